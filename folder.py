"""Your own folder of pictures: each picture read as a viewer shows it, the folder listed with links followed
and each real file once, and the scan before training (unreadable files, mean and std, sizes, colour), shared
over processes and kept in OUT/scan.json; then the recipe the pictures call for.

data.py: ImageFiles is the folder as a dataset; train.py and evaluate.py read folders through these functions.
"""
import hashlib
import json
import os
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from progress import Progress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# PIL's limit on a picture's pixels (about 89.5 million), the default of --max_pixels. PIL refuses twice that with an
# error that names no file and only warns between the two; read_picture checks the limit itself and names the file.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None
COLOUR_SPREAD = 16  # levels of 255 between a pixel's R, G and B above which a picture has colour (JPEG's grey: ~3)
_WARNED = set()


def warn_once(msg):
    # one line per process from rank 0, however many times the same folder is read
    if msg not in _WARNED and os.environ.get("RANK", "0") == "0":
        _WARNED.add(msg)
        print(f"warning: {msg}", flush=True)


def few(names, k=3):
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def check_pixels(img, max_pixels):
    """Refuse a picture of more than max_pixels (0: no limit) before it is decoded."""
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise ValueError(f"{w:,} x {h:,} = {w * h:,} pixels, above the limit of {max_pixels:,} (--max_pixels; "
                         f"0 = no limit)")


def read_picture(path, draft=None, max_pixels=DEFAULT_MAX_PIXELS):
    """A picture file as a user sees it: (PIL image, (width, height) as shown at full size, whether the file is
    truncated). EXIF orientation applied; the first frame of an animation; 16-bit images scaled to 8 bits (not
    clipped); transparency composited on white, as viewers show it. A truncated file (a JPEG without its end
    marker) is decoded as far as it goes, as viewers do. draft (w, h): let a JPEG decode at a reduced scale no
    smaller than this (much faster; for the scan)."""
    def decode(truncated):
        with open(path, "rb") as f:
            img = Image.open(f)
            check_pixels(img, max_pixels)
            size = img.size
            if draft and img.format == "JPEG":
                img.draft(img.mode, draft)
            was, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, truncated
            try:
                img.load()  # the first frame of a GIF, decoded before the file closes
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = was
        return img, size
    try:
        (img, size), truncated = decode(False), False
    except OSError as e:
        if "truncated" not in str(e).lower():
            raise
        (img, size), truncated = decode(True), True  # only the files that need it: the rest keep PIL's check
    if img.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that turn the picture by 90 degrees
        size = size[::-1]
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and integer images span 0-65535: PIL's convert("L") would clip them at 255
        x = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(x / 257.0), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img, size, truncated


def open_image(path, channels=3, draft=None, max_pixels=DEFAULT_MAX_PIXELS):
    """read_picture's picture as an RGB (channels 3) or L (channels 1) PIL image (palette and CMYK through PIL's
    conversions)."""
    return read_picture(path, draft, max_pixels)[0].convert("L" if channels == 1 else "RGB")


def list_pictures(root):
    """(relative path, size, mtime_ns) of every picture file below root, each real file once, sorted by path.

    Links are followed, each folder walked once (by its (st_dev, st_ino)): the real tree first, then the folders
    that links reach, so a real path wins over a link and a loop such as sub/up -> .. ends. A file reached twice
    (two links to one file) is listed once, by its real path where it has one."""
    found, left_out, seen_dirs = [], [], set()
    todo, stage = [""], 0  # folders to walk, relative to root: the root, then each round of links found
    while todo:
        links = []
        for top in sorted(todo):
            stack = [top]
            while stack:
                rel = stack.pop()
                path = os.path.join(root, rel)
                try:
                    st = os.stat(path)
                    entries = list(os.scandir(path))
                except OSError:  # a broken link to a folder, or one we may not read: it holds nothing for us
                    continue
                if (st.st_dev, st.st_ino) in seen_dirs:
                    left_out.append(rel + "/")
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                prefix = rel + "/" if rel else ""
                for e in entries:
                    if e.name.startswith("."):  # hidden files and folders hold no pictures
                        continue
                    if e.is_dir():
                        (links if e.is_symlink() else stack).append(prefix + e.name)
                    elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                        try:
                            st = e.stat()
                            key, size, mtime = (st.st_dev, st.st_ino), st.st_size, st.st_mtime_ns
                        except OSError:  # a broken link: kept, for the scan to name it as unreadable
                            key, size, mtime = e.path, -1, 0
                        found.append((stage, e.is_symlink(), prefix + e.name, key, size, mtime))
        todo, stage = links, stage + 1
    entries, seen_files = [], set()
    for _, _, rel, key, size, mtime in sorted(found):
        if key in seen_files:
            left_out.append(rel)
        else:
            seen_files.add(key)
            entries.append((rel, size, mtime))
    if left_out:
        warn_once(f"{root}: {len(left_out)} link(s) left out, each to a folder or picture already listed (each "
                   f"real file is read once): {few(sorted(left_out))}")
    return sorted(entries)


def find_images(root):
    """Relative paths (with /) of every image file below root, each real file once (links followed without loops),
    in sorted order: the same on every machine."""
    return [rel for rel, _, _ in list_pictures(root)]


def files_fingerprint(files):
    # a resume must see the same files in the same order, or its steps would not be the run's
    return hashlib.sha1("\n".join(files).encode()).hexdigest()[:16]


class Scan(NamedTuple):
    """What scan measures. unreadable: (relative path, reason) of each file that cannot be decoded;
    mean, std: per channel, on thumbnails; median_size: (width, height) in px of the readable pictures at full
    size; colour: whether any picture has colour (R, G and B of a pixel more than COLOUR_SPREAD levels apart),
    colour_pictures: how many; truncated: files decoded only as far as they go; large: pictures above PIL's limit,
    read because --max_pixels allows them; files: how many were scanned."""
    unreadable: list
    mean: tuple
    std: tuple
    median_size: tuple
    colour: bool
    colour_pictures: int
    truncated: list
    large: list
    files: int


def _one_line(e):
    if isinstance(e, UnidentifiedImageError):  # PIL's message names its file object, not the file
        return "not a picture: no format PIL reads (damaged, empty or another kind of file)"
    return " ".join(str(e).split()) or type(e).__name__


def _identity(x):
    return x


class _ScanChunks(torch.utils.data.Dataset):
    """Item k: the partial sums of chunk k of an ImageFiles' files, for a DataLoader to spread over its workers."""

    def __init__(self, ds, chunks, side):
        self.ds, self.chunks, self.side = ds, chunks, side

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, k):
        ds, (index, files) = self.ds, self.chunks[k]
        total, total_sq, n = np.zeros(ds.channels), np.zeros(ds.channels), 0
        sizes, bad, truncated, large, colour = [], [], [], [], 0
        for i in files:
            try:
                img, size, cut = read_picture(ds.path(i), (self.side, self.side), ds.max_pixels)
            except Exception as e:
                bad.append((ds.files[i], _one_line(e)))
                continue
            grey = img.mode in ("L", "1")
            img = img.convert("L" if grey else "RGB")
            img.thumbnail((self.side, self.side))
            x = np.asarray(img, dtype=np.int16)  # (h, w) or (h, w, 3)
            if not grey and int((x.max(2) - x.min(2)).max()) > COLOUR_SPREAD:
                colour += 1
            if ds.channels == 1 and not grey:
                x = np.asarray(img.convert("L"))
            elif ds.channels == 3 and grey:
                x = np.repeat(x[..., None], 3, axis=2)
            x = x.reshape(-1, ds.channels) / 255
            total, total_sq, n = total + x.sum(0), total_sq + (x ** 2).sum(0), n + len(x)
            sizes.append(size)
            truncated += [ds.files[i]] * cut
            large += [ds.files[i]] * (size[0] * size[1] > DEFAULT_MAX_PIXELS)
        return dict(chunk=index, files=len(files), total=total, total_sq=total_sq, n=n,
                    sizes=np.array(sizes, dtype=np.int64).reshape(-1, 2), bad=bad, truncated=truncated, large=large,
                    colour=colour)


def merge_scan(parts):
    """The Scan of a folder from the partial sums of its chunks (scan_part, of every process), added in
    the chunks' order: the same numbers whatever the number of processes and workers."""
    parts = sorted(parts, key=lambda p: p["chunk"])
    total, total_sq, n = 0.0, 0.0, 0
    for p in parts:
        total, total_sq, n = total + p["total"], total_sq + p["total_sq"], n + p["n"]
    mean = np.atleast_1d(total / max(n, 1))
    std = np.sqrt(np.maximum(np.atleast_1d(total_sq / max(n, 1)) - mean ** 2, 1e-6))
    sizes = np.concatenate([p["sizes"] for p in parts]) if parts else np.zeros((0, 2))
    median = tuple(int(np.median(sizes[:, k])) for k in range(2)) if len(sizes) else (0, 0)
    colour = sum(p["colour"] for p in parts)
    return Scan([tuple(b) for p in parts for b in p["bad"]], tuple(round(float(m), 4) for m in mean),
                tuple(round(float(s), 4) for s in std), median, colour > 0, colour,
                [f for p in parts for f in p["truncated"]], [f for p in parts for f in p["large"]],
                sum(p["files"] for p in parts))


def scan_part(ds, side=64, workers=0, rank=0, world_size=1, chunk=64):
    """This process's share of the scan of ds (a data.ImageFiles): the partial sums (merge_scan) of chunks rank, rank + world_size, ...
    of `chunk` files each, spread over `workers` loader processes."""
    starts = range(chunk * rank, len(ds), chunk * world_size)
    chunks = [(s // chunk, range(s, min(s + chunk, len(ds)))) for s in starts]
    # a generator of its own: starting workers draws a seed, which must not move the global one
    loader = torch.utils.data.DataLoader(_ScanChunks(ds, chunks, side), batch_size=None, num_workers=workers,
                                         collate_fn=_identity, generator=torch.Generator())
    progress = Progress(f"scan of {ds.root}", len(ds), "files")
    parts = []
    for part in loader:
        parts.append(part)
        progress.update(part["files"] * world_size)  # rank 0's share stands for every process's
    progress.close()
    return parts


def scan(ds, side=64, workers=0, chunk=64):
    """Decode every file once, JPEGs at a reduced scale, to find the unreadable ones before training and to
    measure the pictures (on thumbnails of at most side px): a Scan, whose first field is the unreadable files."""
    return merge_scan(scan_part(ds, side, workers, chunk=chunk))


def scan_key(ds, side=64):
    # the files (path, bytes, mtime) and what decides the scan's numbers: equal keys, equal scans
    h = hashlib.sha1(f"{ds.channels} {side} {ds.max_pixels}\n".encode())
    for f, (size, mtime) in zip(ds.files, ds.stats):
        h.update(f"{f}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def shared_scan(ds, cache_path, workers=0, rank=0, world_size=1):
    """scan(ds), read from cache_path when it was made of the same files (paths, bytes, mtimes), else shared: each
    of the world_size processes decodes its share of the files with `workers` loader processes, and every process
    gets the whole scan. Returns (the Scan, None) from the cache, else (the Scan, (key, files, Scan)) for
    write_scan_cache once the caller is sure the run goes on."""
    key = scan_key(ds)
    record = read_scan_cache(cache_path) if rank == 0 else None
    found = [record["scan"] if record and record["key"] == key else None]
    if world_size > 1:
        dist.broadcast_object_list(found, 0)  # rank 0 decides for all: every process scans, or none does
    if found[0] is not None:
        return found[0], None
    parts = scan_part(ds, workers=workers, rank=rank, world_size=world_size)
    if world_size > 1:
        shares = [None] * world_size
        dist.all_gather_object(shares, parts)
        parts = [p for share in shares for p in share]
    result = merge_scan(parts)
    return result, (key, [[f, size, mtime] for f, (size, mtime) in zip(ds.files, ds.stats)], result)


def write_scan_cache(path, key, files, scan):
    """OUT/scan.json: a Scan with its key (scan_key) and the files scanned, each [path, bytes, mtime_ns],
    written atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    record = dict(key=key, scan=scan._asdict(), files=files)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def read_scan_cache(path):
    """The record write_scan_cache wrote, or None where there is none or it cannot be read."""
    try:
        with open(path) as f:
            record = json.load(f)
        s = record["scan"]
        record["scan"] = Scan(**dict(s, unreadable=[tuple(b) for b in s["unreadable"]], mean=tuple(s["mean"]),
                                     std=tuple(s["std"]), median_size=tuple(s["median_size"])))
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def folder_changes(old, new):
    """Files added, removed and changed (in bytes or mtime) from the list old to the list new, each a list of
    [path, bytes, mtime_ns] (write_scan_cache's files)."""
    old, new = {f: (s, t) for f, s, t in old}, {f: (s, t) for f, s, t in new}
    return (sorted(set(new) - set(old)), sorted(set(old) - set(new)),
            sorted(f for f in set(old) & set(new) if old[f] != new[f]))


def describe_changes(added, removed, changed):
    return ", ".join(f"{len(names)} {what}" + (f" ({few(names)})" if names else "")
                     for what, names in (("added", added), ("removed", removed),
                                         ("changed in size or modification time", changed)))


def changes_since(cache_path, fingerprint, files):
    """(added, removed, changed) from the readable files that the scan in cache_path listed to files (each [path,
    bytes, mtime_ns]), where those were the files of this fingerprint (a checkpoint's folder_files); else None."""
    record = read_scan_cache(cache_path)
    if record is None:
        return None
    was = [r for r in record["files"] if r[0] not in dict(record["scan"].unreadable)]
    return folder_changes(was, files) if files_fingerprint([f for f, _, _ in was]) == fingerprint else None


def folder_splits(data_dir):
    """DIR/train and DIR/val when both exist, else DIR for training and evaluation alike."""
    train, val = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    return (train, val) if os.path.isdir(train) and os.path.isdir(val) else (data_dir, data_dir)


def picture_stats(ds, n=256):
    """(median shorter side in px, whether the pictures have colour) of an ImageFiles, from n of its files spread
    evenly over the sorted list; unreadable files are left to the scan. Colour: the median picture's channels
    differ by more than 2 levels on average (a grey picture saved as RGB, or as a JPEG, stays grey)."""
    sides, spread = [], []
    for i in np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int)):
        try:
            with open(ds.path(i), "rb") as f:
                sides.append(min(ImageOps.exif_transpose(Image.open(f)).size))
            img = open_image(ds.path(i), 3, draft=(32, 32))
        except Exception:
            continue
        img.thumbnail((32, 32))
        x = np.asarray(img, dtype=np.float64)
        spread.append((np.abs(x[..., 0] - x[..., 1]) + np.abs(x[..., 1] - x[..., 2])).mean() / 2)
    if not sides:
        return None, True
    return int(np.median(sides)), bool(np.median(spread) > 2)


def folder_recipe(side, colour):
    """The folder recipe's changes for pictures of this median shorter side (px) and colour, and a line saying
    why (docs/experiments.md, "the folder recipe for small pictures"): small pictures are cropped at their own
    size, as the in-memory small-picture recipes are, with little cropping, which tiny objects do not survive."""
    what = f"median side {side} px, {'colour' if colour else 'grey'}"
    if side is None or side > 32:
        return {}, f"{what}: the recipe for photos (64-px crops of area 0.25-1)"
    size = max(16, side)
    small = dict(size=size, local_size=size // 2, crop_scale=[0.8, 1.0])
    return small, f"{what}: the recipe for small pictures ({size}-px crops of area 0.8-1)"


class Preparation:
    """train.py's folder work before any step: every file decoded once (JPEGs at 1/8 scale), so that a bad file
    stops the run now, not at step 5,000, and the same pass measures the mean and std the input is normalised by;
    the unreadable files refused or left out; the evaluation split's own scan; OUT/scan*.json and OUT/skipped.txt
    written (keep) only once the resume check has passed, so that a refused resume keeps the old ones."""

    def __init__(self, args, rank=0, world_size=1, say=print):
        self.args, self.rank, self.world_size, self.say = args, rank, world_size, say
        self.skipped = []  # (file, reason) of the training split left out
        self.lines = []  # OUT/skipped.txt: (path below --data_dir, reason) of each file left out, of either split
        self.caches = {}  # name: (key, files, scan) of the scans to keep in OUT

    def _scan(self, ds, name):
        # shared_scan with OUT/name as its cache: (the Scan, whether it came from the cache)
        ds.max_pixels = self.args.max_pixels
        scan, made = shared_scan(ds, os.path.join(self.args.out_dir, name), self.args.workers, self.rank,
                                 self.world_size)
        if made:
            self.caches[name] = made
        return scan, made is None

    def _refuse(self, bad, total, where, way_out="to train without them"):
        if bad and not self.args.skip_unreadable:
            raise SystemExit(f"{len(bad)} of {total} files {where} cannot be decoded:\n  "
                             + "\n  ".join(f"{f}: {e}" for f, e in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
                             + f"\nremove or fix them, or pass --skip_unreadable {way_out}")

    def _note(self, root, bad):
        self.lines += [(os.path.relpath(os.path.join(root, f), self.args.data_dir), e) for f, e in bad]

    def train_split(self, dataset, started):
        """Scan the training split, refuse or drop its unreadable files, set args.mean, args.std and
        args.folder_files, and say what the scan found (started: time.time() before the listing)."""
        args, say = self.args, self.say
        scan, cached = self._scan(dataset, "scan.json")
        args.mean, args.std = scan.mean, scan.std
        self._refuse(scan.unreadable, len(dataset), f"below {args.data_dir}")
        self.skipped = skipped = scan.unreadable
        dataset.drop([f for f, _ in skipped])
        self._note(dataset.root, skipped)
        dataset.draft_side = 2 * args.size  # a global crop of a quarter of the picture keeps its full resolution
        args.folder_files = dataset.fingerprint()
        say(f"folder recipe: {args.folder_recipe} (flags given win)")
        w, h = scan.median_size
        colour = (f"{scan.colour_pictures:,} of {len(dataset):,} in colour" if scan.colour else "none in colour")
        unreadable = (f"{len(skipped)} unreadable, left out ({few([f for f, _ in skipped])}; all with the reasons "
                      f"in {os.path.join(args.out_dir, 'skipped.txt')})" if skipped else "0 unreadable")
        seconds = time.time() - started
        took = (f"scan of {scan.files:,} files read from {os.path.join(args.out_dir, 'scan.json')} (the same paths, "
                f"sizes and times) in {seconds:.1f} s" if cached else f"scanned {scan.files:,} files in {seconds:.1f} s")
        classes = f"{len(dataset.classes)} ({few(dataset.classes, 10)})" if dataset.classes else "none (unlabelled)"
        say(f"{took}: {unreadable}, mean {args.mean}, std {args.std}, median {w} x {h} px, {colour}, classes: {classes}")
        if scan.truncated:
            say(f"warning: {len(scan.truncated)} truncated file(s), read as far as they go (as viewers show them): "
                f"{few(scan.truncated, 10)}")
        if scan.large:
            say(f"warning: {len(scan.large)} picture(s) above PIL's limit of {DEFAULT_MAX_PIXELS:,} pixels, read "
                f"as --max_pixels allows (each takes memory for its full size): {few(scan.large, 10)}")

    def eval_split(self, eval_set, dataset):
        """The evaluation split's unreadable files, refused or dropped: its own scan where it is another folder."""
        own = eval_set.root != dataset.root
        bad = self._scan(eval_set, "scan_val.json")[0].unreadable if own else self.skipped
        self._refuse(bad, len(eval_set), f"of the evaluation split below {eval_set.root}",
                     "to train and score without them, or --eval_every 0 to train without scoring")
        eval_set.drop([f for f, _ in bad])
        if own:
            self._note(eval_set.root, bad)

    def resume_differences(self, diff, checkpoint_files):
        """A resume check's differences (lines "key: checkpoint ..., now ...") with folder_files' line saying which
        files changed since the checkpoint's scan; a warning where only sizes or times changed."""
        if "scan.json" not in self.caches:  # the scan came from OUT/scan.json: the checkpoint's files, unchanged
            return diff
        # OUT/scan.json still holds the files the checkpoint's run scanned (a new scan is kept only after this check)
        now = [r for r in self.caches["scan.json"][1] if r[0] not in dict(self.skipped)]
        changes = changes_since(os.path.join(self.args.out_dir, "scan.json"), checkpoint_files, now)
        if changes and checkpoint_files != self.args.folder_files:
            return [f"folder_files: the folder changed since the checkpoint: {describe_changes(*changes)}"
                    if d.startswith("folder_files:") else d for d in diff]
        if changes and changes[2]:  # the same files in the same order: the run goes on, but should know
            self.say(f"warning: {len(changes[2])} file(s) below {self.args.data_dir} changed in size or modification "
                     f"time since the checkpoint's scan ({few(changes[2])}); resuming on them")
        return diff

    def keep(self):
        """Rank 0, once the run goes on: the new scans into OUT, and OUT/skipped.txt where files may be left out
        (one line a file: its path below --data_dir with /, a tab, the reason)."""
        for name, (key, files, scan) in self.caches.items():
            write_scan_cache(os.path.join(self.args.out_dir, name), key, files, scan)
        if self.args.skip_unreadable:
            os.makedirs(self.args.out_dir, exist_ok=True)
            with open(os.path.join(self.args.out_dir, "skipped.txt"), "w") as f:
                f.writelines(f"{path.replace(os.sep, '/')}\t{reason}\n" for path, reason in self.lines)


def training_skipped(ckpt):
    """The files a run left out as unreadable: OUT/skipped.txt beside its checkpoint (Preparation.keep writes it), a
    line `path<TAB>reason` per file (older runs: the path alone), each relative to the folder training read.
    (its path, {those paths}) out."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "skipped.txt")
    if not os.path.isfile(path):
        return path, set()
    with open(path) as f:
        return path, {line.rstrip("\n").split("\t")[0] for line in f if line.strip()}
