"""The recipes: each dataset's settings, the published ImageNet runs and the other methods' settings, and how
they complete train.py's flags (complete_flags) and refuse impossible combinations. Prints nothing, parses
nothing: train.py --dry_run prints what it returns."""
import os

import data
import folder
from model import starting_weights

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
                    weight_decay=1e-6, optimizer="lars", workers=4, log_every=100,
                    sela_lamb=10.0),  # SeLa's cifar.py (its ImageNet code: 25)
    "cifar100": dict(arch="resnet18", mlp_layers=2, mlp_hidden=512, mlp_out=128, cls_sizes=[100, 200, 400, 800],
                     queue_len=0, n_local=0, epochs=100, batch_size=256, lr=0.3, start_lr=0.0, warmup_epochs=10,
                     weight_decay=1e-6, optimizer="lars", workers=4, log_every=50, sela_lamb=10.0),
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


def complete_flags(args):
    """Fill every flag left None from the recipes, in place, and stop (SystemExit, one message) on impossible
    combinations. A resume's checkpoint fixes the network's shape, and wins over --init. Returns
    (resume, init, init_note, ckpt_seen): the checkpoint in OUT_DIR (or None), the --init file read by
    model.read_pretrained (or None), a line for the run to print about --init (or None), and the checkpoint
    file's os.stat when it was read (to see whether another run rewrote it before this one held the folder)."""
    if args.recipe and args.dataset != "imagenet":
        raise SystemExit(f"--recipe {args.recipe}: the recipes are the published ImageNet runs; {args.dataset} has "
                         f"one recipe")
    if args.method != "self_classifier":
        if args.queue_len:  # the queue is part of Self-Classifier's method, neither TWIST's nor SeLa's
            raise SystemExit(f"--queue_len {args.queue_len}: the nearest-neighbour queue is Self-Classifier's; "
                             f"{args.method} never uses one (leave --queue_len out or pass 0)")
        args.queue_len = 0
        if args.bn_group is None:
            args.bn_group = 0 if args.method == "twist" else 1

    recipe = dict(RECIPES[args.dataset])  # a copy: the tables stay as published
    # the network's shape comes from --init's file, or on a resume from the checkpoint, which wins over --init
    args.out_dir = args.out_dir or f"out/{args.dataset}-{args.method}"
    resume, init, init_note, ckpt_seen, shape = starting_weights(args, os.path.join(args.out_dir, "ckpt.pt"))
    for k, v in shape.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dataset == "imagenet":
        if args.method == "sela" and args.recipe:
            raise SystemExit(f"--recipe {args.recipe}: the recipes are Self-Classifier's published runs; SeLa on imagenet "
                             f"follows its authors' run (batch 256, 400 epochs), changed by flags")
        if args.method != "sela":
            args.recipe = args.recipe or "bs2048"
            recipe.update(IMAGENET_RUNS[args.recipe])
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
        recipe.update(small)
    recipe.update(METHOD_RECIPES.get((args.dataset, args.method), {}))
    for k, v in recipe.items():
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
    return resume, init, init_note, ckpt_seen


def check_processes(args, world_size, cuda):
    """Stop with one line where the global batch does not split over the processes, or TWIST's logit BatchNorm
    groups (CUDA only) over their images."""
    if args.batch_size % world_size:
        raise SystemExit(f"--batch_size {args.batch_size} (global) does not divide by {world_size} processes")
    local = args.batch_size // world_size
    if args.method == "twist" and cuda and world_size > 1 and args.twist_bn_images % local:
        raise SystemExit(f"--twist_bn_images {args.twist_bn_images} is not a multiple of the {local} images per process")


def check_dataset_size(args, n):
    """Stop with one line where the training set of n images cannot fill the heads or one global batch."""
    images = f"{n:,} image{'s' if n != 1 else ''}"
    if max(args.cls_sizes) > n:
        raise SystemExit(f"--cls_sizes {' '.join(map(str, args.cls_sizes))}: a head of {max(args.cls_sizes)} classes "
                         f"for {images}; every class needs images, so pick sizes of at most {n}")
    if n < args.batch_size:
        raise SystemExit(f"the {args.dataset} training set has {images}, fewer than one global batch "
                         f"of {args.batch_size}; lower --batch_size")


def relabel_points(args):
    # SeLa: relabelling i of n at i/n of the run (linear) or (i/n)^2 (quadratic: dense early), the first at step 0
    n = args.sela_relabels or args.epochs
    return [(i / n) ** (2 if args.sela_schedule == "quadratic" else 1) for i in range(n)]


def dry_run_settings(args):
    """What --dry_run prints: the completed flags, the peak and final learning rates, SeLa's relabelling epochs."""
    peak = args.lr * args.batch_size / 256
    drops = sum(d < args.epochs for d in args.lr_drops or ())
    final = peak * 0.1 ** drops if args.lr_drops else peak * args.final_lr_ratio
    sela = ({"sela_relabel_epochs": [round(args.epochs * f, 4) for f in relabel_points(args)]}
            if args.method == "sela" else {})
    return dict(vars(args), peak_lr=peak, final_lr=final, **sela)
