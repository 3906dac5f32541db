"""Score a checkpoint the way the papers do: head-0 clustering (NMI, AMI, ARI, ACC), kNN, a linear
probe and k-means baselines, written to OUT/metrics.json, with figures of what the network learned.

    python evaluate.py --ckpt out/synthetic-self_classifier/ckpt.pt
    python evaluate.py --ckpt out/folder-self_classifier/ckpt.pt   # + clusters.csv and a picture of each class
    torchrun --nproc_per_node=8 evaluate.py --ckpt out/imagenet-self_classifier/ckpt.pt --data_dir /path/to/imagenet
    python evaluate.py --ckpt model_800.pth.tar --dataset imagenet --data_dir /path/to/imagenet   # the authors' model
"""
import argparse
import json
import os
import time

import numpy as np

import figures

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py, or a published network: the "
                    "Self-Classifier authors' .pth.tar, TWIST's or SeLa's ResNet file, a torchvision ResNet state_dict "
                    "(recognised by content; heads are scored where the file has them)")
parser.add_argument("--dataset", default=None, help="a name train.py --dataset takes (default: the checkpoint's; a "
                    "published network names none: give it)")
parser.add_argument("--data_dir", default=None, help="default: the checkpoint's (a published network: give it)")
parser.add_argument("--size", type=int, default=None, help="evaluation crop side in px, after a resize of the "
                    "dataset's ratio (imagenet: 256/224) (default: the training crop; 224 for a published network)")
parser.add_argument("--bf16", action="store_true", help="extract features under bf16 autocast (default: float32 for "
                    "every checkpoint, as the authors evaluate; docs/experiments.md has the cost of each)")
parser.add_argument("--out_dir", default=None, help="where metrics.json and the figures go (default: the checkpoint's folder)")
parser.add_argument("--batch_size", type=int, default=256, help="images per forward pass, per process")
parser.add_argument("--workers", type=int, default=2, help="data loading processes per process")
parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
parser.add_argument("--superclasses", action="store_true", help="cifar100: score against the 20 superclasses")
parser.add_argument("--no_knn", action="store_true", help="skip the kNN classifier")
parser.add_argument("--no_linear", action="store_true", help="skip the linear probe")
parser.add_argument("--no_kmeans", action="store_true", help="skip the k-means baselines (on the backbone's features "
                    "and on raw pixels) and the verdict that compares head 0 with them")
parser.add_argument("--kmeans_init", type=int, default=None, help="k-means++ starts of each k-means baseline, "
                    "the lowest inertia kept (default 10, scikit-learn's n_init, as clustering papers run it; on a CPU "
                    "fewer where samples x dims x classes x 10 passes 1e11, as ImageNet's does, and said)")
parser.add_argument("--estimate_k", type=int, nargs=2, metavar=("LO", "HI"), default=None, help="estimate the "
                    "number of classes, from LO to HI, in the backbone features of the evaluation split (at most "
                    "10,000 at random): k_estimate in metrics.json, k_estimate.png and the training command that "
                    "uses it. A folder without labels gets 2 to twice head 0's size (at least 20) unasked")
parser.add_argument("--skip_unreadable", action="store_true", help="folder: score without the files that cannot be "
                    "decoded now, naming them (default: name them and stop). Those training skipped, listed in "
                    "skipped.txt beside --ckpt, are left out either way")
parser.add_argument("--no_figures", action="store_true", help="skip the PNG figures")
parser.add_argument("--curves_only", action="store_true", help="only draw OUT/curves.png from the log.jsonl beside "
                    "--ckpt: no data, no model, and the checkpoint need not exist yet (a run in its first epoch)")
parser.add_argument("--knn_temp", type=float, default=0.1, help="kNN vote weight exp(cosine / knn_temp); 0.1 as "
                    "the authors' knn_eval.sh")
parser.add_argument("--knn_k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbours; each k gives "
                    "knn_top1_kK in metrics.json, and knn_top1 is k 20 (the authors' list by default)")
parser.add_argument("--linear_protocol", default="auto", choices=["auto", "fast", "paper"], help="fast: Adam on "
                    "cached center-crop features (minutes on a CPU); paper: the Self-Classifier paper's, LARS on "
                    "RandomResizedCrop + flip through the frozen backbone (slow); auto: paper on imagenet, else fast")
parser.add_argument("--linear_aug", dest="linear_protocol", action="store_const", const="paper",
                    help="the same as --linear_protocol paper")
parser.add_argument("--linear_epochs", type=int, default=100, help="linear probe epochs")
parser.add_argument("--linear_lr", type=float, default=None, help="linear probe learning rate "
                    "(default: fast 1e-3 Adam; paper 0.8 x global batch / 4096 LARS)")
parser.add_argument("--holdout", type=int, default=None, help="score on the validation split of this many training "
                    "images (default: the checkpoint's --holdout; 0 = the test set)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if args.estimate_k and not 2 <= args.estimate_k[0] <= args.estimate_k[1]:
    parser.error(f"--estimate_k LO HI needs 2 <= LO <= HI, got {args.estimate_k[0]} {args.estimate_k[1]}")
if args.kmeans_init is not None and args.kmeans_init < 1:
    parser.error(f"--kmeans_init must be at least 1, got {args.kmeans_init}")


if args.curves_only:
    log_path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "log.jsonl")
    if not os.path.isfile(log_path):
        raise SystemExit(f"--curves_only: no {log_path}; train.py writes it from its first log step")
    import matplotlib
    matplotlib.use("Agg")
    out_dir = args.out_dir or os.path.dirname(log_path)
    os.makedirs(out_dir, exist_ok=True)
    args_path = os.path.join(os.path.dirname(log_path), "args.json")  # train.py's flags: head 0's size
    sizes = json.load(open(args_path)).get("cls_sizes") if os.path.isfile(args_path) else None
    figures.plot_curves(log_path, os.path.join(out_dir, "curves.png"), sizes[0] if sizes else None)
    print(f"wrote {os.path.join(out_dir, 'curves.png')}")
    raise SystemExit(0)

# the rest needs torch, which --curves_only above does without: importing it takes most of a minute on a loaded
# machine, for a plot of seconds (docs/experiments.md, "progress lines and a plot without torch")
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import folder
import metrics
from lars import LARS
from loss import all_gather_cat
from model import build_model, read_pretrained
from preempt import exit_process
from progress import Progress

if args.dataset is not None and args.dataset not in data.DATASETS:
    raise SystemExit(f"--dataset {args.dataset}: choose from {', '.join(data.DATASETS)}")

# -----------------------------------------------------------------------------
ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
if ddp:
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
if use_cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
master = rank == 0
torch.manual_seed(args.seed)


def print0(*a):
    if master:
        print(*a, flush=True)


if not os.path.isfile(args.ckpt):
    raise SystemExit(f"--ckpt {args.ckpt}: no such file")
pretrained = read_pretrained(args.ckpt)
if pretrained["ckpt"] is None:  # a published network: the layout gives the network, the flags the data
    print0(pretrained["report"])
    if args.dataset is None or args.data_dir is None:
        raise SystemExit(f"--ckpt {args.ckpt} is a published network, which names no data: give --dataset and "
                         f"--data_dir")
    train_args = dict(pretrained["config"], dataset=args.dataset, data_dir=args.data_dir, holdout=0, size=224,
                      row_tau=0.1)
else:
    train_args = pretrained["ckpt"]["args"]
dataset_name = args.dataset or train_args["dataset"]
data_dir = args.data_dir or train_args["data_dir"]
out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.ckpt))
holdout = train_args.get("holdout", 0) if args.holdout is None else args.holdout
size = args.size or train_args["size"]
heads = len(train_args["cls_sizes"])  # a backbone alone has none: kNN, the linear probe and k-means only
head_size = train_args["cls_sizes"][0] if heads else None
linear_protocol = ("paper" if dataset_name == "imagenet" else "fast") if args.linear_protocol == "auto" else args.linear_protocol
model = build_model(train_args)
model.load_state_dict(pretrained["state"])
model.to(device, memory_format=torch.channels_last).eval()  # as in train.py
epoch = pretrained["epoch"]
del pretrained
num_classes = data.DATASETS[dataset_name]["classes"]  # folder: its number of sub-folders, once read
# a folder is normalised by the mean and std train.py measured on it
MEAN = train_args.get("mean") or data.DATASETS[dataset_name]["mean"]
STD = train_args.get("std") or data.DATASETS[dataset_name]["std"]
if dataset_name == "cifar100" and args.superclasses:
    num_classes = 20
    if not heads or train_args["cls_sizes"][0] != 20:  # 100 clusters matched to 20 classes would inflate every metric
        raise SystemExit("--superclasses scores head 0 against 20 classes: train with --cls_sizes 20 ...")


skipped_path, skipped = folder.training_skipped(args.ckpt) if dataset_name == "folder" else (None, set())
unreadable = set()  # full paths of the files a pass of this run could not decode (--skip_unreadable): left out after


def load_split(split, transform):
    ds = data.build_dataset(dataset_name, data_dir, split, transform, holdout=holdout, channels=train_args["in_chans"])
    if dataset_name == "folder":
        ds.draft_side = size  # the evaluation crop's side: the decode need not be larger
        # skipped.txt's paths are below the folder training read (DIR or DIR/train), or below DIR
        full = lambda f: os.path.normpath(os.path.join(ds.root, f))
        roots = (folder.folder_splits(data_dir)[0], data_dir)
        known = {os.path.normpath(os.path.join(r, f)) for f in skipped for r in roots}
        left_out = [f for f in ds.files if full(f) in known]
        ds.drop(left_out + [f for f in ds.files if full(f) in unreadable])
        if left_out:
            print0(f"left out {len(left_out)} files of the {split} split that training skipped as unreadable "
                   f"({skipped_path})")
    if dataset_name == "cifar100" and args.superclasses:
        if holdout:
            raise SystemExit("--superclasses with a --holdout checkpoint is not supported")
        ds.labels = data.load_cifar(data_dir, split != "eval", "cifar100", coarse=True)[1]
    return ds


stage_seconds = {}  # each stage's wall time, for metrics.json


class Flagged(torch.utils.data.Dataset):
    """A dataset's samples with a flag each: a folder's file that cannot be decoded gives a blank crop and False
    instead of stopping the pass, so that every process finishes it and the files are named together after."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return (*self.ds[i], True)
        except RuntimeError:  # data.ImageFiles.load's, naming the file
            if not isinstance(self.ds, data.ImageFiles):
                raise
            return torch.zeros(train_args["in_chans"], size, size), int(self.ds.labels[i]), i, False


# k-means on raw pixels: the in-memory datasets' stored images; a folder's or ImageNet's evaluation crops as the
# network sees them before normalisation, area-averaged to 32 px or less and, beyond what fits, a fixed random subset
# of the pictures. An iteration of k-means costs pictures x pixels x classes: at most PIXEL_WORK of it, a few seconds
# on a CPU core (docs/experiments.md, "evaluate.py on your own folder"), where ImageNet's 50,000 crops of 224 px with
# 1,000 classes would take days an iteration
PIXEL_MAX, PIXEL_WORK = 10_000, 10 ** 8
K_SAMPLE = 10_000  # features --estimate_k reads at most: under a minute on 2 cores (docs/experiments.md)
KMEANS_CPU_WORK = 10 ** 11  # samples x dims x classes x starts: ImageNet's 50,000 x 2,048 x 1,000 x 1 on a CPU


def pixel_plan(n, k):
    """(side in px, pictures) for k-means on the raw pixels of n pictures in k classes: the largest side of 32, 16
    or 8 px (at most the crop's) at which PIXEL_WORK allows ten pictures a class (or all n); None where none does."""
    for side in (min(size, s) for s in (32, 16, 8)):
        m = min(n, PIXEL_MAX, PIXEL_WORK // (train_args["in_chans"] * side * side * k))
        if m >= min(n, 10 * k):
            return side, m
    return None


@torch.no_grad()
def extract(ds, split, pixels=None, side=None):
    """Backbone features, head-0 logits and labels of every sample, in dataset order; the indices of the samples
    that could not be decoded (their rows are blank); and, for the samples of the bool mask pixels, their
    evaluation crops before normalisation, area-averaged to side px, as (pixels.sum(), D) floats in [0, 1].

    Each process takes every world_size-th sample; the shares are padded to one length and gathered."""
    n = len(ds)
    progress = Progress(f"features {split}", n)
    mine = list(range(rank, n, world_size))
    mine += mine[-1:] * (-(-n // world_size) - len(mine))  # equal shares for all_gather
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(Flagged(ds), mine), batch_size=args.batch_size,
                                         num_workers=args.workers, pin_memory=use_cuda)
    if pixels is not None:
        slot = torch.full((n,), -1, dtype=torch.long)
        slot[pixels] = torch.arange(int(pixels.sum()))
        px = torch.zeros(int(pixels.sum()), train_args["in_chans"] * side * side, device=device)
        mean, std = (torch.tensor(v, device=device)[:, None, None] for v in (MEAN, STD))
    feats, logits, labels, index, good = [], [], [], [], []
    for x, y, i, ok in loader:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            f, out = model.predict(x.contiguous(memory_format=torch.channels_last), heads=[0] if heads else [])
        feats.append(f.float())
        logits.append(out[0].float() if heads else f.new_zeros(len(f), 0))
        labels.append(y.to(device))
        index.append(i.to(device))
        good.append(ok.to(device))
        if pixels is not None and (slot[i] >= 0).any():
            s = slot[i]
            crops = x[(s >= 0).to(device)].float() * std + mean
            if side < size:
                crops = F.interpolate(crops, size=(side, side), mode="area")
            px[s[s >= 0].to(device)] = crops.flatten(1)
        progress.update(len(x) * world_size)  # rank 0's share stands for every process's
    feats, logits, labels, index, good = (all_gather_cat(torch.cat(t)) for t in (feats, logits, labels, index, good))
    order = torch.empty(n, dtype=torch.long, device=device)
    order[index] = torch.arange(len(index), device=device)  # duplicates of the padding land on one row
    if pixels is not None and ddp:
        dist.all_reduce(px)  # each row written by the one process that read its picture, zeros elsewhere
    stage_seconds[f"features_{split}"] = round(progress.close(), 2)
    bad = torch.nonzero(~good[order]).flatten().tolist()
    return feats[order], logits[order], labels[order], bad, (px if pixels is not None else None)


def leave_out_unreadable(ds, split, bad):
    """The files of ds a pass could not decode: stop, naming them, or with --skip_unreadable name them and leave
    them out of ds; a bool mask of the samples kept (None: all)."""
    if not bad:
        return None
    names = [ds.files[i] for i in bad]
    if not args.skip_unreadable:
        def reason(i):
            try:
                ds.load(i)
                return "read on a second try"
            except RuntimeError as e:
                return str(e.__cause__ or e)

        raise SystemExit(1 if not master else  # every process stops; one says why
                         f"{len(bad)} of {len(ds)} files below {ds.root} cannot be decoded (changed since training?):"
                         + "".join(f"\n  {f}: {reason(i)}" for f, i in zip(names[:10], bad))
                         + ("\n  ..." if len(bad) > 10 else "")
                         + "\nremove or fix them, or pass --skip_unreadable to score without them")
    print0(f"skipped {len(bad)} unreadable files of the {split} split: {folder.few(names, 10)}")
    unreadable.update(os.path.normpath(ds.path(i)) for i in bad)
    ds.drop(names)
    keep = torch.ones(len(ds) + len(bad), dtype=torch.bool)
    keep[bad] = False
    return keep


def linear_probe(train_f, train_y, test_f, test_y):
    """One Linear layer on frozen features, cross-entropy, no weight decay, cosine schedule.

    fast: Adam on cached center-crop features (minutes on a CPU), standardised with the training
    statistics. paper: the Self-Classifier paper's ImageNet protocol, LARS on augmented crops."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    C = num_classes
    if linear_protocol == "fast":
        mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
        train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
        clf = torch.nn.Linear(train_f.shape[1], C).to(device)
        opt = torch.optim.Adam(clf.parameters(), lr=args.linear_lr or 1e-3)
        steps_per_epoch = -(-len(train_f) // 1024)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.linear_epochs * steps_per_epoch)
        progress = Progress("linear probe", args.linear_epochs * steps_per_epoch, "steps")

        def scores():  # the probe as it stands, on every training feature: a pass, paid for only when printed
            return "loss {:.4f} | train acc {:.4f}".format(*probe_scores(clf, train_f, train_y))

        for epoch in range(args.linear_epochs):
            for idx in torch.randperm(len(train_f), generator=g).split(1024):
                idx = idx.to(device)
                loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            progress.update(steps_per_epoch, lambda: f"ep {epoch + 1}/{args.linear_epochs} | {scores()}")
        stage_seconds["linear"] = round(progress.close(scores()), 2)
        with torch.no_grad():
            return (clf(test_f).argmax(1) == test_y).float().mean().item()
    # augmented protocol: crops through the frozen backbone every epoch, probe trained under DDP
    from torchvision import transforms
    aug = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                              transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = load_split("train_labeled", aug)
    clf = torch.nn.Linear(model.feat_dim, C).to(device)
    clf.weight.data.normal_(0, 0.01)
    clf.bias.data.zero_()
    if ddp:
        clf = torch.nn.parallel.DistributedDataParallel(clf, device_ids=[device.index] if use_cuda else None)
    global_batch = args.batch_size * world_size
    opt = LARS(clf.parameters(), lr=args.linear_lr or 0.8 * global_batch / 4096, momentum=0.9)
    sampler = data.EpochSampler(len(ds), global_batch, world_size, rank, args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, pin_memory=use_cuda)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.linear_epochs * sampler.steps)
    progress = Progress("linear probe", args.linear_epochs * sampler.steps, "steps")

    seen = 0  # this process's images in the epoch; their summed loss and correct predictions stay on the device

    def scores():  # rank 0's share of the epoch so far
        return f"loss {loss_sum.item() / seen:.4f} | train acc {correct.item() / seen:.4f}" if seen else "no step"

    for epoch in range(args.linear_epochs):
        sampler.set_epoch(epoch)
        seen, loss_sum, correct = 0, torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
        for x, y, _ in loader:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                f = model.backbone(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
            y = y.to(device)
            out = clf(f.float())
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen, loss_sum = seen + len(y), loss_sum + loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            # a line within the epoch when one is due: an epoch of augmented crops can take minutes
            progress.update(1, lambda: f"ep {epoch + 1}/{args.linear_epochs} | {scores()}")
    stage_seconds["linear"] = round(progress.close(scores()), 2)
    clf = clf.module if ddp else clf
    with torch.no_grad():
        return (clf(test_f).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def probe_scores(clf, f, y, chunk=65536):
    # loss and accuracy of the probe on these features, in chunks: ImageNet's logits at once would take 5 GB
    loss, correct = 0.0, 0
    for s in range(0, len(f), chunk):
        out = clf(f[s:s + chunk])
        loss += F.cross_entropy(out, y[s:s + chunk], reduction="sum").item()
        correct += (out.argmax(1) == y[s:s + chunk]).sum().item()
    return loss / len(f), correct / len(f)


def kmeans_scores(x, y, prefix):
    # k-means with restarts, k = number of classes, on the device x lives on, scored with the clustering metrics.
    # A CPU gets fewer starts where ten would take hours (docs/experiments.md, "k-means with restarts")
    name = prefix.replace("_", " ").replace("kmeans", "k-means")
    if len(x) < num_classes:
        print0(f"{name}: skipped, {num_classes:,} classes for {len(x):,} pictures")
        return {}
    starts, why = args.kmeans_init or 10, ""
    work = x.shape[0] * x.shape[1] * num_classes
    if args.kmeans_init is None and x.device.type == "cpu" and work * starts > KMEANS_CPU_WORK:
        starts = max(1, KMEANS_CPU_WORK // work)
        why = (f", not 10: {x.shape[0]:,} x {x.shape[1]:,} x {num_classes:,} classes on a CPU (a GPU runs 10; "
               f"--kmeans_init 10 insists)")
    print0(f"{name}: {starts} start{'s' if starts > 1 else ''} of k-means++{why}, Lloyd's iterations to convergence")
    progress, best = Progress(name, starts, "starts"), []

    def step(n, inertia, updates):
        best.append(inertia)
        progress.update(n, lambda: f"inertia {inertia:.6g} after {updates} updates")
    assign = metrics.kmeans(x, num_classes, n_init=starts, seed=args.seed, progress=step)
    stage_seconds[prefix] = round(progress.close(f"lowest inertia {min(best):.6g}"), 2)
    return {f"{prefix}_{k}": v for k, v in metrics.cluster_metrics(y, assign).items()} | {f"{prefix}_starts": starts}


def estimate_classes(f, lo, hi):
    """The number of classes in lo..hi that k-means finds again in these features, in clusters that stand apart
    (metrics.py: k_criteria, estimate_k; docs/experiments.md, "how many classes"), at most K_SAMPLE of them at
    random (seed 0): the results' fields, the criteria, and the line that suggests a training command."""
    pick = torch.randperm(len(f), generator=torch.Generator().manual_seed(0))[:K_SAMPLE].to(f.device)
    x = F.normalize(f[pick].float(), dim=1)
    hi = min(hi, len(x) - 1)
    progress = Progress(f"number of classes ({lo}-{hi}, {len(x):,} pictures)", hi - lo + 1, "K")
    criteria = metrics.k_criteria(x, lo, hi, progress=progress.update)
    k = metrics.estimate_k(criteria)
    stage_seconds["k_estimate"] = round(progress.close(f"estimate {k}"), 2)
    command = f"python train.py --dataset {dataset_name}" + (f" --data_dir {data_dir}" if dataset_name == "folder" else "")
    line = (f"the pictures fall into about {k} classes (of {lo}-{hi}, the number k-means finds again in clusters that "
            f"stand apart; head 0 was trained with {head_size or 'none'}): {command} --cls_sizes {k} {3 * k} {10 * k} "
            f"--out_dir OUT")
    curve = {str(c): [round(a, 4), round(s, 4)] for c, (a, s) in criteria.items()}
    return dict(k_estimate=k, k_estimate_range=[lo, hi], k_estimate_curve=curve), criteria, line


def verdict(results, head_on_pixels, subset):
    """Head 0 against k-means on its own features and on raw pixels (head_on_pixels: its scores on the pictures
    that k-means on pixels saw): {baseline: head 0's score minus the baseline's}, and where head 0 is below any, a
    line saying which, by how much, and what to try (else None)."""
    gaps, below = {}, []
    for prefix, what, head in (("kmeans", "k-means on its own backbone features", results),
                               ("kmeans_pixels", f"k-means on raw pixels{subset}", head_on_pixels)):
        worse = []
        for m in ("acc", "nmi"):
            if f"{prefix}_{m}" in results:
                gaps[f"{prefix}_{m}"] = gap = round(head[m] - results[f"{prefix}_{m}"], 4)
                if gap < 0:
                    worse.append(f"{m.upper()} {head[m]:.3f} vs {results[f'{prefix}_{m}']:.3f}, {gap:+.3f}")
        if worse:
            below.append(f"{what} ({'; '.join(worse)})")
    if not below:
        return gaps, None
    tries = ["a sharper crop range --crop_scale 0.8 1"] if train_args.get("crop_scale", [0])[0] < 0.8 else []
    tries += [f"more --epochs (than {train_args['epochs']})" if "epochs" in train_args else "more --epochs",
              f"another --seed (than {train_args.get('seed', 0)})"]
    if any(k.startswith("kmeans_pixels") and v < 0 for k, v in gaps.items()) and train_args["in_chans"] == 3 \
            and dataset_name == "folder":
        tries.append("for small greyscale pictures --channels 1 and a --size near their side")
    return gaps, f"head 0 scores below {' and below '.join(below)}: try {', '.join(tries)}"


# -----------------------------------------------------------------------------
# scoring
t0 = time.time()
eval_tf = data.eval_transform(dataset_name, size, MEAN, STD)
try:
    eval_ds = load_split("eval", eval_tf)
except (FileNotFoundError, ValueError) as e:
    if args.data_dir is None and not os.path.isabs(data_dir) and not os.path.exists(data_dir):
        raise SystemExit(f"{e}\n(--data_dir {data_dir} is the checkpoint's, from the args training ran with, and "
                         f"relative to the folder it ran in, not to {os.getcwd()}: run from there, or pass --data_dir)"
                         ) from None
    raise SystemExit(str(e)) from None
# the pictures k-means on raw pixels sees, where they are not in memory: the crops extract passes to the network
pixel_mask, plan = None, None
if not args.no_kmeans and not hasattr(eval_ds, "images") and getattr(eval_ds, "classes", True):
    plan = pixel_plan(len(eval_ds), len(eval_ds.classes) if dataset_name == "folder" else num_classes)
    if plan:
        pixel_mask = torch.zeros(len(eval_ds), dtype=torch.bool)
        pixel_mask[torch.randperm(len(eval_ds), generator=torch.Generator().manual_seed(0))[:plan[1]]] = True
eval_f, eval_logits, eval_y, bad, eval_px = extract(eval_ds, "eval", pixel_mask, plan and plan[0])
keep = leave_out_unreadable(eval_ds, "eval", bad)
if keep is not None:
    eval_f, eval_logits, eval_y = eval_f[keep.to(device)], eval_logits[keep.to(device)], eval_y[keep.to(device)]
    if pixel_mask is not None:
        eval_px, pixel_mask = eval_px[keep[pixel_mask].to(device)], pixel_mask[keep]
pred = eval_logits.argmax(1).cpu().numpy() if heads else None
y = eval_y.cpu().numpy()
# class names: a folder's sub-folders, ImageNet's folder names, or the named datasets' classes
class_names = getattr(eval_ds, "classes", None) or data.DATASETS[dataset_name].get("names")
labelled = bool((y >= 0).all())
if dataset_name == "folder":
    num_classes = len(eval_ds.classes) if labelled else None
    if not labelled:  # no labels: every metric that needs them is skipped
        if not heads:
            raise SystemExit(f"{args.ckpt} has no heads and {data_dir} no classes: nothing to score")
        args.no_knn = args.no_linear = args.no_kmeans = True
    elif len(set(folder.folder_splits(data_dir))) == 1 and not (args.no_knn and args.no_linear):
        # kNN and the probe would be fitted on the images they are scored on
        print0("no DIR/train and DIR/val: kNN and the linear probe skipped (they need a held-out split)")
        args.no_knn = args.no_linear = True
results = metrics.cluster_metrics(y, pred) if labelled and heads else {}
if heads:
    results["classes_used"] = int(len(np.unique(pred)))
results["num_eval"] = len(y)
if not (args.no_knn and args.no_linear):
    train_ds = load_split("train_labeled", eval_tf)
    train_f, _, train_y, bad, _ = extract(train_ds, "train")
    keep = leave_out_unreadable(train_ds, "train", bad)
    if keep is not None:
        train_f, train_y = train_f[keep.to(device)], train_y[keep.to(device)]
    keep = train_y >= 0  # STL-10's unlabelled images have label -1
    train_f, train_y = train_f[keep], train_y[keep]
    if not args.no_knn:
        ks = [k for k in args.knn_k if k <= len(train_f)]
        for k in sorted(set(args.knn_k) - set(ks)):
            print0(f"kNN with k {k}: only {len(train_f)} labelled training images, skipped")
        progress = Progress(f"kNN (k {' '.join(map(str, ks))})", len(ks) * len(eval_f))  # evaluation images, per k
        for k in ks:
            results[f"knn_top1_k{k}"] = metrics.knn_top1(train_f, train_y, eval_f, eval_y, k, args.knn_temp,
                                                         progress=progress.update)
        stage_seconds["knn"] = round(progress.close(), 2)
        results["knn_top1"] = results.get("knn_top1_k20", results.get(f"knn_top1_k{args.knn_k[0]}"))
        results["knn_temp"] = args.knn_temp
    if not args.no_linear:  # linear_top1 is the protocol that ran, which linear_protocol names
        results[f"linear_top1_{linear_protocol}"] = results["linear_top1"] = linear_probe(train_f, train_y, eval_f, eval_y)
        results["linear_protocol"] = linear_protocol
if not args.no_kmeans and master:
    results.update(kmeans_scores(F.normalize(eval_f.float(), dim=1), y, "kmeans"))
    subset, head_on_pixels = "", results
    if hasattr(eval_ds, "images"):  # raw pixels of the in-memory datasets
        shape = " x ".join(map(str, eval_ds.images.shape[1:]))
        results["kmeans_pixels_input"] = f"the {len(y):,} stored images, {shape}"
        results.update(kmeans_scores(torch.from_numpy(eval_ds.images.reshape(len(y), -1)).to(device) / 255.0, y,
                                      "kmeans_pixels"))
    elif pixel_mask is None:
        results["kmeans_pixels_input"] = (f"none: ten pictures a class of {num_classes:,} classes, even at 8 px, exceed "
                                          f"{PIXEL_WORK:.0e} pictures x pixels x classes an iteration")
    else:
        pm, side = pixel_mask.numpy(), plan[0]
        results["kmeans_pixels_input"] = (f"{pm.sum():,} of the {len(y):,} evaluation pictures"
                                          + (" at random (seed 0)" if pm.sum() < len(y) else "")
                                          + f", their {size}-px center crops" + (f" averaged to {side} px" if side < size else ""))
        results.update(kmeans_scores(eval_px.float(), y[pm], "kmeans_pixels"))
        head_on_pixels = metrics.cluster_metrics(y[pm], pred[pm]) if heads else results
        subset = f" (on the same {pm.sum():,} pictures)" if pm.sum() < len(y) else ""
    if heads:
        results["head0_minus_kmeans"], line = verdict(results, head_on_pixels, subset)
        results["verdict"] = line or "head 0 scores at or above k-means on raw pixels and on its own features"
k_range = args.estimate_k or ((2, max(20, 2 * (head_size or 10))) if dataset_name == "folder" and not labelled else None)
if k_range and master:
    fields, k_curve, k_line = estimate_classes(eval_f, *k_range)
    results.update(fields)
results["seconds"] = round(time.time() - t0, 1)
results["stage_seconds"] = stage_seconds

if master:
    os.makedirs(out_dir, exist_ok=True)
    results = dict(dataset=dataset_name, ckpt=os.path.abspath(args.ckpt), epoch=epoch, size=size,
                   precision="bf16" if args.bf16 else "fp32", **results)
    if heads:
        results["class_sizes"] = np.bincount(pred, minlength=head_size).tolist()  # images per class of head 0
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    for k, v in results.items():
        if k != "verdict" and not k.startswith("k_estimate_"):
            print(f"{k:>20}  {v:.4f}" if isinstance(v, float) else f"{k:>20}  {v}")
    if heads:
        conf = F.softmax(eval_logits / train_args["row_tau"], dim=1).max(1).values.cpu().numpy()
        np.savez(os.path.join(out_dir, "predictions.npz"), label=y, pred=pred, confidence=conf)
    if heads and dataset_name == "folder":
        figures.write_clusters(eval_ds, pred, conf, os.path.join(out_dir, "clusters.csv"), data_dir)
        print(f"wrote {os.path.join(out_dir, 'clusters.csv')}: the class of each of {len(pred):,} images")
    if heads and not args.no_figures:
        import matplotlib
        matplotlib.use("Agg")
        if dataset_name == "folder":
            figures.plot_class_sheets(eval_ds, pred, conf, y, out_dir, MEAN, STD, head_size, class_names)
        else:
            figures.plot_examples(eval_ds, pred, conf, y, os.path.join(out_dir, "examples.png"), MEAN, STD, head_size,
                                  names=class_names)
        if labelled:
            figures.plot_confusion(y, pred, os.path.join(out_dir, "confusion.png"), class_names)
        log_path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "log.jsonl")
        if os.path.exists(log_path):
            figures.plot_curves(log_path, os.path.join(out_dir, "curves.png"), head_size)
    if k_range and not args.no_figures:
        import matplotlib
        matplotlib.use("Agg")
        figures.plot_k_estimate(k_curve, results["k_estimate"], os.path.join(out_dir, "k_estimate.png"), head_size,
                                len(np.unique(y)) if labelled else None)
        print(f"wrote {os.path.join(out_dir, 'k_estimate.png')}")
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}")
    if k_range:
        print(k_line)
    if results.get("verdict", "").startswith("head 0 scores below"):
        print(results["verdict"])
if ddp:
    dist.destroy_process_group()
    exit_process(0)
