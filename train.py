"""Train Self-Classifier (or TWIST, or SeLa) on unlabelled images, one process or many under torchrun.

    python train.py --dataset synthetic                       # a laptop CPU, under a minute
    python train.py --dataset folder --data_dir ~/photos --cls_sizes 12 36 120   # your own pictures
    python train.py --dataset folder --data_dir ~/photos --cls_sizes 12 36 120 --init model_800.pth.tar
                                            # the same from the authors' network: its backbone and MLP, new heads
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data_dir /path/to/imagenet
Running the same command again resumes from OUT_DIR/ckpt.pt. SIGTERM or SIGUSR1 saves the step in flight and
exits with status 75 (torchrun reports 1), for a job script to requeue the same command.
"""
import argparse
import atexit
import datetime
import inspect
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import folder
import loss as losses
import metrics
from lars import LARS
from model import NNQueue, build_model, init_from, load_checkpoint, read_pretrained, sync_bn_groups
from model import failed_save, save_atomically
from preempt import REQUEUE_STATUS, SAVE_FAILED_STATUS, OutDirLock, StopSignal, exit_process, init_process_group
from progress import Progress, fmt_time

# -----------------------------------------------------------------------------
# arguments: None means "the dataset's recipe below"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", default="synthetic", choices=list(data.DATASETS))
parser.add_argument("--data_dir", default=None, help="dataset location (fashion_mnist: /usr/share/datasets/fashion-mnist; "
                    "folder: every picture below it; first-level sub-folders, if every picture sits in one, are "
                    "classes used only for scoring; DIR/train and DIR/val, when both exist, are the splits)")
parser.add_argument("--channels", type=int, default=None, choices=[1, 3], help="folder: 1 reads the pictures as "
                    "greyscale (scans, X-rays, micrographs) into a 1-channel network, 3 as RGB; default 1 where the "
                    "pictures have no colour, else 3")
parser.add_argument("--skip_unreadable", action="store_true", help="folder: train without the files that cannot "
                    "be decoded, listed with the reasons in OUT/skipped.txt (default: name them and stop before training)")
parser.add_argument("--max_pixels", type=int, default=folder.DEFAULT_MAX_PIXELS, help="folder: a picture of more pixels "
                    "is unreadable (decoding 15,000 x 15,000 px takes 675 MB); default PIL's limit, 0 = no limit")
parser.add_argument("--download", action="store_true", help="download the dataset with torchvision (needs a network)")
parser.add_argument("--holdout", type=int, default=0, help="train without the last N training images (a fixed "
                    "permutation); evaluate.py then scores on them instead of the test set (for tuning)")
parser.add_argument("--out_dir", default=None, help="checkpoint and logs go here (default: out/DATASET-METHOD)")
parser.add_argument("--method", default="self_classifier", choices=["self_classifier", "twist", "sela"],
                    help="self_classifier (Amrani et al.), twist (Wang et al.) or sela (Asano et al.)")
parser.add_argument("--recipe", default=None, choices=["bs2048", "100ep", "800ep"], help="imagenet: the published run "
                    "to reproduce: bs2048 (default, 8 GPUs x 256: the authors' batch-size ablation), 100ep or 800ep "
                    "(the paper's runs, global batch 4,092, so the process count must divide 4,092: 6, 12, 22, 66, "
                    "...); TWIST takes its batch and epochs; SeLa has its authors' run instead")
parser.add_argument("--dry_run", action="store_true", help="print the settings after the recipe as JSON and exit")
# model
parser.add_argument("--init", default=None, help="start from the network in this file: a published one (what "
                    "evaluate.py --ckpt reads) or a train.py checkpoint. Its backbone always, its projection MLP and "
                    "heads where their shapes match this run's, new ones otherwise; --arch and the MLP sizes default "
                    "to the file's. A resume ignores it: the checkpoint wins")
parser.add_argument("--arch", default=None, help="resnet18, resnet50, alexnet or cnn (a 4-conv network for CPUs)")
parser.add_argument("--width", type=int, default=None, help="channels of the first conv of --arch cnn (x2, x4, x8 after)")
parser.add_argument("--mlp_layers", type=int, default=None, help="Linear layers of the projection MLP (0 = none)")
parser.add_argument("--mlp_hidden", type=int, default=None, help="hidden width of the projection MLP")
parser.add_argument("--mlp_out", type=int, default=None, help="embedding dimension (output of the MLP)")
parser.add_argument("--cls_sizes", type=int, nargs="+", default=None, help="classes of each head; head 0 is evaluated "
                    "and names the classes. K unknown: give head 0 more classes than you expect (an over-split class "
                    "is easier to merge by eye than a mixed one) and extra heads of about 3K and 10K")
# objective: every flag of this group is compared on resume (MUST_MATCH below), with no list to keep
flags = parser.add_argument_group("objective", "compared on resume: a checkpoint trained with other values is "
                                  "refused")
flags.add_argument("--row_tau", type=float, default=0.1, help="temperature of the softmax over classes (SeLa: of its "
                   "cross-entropy on the heads' cosine logits)")
flags.add_argument("--col_tau", type=float, default=0.05, help="temperature of the softmax over samples")
flags.add_argument("--no_prior", action="store_true", help="self_classifier without Bayes' rule and its uniform "
                   "prior: plain cross-entropy between the views at --row_tau, which collapses (an experiment)")
flags.add_argument("--twist_lam1", type=float, default=0.0, help="TWIST weight of the extra mean sample entropy")
flags.add_argument("--twist_lam2", type=float, default=1.0, help="TWIST weight of the batch entropy")
flags.add_argument("--twist_tau", type=float, default=None, help="TWIST temperature of the entropy terms (default: "
                   "the paper's 1.0; 0.5 in the CPU recipes, synthetic and (fashion_)mnist)")
flags.add_argument("--sela_relabels", type=int, default=None, help="SeLa: Sinkhorn-Knopp relabellings over the run, "
                   "the first before any step (default: 400 on cifar10/cifar100 as SeLa's cifar.py, 100 on imagenet "
                   "as its main.py, else --epochs of them)")
flags.add_argument("--sela_schedule", default=None, choices=["quadratic", "linear"], help="SeLa: relabelling i of n "
                   "at (i/n)^2 of the run (dense early, its ImageNet code) or at i/n (its CIFAR code; the default on "
                   "cifar10/cifar100, quadratic elsewhere)")
flags.add_argument("--sela_lamb", type=float, default=None, help="SeLa: Sinkhorn-Knopp exponent lambda (P^lambda; "
                   "default: 10 on cifar10/cifar100 as SeLa's CIFAR code, else 25 as its ImageNet code)")
flags.add_argument("--queue_len", type=int, default=None, help="nearest-neighbour queue length in samples (0 = off); "
                   "Self-Classifier only: TWIST and SeLa never use one, and refuse a nonzero length")
# augmentation
parser.add_argument("--n_local", type=int, default=None, help="local crops per image (0 = two global crops only)")
parser.add_argument("--size", type=int, default=None, help="global crop side in px")
parser.add_argument("--local_size", type=int, default=None, help="local crop side in px")
parser.add_argument("--crop_scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="area range of the global crops, as fractions of the image (default: the dataset's)")
parser.add_argument("--no_flip", action="store_true", help="no horizontal flips: for pictures whose mirror image "
                    "means something else (text, digits, scans of forms)")
# optimisation
parser.add_argument("--epochs", type=int, default=None, help="passes over the training set")
parser.add_argument("--batch_size", type=int, default=None, help="GLOBAL batch, split evenly over processes")
parser.add_argument("--lr", type=float, default=None, help="base learning rate per 256 images: lr = lr * batch_size / 256")
parser.add_argument("--start_lr", type=float, default=None, help="learning rate at step 0, warming up to lr (absolute)")
parser.add_argument("--warmup_epochs", type=float, default=None, help="linear warmup length in epochs, then cosine")
parser.add_argument("--final_lr_ratio", type=float, default=1e-3, help="the cosine ends at lr * this")
parser.add_argument("--lr_drops", type=float, nargs="*", default=None, metavar="EPOCH", help="a step schedule "
                    "instead of the cosine: lr x 0.1 at each of these epochs (SeLa's ImageNet code: 150 300 350)")
parser.add_argument("--optimizer", default=None, choices=["lars", "sgd"], help="SGD momentum, with LARS scaling or plain")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (LARS wraps the same SGD)")
parser.add_argument("--weight_decay", type=float, default=None, help="L2 weight decay on all parameters")
# system
parser.add_argument("--seed", type=int, default=0, help="initial weights, data order and crops all follow it")
parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
parser.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="CUDA: bf16 autocast (losses stay "
                    "fp32) or all fp32 as the authors ran (default: fp32 for --recipe 100ep/800ep, else bf16); CPU: fp32")
parser.add_argument("--bn_group", type=int, default=None, help="CUDA: processes per SyncBatchNorm group, consecutive "
                    "ranks (0 = all; 1 = no sync). Default: Self-Classifier the recipe's (imagenet: 22 as the authors' "
                    "100/800-epoch runs, 32 for bs2048), else 0; TWIST 0 as its code; SeLa 1 (its code syncs nothing). "
                    "CPU: no effect, each process keeps its own statistics")
parser.add_argument("--twist_bn_images", type=int, default=256, help="CUDA, TWIST: images per group of its logit "
                    "BatchNorm (its code: 256, 2 GPUs x 128); a multiple of the per-process batch. CPU: no effect")
parser.add_argument("--workers", type=int, default=None, help="data loading processes per training process")
parser.add_argument("--log_every", type=int, default=None, help="steps between log lines, each also a record of "
                    "OUT/log.jsonl")
parser.add_argument("--eval_every", type=int, default=None, help="every this many epochs and at the last, score head "
                    "0 on the evaluation split (center crops, eval mode) into OUT/log.jsonl: NMI, AMI, ARI and ACC "
                    "where there are labels, classes used and balance always. The labels are read for this record "
                    "alone, never for training or for choosing anything. 0 = off; default 10 on folder, else 1")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--ckpt_minutes", type=float, default=0, help="also checkpoint within an epoch every this many "
                    "minutes (0 = only at epoch ends); a resume continues from that step")
parser.add_argument("--dist_timeout", type=float, default=10, help="minutes a process waits for the others to "
                    "create a process group or join a collective before it stops with a message naming its rank and "
                    "step, for torchrun --max_restarts to restart the job from its checkpoint (or the job to fail)")
parser.add_argument("--keep_every", type=int, default=0, help="also keep a copy of the checkpoint every this many "
                    "epochs as OUT/ckpt_epN.pt, to evaluate the run part way (0 = off)")
parser.add_argument("--collapse_frac", type=float, default=0.5, help="warn when head 0 predicts fewer than this "
                    "fraction of its classes in the global batch (a check that assumes classes of about equal "
                    "size, as the uniform prior does) ...")
parser.add_argument("--collapse_logs", type=int, default=5, help="... at this many log steps in a row")
args = parser.parse_args()
if args.recipe and args.dataset != "imagenet":
    raise SystemExit(f"--recipe {args.recipe}: the recipes are the published ImageNet runs; {args.dataset} has one recipe")
if args.method != "self_classifier":
    if args.queue_len:  # the queue is part of Self-Classifier's method, neither TWIST's nor SeLa's
        raise SystemExit(f"--queue_len {args.queue_len}: the nearest-neighbour queue is Self-Classifier's; {args.method} "
                         f"never uses one (leave --queue_len out or pass 0)")
    args.queue_len = 0
    if args.bn_group is None:
        args.bn_group = 0 if args.method == "twist" else 1

# Recipes; the runs behind each small-data choice are in docs/experiments.md, by question.
# imagenet: the paper's, completed by one of the published runs (IMAGENET_RUNS below).
# cifar10: the CIFAR-10 report's ResNet-18 recipe. The CPU recipes use plain SGD: in a few hundred steps
# LARS, whose steps are 1e-3 of the weight norm, learns too slowly ("why SGD instead of LARS on a CPU").
# synthetic: 6 epochs, as head 0's clusters settle early, and 2 data workers, as augmenting a 16-px image
# costs as much as the step on it ("the synthetic set, seed by seed").
RECIPES = {
    "imagenet": dict(arch="resnet50", mlp_layers=2, mlp_hidden=4096, mlp_out=128, cls_sizes=[1000, 2000, 4000, 8000],
                     queue_len=262144, n_local=6, warmup_epochs=10, weight_decay=1e-6, optimizer="lars", workers=10,
                     log_every=50),
    "stl10": dict(arch="resnet18", mlp_layers=2, mlp_hidden=512, mlp_out=128, cls_sizes=[10, 20, 40, 80],
                  queue_len=16384, n_local=4, epochs=200, batch_size=256, lr=0.3, start_lr=0.0, warmup_epochs=10,
                  weight_decay=1e-6, optimizer="lars", workers=8, log_every=50),
    "cifar10": dict(arch="resnet18", mlp_layers=2, mlp_hidden=512, mlp_out=128, cls_sizes=[10, 20, 40, 80],
                    queue_len=0, n_local=0, epochs=100, batch_size=64, lr=0.3, start_lr=0.0, warmup_epochs=10,
                    weight_decay=1e-6, optimizer="lars", workers=4, log_every=100),
    "cifar100": dict(arch="resnet18", mlp_layers=2, mlp_hidden=512, mlp_out=128, cls_sizes=[100, 200, 400, 800],
                     queue_len=0, n_local=0, epochs=100, batch_size=256, lr=0.3, start_lr=0.0, warmup_epochs=10,
                     weight_decay=1e-6, optimizer="lars", workers=4, log_every=50),
    "fashion_mnist": dict(arch="cnn", width=32, mlp_layers=2, mlp_hidden=512, mlp_out=128, cls_sizes=[10, 30, 100],
                          queue_len=0, n_local=0, epochs=3, batch_size=256, lr=0.5, start_lr=0.0, warmup_epochs=1,
                          weight_decay=1e-6, optimizer="sgd", workers=1, log_every=20, twist_tau=0.5),
    # folder: a few thousand pictures in under 30 min on a laptop CPU, hence width 16 (docs/experiments.md,
    # "your own folder"); on GPUs scale by flags, e.g. --arch resnet18 --size 128 --n_local 4 --epochs 200
    "folder": dict(arch="cnn", width=16, mlp_layers=2, mlp_hidden=512, mlp_out=128, cls_sizes=[10, 30, 100],
                   queue_len=0, n_local=0, epochs=30, batch_size=128, lr=0.5, start_lr=0.0, warmup_epochs=2,
                   weight_decay=1e-6, optimizer="sgd", workers=2, log_every=10, twist_tau=0.5, eval_every=10),
    # small pictures (median side of 32 px or less): see folder.py: folder_recipe
    "synthetic": dict(arch="cnn", width=16, mlp_layers=2, mlp_hidden=256, mlp_out=64, cls_sizes=[10, 20],
                      queue_len=0, n_local=0, epochs=6, batch_size=256, lr=0.5, start_lr=0.0, warmup_epochs=1,
                      weight_decay=1e-6, optimizer="sgd", workers=2, log_every=10, twist_tau=0.5),
}
RECIPES["mnist"] = RECIPES["fashion_mnist"]
# The authors' ImageNet runs (scripts/train_100ep.sh, train_800ep.sh, ablation/batch_size/train_100ep_bs_2048.sh of
# elad-amrani/self-classifier): their lr is absolute at their global batch, ours is per 256 images, hence * 256 / batch.
# bs2048 stays in bf16: fp32 at 256 crops of 2 x 224 + 6 x 96 px per GPU was not tried here.
IMAGENET_RUNS = {
    "bs2048": dict(batch_size=2048, lr=2.4 * 256 / 2048, start_lr=0.3, epochs=100, bn_group=32, precision="bf16"),
    "100ep": dict(batch_size=4092, lr=4.8 * 256 / 4092, start_lr=0.3, epochs=100, bn_group=22, precision="fp32"),
    "800ep": dict(batch_size=4092, lr=3.2 * 256 / 4092, start_lr=0.2, epochs=800, bn_group=22, precision="fp32"),
}
# TWIST and SeLa on the shared network, with what their authors' code sets that the network leaves free
# (bytedance/TWIST 796d36e, yukimasano/self-label 3891e37; docs/fidelity.md has the lines and what stays different).
# TWIST: one head of 4,096 classes, lr 0.5 per 256 images warming up from 0, wd 1.5e-6; batch and epochs from
# --recipe (bs2048 is TWIST's batch too). SeLa: its resnet.sh run, 10 heads of 3,000, SGD at 0.08 for batch 256,
# x 0.1 at epochs 150, 300 and 350, wd 1e-5, 400 epochs, crops of 0.08-1, 100 quadratic relabellings; CIFAR: 400
# relabellings evenly spaced.
METHOD_RECIPES = {
    ("imagenet", "twist"): dict(cls_sizes=[4096], lr=0.5, start_lr=0.0, weight_decay=1.5e-6),
    ("imagenet", "sela"): dict(cls_sizes=[3000] * 10, optimizer="sgd", batch_size=256, lr=0.08, warmup_epochs=0,
                               start_lr=0.08, lr_drops=[150, 300, 350], weight_decay=1e-5, epochs=400, n_local=0,
                               crop_scale=[0.08, 1.0], sela_relabels=100, precision="fp32"),
    ("cifar10", "sela"): dict(sela_relabels=400, sela_schedule="linear"),
    ("cifar100", "sela"): dict(sela_relabels=400, sela_schedule="linear"),
}


# --init: the network's shape comes from the file, or on a resume from the checkpoint, which wins over --init
args.out_dir = args.out_dir or f"out/{args.dataset}-{args.method}"
ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
resume = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
ckpt_seen = os.stat(ckpt_path) if resume is not None else None  # compared once the out dir is held
init, init_note = None, None
if resume is not None and resume["args"].get("init"):
    if args.init and args.init != resume["args"]["init"]:
        init_note = f"--init {args.init} not used: resuming {ckpt_path}, which started from {resume['args']['init']}"
    args.init = resume["args"]["init"]
    shape = {k: resume["args"][k] for k in ("arch", "width", "mlp_layers", "mlp_hidden", "mlp_out")}
elif args.init and resume is not None:
    init_note, args.init, shape = f"--init {args.init} not used: resuming {ckpt_path}, which started afresh", None, {}
elif args.init:
    if not os.path.isfile(args.init):
        raise SystemExit(f"--init {args.init}: no such file")
    init = read_pretrained(args.init)
    c = init["config"]
    # a backbone alone gives the arch only
    shape = dict(arch=c["arch"], **({"width": c["width"]} if c["arch"] == "cnn" else {}),
                 **{k: c[k] for k in ("mlp_layers", "mlp_hidden", "mlp_out") if c["mlp_layers"]})
else:
    shape = {}
for k, v in shape.items():
    if getattr(args, k) is None:
        setattr(args, k, v)
if args.dataset == "imagenet":
    if args.method == "sela" and args.recipe:
        raise SystemExit(f"--recipe {args.recipe}: the recipes are Self-Classifier's published runs; SeLa on imagenet "
                         f"follows its authors' run (batch 256, 400 epochs), changed by flags")
    if args.method != "sela":
        args.recipe = args.recipe or "bs2048"
        RECIPES["imagenet"].update(IMAGENET_RUNS[args.recipe])
if args.data_dir is None:
    args.data_dir = data.FASHION_MNIST_DIR if args.dataset == "fashion_mnist" else f"data/{args.dataset}"
if args.dataset == "folder":  # absolute in args.json and the checkpoint: evaluate.py may run from another folder
    args.data_dir = os.path.abspath(args.data_dir)
if args.max_pixels < 0:
    raise SystemExit(f"--max_pixels {args.max_pixels}: give a number of pixels, or 0 for no limit")
args.folder_recipe = None
if args.dataset == "folder":
    try:  # the train split's files, sampled before the recipe is fixed
        files = data.build_dataset("folder", args.data_dir, "train", None)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    side, colour = folder.picture_stats(files)
    if args.init:  # a network from a file keeps the stem and input channels it was trained with
        small, args.folder_recipe = {}, f"the recipe for photos, as --init {args.init} was trained on them"
    else:
        small, args.folder_recipe = folder.folder_recipe(side, colour)
        # grey pictures in three channels would only triple the first conv's input: read them as one channel
        args.channels = args.channels or (3 if colour else 1)
        args.folder_recipe += f", {args.channels} channel{'s' * (args.channels > 1)}"
    RECIPES["folder"].update(small)
RECIPES["cifar10"]["sela_lamb"] = RECIPES["cifar100"]["sela_lamb"] = 10.0  # SeLa's cifar.py (its ImageNet code: 25)
RECIPES[args.dataset].update(METHOD_RECIPES.get((args.dataset, args.method), {}))
for k, v in RECIPES[args.dataset].items():
    if getattr(args, k, None) is None:
        setattr(args, k, v)
# twist_tau: the paper's 1.0 leaves TWIST's predictions soft in the CPU recipes, which set 0.5
# (docs/experiments.md, "why --twist_tau 0.5 in the CPU recipes")
for k, v in dict(width=32, twist_tau=1.0, eval_every=1, sela_lamb=25.0, sela_schedule="quadratic", bn_group=0,
                 precision="bf16", size=data.DATASETS[args.dataset]["size"],
                 local_size=data.DATASETS[args.dataset]["local_size"],
                 crop_scale=list(data.default_crop_scale(args.dataset, args.n_local))).items():
    if getattr(args, k) is None:
        setattr(args, k, v)
if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
    raise SystemExit(f"--crop_scale {args.crop_scale[0]:g} {args.crop_scale[1]:g}: need 0 < LO <= HI <= 1")
if args.no_prior and args.method != "self_classifier":
    raise SystemExit(f"--no_prior removes Self-Classifier's prior; --method {args.method} has none")
if args.channels is not None and args.dataset != "folder":
    raise SystemExit(f"--channels is for --dataset folder; {args.dataset} has {data.DATASETS[args.dataset]['chans']}")
args.in_chans = args.channels or data.DATASETS[args.dataset]["chans"]
args.small_stem = args.size <= 32
if args.sela_relabels is not None and args.sela_relabels < 1:
    raise SystemExit(f"--sela_relabels {args.sela_relabels}: SeLa needs at least one relabelling (the first at step 0)")


def relabel_points():
    # SeLa: relabelling i of n at i/n of the run (linear) or (i/n)^2 (quadratic: dense early), the first at step 0
    n = args.sela_relabels or args.epochs
    return [(i / n) ** (2 if args.sela_schedule == "quadratic" else 1) for i in range(n)]


if args.dry_run:
    peak = args.lr * args.batch_size / 256
    drops = sum(d < args.epochs for d in args.lr_drops or ())
    final = peak * 0.1 ** drops if args.lr_drops else peak * args.final_lr_ratio
    sela = {"sela_relabel_epochs": [round(args.epochs * f, 4) for f in relabel_points()]} if args.method == "sela" else {}
    print(json.dumps(dict(vars(args), peak_lr=peak, final_lr=final, **sela)))
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# processes and device: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python is world size 1
use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
args.precision = args.precision if use_cuda else "fp32"  # what runs, for args.json and the resume check
ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
dist_timeout = datetime.timedelta(minutes=args.dist_timeout)
step, doing = None, "creating the process group"  # where a failure happened, for its last line below


def report_failure(kind, e, tb):
    # torchrun puts every process's traceback in one log: the last line names the rank and the step
    sys.__excepthook__(kind, e, tb)
    where = doing if step is None else f"after step {step}/{total_steps}"
    waited = isinstance(e, dist.DistError) or "Timed out" in str(e)  # gloo's timeouts are plain RuntimeErrors
    first = (str(e).splitlines() or [""])[0]
    print(f"rank {os.environ.get('RANK', 0)} stopped {where}: {kind.__name__}: {first}"
          + (f" (--dist_timeout {args.dist_timeout:g} min)" if waited else ""), file=sys.stderr, flush=True)


if ddp:
    sys.excepthook = report_failure
    init_process_group("nccl" if use_cuda else "gloo", dist_timeout)
doing = "setting up"
rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
local_rank = int(os.environ.get("LOCAL_RANK", 0))
if use_cuda:
    torch.cuda.set_device(local_rank)
device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
master = rank == 0


def print0(*a):
    if master:
        print(*a, flush=True)


# one run per out dir: rank 0 holds OUT/run.lock until it exits, and every process follows its verdict
lock = OutDirLock(args.out_dir)
refusal = None
if master:
    try:
        lock.acquire()
    except OSError as e:
        refusal = f"--out_dir {args.out_dir}: cannot write there ({e.strerror or e})"
    if lock.busy:
        refusal = (f"{args.out_dir} is in use by another run: {lock.busy} (it holds {lock.path}). Wait for it to "
                   f"end or stop it, or give this run another --out_dir")
    now = os.stat(ckpt_path) if os.path.exists(ckpt_path) else None
    if not refusal and (now and (now.st_mtime_ns, now.st_size, now.st_ino)) != \
            (ckpt_seen and (ckpt_seen.st_mtime_ns, ckpt_seen.st_size, ckpt_seen.st_ino)):
        refusal = (f"{ckpt_path} was written by another run while this one started (that run has ended); the same "
                   f"command again resumes from it")
    if lock.unsupported:
        print(f"warning: {lock.path}: the file system keeps no locks ({lock.unsupported}); nothing stops a second "
              f"run from writing to {args.out_dir} too", flush=True)
    elif lock.stale and not refusal:
        print(f"{lock.path}: taking over from {lock.stale}, which is gone", flush=True)
if ddp:
    verdict = [refusal]
    dist.broadcast_object_list(verdict, 0)
    refusal = verdict[0]
if refusal:
    raise SystemExit(refusal if master else 1)
atexit.register(lock.release)  # every exit but exit_process's, which releases it first
if args.batch_size % world_size:
    raise SystemExit(f"--batch_size {args.batch_size} (global) does not divide by {world_size} processes")
local_batch = args.batch_size // world_size
torch.manual_seed(args.seed)  # the same initial weights on every process
torch.backends.cudnn.benchmark = True
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")  # loss stays float32

# -----------------------------------------------------------------------------
# data
t0 = time.time()  # a folder's listing and scan, for its line below
try:
    dataset = data.build_dataset(args.dataset, args.data_dir, "train", None, args.download, args.seed, args.holdout,
                                 args.in_chans)
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(str(e)) from None
skipped, args.mean, args.std = [], None, None  # None: the dataset's normalisation
skipped_lines = []  # OUT/skipped.txt: (path below --data_dir, reason) of each file left out, of either split
caches = {}  # name: (key, files, scan) of the folder scans to keep in OUT once the resume check has passed


def scan_folder(ds, name):
    """folder.shared_scan with OUT/name as its cache; a new scan is kept in `caches` to be written after the resume
    check. Returns (the Scan, whether it came from the cache)."""
    ds.max_pixels = args.max_pixels
    scan, made = folder.shared_scan(ds, os.path.join(args.out_dir, name), args.workers, rank, world_size)
    if made:
        caches[name] = made
    return scan, made is None


def refuse_unreadable(bad, total, where, way_out="to train without them"):
    if bad and not args.skip_unreadable:
        raise SystemExit(f"{len(bad)} of {total} files {where} cannot be decoded:\n  "
                         + "\n  ".join(f"{f}: {e}" for f, e in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
                         + f"\nremove or fix them, or pass --skip_unreadable {way_out}")


if args.dataset == "folder":
    # every file decoded once before any step (JPEGs at 1/8 scale): a bad file stops the run now, not at
    # step 5,000; the same pass measures the folder's mean and std, which the network's input is normalised by
    scan, cached = scan_folder(dataset, "scan.json")
    args.mean, args.std = scan.mean, scan.std
    refuse_unreadable(scan.unreadable, len(dataset), f"below {args.data_dir}")
    skipped = scan.unreadable
    dataset.drop([f for f, _ in skipped])
    skipped_lines += [(os.path.relpath(os.path.join(dataset.root, f), args.data_dir), e) for f, e in skipped]
    dataset.draft_side = 2 * args.size  # a global crop of a quarter of the picture keeps its full resolution
    args.folder_files = dataset.fingerprint()
    print0(f"folder recipe: {args.folder_recipe} (flags given win)")
    w, h = scan.median_size
    colour = (f"{scan.colour_pictures:,} of {len(dataset):,} in colour" if scan.colour else "none in colour")
    unreadable = (f"{len(skipped)} unreadable, left out ({folder.few([f for f, _ in skipped])}; all with the reasons "
                  f"in {os.path.join(args.out_dir, 'skipped.txt')})" if skipped else "0 unreadable")
    took = (f"scan of {scan.files:,} files read from {os.path.join(args.out_dir, 'scan.json')} (the same paths, sizes "
            f"and times) in {time.time() - t0:.1f} s" if cached else f"scanned {scan.files:,} files in {time.time() - t0:.1f} s")
    print0(f"{took}: {unreadable}, "
           f"mean {args.mean}, std {args.std}, median {w} x {h} px, {colour}, "
           f"classes: {f'{len(dataset.classes)} ({folder.few(dataset.classes, 10)})' if dataset.classes else 'none (unlabelled)'}")
    if scan.truncated:
        print0(f"warning: {len(scan.truncated)} truncated file(s), read as far as they go (as viewers show them): "
               f"{folder.few(scan.truncated, 10)}")
    if scan.large:
        print0(f"warning: {len(scan.large)} picture(s) above PIL's limit of {folder.DEFAULT_MAX_PIXELS:,} pixels, read "
               f"as --max_pixels allows (each takes memory for its full size): {folder.few(scan.large, 10)}")
dataset.transform = data.train_transform(args.dataset, args.n_local, args.size, args.local_size, args.crop_scale,
                                         args.mean, args.std, not args.no_flip)
images_text = f"{len(dataset):,} image{'s' if len(dataset) != 1 else ''}"
if max(args.cls_sizes) > len(dataset):
    raise SystemExit(f"--cls_sizes {' '.join(map(str, args.cls_sizes))}: a head of {max(args.cls_sizes)} classes "
                     f"for {images_text}; every class needs images, so pick sizes of at most {len(dataset)}")
if len(dataset) < args.batch_size:
    raise SystemExit(f"the {args.dataset} training set has {images_text}, fewer than one global batch "
                     f"of {args.batch_size}; lower --batch_size")


def center_crop_set(split):
    """A split as evaluate.py reads it, for scoring and SeLa's relabelling: center crops; a folder's pictures
    decoded no larger than the crop needs."""
    tf = data.eval_transform(args.dataset, args.size, args.mean, args.std)
    ds = data.build_dataset(args.dataset, args.data_dir, split, tf, holdout=args.holdout, channels=args.in_chans)
    if args.dataset == "folder":
        ds.draft_side, ds.max_pixels = args.size, args.max_pixels
    return ds


# --eval_every: the evaluation split, checked now rather than at the first epoch's end
eval_set, labelled, n_true = None, False, 1  # n_true: rows of the (true class x class) table; 1 without labels
if args.eval_every:
    try:
        eval_set = center_crop_set("eval")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--eval_every {args.eval_every}: {e}\n(--eval_every 0 trains without scoring)") from None
    labelled = args.dataset != "folder" or bool(eval_set.classes)
    if labelled:
        n_true = len(eval_set.classes) if args.dataset == "folder" else data.DATASETS[args.dataset]["classes"]
    if args.dataset == "folder":
        bad = scan_folder(eval_set, "scan_val.json")[0].unreadable if eval_set.root != dataset.root else skipped
        refuse_unreadable(bad, len(eval_set), f"of the evaluation split below {eval_set.root}",
                          "to train and score without them, or --eval_every 0 to train without scoring")
        eval_set.drop([f for f, _ in bad])
        if eval_set.root != dataset.root:
            skipped_lines += [(os.path.relpath(os.path.join(eval_set.root, f), args.data_dir), e) for f, e in bad]
    eval_loader = data.pass_loader(eval_set, 256, rank, world_size, args.workers)
sampler = data.EpochSampler(len(dataset), args.batch_size, world_size, rank, args.seed)
loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.workers,
                                     pin_memory=use_cuda, drop_last=True, persistent_workers=args.workers > 0)
steps_per_epoch, total_steps = sampler.steps, sampler.steps * args.epochs

# -----------------------------------------------------------------------------
# model, optimiser, queue
model = build_model(vars(args))
if init is not None:
    taken, new = init_from(model, init)
    print0(init["report"])
    print0(f"--init: kept {', '.join(taken)}; new: {', '.join(new) or 'nothing'}")
    del init
if init_note:
    print0(init_note)


def sync_bn(module, size):
    # SyncBatchNorm over groups of `size` consecutive ranks, as the authors' runs; every rank creates every group
    if not use_cuda or size == 1:
        return module
    try:
        groups = sync_bn_groups(world_size, size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    handles = [dist.new_group(g, timeout=dist_timeout) for g in groups] if ddp and len(groups) > 1 else [None]
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=handles[rank // len(groups[0])])


if args.method == "twist" and use_cuda and ddp and args.twist_bn_images % local_batch:
    raise SystemExit(f"--twist_bn_images {args.twist_bn_images} is not a multiple of the {local_batch} images per process")
logit_bn, model.logit_bn = model.logit_bn, None  # TWIST's logit BatchNorm has its own groups
model = sync_bn(model, args.bn_group)
model.logit_bn = sync_bn(logit_bn, max(1, args.twist_bn_images // local_batch)) if logit_bn is not None else None
# channels_last: faster convolutions on GPUs and CPUs alike (the synthetic recipe's step: 1.4x on one core)
model.to(device, memory_format=torch.channels_last)
optimizer_cls = LARS if args.optimizer == "lars" else torch.optim.SGD
optimizer = optimizer_cls(model.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.weight_decay)
queue = NNQueue(args.queue_len, model.mlp.out_dim).to(device) if args.queue_len > 0 else None
# SeLa: one pseudo-label per training image and head, a balanced random assignment to start with
# (the same on every process: the generator is seeded), then Sinkhorn-Knopp at scheduled steps
pseudo_labels, relabel_steps = None, set()
if args.method == "sela":
    label_set = center_crop_set("train")  # the relabelling pass sees each training image once, as a center crop
    if args.dataset == "folder":
        label_set.drop([f for f, _ in skipped])
    label_loader = data.pass_loader(label_set, local_batch, rank, world_size, args.workers)
    g = torch.Generator().manual_seed(args.seed)
    pseudo_labels = torch.stack([torch.randperm(len(dataset), generator=g) % c for c in args.cls_sizes]).to(device)
    relabel_steps = {int(total_steps * f) for f in relabel_points()}

# resume: the same command again continues from the checkpoint, or refuses with the differences
MUST_MATCH = ("dataset", "holdout", "method", "optimizer", "momentum", "weight_decay", "arch", "width", "in_chans",
              "small_stem", "mlp_layers", "mlp_hidden", "mlp_out", "cls_sizes", "batch_size", "n_local",
              "size", "local_size", "crop_scale", "no_flip", "seed", "precision",
              *(a.dest for a in flags._group_actions))  # --row_tau, --col_tau, ... and any flag added there
# what checkpoints older than a flag trained with
BEFORE_FLAG = dict(precision="bf16" if use_cuda else "fp32", sela_schedule="quadratic")
start_step = 0
if resume is not None:
    ckpt, resume = resume, None
    # a setting added after the checkpoint was written: what such runs trained with, else the flag's default
    keys = MUST_MATCH + (("folder_files",) if args.dataset == "folder" else ())
    old = {k: ckpt["args"].get(k, BEFORE_FLAG.get(k, parser.get_default(k))) for k in keys}
    diff = [f"{k}: checkpoint {old[k]!r}, now {getattr(args, k)!r}" for k in keys if old[k] != getattr(args, k)]
    if args.dataset == "folder" and "scan.json" in caches:
        # OUT/scan.json still holds the files the checkpoint's run scanned (a new scan is kept only after this check)
        now = [r for r in caches["scan.json"][1] if r[0] not in dict(skipped)]
        changes = folder.changes_since(os.path.join(args.out_dir, "scan.json"), old["folder_files"], now)
        if changes and old["folder_files"] != args.folder_files:
            diff = [f"folder_files: the folder changed since the checkpoint: {folder.describe_changes(*changes)}"
                    if d.startswith("folder_files:") else d for d in diff]
        elif changes and changes[2]:  # the same files in the same order: the run goes on, but should know
            print0(f"warning: {len(changes[2])} file(s) below {args.data_dir} changed in size or modification time "
                   f"since the checkpoint's scan ({folder.few(changes[2])}); resuming on them")
    if diff:
        raise SystemExit(f"{ckpt_path} was trained with other settings; use another --out_dir or the same flags:\n  "
                         + "\n  ".join(diff))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if queue is not None:
        queue.load_state_dict(ckpt["queue"])
    if pseudo_labels is not None:
        pseudo_labels.copy_(ckpt["pseudo_labels"])
    start_step = ckpt["step"]
    print0(f"resumed from {ckpt_path} at epoch {ckpt['epoch']}, step {start_step}")
    del ckpt
for name, (key, files, scan) in caches.items() if master else ():  # kept only now: a refused resume keeps the old list
    folder.write_scan_cache(os.path.join(args.out_dir, name), key, files, scan)
raw_model = model
if args.compile:
    model = torch.compile(model)
if ddp:
    # BatchNorm statistics are not broadcast from rank 0 before each forward: on a CPU each process keeps its
    # own, on CUDA SyncBatchNorm makes them the same within each --bn_group; checkpoints hold rank 0's. torch 2.13
    # renamed the switch (the old name warns), and the new one also broadcasts them once here: a no-op, as every
    # process built the same model or loaded the same checkpoint.
    new_name = "forward_sync_buffers" in inspect.signature(DDP).parameters
    no_sync = dict(forward_sync_buffers=False) if new_name else dict(broadcast_buffers=False)
    model = DDP(model, device_ids=[local_rank] if use_cuda else None, **no_sync)


def lr_at(step):
    # linear warmup from start_lr to lr, then a cosine to lr * final_lr_ratio (or --lr_drops' steps), per iteration
    lr = args.lr * args.batch_size / 256
    warmup = int(args.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return args.start_lr + (lr - args.start_lr) * step / warmup
    if args.lr_drops:
        return lr * 0.1 ** sum(step >= d * steps_per_epoch for d in args.lr_drops)
    t = (step - warmup) / max(1, total_steps - warmup)
    final = lr * args.final_lr_ratio
    return final + 0.5 * (lr - final) * (1 + math.cos(math.pi * t))


def objective(logits, index):
    if args.method == "twist":
        return losses.twist_loss(logits, args.twist_lam1, args.twist_lam2, args.twist_tau)
    if args.method == "sela":
        return losses.sela_loss(logits, pseudo_labels[:, index], args.row_tau)
    if args.no_prior:
        return losses.view_cross_entropy(logits, args.row_tau)
    return losses.self_classifier_loss(logits, args.row_tau, args.col_tau)


@torch.no_grad()
def relabel():
    """SeLa: log p(y|x) of every training image (center crops, eval mode), then Sinkhorn-Knopp per
    head. Each process labels its share; the shares are gathered so every table is the same."""
    raw_model.eval()
    mine = torch.tensor(label_loader.dataset.indices, dtype=torch.long)  # this process's share of the training images
    # the log-probabilities wait in host memory in float16 and go to the device one head at a time:
    # on ImageNet, 10 heads of 3000 classes over 160k images per process would take 19 GB in float32
    log_p = [[] for _ in args.cls_sizes]
    progress = Progress("relabelling", len(label_set))
    for x, _, _ in label_loader:
        with autocast:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            for h, logits in enumerate(raw_model.predict(x)[1]):
                log_p[h].append(torch.log_softmax(logits.float() / args.row_tau, dim=1).to("cpu", torch.float16))
        progress.update(len(x) * world_size)  # rank 0's share stands for every process's
    pad = -(-len(label_set) // world_size) - len(mine)  # all_gather needs equal shares
    index = losses.all_gather_cat(F.pad(mine.to(device), (0, pad), value=-1))
    iters = []
    for h in range(len(args.cls_sizes)):
        labels, n = losses.sinkhorn_knopp(torch.cat(log_p[h]).to(device), args.sela_lamb, return_iters=True)
        iters.append(n)
        log_p[h] = None
        labels = losses.all_gather_cat(F.pad(labels, (0, pad), value=-1))
        pseudo_labels[h, index[index >= 0]] = labels[index >= 0]
    progress.close(f"Sinkhorn-Knopp iterations per head {iters}")
    raw_model.train()


def balance(counts):
    """Entropy of the class sizes over log C: 1 when every class of the head is used equally, as the uniform
    prior asks, 0 when one class takes every image."""
    p = counts.double() / counts.sum()
    return float(-torch.xlogy(p, p).sum() / math.log(len(p))) if len(p) > 1 else 1.0


log_path = os.path.join(args.out_dir, "log.jsonl")


def log_record(**record):
    # one JSON line per log step, epoch end and evaluation, from rank 0 (a line cut by a kill goes at the resume)
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


@torch.no_grad()
def score_head0(epoch):
    """--eval_every: head 0 on the evaluation split as evaluate.py scores it (center crops, eval mode, 256
    images a forward), each process its share; the (true class x class) counts are summed over processes."""
    t0 = time.time()
    # every process scores with rank 0's BatchNorm statistics, the checkpoint's: each process keeps its own on a
    # CPU and per --bn_group; its own come back afterwards, so that training does not depend on --eval_every
    own = [b.clone() for b in raw_model.buffers()] if ddp else []
    if ddp:
        for b in raw_model.buffers():
            dist.broadcast(b, 0)
    raw_model.eval()
    C = args.cls_sizes[0]
    counts = torch.zeros(n_true * C, dtype=torch.long, device=device)
    for x, y, _ in eval_loader:
        with autocast:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            pred = raw_model.predict(x, heads=[0])[1][0].argmax(dim=1)
        row = y.to(device).clamp(min=0) if labelled else torch.zeros_like(pred)
        counts.index_add_(0, row * C + pred, torch.ones_like(pred))
    if ddp:
        dist.all_reduce(counts)
    for b, mine in zip(raw_model.buffers(), own):
        b.copy_(mine)
    raw_model.train()
    counts = counts.view(n_true, C).cpu()
    sizes = counts.sum(0)
    r = dict(metrics.cluster_metrics_from_counts(counts) if labelled else {}, classes=int((sizes > 0).sum()),
             balance=balance(sizes), num_eval=int(sizes.sum()), seconds=time.time() - t0)
    log_record(kind="eval", epoch=epoch, step=step, **r)
    scores = "".join(f"{k} {r[k]:.4f} | " for k in ("nmi", "ami", "ari", "acc") if k in r)
    print0(f"eval after epoch {epoch}: {scores}classes {r['classes']}/{C} | balance {r['balance']:.3f} | "
           f"{r['seconds']:.1f} s")


saved_step = start_step if start_step else None  # the step ckpt.pt holds, for the line of a failed save


def save_checkpoint(step, copy_to=None):
    """Rank 0 writes a temporary file and renames it: a crash never leaves a half-written ckpt.pt. copy_to: a
    copy of ckpt.pt instead. A failed write stops the run with one line and status 74, ckpt.pt as it was."""
    global saved_step
    if not master:
        return
    state = None if copy_to else dict(
        model=raw_model.state_dict(), optimizer=optimizer.state_dict(), epoch=step // steps_per_epoch, step=step,
        args=vars(args), queue=queue.state_dict() if queue is not None else None, pseudo_labels=pseudo_labels)
    try:
        if copy_to:
            with open(ckpt_path, "rb") as src:
                save_atomically(copy_to, lambda f: shutil.copyfileobj(src, f))
        else:
            save_atomically(ckpt_path, lambda f: torch.save(state, f))
    except OSError as e:
        last = step if copy_to else saved_step
        intact = f"{ckpt_path} still holds step {last}" if last else "no checkpoint of this run was saved before"
        print(failed_save(e, copy_to or ckpt_path, state, intact) + f" (exit status {SAVE_FAILED_STATUS})",
              file=sys.stderr, flush=True)
        if ddp:  # torchrun then stops the other processes
            lock.release()
            exit_process(SAVE_FAILED_STATUS)
        raise SystemExit(SAVE_FAILED_STATUS)
    saved_step = saved_step if copy_to else step


def state_is_finite(loss):
    # a host sync: only before a save within an epoch (the epoch end checks the epoch's mean loss)
    return math.isfinite(loss.item()) and all(torch.isfinite(p).all() for p in raw_model.parameters())


def exit_for_requeue(step):
    if ddp:
        dist.barrier(group=stop.group)  # torchrun ends every process once one exits: none leaves before the save
        dist.destroy_process_group()
    print0(f"stopped by {stop.name} after step {step}/{total_steps}: saved {ckpt_path}; the same command resumes "
           f"from this step (exit status {REQUEUE_STATUS})")
    if ddp:
        lock.release()
        exit_process(REQUEUE_STATUS)
    raise SystemExit(REQUEUE_STATUS)


# -----------------------------------------------------------------------------
# training loop
if master:
    os.makedirs(args.out_dir, exist_ok=True)
    if os.path.exists(log_path):
        # records after the checkpoint's step are of steps this run does again: keep each step once
        keep = []
        with open(log_path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start_step:
                        keep.append(line)
                except (ValueError, KeyError):  # a line cut short by a kill
                    pass
        with open(log_path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log_path + ".tmp", log_path)
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    if args.skip_unreadable:  # one line a file: its path below --data_dir (with /), a tab, the reason
        with open(os.path.join(args.out_dir, "skipped.txt"), "w") as f:
            f.writelines(f"{path.replace(os.sep, '/')}\t{reason}\n" for path, reason in skipped_lines)
print0(f"{args.method} on {args.dataset}: {len(dataset):,} images, {steps_per_epoch} steps/epoch, {world_size} "
       f"process(es) x {local_batch} on {device.type} in {args.precision}, {sum(p.numel() for p in raw_model.parameters()):,} parameters")
# a CPU group of its own, so that the stop flag's all-reduce never queues behind DDP's gradients
doing = "creating the stop signal's process group"
stop = StopSignal(dist.new_group(backend="gloo", timeout=dist_timeout) if ddp else None)
step = start_step
t_log, step_log, t_start, t_saved = time.time(), step, time.time(), time.time()
low_streak = 0  # log steps in a row at which head 0 used few classes
for epoch in range(start_step // steps_per_epoch, args.epochs):
    sampler.set_epoch(epoch, start=step - epoch * steps_per_epoch)
    model.train()
    loss_sum, n_loss = torch.zeros((), device=device), 0
    class_counts = torch.zeros(args.cls_sizes[0], dtype=torch.long, device=device)
    for crops, _, index in loader:
        crops = [c.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last) for c in crops]
        index = index.to(device, non_blocking=True)
        if step in relabel_steps:
            relabel()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with autocast:
            # the queue goes in only once full: a compiled forward then sees one constant branch
            z, logits = model(crops, queue if queue is not None and queue.full else None, index)
        loss = objective(logits, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if queue is not None:
            queue.push(z[:local_batch], index)
        loss_sum += loss.detach()
        n_loss += 1
        pred = logits[0][0].detach().argmax(dim=1)  # index_add_, unlike bincount, needs no host sync on a GPU
        batch_counts = torch.zeros_like(class_counts).index_add_(0, pred, torch.ones_like(pred))
        class_counts += batch_counts
        step += 1
        if step % args.log_every == 0 or step == total_steps:
            # the only host syncs of the loop: the loss and the collapse monitor, every log step
            loss_val = loss.detach().float().clone()
            if ddp:
                dist.all_reduce(loss_val)
                dist.all_reduce(batch_counts)
            loss_val = loss_val.item() / world_size
            if not math.isfinite(loss_val):
                raise SystemExit(f"loss is {loss_val} at step {step} (epoch {epoch}); stopping without saving, "
                                 f"{ckpt_path} keeps the last good state. Lower --lr or check the data.")
            # classes with at least one image in the global batch: near C only where the classes are of about
            # equal size, as the uniform prior assumes (a different prior can set off the banner below)
            used, bal = int((batch_counts > 0).sum()), balance(batch_counts)
            dt = (time.time() - t_log) / (step - step_log)
            print0(f"step {step}/{total_steps} | ep {epoch} | loss {loss_val:.4f} | lr {lr_at(step - 1):.4g} | "
                   f"{dt * 1000:.0f} ms/step | {args.batch_size / dt:,.0f} img/s | classes {used}/{args.cls_sizes[0]} "
                   f"| balance {bal:.3f} | eta {fmt_time(dt * (total_steps - step))}")
            log_record(kind="step", step=step, epoch=epoch, loss=loss_val, lr=lr_at(step - 1),
                       img_s=args.batch_size / dt, classes=used, balance=bal)
            low_streak = low_streak + 1 if used < args.collapse_frac * args.cls_sizes[0] else 0
            if low_streak >= args.collapse_logs:
                print0(f"{'!' * 80}\nCOLLAPSE? head 0 predicts only {used} of {args.cls_sizes[0]} classes in the "
                       f"global batch, below {args.collapse_frac:.0%} for {low_streak} log steps in a row\n{'!' * 80}")
            t_log, step_log = time.time(), step
        if stop.poll() and step % steps_per_epoch:  # every process, every step; an epoch's last goes on below
            if not state_is_finite(loss):
                raise SystemExit(f"{stop.name} at step {step}, but the loss or weights are not finite; stopping "
                                 f"without saving, {ckpt_path} keeps the last good state.")
            save_checkpoint(step)
            exit_for_requeue(step)
        if args.ckpt_minutes and master and time.time() - t_saved > 60 * args.ckpt_minutes:
            if state_is_finite(loss):  # rank 0 alone: saving needs no other process
                save_checkpoint(step)
                t_saved = time.time()
    mean_loss = loss_sum / max(n_loss, 1)
    if ddp:
        dist.all_reduce(mean_loss)
        dist.all_reduce(class_counts)
        mean_loss /= world_size
    if not math.isfinite(mean_loss.item()):  # between two log steps: still never saved
        raise SystemExit(f"loss is not finite in epoch {epoch}; stopping without saving, {ckpt_path} keeps the "
                         f"last good state. Lower --lr or check the data.")
    # the epoch's records before its checkpoint: a resume drops whatever was logged past its step
    log_record(kind="epoch", epoch=epoch + 1, step=step, loss=mean_loss.item(), lr=lr_at(step - 1),
               classes=int((class_counts > 0).sum()), balance=balance(class_counts), time=time.time() - t_start)
    if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
        score_head0(epoch + 1)
    save_checkpoint(step)
    t_saved = time.time()
    if args.keep_every and (epoch + 1) % args.keep_every == 0:
        save_checkpoint(step, copy_to=os.path.join(args.out_dir, f"ckpt_ep{epoch + 1}.pt"))
    if stop.agreed and step < total_steps:  # the signal came at the epoch's last step: saved above
        exit_for_requeue(step)
stop.close()
print0(f"done: {args.epochs} epochs in {fmt_time(time.time() - t_start)}; checkpoint {ckpt_path}")
if ddp:
    dist.destroy_process_group()
    lock.release()
    exit_process(0)
