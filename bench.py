"""Benchmarks: every figure is the median of several runs, with its baseline measured in the same run.
(The README's result tables, trained and scored again: results.py.)

    python bench.py                 # all parts, a few minutes on 2 CPU cores
    python bench.py --only step loss
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--only", nargs="+",
                    default=["step", "data", "eval", "precision", "watch", "memory", "loss", "stop"],
                    help="parts to run: step data eval precision watch memory loss stop")
parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is printed)")
args, _ = parser.parse_known_args()
HERE = os.path.dirname(os.path.abspath(__file__))


def median_time(fn, repeats=None, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats or args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def row(name, value, unit, note=""):
    print(f"{name:<58} {value:>12,.2f} {unit:<8} {note}", flush=True)


# -----------------------------------------------------------------------------
# 1. the full training step against the bare backbone on the same crops


def recipe_network(arch, device, queue=None):
    """The ImageNet recipe's network on arch (MLP 4096-128, heads of 1,000 to 8,000 classes) with LARS: (a full
    training step on crops and their indices, the bare backbone's forward and backward on crops), under bf16
    autocast on CUDA as train.py runs them."""
    import loss
    from lars import LARS
    from model import SelfClassifier
    torch.manual_seed(0)
    model = SelfClassifier(arch, mlp_layers=2, mlp_hidden=4096, mlp_out=128, cls_sizes=(1000, 2000, 4000, 8000))
    model.to(device, memory_format=torch.channels_last)  # as train.py does
    opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
    backbone_opt = torch.optim.SGD(model.backbone.parameters(), lr=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def full(crops, index):
        with autocast:
            z, logits = model(crops, queue, index) if queue is not None else model(crops)
        value = loss.self_classifier_loss(logits)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if queue is not None:
            queue.push(z[:len(index)], index)

    def bare(crops):
        with autocast:
            f = model.features(crops)
        backbone_opt.zero_grad(set_to_none=True)
        f.float().sum().backward()
    return full, bare


def bench_step_at(batch, global_px, local_px, n_local=6):
    from model import NNQueue
    queue = NNQueue(4096, 128)
    queue.push(torch.nn.functional.normalize(torch.randn(4096, 128), dim=1), torch.arange(4096) + 10 ** 6)  # full
    full_step, bare_step = recipe_network("resnet18", torch.device("cpu"), queue)
    crops = [torch.randn(batch, 3, global_px, global_px) for _ in range(2)]
    crops += [torch.randn(batch, 3, local_px, local_px) for _ in range(n_local)]
    crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    index = torch.arange(batch)
    full, bare = (lambda: full_step(crops, index)), (lambda: bare_step(crops))

    # interleave the two so that the machine's load drifts over both alike
    t_full, t_bare = [], []
    full(), bare()
    for _ in range(args.repeats):
        t_full.append(median_time(full, 1, 0))
        t_bare.append(median_time(bare, 1, 0))
    t_full, t_bare = float(np.median(t_full)), float(np.median(t_bare))
    crops_txt = f"2x{global_px}+{n_local}x{local_px} px, batch {batch}"
    row(f"train step {crops_txt}: bare backbone fwd+bwd", batch / t_bare, "img/s")
    row(f"train step {crops_txt}: full step", batch / t_full, "img/s", "MLP, heads, loss, queue, LARS")
    row(f"train step {crops_txt}: overhead full / bare", t_full / t_bare, "x", "goal <= 1.10")


def bench_step():
    # resnet18, MLP 512-4096-128, heads of 1000/2000/4000/8000 classes, a full queue of 4096, one thread.
    # The recipe's crops first; then small crops, where the backbone is cheap next to the 15,000-class heads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bench_step_at(batch=8, global_px=224, local_px=96)
    bench_step_at(batch=32, global_px=64, local_px=32)
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# 2. the multi-crop pipeline on real JPEG photos


def reference_multicrop():
    # the original code's pipeline: PIL transforms per crop, ToTensor + Normalize at the end
    from torchvision import transforms as T
    from PIL import ImageFilter
    import random

    class Blur:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            return img.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0))) if random.random() < self.p else img

    flip_jitter = T.Compose([T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                             T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = T.InterpolationMode.BICUBIC
    g1 = T.Compose([T.RandomResizedCrop(224, (0.4, 1), interpolation=bicubic), flip_jitter, Blur(1.0), norm])
    g2 = T.Compose([T.RandomResizedCrop(224, (0.4, 1), interpolation=bicubic), flip_jitter, Blur(0.1),
                    T.RandomSolarize(128, p=0.2), norm])
    loc = T.Compose([T.RandomResizedCrop(96, (0.05, 0.4), interpolation=bicubic), flip_jitter, Blur(0.5), norm])
    return lambda img: [g1(img), g2(img)] + [loc(img) for _ in range(6)]


def bench_data(n_images=24):
    import data
    from matplotlib import cbook
    from PIL import Image
    with tempfile.TemporaryDirectory() as root:
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photo = Image.open(f).convert("RGB")
        os.makedirs(f"{root}/train/a")
        rng = np.random.default_rng(0)
        for i in range(n_images):  # ImageNet-like sizes, about 450 x 375 on average
            w, h = int(rng.integers(350, 550)), int(rng.integers(300, 450))
            photo.resize((w, h), Image.BICUBIC).save(f"{root}/train/a/{i}.JPEG", quality=90)
        torch.set_num_threads(1)  # one data worker process: one thread
        ours = data.build_dataset("imagenet", root, "train", data.train_transform("imagenet", n_local=6))
        ref = data.build_dataset("imagenet", root, "train", reference_multicrop())
        geometric = data.build_dataset("imagenet", root, "train",
                                       data.train_transform("imagenet", n_local=6, device_augment=True))
        t_ours = median_time(lambda: [ours[i] for i in range(n_images)], 3)
        t_ref = median_time(lambda: [ref[i] for i in range(n_images)], 3)
        t_geo = median_time(lambda: [geometric[i] for i in range(n_images)], 3)
        torch.set_num_threads(os.cpu_count())
        row("data: reference PIL multi-crop (2x224 + 6x96), 1 worker", n_images / t_ref, "img/s")
        row("data: data.MultiCrop, 1 worker", n_images / t_ours, "img/s")
        row("data: speed-up over the reference (goal >= 1.5)", t_ref / t_ours, "x")
        row("data: --device_augment: workers' geometric part, 1 worker", n_images / t_geo, "img/s",
            "decode, crop, resize to uint8")
        row("data: geometric part's speed-up over the reference", t_ref / t_geo, "x", "goal >= 3")
        bench_device_augment(geometric)


def bench_device_augment(geometric, batch=256):
    """--device_augment: the batched photometric part on a batch of 256 on the bench's device; then the full
    training step with the data loading (workers, photometric part) against the bare backbone on the same crops."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if not cuda else threads)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    mc = geometric.transform
    crops = [torch.stack(v).to(device) for v in zip(*[geometric[i % len(geometric)][0] for i in range(batch)])]
    index = torch.arange(batch)

    def photometric():
        mc.photometric(crops, index, 0, 0)
        sync()

    t_photo = median_time(photometric, 3)
    row(f"data: photometric part, batch of {batch} x 8 crops, {device.type}", t_photo * 1000, "ms",
        f"{t_photo / batch * 1000:.2f} ms/img, augment.apply via MultiCrop.photometric")
    # the step: the recipe's ResNet-50 and batch on a GPU; ResNet-18 and batch 8 on a CPU (bench_step's)
    arch, step_batch, workers = ("resnet50", batch, 8) if cuda else ("resnet18", 8, 1)
    full_step, bare_step = recipe_network(arch, device)
    steps = 2 * args.repeats
    images = torch.utils.data.Subset(geometric, [i % len(geometric) for i in range((steps + 1) * step_batch)])
    loader = torch.utils.data.DataLoader(images, batch_size=step_batch, num_workers=workers, pin_memory=cuda,
                                         drop_last=True)

    t0 = None  # the mean over a stream of steps, not a median: a stall waiting for the workers counts
    for i, (views, _, idx) in enumerate(loader):  # train.py's hand-off, then the step
        views = [c.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last) for c in views]
        full_step(mc.photometric(views, idx, 0, 0), idx)
        if i == 0:  # the first batch waits for the workers to start
            sync()
            t0 = time.perf_counter()
    sync()
    t_full = (time.perf_counter() - t0) / steps
    stored = [c.float().contiguous(memory_format=torch.channels_last) for c in mc.photometric(views, idx, 0, 0)]
    t_bare = median_time(lambda: (bare_step(stored), sync()))
    what = f"{arch}, batch {step_batch}, {workers} worker(s), {device.type}"
    row("data: bare backbone fwd+bwd, stored crops", step_batch / t_bare, "img/s", what)
    row("data: full step with data loading, --device_augment", step_batch / t_full, "img/s",
        f"{what}; photometric part {100 * t_photo * step_batch / batch / t_full:.0f}% of the step")
    row("data: full step with data / bare backbone", t_bare / t_full, "x", "goal >= 0.9 on a GPU with 8 workers")
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# 3. evaluation: feature extraction and the metrics against scikit-learn


def bench_eval():
    from model import SelfClassifier
    import metrics
    model = SelfClassifier("resnet18", cls_sizes=(1000,)).eval()
    x = torch.randn(64, 3, 224, 224)
    with torch.no_grad():
        t = median_time(lambda: model.backbone(x), 3)
    row("eval: resnet18 feature extraction, 224 px", 64 / t, "img/s")
    try:
        from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score
    except ImportError:
        print("eval: scikit-learn is not installed; skipping the metrics comparison")
        return
    rng = np.random.default_rng(0)
    y = rng.integers(0, 1000, 50000)
    pred = np.where(rng.random(50000) < 0.3, rng.integers(0, 1000, 50000), rng.permutation(1000)[y])
    t_ours = median_time(lambda: metrics.cluster_metrics(y, pred), 3)
    t_sk = median_time(lambda: (normalized_mutual_info_score(y, pred), adjusted_mutual_info_score(y, pred),
                                adjusted_rand_score(y, pred)), 3)
    row("eval: metrics.py NMI+AMI+ARI+ACC, 50k samples, 1000 classes", t_ours * 1000, "ms")
    row("eval: scikit-learn NMI+AMI+ARI, same labels", t_sk * 1000, "ms")
    row("eval: scikit-learn time / ours", t_sk / t_ours, "x")


def bench_precision(batch=8, px=224):
    """evaluate.py's feature extraction of the authors' ImageNet network (ResNet-50, MLP 2048-4096-128, head 0 of
    1000 classes; eval mode, channels_last) in float32, its default, against bf16 autocast (--bf16)."""
    from model import SelfClassifier
    torch.manual_seed(0)
    model = SelfClassifier("resnet50", cls_sizes=(1000, 2000, 4000, 8000)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, px, px).contiguous(memory_format=torch.channels_last)
    def extract(bf16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.predict(x, heads=[0])

    # the two alternate, so that a change in the machine's load falls on both
    times = {"fp32": [], "bf16": []}
    for r in range(args.repeats + 1):
        for name in times:
            t0 = time.perf_counter()
            extract(name == "bf16")
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        row(f"precision: ResNet-50 + MLP + head 0, {px} px, batch {batch}, {name}", batch / np.median(t), "img/s")
    ratios = np.array(times["fp32"]) / np.array(times["bf16"])
    row("precision: fp32 time / bf16 time, median of the rounds", float(np.median(ratios)), "x",
        f"(rounds {ratios.min():.2f}-{ratios.max():.2f})")
    # what one data-loading process feeds it: read, decode and evaluation transform of a JPEG photo
    import io
    import data
    from matplotlib import cbook
    from PIL import Image
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        jpeg = f.read()
    tf = data.eval_transform("imagenet")
    t = median_time(lambda: [tf(Image.open(io.BytesIO(jpeg)).convert("RGB")) for _ in range(batch)])
    w, h = Image.open(io.BytesIO(jpeg)).size
    row(f"precision: one loader process, {w} x {h} JPEG to a 224 px center crop", batch / t, "img/s")


def bench_watch():
    """train.py --eval_every 1 on the Fashion-MNIST recipe: a scoring pass over the 10,000 test images (what
    score_head0 does) against the 234 training steps of an epoch, both in this process. The steps run on
    stored crops, without the data loading that a real epoch overlaps with them."""
    import data
    import loss
    from model import build_model
    if not os.path.exists(os.path.join(data.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        print("watch: Fashion-MNIST files not found (apt-get install dataset-fashion-mnist); skipping")
        return
    recipe = subprocess.run([sys.executable, "train.py", "--dataset", "fashion_mnist", "--dry_run"], cwd=HERE,
                            capture_output=True, text=True, check=True).stdout
    recipe = json.loads(recipe)  # the recipe's settings, as train.py fills them in
    torch.manual_seed(0)
    model = build_model(recipe).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_set = data.build_dataset("fashion_mnist", data.FASHION_MNIST_DIR, "train",
                                   data.train_transform("fashion_mnist", 0, scale=recipe["crop_scale"]))
    crops = [torch.stack(v).contiguous(memory_format=torch.channels_last)
             for v in zip(*[train_set[i][0] for i in range(recipe["batch_size"])])]

    def step():
        opt.zero_grad(set_to_none=True)
        loss.self_classifier_loss(model(crops)[1]).backward()
        opt.step()

    eval_set = data.build_dataset("fashion_mnist", data.FASHION_MNIST_DIR, "eval", data.eval_transform("fashion_mnist"))
    loader = torch.utils.data.DataLoader(eval_set, batch_size=256, num_workers=recipe["workers"])

    @torch.no_grad()
    def score():
        model.eval()
        for x, _, _ in loader:
            model.predict(x.contiguous(memory_format=torch.channels_last), heads=[0])[1][0].argmax(1)
        model.train()

    steps = len(train_set) // recipe["batch_size"]
    t_step, t_score = median_time(step, 10), median_time(score, 3)
    row("watch: Fashion-MNIST recipe, one training step", t_step * 1000, "ms", f"x {steps} steps an epoch")
    row("watch: scoring head 0 on the 10,000 test images", t_score, "s", "(--eval_every 1)")
    row("watch: scoring / an epoch of steps", 100 * t_score / (steps * t_step), "%")


# -----------------------------------------------------------------------------
# 4. peak memory of the Fashion-MNIST recipe (a short run of the real command)


def bench_memory(seconds=60):
    import data
    if not os.path.exists(os.path.join(data.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        print("memory: Fashion-MNIST files not found (apt-get install dataset-fashion-mnist); skipping")
        return
    with tempfile.TemporaryDirectory() as out:
        # the real command, loading data in the training process; its peak RSS (VmHWM) after a minute
        p = subprocess.Popen([sys.executable, "train.py", "--dataset", "fashion_mnist", "--out_dir", out, "--workers", "0"],
                             cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak_kb = 0
        for _ in range(int(seconds / 0.5)):
            time.sleep(0.5)
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    peak_kb = max(peak_kb, *[int(l.split()[1]) for l in f if l.startswith("VmHWM")])
            except FileNotFoundError:
                break
        p.kill()
        p.wait()
    row("memory: Fashion-MNIST recipe, peak RSS of the training process", peak_kb / 1024, "MB",
        f"first {seconds} s, --workers 0")


# -----------------------------------------------------------------------------
# 5. the loss at ImageNet head sizes, 1 process against 2, against a version that gathers the logits


def loss_worker(out, mode, batch=64, repeats=5):
    import torch.distributed as dist
    import torch.distributed.nn.functional as dfn
    import loss
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    sizes = (1000, 2000, 4000, 8000)
    logits = [[torch.randn(batch, c, requires_grad=True) for _ in range(8)] for c in sizes]

    def gathered():
        # the original's way: all-gather the [B, C] logits of every view and head, then every process
        # computes the single-process loss on the whole [N, C] batch
        full = [[torch.cat(dfn.all_gather(z)) for z in views] for views in logits]
        saved, loss.world_size = loss.world_size, lambda: 1
        try:
            return loss.self_classifier_loss(full)
        finally:
            loss.world_size = saved

    fn = (lambda: loss.self_classifier_loss(logits)) if mode == "allreduce" else gathered

    def step():
        value = fn()
        value.backward()

    step()
    dist.barrier()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(ms=1000 * float(np.median(times)), peak_mb=peak), f)
    dist.destroy_process_group()


def run_worker(nproc, worker, *worker_args):
    """This file's worker under torchrun on nproc processes: the JSON its rank 0 wrote, or None if it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.abspath(__file__), worker, f.name, *worker_args]
        p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-2000:])
            return None
        return json.load(open(f.name))


def bench_loss():
    results = {}
    for mode in ("allreduce", "gather"):
        for nproc in (1, 2):
            r = run_worker(nproc, "loss_worker", mode)
            if r is not None:
                results[mode, nproc] = r
    for (mode, nproc), r in results.items():
        name = "C-vector all-reduce (ours)" if mode == "allreduce" else "all-gather of the logits"
        row(f"loss fwd+bwd, 4 heads 15k classes, 8 views, 64/process: {name}, {nproc} proc", r["ms"], "ms",
            f"peak {r['peak_mb']:,.0f} MB/process")


# -----------------------------------------------------------------------------
# 6. train.py's stop-signal check: a small synthetic-recipe step on 2 processes, without the check and with it


def stop_worker(out, steps=10):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import loss
    from model import SelfClassifier
    from preempt import StopSignal
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(SelfClassifier("cnn", 3, True, 16, 2, 256, 64, (10, 20)).to(memory_format=torch.channels_last))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crops = [torch.randn(32, 3, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    group = dist.new_group(backend="gloo")  # as train.py: the flag's own CPU group
    stop = StopSignal(group)

    def blocking_check():  # the alternative: a round trip inside every step, on the same group
        flag = torch.tensor(stop.received)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag)

    checks = {"none": lambda: False, "poll": stop.poll, "blocking": blocking_check}
    step_s, check_s = {k: [] for k in checks}, {k: [] for k in checks}
    for i in range(4 * args.repeats + 1):  # the modes interleave, in a rotating order, so that load drifts over all
        names = list(checks)[i % 3:] + list(checks)[:i % 3]
        for name in names:
            dist.barrier()
            t_check, t0 = 0.0, time.perf_counter()
            for _ in range(steps):
                value = loss.self_classifier_loss(model(crops)[1])
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                t1 = time.perf_counter()
                assert not checks[name]()
                t_check += time.perf_counter() - t1
            if i:  # the first round warms up
                step_s[name].append((time.perf_counter() - t0) / steps)
                check_s[name].append(t_check / steps)
    stop.close()
    if dist.get_rank() == 0:
        none = np.array(step_s["none"])
        with open(out, "w") as f:  # ratios paired with the no-check block of the same round
            json.dump({k: dict(ms=1000 * float(np.median(step_s[k])), check_us=1e6 * float(np.median(check_s[k])),
                               ratio=float(np.median(np.array(step_s[k]) / none))) for k in checks}, f)
    dist.destroy_process_group()


def bench_stop():
    r = run_worker(2, "stop_worker", "--repeats", str(args.repeats))
    if r is None:
        return
    for k, name in (("none", "no stop check"), ("poll", "StopSignal.poll (train.py)"), ("blocking", "a blocking all-reduce")):
        row(f"step, 2 proc x 32 imgs: {name}", r[k]["ms"], "ms/step",
            f"{r[k]['ratio']:.3f} x none; the check itself {r[k]['check_us']:,.0f} us/step")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "loss_worker":
        loss_worker(*sys.argv[2:4])
        sys.exit()
    if len(sys.argv) > 1 and sys.argv[1] == "stop_worker":
        stop_worker(sys.argv[2])
        sys.exit()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    for part in args.only:
        {"step": bench_step, "data": bench_data, "eval": bench_eval, "precision": bench_precision, "watch": bench_watch,
         "memory": bench_memory, "loss": bench_loss, "stop": bench_stop}[part]()
