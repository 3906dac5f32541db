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
import functools
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

import data
import folder
import loss as losses
import metrics
import recipes
from lars import LARS
from model import NNQueue, build_model, failed_save, init_from, save_atomically, sync_batchnorm, wrap_ddp
from preempt import REQUEUE_STATUS, SAVE_FAILED_STATUS, StopSignal, end_process, hold_out_dir
from preempt import init_process_group, report_failures
from progress import CollapseWatch, JsonLog, fmt_time

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
# objective: every flag of this group is compared on resume (MUST_MATCH below), with no list to keep;
# the group ends at the line "# augmentation" (test_all.py adds a flag to the group just above it)
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
parser.add_argument("--device_augment", action="store_true", help="workers only crop; flip, jitter, grey, blur and "
                    "solarisation run batched on the training device, drawn per sample as the workers do (augment.py)")
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
resume, init, init_note, ckpt_seen = recipes.complete_flags(args)
ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
if args.dry_run:
    print(json.dumps(recipes.dry_run_settings(args)))
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# processes and device: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python is world size 1
use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
args.precision = args.precision if use_cuda else "fp32"  # what runs, for args.json and the resume check
ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
dist_timeout = datetime.timedelta(minutes=args.dist_timeout)
step, doing = None, "creating the process group"  # where a failure happened, for its last line below
if ddp:
    report_failures(lambda: doing if step is None else f"after step {step}/{total_steps}", args.dist_timeout)
    init_process_group("nccl" if use_cuda else "gloo", dist_timeout)
doing = "setting up"
rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
local_rank = int(os.environ.get("LOCAL_RANK", 0))
if use_cuda:
    torch.cuda.set_device(local_rank)
device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
master = rank == 0
print0 = functools.partial(print, flush=True) if master else lambda *a: None  # rank 0 speaks for all
# one run per out dir: rank 0 holds OUT/run.lock until it exits, and every process follows its verdict
lock = hold_out_dir(args.out_dir, ckpt_path, ckpt_seen, master, ddp)
atexit.register(lock.release)  # every exit but exit_process's, which releases it first
recipes.check_processes(args, world_size, use_cuda)
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
args.mean, args.std = None, None  # None: the dataset's normalisation
prep = folder.Preparation(args, rank, world_size, print0)  # a folder's scan, unreadable files and skipped.txt
if args.dataset == "folder":
    prep.train_split(dataset, t0)
dataset.transform = data.train_transform(args.dataset, args.n_local, args.size, args.local_size, args.crop_scale,
                                         args.mean, args.std, not args.no_flip, args.device_augment)
recipes.check_dataset_size(args, len(dataset))
# --eval_every: the evaluation split, checked now rather than at the first epoch's end
eval_loader, n_true = None, 0  # n_true: true classes of the evaluation split, 0 without labels
if args.eval_every:
    try:
        eval_set = data.center_crop_set(args, "eval")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--eval_every {args.eval_every}: {e}\n(--eval_every 0 trains without scoring)") from None
    n_true = len(eval_set.classes or ()) if args.dataset == "folder" else data.DATASETS[args.dataset]["classes"]
    if args.dataset == "folder":
        prep.eval_split(eval_set, dataset)
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
if use_cuda:  # SyncBatchNorm in groups of --bn_group ranks; on a CPU each process keeps its own statistics
    logit_bn, model.logit_bn = model.logit_bn, None  # TWIST's logit BatchNorm has its own groups
    model = sync_batchnorm(model, args.bn_group, rank, world_size, dist_timeout)
    if logit_bn is not None:
        model.logit_bn = sync_batchnorm(logit_bn, max(1, args.twist_bn_images // local_batch), rank, world_size,
                                        dist_timeout)
# channels_last: faster convolutions on GPUs and CPUs alike (the synthetic recipe's step: 1.4x on one core)
model.to(device, memory_format=torch.channels_last)
optimizer_cls = LARS if args.optimizer == "lars" else torch.optim.SGD
optimizer = optimizer_cls(model.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.weight_decay)
queue = NNQueue(args.queue_len, model.mlp.out_dim).to(device) if args.queue_len > 0 else None
# SeLa: one pseudo-label per training image and head, a balanced random assignment to start with
# (the same on every process: the generator is seeded), then Sinkhorn-Knopp at scheduled steps
pseudo_labels, relabel_steps = None, set()
if args.method == "sela":
    label_set = data.center_crop_set(args, "train")  # the relabelling pass: each training image once, center crops
    if args.dataset == "folder":
        label_set.drop([f for f, _ in prep.skipped])
    label_loader = data.pass_loader(label_set, local_batch, rank, world_size, args.workers)
    g = torch.Generator().manual_seed(args.seed)
    pseudo_labels = torch.stack([torch.randperm(len(dataset), generator=g) % c for c in args.cls_sizes]).to(device)
    relabel_steps = {int(total_steps * f) for f in recipes.relabel_points(args)}

# resume: the same command again continues from the checkpoint, or refuses with the differences
MUST_MATCH = ("dataset", "holdout", "method", "optimizer", "momentum", "weight_decay", "arch", "width", "in_chans",
              "small_stem", "mlp_layers", "mlp_hidden", "mlp_out", "cls_sizes", "batch_size", "n_local",
              "size", "local_size", "crop_scale", "no_flip", "device_augment", "seed", "precision",
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
    if args.dataset == "folder":
        diff = prep.resume_differences(diff, old["folder_files"])
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
raw_model = model
if args.compile:
    model = torch.compile(model)
if ddp:
    model = wrap_ddp(model, [local_rank] if use_cuda else None)  # each process keeps its BatchNorm statistics


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


log = JsonLog(os.path.join(args.out_dir, "log.jsonl"), master)  # a record per log step, epoch end and evaluation
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
        end_process(SAVE_FAILED_STATUS, lock, ddp)  # torchrun then stops the other processes
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
    end_process(REQUEUE_STATUS, lock, ddp)


# -----------------------------------------------------------------------------
# training loop
if master:
    os.makedirs(args.out_dir, exist_ok=True)
    log.trim(start_step)  # records after the checkpoint's step are of steps this run does again
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    prep.keep()  # only now: a refused resume keeps the old scans
print0(f"{args.method} on {args.dataset}: {len(dataset):,} images, {steps_per_epoch} steps/epoch, {world_size} "
       f"process(es) x {local_batch} on {device.type} in {args.precision}, {sum(p.numel() for p in raw_model.parameters()):,} parameters")
# a CPU group of its own, so that the stop flag's all-reduce never queues behind DDP's gradients
doing = "creating the stop signal's process group"
stop = StopSignal(dist.new_group(backend="gloo", timeout=dist_timeout) if ddp else None)
step = start_step
t_log, step_log, t_start, t_saved = time.time(), step, time.time(), time.time()
collapse = CollapseWatch(args.collapse_frac, args.collapse_logs, args.cls_sizes[0], print0)
for epoch in range(start_step // steps_per_epoch, args.epochs):
    sampler.set_epoch(epoch, start=step - epoch * steps_per_epoch)
    model.train()
    loss_sum, n_loss = torch.zeros((), device=device), 0
    class_counts = torch.zeros(args.cls_sizes[0], dtype=torch.long, device=device)
    for crops, _, index in loader:
        crops = [c.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last) for c in crops]
        if args.device_augment:  # uint8 crops from the workers: the rest of the augmentation here, drawn per sample
            crops = dataset.transform.photometric(crops, index, epoch, args.seed)  # index still on the host
        index = index.to(device, non_blocking=True)
        if step in relabel_steps:
            losses.sela_relabel(raw_model, label_loader, pseudo_labels, args.row_tau, args.sela_lamb, autocast)
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
            used, bal = int((batch_counts > 0).sum()), metrics.balance(batch_counts)
            dt = (time.time() - t_log) / (step - step_log)
            print0(f"step {step}/{total_steps} | ep {epoch} | loss {loss_val:.4f} | lr {lr_at(step - 1):.4g} | "
                   f"{dt * 1000:.0f} ms/step | {args.batch_size / dt:,.0f} img/s | classes {used}/{args.cls_sizes[0]} "
                   f"| balance {bal:.3f} | eta {fmt_time(dt * (total_steps - step))}")
            log.write(kind="step", step=step, epoch=epoch, loss=loss_val, lr=lr_at(step - 1),
                       img_s=args.batch_size / dt, classes=used, balance=bal)
            collapse.update(used)  # the banner after --collapse_logs log steps of few classes
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
    log.write(kind="epoch", epoch=epoch + 1, step=step, loss=mean_loss.item(), lr=lr_at(step - 1),
               classes=int((class_counts > 0).sum()), balance=metrics.balance(class_counts), time=time.time() - t_start)
    if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
        r = metrics.score_head0(raw_model, eval_loader, args.cls_sizes[0], n_true, device, autocast, ddp)
        log.write(kind="eval", epoch=epoch + 1, step=step, **r)
        scores = "".join(f"{k} {r[k]:.4f} | " for k in ("nmi", "ami", "ari", "acc") if k in r)
        print0(f"eval after epoch {epoch + 1}: {scores}classes {r['classes']}/{args.cls_sizes[0]} | balance "
               f"{r['balance']:.3f} | {r['seconds']:.1f} s")
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
end_process(0, lock, ddp)
