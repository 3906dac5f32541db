"""Datasets and the DINO-style multi-crop augmentation (Caron et al., 2021) used by Self-Classifier.

Every dataset yields (crops, label, index): crops a list of views (2 global, then the local ones),
label the true class (-1 where unknown; only evaluation reads it), index the position in the dataset.
"""
import gzip
import os
import pickle

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import datasets, transforms

import augment
import folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Per-dataset image facts and crop recipe. size/local_size: global and local crop sides in px;
# scale/local_scale: RandomResizedCrop area ranges with local crops; scale_2views: the global crops'
# range without local crops (the paper: 0.14-1; tiny images need more of the object, docs/experiments.md,
# "why global crops of 0.8-1 on Fashion-MNIST"); blur: DINO's
# Gaussian blur (off for tiny images, where it erases the object); eval_resize: shorter side before
# the center crop.
_MULTICROP = dict(scale=(0.4, 1.0), local_scale=(0.05, 0.4))
DATASETS = {
    "imagenet": dict(chans=3, classes=1000, size=224, local_size=96, **_MULTICROP, scale_2views=(0.14, 1.0),
                     blur=True, eval_resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "stl10": dict(chans=3, classes=10, size=96, local_size=48, **_MULTICROP, scale_2views=(0.14, 1.0),
                  blur=True, eval_resize=96, mean=(0.447, 0.440, 0.405), std=(0.260, 0.257, 0.271)),
    "cifar10": dict(chans=3, classes=10, size=32, local_size=16, **_MULTICROP, scale_2views=(0.14, 1.0),
                    blur=False, eval_resize=32, mean=(0.491, 0.482, 0.447), std=(0.247, 0.243, 0.262)),
    "cifar100": dict(chans=3, classes=100, size=32, local_size=16, **_MULTICROP, scale_2views=(0.14, 1.0),
                     blur=False, eval_resize=32, mean=(0.507, 0.487, 0.441), std=(0.267, 0.256, 0.276)),
    "mnist": dict(chans=1, classes=10, size=28, local_size=14, **_MULTICROP, scale_2views=(0.3, 1.0),
                  blur=False, eval_resize=28, mean=(0.131,), std=(0.308,)),
    "fashion_mnist": dict(chans=1, classes=10, size=28, local_size=14, **_MULTICROP, scale_2views=(0.8, 1.0),
                          blur=False, eval_resize=28, mean=(0.286,), std=(0.353,)),
    "synthetic": dict(chans=3, classes=10, size=16, local_size=8, scale=(0.4, 1.0), local_scale=(0.1, 0.4),
                      scale_2views=(0.5, 1.0), blur=False, eval_resize=16, mean=(0.5,) * 3, std=(0.25,) * 3),
    # a user's own pictures: classes come from the folder; mean and std are measured on its images by train.py
    "folder": dict(chans=3, classes=None, size=64, local_size=32, **_MULTICROP, scale_2views=(0.25, 1.0),
                   blur=False, eval_resize=64, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
# the names figures show for the classes of the named datasets
DATASETS["fashion_mnist"]["names"] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                      "Sneaker", "Bag", "Ankle boot")
DATASETS["mnist"]["names"] = tuple(str(d) for d in range(10))
DATASETS["cifar10"]["names"] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck")
DATASETS["stl10"]["names"] = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it

# -----------------------------------------------------------------------------
# augmentation


class RandomBlur:
    """Gaussian blur with probability p and sigma uniform in [lo, hi] (PIL: ~30x faster than tensors on a CPU)."""

    def __init__(self, p, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        radius = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class MultiCrop:
    """2 global crops and n_local local crops of one PIL image, DINO's augmentations as Self-Classifier uses them.

    View 0: blur p 0.1; view 1: blur p 1.0 and solarisation p 0.2; local crops: blur p 0.5.
    The same random draws, in the same order, as the torchvision composition RandomResizedCrop(bicubic),
    RandomHorizontalFlip, RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(0.2),
    blur, RandomSolarize, ToTensor, Normalize, and the same operations, except two that run faster on a
    CPU: the crop's antialiased bicubic resize runs on the uint8 tensor (5x faster than PIL's, pixels equal
    up to a rounding of 1 level in about 0.2% of values), and ToTensor + Normalize is one conversion with
    precomputed constants (3x faster). Colour jitter, blur and solarisation stay PIL's.

    device_augment: the workers return the uint8 crops alone, and photometric does the rest on a batch, on the
    training device, with the same distributions (augment.py).
    """

    def __init__(self, size, local_size, scale, local_scale, n_local, mean, std, blur=True, flip=True,
                 device_augment=False):
        # flip=False for pictures whose mirror image means something else (text, digits, scans)
        self.flip, self.mean, self.std, self.device_augment = flip, tuple(mean), tuple(std), device_augment
        self.flip_jitter = transforms.Compose([transforms.RandomHorizontalFlip()] * flip + [
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)])
        self.views = [(size, scale, 0.1, 0.0), (size, scale, 1.0, 0.2)] + [(local_size, local_scale, 0.5, 0.0)] * n_local
        self.blur = blur
        self.shift = torch.tensor(mean)[:, None, None] * 255  # (C, 1, 1): (x / 255 - mean) / std = (x - shift) * mul
        self.mul = 1 / (torch.tensor(std)[:, None, None] * 255)

    def view(self, x, size, scale, blur_p, solarize_p):
        # x: (1, C, H, W) uint8, the whole image
        i, j, h, w = transforms.RandomResizedCrop.get_params(x, scale, (3 / 4, 4 / 3))
        crop = torch.nn.functional.interpolate(x[:, :, i:i + h, j:j + w], size=(size, size), mode="bicubic",
                                               antialias=True)[0]  # (C, size, size) uint8
        if self.device_augment:
            return crop.contiguous()
        img = Image.fromarray(crop[0].numpy() if len(crop) == 1 else crop.permute(1, 2, 0).contiguous().numpy())
        img = self.flip_jitter(img)
        if torch.rand(1) < 0.2:  # RandomGrayscale: the L image in as many bands as the input
            img = img.convert("L").convert(img.mode)
        if self.blur and blur_p > 0:
            img = RandomBlur(blur_p)(img)
        if solarize_p > 0 and torch.rand(1).item() < solarize_p:
            img = ImageOps.solarize(img, 128)
        out = torch.from_numpy(np.array(img))  # (H, W, C) or (H, W) uint8
        out = out[None] if out.ndim == 2 else out.permute(2, 0, 1)
        return out.to(torch.float32, memory_format=torch.contiguous_format).sub_(self.shift).mul_(self.mul)  # (C, size, size)

    def __call__(self, img):
        x = torch.from_numpy(np.array(img))  # (H, W, C) or (H, W) uint8
        x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]  # channels-last strides: the fast resize
        return [self.view(x, *v) for v in self.views]

    def photometric(self, crops, index, epoch, seed):
        """What the workers left out with device_augment, on a batch: crops, a list over views of (B, C, S, S) uint8
        on the device; index: (B,) dataset indices on the host. Views of one size go through together."""
        out = [None] * len(crops)
        for side in dict.fromkeys(c.shape[-1] for c in crops):
            group = [v for v, c in enumerate(crops) if c.shape[-1] == side]
            rows = dict(index=index.repeat(len(group)), view=torch.tensor(group).repeat_interleave(len(index)))
            blur_p, solarize_p = (torch.tensor([self.views[v][k] for v in group]).repeat_interleave(len(index))
                                  for k in (2, 3))
            p = augment.draw(seed, epoch, rows["index"], rows["view"], blur_p * self.blur, solarize_p, self.flip)
            x = augment.apply(torch.cat([crops[v] for v in group]), p, self.mean, self.std)
            for v, part in zip(group, x.split(len(index))):
                out[v] = part
        return out


def eval_transform(name, size=None, mean=None, std=None):
    """Resize the shorter side (bilinear, as the authors' evaluation code), center crop to the training crop
    size (default: the dataset's), normalise (default: with the dataset's mean and std)."""
    d = DATASETS[name]
    size = size or d["size"]
    return transforms.Compose([
        transforms.Resize(round(size * d["eval_resize"] / d["size"]), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean or d["mean"], std or d["std"])])


def default_crop_scale(name, n_local):
    d = DATASETS[name]
    return d["scale"] if n_local else d["scale_2views"]


def train_transform(name, n_local, size=None, local_size=None, scale=None, mean=None, std=None, flip=True,
                    device_augment=False):
    d = DATASETS[name]
    return MultiCrop(size or d["size"], local_size or d["local_size"], scale or default_crop_scale(name, n_local),
                     d["local_scale"], n_local, mean or d["mean"], std or d["std"], d["blur"], flip, device_augment)

# -----------------------------------------------------------------------------
# datasets


def _seed_augmentation(key, seed):
    # A key (index, epoch) from EpochSampler makes the random crops a function of (seed, epoch,
    # index) alone: the same whatever the number of workers or processes, and after a resume.
    if isinstance(key, (tuple, list)):
        i, epoch = key
        torch.default_generator.manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + i) % 2 ** 62)
        return i
    return key


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 [N, H, W] or [N, H, W, 3] with integer labels."""

    def __init__(self, images, labels, transform, seed=0):
        assert len(images) == len(labels)
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform
        self.seed = seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        i = _seed_augmentation(key, self.seed)
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i]), i


class FolderDataset(datasets.ImageFolder):
    """ImageFolder that also returns the index and names the file it cannot decode."""

    def __init__(self, root, transform, seed=0):
        super().__init__(root, transform=transform, loader=self._load)
        self.seed = seed

    @staticmethod
    def _load(path):
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                folder.check_pixels(img, folder.DEFAULT_MAX_PIXELS)  # PIL's limit, which folder.py checks in its place
                return img.convert("RGB")
        except Exception as e:
            raise RuntimeError(f"cannot read image {path}: {e}") from e

    def __getitem__(self, key):
        i = _seed_augmentation(key, self.seed)
        img, label = super().__getitem__(i)
        return img, label, i


class ImageFiles(torch.utils.data.Dataset):
    """Every image file below root (folder.find_images), with the first-level folder as its class where every file
    sits in one and there are at least two (classes: their sorted names, or the names given); else label -1."""

    def __init__(self, root, transform, channels=3, seed=0, classes=None, max_pixels=folder.DEFAULT_MAX_PIXELS):
        self.root, self.transform, self.channels, self.seed = root, transform, channels, seed
        self.max_pixels = max_pixels  # pictures with more pixels are unreadable (0: no limit)
        # JPEGs decode at the smallest 1/2, 1/4 or 1/8 scale whose sides stay at least this many px (None: full
        # size): a 2000 x 1500 photo decodes 4x faster and is resized to a few dozen px anyway
        self.draft_side = None
        entries = folder.list_pictures(root)
        self.files = [rel for rel, _, _ in entries]
        self.stats = [(size, mtime) for _, size, mtime in entries]  # bytes and mtime_ns of each file
        if not self.files:
            raise FileNotFoundError(f"--data_dir {root}: no image files there or in any sub-folder (looked for "
                                    f"{' '.join(folder.IMAGE_EXTENSIONS)} in any case)")
        tops = [f.split("/")[0] if "/" in f else None for f in self.files]
        labelled = None not in tops and len(set(tops)) >= 2
        loose = [f for f, t in zip(self.files, tops) if t is None]
        if loose and len(set(tops) - {None}) >= 2:
            folder.warn_once(f"{root}: {len(loose)} picture(s) outside its sub-folders ({folder.few(loose)}), so the "
                             f"folder is read as unlabelled and the label metrics (NMI, AMI, ARI, ACC) are off; to score "
                             f"by the sub-folders' names, move them into a sub-folder")
        self.classes = (classes or sorted(set(tops))) if labelled else None
        lookup = {c: i for i, c in enumerate(self.classes or ())}
        self.labels = np.array([lookup[t] for t in tops] if labelled else [-1] * len(tops), dtype=np.int64)

    def __len__(self):
        return len(self.files)

    def path(self, i):
        return os.path.join(self.root, self.files[i])

    def load(self, i, draft=None):
        try:
            return folder.open_image(self.path(i), self.channels, draft, self.max_pixels)
        except Exception as e:
            raise RuntimeError(f"cannot read image {self.path(i)}: {e}") from e

    def __getitem__(self, key):
        i = _seed_augmentation(key, self.seed)
        return self.transform(self.load(i, self.draft_side and (self.draft_side, self.draft_side))), int(self.labels[i]), i

    def drop(self, files):
        """Leave these relative paths out (the unreadable files, when the user asks to skip them)."""
        files = set(files)
        keep = np.array([f not in files for f in self.files], dtype=bool)
        self.files = [f for f, k in zip(self.files, keep) if k]
        self.stats = [s for s, k in zip(self.stats, keep) if k]
        self.labels = self.labels[keep]

    def fingerprint(self):
        return folder.files_fingerprint(self.files)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled global batches, deterministic in (seed, epoch), cut into equal per-process shares.

    Step s of an epoch uses the same global batch whatever the number of processes; the tail that
    does not fill a global batch is dropped. Yields (index, epoch) keys; start skips whole steps.
    """

    def __init__(self, n, global_batch, world_size=1, rank=0, seed=0):
        self.n, self.global_batch, self.world_size, self.rank, self.seed = n, global_batch, world_size, rank, seed
        self.local_batch = global_batch // world_size
        self.steps = n // global_batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return (self.steps - self.start) * self.local_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.global_batch].view(self.steps, self.global_batch)
        mine = perm[self.start:, self.rank * self.local_batch: (self.rank + 1) * self.local_batch]
        return iter([(i, self.epoch) for i in mine.flatten().tolist()])


def center_crop_set(args, split):
    """A split of train.py's run (args: its settings) as evaluate.py reads it, for scoring and SeLa's
    relabelling: center crops; a folder's pictures decoded no larger than the crop needs."""
    tf = eval_transform(args.dataset, args.size, args.mean, args.std)
    ds = build_dataset(args.dataset, args.data_dir, split, tf, holdout=args.holdout, channels=args.in_chans)
    if args.dataset == "folder":
        ds.draft_side, ds.max_pixels = args.size, args.max_pixels
    return ds


def pass_loader(ds, batch_size, rank, world_size, workers):
    """A loader for passes beside training (scoring, SeLa's relabelling) over this process's share of ds, every
    world_size-th image from rank. Its workers are forked now, once, and persist: a worker forked later, beside
    the training loader's threads, was seen to hang on a lock at its start (docs/experiments.md, "a restart
    after a crash"). Build it before the training loader's first pass."""
    share = torch.utils.data.Subset(ds, range(rank, len(ds), world_size))
    # a generator of its own: starting the workers draws a seed, which must not move the global one (the
    # model's initial weights are drawn after)
    loader = torch.utils.data.DataLoader(share, batch_size=batch_size, num_workers=workers,
                                         persistent_workers=workers > 0, generator=torch.Generator())
    if workers:
        iter(loader)
    return loader


def _require(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: expected {what}")
    return path


def read_idx(path):
    """An IDX file of the original MNIST distribution (optionally gzipped) as a numpy array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {arr.size} bytes")
    return arr.reshape(shape)


def load_mnist(data_dir, train, name="fashion_mnist", download=False):
    """The four original IDX files (gz or not) in data_dir, or in torchvision's layout below it."""
    tv_name = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]  # torchvision's class and folder
    if download:
        getattr(datasets, tv_name)(data_dir, train=train, download=True)
    prefix = "train" if train else "t10k"
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        folders = (data_dir, os.path.join(data_dir, tv_name, "raw"))
        found = [p for d in folders for ext in ("", ".gz") if os.path.exists(p := os.path.join(d, f"{prefix}-{kind}{ext}"))]
        if not found:
            hint = f" (apt-get install dataset-fashion-mnist puts them in {FASHION_MNIST_DIR})" if name == "fashion_mnist" else ""
            raise FileNotFoundError(f"--data_dir {data_dir}: expected the {name} file {prefix}-{kind}[.gz] there or in "
                                    f"{data_dir}/{tv_name}/raw{hint}, or pass --download")
        arrays.append(read_idx(found[0]))
    return arrays[0], arrays[1]


def load_cifar(data_dir, train, name="cifar10", coarse=False, download=False):
    """CIFAR in the python pickle format of its authors (what torchvision downloads)."""
    if download:
        getattr(datasets, name.upper())(data_dir, train=train, download=True)
    sub = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    root = data_dir if os.path.basename(os.path.normpath(data_dir)) == sub else os.path.join(data_dir, sub)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = "labels"
    else:
        files, key = ["train" if train else "test"], "coarse_labels" if coarse else "fine_labels"
    images, labels = [], []
    for fname in files:
        with open(_require(os.path.join(root, fname), f"the {name} python batches in {root} (or pass --download)"), "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[key])
    return np.ascontiguousarray(np.concatenate(images)), np.asarray(labels)


def load_stl10(data_dir, split, download=False):
    """STL-10 binary format; split in {train, test, unlabeled, train+unlabeled}; unlabeled has label -1."""
    if download:
        datasets.STL10(data_dir, split=split, download=True)
    root = data_dir if os.path.exists(os.path.join(data_dir, "train_X.bin")) else os.path.join(data_dir, "stl10_binary")
    images, labels = [], []
    for part in split.split("+"):
        x_path = _require(os.path.join(root, f"{part}_X.bin"), f"the STL-10 binary files in {root} (or pass --download)")
        x = np.fromfile(x_path, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)  # stored column-major
        images.append(x)
        if part == "unlabeled":
            labels.append(np.full(len(x), -1))
        else:  # labels are stored 1..10
            labels.append(np.fromfile(_require(os.path.join(root, f"{part}_y.bin"), "STL-10 labels"), dtype=np.uint8) - 1)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels).astype(np.int64)


def make_synthetic(n, seed, size=16, classes=10):
    """A learnable image set made in memory: each class a shape in its own colour, at a random
    position and scale, with a colour and brightness jitter, on a noisy background."""
    g = np.random.default_rng(seed)
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 190, 190], [255, 255, 255]], np.float32)
    labels = np.arange(n) % classes
    g.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = g.uniform(0.28, 0.4, n)[:, None, None] * size  # half-size of the shape, px
    cy, cx = (g.uniform(0.35, 0.65, (2, n)) * size)[:, :, None, None]
    dy, dx = (yy - cy) / r, (xx - cx) / r  # (n, size, size), shape coordinates in [-1, 1]
    ay, ax = np.abs(dy), np.abs(dx)
    rad = np.sqrt(dy ** 2 + dx ** 2)
    # shapes that look alike go to colours far apart in hue and brightness, and vice versa
    shapes = [(np.minimum(ay, ax) < 0.3) & (np.maximum(ay, ax) < 1),  # red plus
              (ay < 0.35) & (ax < 1),  # green horizontal bar
              (np.abs(ay - ax) < 0.3) & (np.maximum(ay, ax) < 1),  # yellow X
              (np.maximum(ay, ax) < 1) & (np.maximum(ay, ax) > 0.55),  # blue hollow square
              np.maximum(ay, ax) < 1,  # orange square
              (ax < 0.35) & (ay < 1),  # purple vertical bar
              rad < 1,  # cyan disc
              (dy > -1) & (dy < 1) & (ax < (dy + 1) / 2),  # magenta triangle
              (rad < 1) & (rad > 0.6),  # pink ring
              (np.abs(ay - 0.65) < 0.3) & (ax < 1)]  # white pair of horizontal bars
    mask = np.stack(shapes[:classes], 1)[np.arange(n), labels].astype(np.float32)  # (n, size, size)
    colour = palette[labels % len(palette)] * g.uniform(0.7, 1.1, (n, 1)) + g.normal(0, 12, (n, 3))
    background = g.uniform(10, 40, (n, 1, 1, 1)) + g.normal(0, 10, (n, size, size, 3))
    img = background * (1 - mask[..., None]) + colour[:, None, None, :] * mask[..., None]
    img += g.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), labels


def build_dataset(name, data_dir, split, transform, download=False, seed=0, holdout=0, channels=3):
    """split: "train" (what training sees, unlabelled), "train_labeled" (for kNN and linear probe)
    or "eval" (the evaluation split: ImageNet val, the test sets, the synthetic held-out set).

    holdout > 0 (in-memory datasets): a validation split for choosing hyper-parameters; the last
    holdout images of a fixed permutation of the training set become "eval", the rest the training
    splits, and the test set is not read."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if holdout and name in ("imagenet", "stl10", "folder"):
        raise ValueError(f"--holdout is for datasets with one labelled training set; {name} is not one of them")
    train = split != "eval" or holdout > 0
    if name == "imagenet":
        root = os.path.join(data_dir, "train" if train else "val")
        if not os.path.isdir(root) or not any(os.scandir(root)):
            raise FileNotFoundError(f"--data_dir {data_dir}: expected ImageNet in ImageFolder layout, "
                                    f"{root}/<class>/<image>.JPEG, but {root} is missing or empty")
        return FolderDataset(root, transform, seed)
    if name == "folder":
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"--data_dir {data_dir}: no such folder")
        train_root, eval_root = folder.folder_splits(data_dir)
        # with train/ and val/ both splits number their classes by the union of their folder names
        tops = {e.name for r in {train_root, eval_root} if r != data_dir for e in os.scandir(r) if e.is_dir()}
        return ImageFiles(eval_root if split == "eval" else train_root, transform, channels, seed, sorted(tops) or None)
    if name == "synthetic":
        images, labels = make_synthetic(5000 if train else 1000, seed=0 if train else 1)
    elif name in ("mnist", "fashion_mnist"):
        images, labels = load_mnist(data_dir, train, name, download)
    elif name in ("cifar10", "cifar100"):
        images, labels = load_cifar(data_dir, train, name, download=download)
    else:
        images, labels = load_stl10(data_dir, {"train": "train+unlabeled", "train_labeled": "train", "eval": "test"}[split],
                                    download)
    if holdout:
        if not 0 < holdout < len(images):
            raise ValueError(f"--holdout {holdout} must be between 0 and the {len(images)} training images")
        perm = np.random.default_rng(12345).permutation(len(images))
        keep = perm[-holdout:] if split == "eval" else np.sort(perm[:-holdout])
        images, labels = images[keep], labels[keep]
    if len(images) == 0:
        raise ValueError(f"--data_dir {data_dir}: the {name} {split} split is empty")
    return ArrayDataset(images, labels, transform, seed)
