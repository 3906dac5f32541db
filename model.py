"""Backbone, projection MLP and weight-normalised classifier heads of Self-Classifier (section 3.3 of
the paper), the logit BatchNorm of TWIST, and the nearest-neighbour queue of the v2 method.
"""
import errno
import glob
import inspect
import os
import re
import shutil
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

from loss import all_gather_cat

ARCHS = ("resnet18", "resnet50", "alexnet", "cnn")


def small_cnn(in_chans, width):
    # a 4-conv network for CPU recipes: (B, in, H, W) -> (B, 8 * width)
    layers, c = [], in_chans
    for i, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        if i in (1, 2):
            layers.append(nn.MaxPool2d(2))
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c


def make_backbone(arch, in_chans=3, small_images=False, width=32):
    """A randomly initialised backbone without its classifier: returns (module, feature dimension).

    small_images (32 px and below) swaps the stem for a 3x3 stride-1 convolution without max-pool,
    the customary CIFAR stem, so that the last feature map is not 1x1.
    """
    if arch == "cnn":
        return small_cnn(in_chans, width)
    if arch in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, arch)(weights=None)
        if small_images:
            net.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    if arch == "alexnet":
        net = torchvision.models.alexnet(weights=None)
        if small_images or in_chans != 3:
            k, s, p = (3, 1, 1) if small_images else (11, 4, 2)
            net.features[0] = nn.Conv2d(in_chans, 64, k, stride=s, padding=p)
        # pooled conv features (256-d) as the representation; the 4096-d classifier is dropped
        # the last max-pool is dropped: small crops have no 3x3 map left for it, and a pool follows anyway
        return nn.Sequential(net.features[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256
    raise ValueError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")


class ProjectionMLP(nn.Module):
    """num_layers Linear layers (hidden ones followed by BN + LeakyReLU), then L2 normalisation.

    num_layers 0 keeps the backbone feature (normalised); 1 is a single Linear layer.
    """

    def __init__(self, in_dim, hidden_dim=4096, out_dim=128, num_layers=2):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.LeakyReLU(0.01, inplace=True)]
            d = hidden_dim
        if num_layers >= 1:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = d
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return F.normalize(self.net(x), dim=1, eps=1e-7)


class NormLinear(nn.Module):
    """Weight-normalised linear layer without bias: W_c = g_c * v_c / ||v_c||, g initialised to 1."""

    def __init__(self, in_dim, num_classes):
        super().__init__()
        self.v = nn.Parameter(nn.Linear(in_dim, num_classes, bias=False).weight.detach().clone())
        self.g = nn.Parameter(torch.ones(num_classes))

    def forward(self, x):
        return F.linear(x, self.g[:, None] * F.normalize(self.v, dim=1))


class SelfClassifier(nn.Module):
    """Crops -> backbone (once per resolution) -> MLP (once on all crops) -> heads.

    forward(crops) returns (z, logits): z the [V * B, D] embeddings of all crops in view order,
    logits a list over heads of lists over views of [B, C_h] tensors.
    """

    def __init__(self, arch="resnet50", in_chans=3, small_images=False, width=32, mlp_layers=2,
                 mlp_hidden=4096, mlp_out=128, cls_sizes=(1000, 2000, 4000, 8000), logit_bn=False):
        super().__init__()
        self.backbone, self.feat_dim = make_backbone(arch, in_chans, small_images, width)
        self.mlp = ProjectionMLP(self.feat_dim, mlp_hidden, mlp_out, mlp_layers)
        self.heads = nn.ModuleList(NormLinear(self.mlp.out_dim, c) for c in cls_sizes)
        # TWIST normalises each head's logits over all views with a BatchNorm without parameters
        self.logit_bn = nn.ModuleList(nn.BatchNorm1d(c, affine=False) for c in cls_sizes) if logit_bn else None

    def features(self, crops):
        # consecutive crops of one resolution go through the backbone together
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return torch.cat(feats)  # (V * B, feat_dim)

    def predict(self, x, heads=None):
        """One batch of single crops, no queue: (backbone features, [logits of the chosen heads])."""
        f = self.backbone(x)
        z = self.mlp(f)
        out = []
        for i in range(len(self.heads)) if heads is None else heads:
            logits = self.heads[i](z)
            out.append(self.logit_bn[i](logits) if self.logit_bn is not None else logits)
        return f, out

    def forward(self, crops, queue=None, index=None):
        V, B = len(crops), crops[0].shape[0]
        z = self.mlp(self.features(crops))  # (V * B, D)
        h = z
        if queue is not None:
            # view 0 is replaced by its nearest neighbour among past embeddings (no gradient)
            h = torch.cat([queue.lookup(z[:B], index), z[B:]])
        logits = []
        for i, head in enumerate(self.heads):
            out = head(h)  # (V * B, C_h)
            if self.logit_bn is not None:
                out = self.logit_bn[i](out)
            logits.append(list(out.split(B)))
        assert len(logits[0]) == V
        return z, logits


class NNQueue(nn.Module):
    """FIFO of past view-0 embeddings with their dataset indices; identical on every process."""

    def __init__(self, length, dim):
        super().__init__()
        self.register_buffer("feats", torch.zeros(length, dim))
        self.register_buffer("index", torch.full((length,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._ptr, self._filled = 0, 0  # host copies, so that a step needs no device sync

    @property
    def full(self):
        return self._filled == len(self.index)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ptr, self._filled = int(self.ptr), int((self.index >= 0).sum())

    @torch.no_grad()
    def lookup(self, z, index):
        with torch.autocast(z.device.type, enabled=False):  # bf16 cosines tie among many neighbours
            sim = z.float() @ self.feats.T  # (B, L) cosine, both sides are unit vectors
        sim[index[:, None] == self.index[None, :]] = float("-inf")  # never a crop of the image itself
        return self.feats[sim.argmax(dim=1)].to(z.dtype)

    @torch.no_grad()
    def push(self, z, index):
        # every process pushes the whole global batch, so the queues stay identical
        z, index = all_gather_cat(z.detach().float()), all_gather_cat(index)
        L = len(self.index)
        n = min(len(index), L)
        pos = (self._ptr + torch.arange(n, device=z.device)) % L
        self.feats[pos], self.index[pos] = z[-n:], index[-n:]
        self._ptr, self._filled = (self._ptr + n) % L, min(L, self._filled + n)
        self.ptr.fill_(self._ptr)


def sync_bn_groups(world_size, group_size):
    """Consecutive ranks in groups of group_size, as the authors' SyncBatchNorm groups: a list of rank lists.

    0, or a size of at least world_size, is one group of all ranks; otherwise the size must divide world_size.
    """
    if group_size < 0 or (0 < group_size < world_size and world_size % group_size):
        raise ValueError(f"--bn_group {group_size}: need 0 or a size that divides the {world_size} processes")
    size = world_size if group_size == 0 or group_size >= world_size else group_size
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def sync_batchnorm(module, group_size, rank=0, world_size=1, timeout=None):
    """module with SyncBatchNorm over groups of group_size consecutive ranks (sync_bn_groups), as the authors'
    runs; every rank creates every group, as torch.distributed asks. group_size 1: module as it is."""
    if group_size == 1:
        return module
    try:
        groups = sync_bn_groups(world_size, group_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    handles = [dist.new_group(g, timeout=timeout) for g in groups] if len(groups) > 1 else [None]
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=handles[rank // len(groups[0])])


def build_model(a):
    """The model described by a training run's arguments (a dict, as stored in the checkpoint)."""
    return SelfClassifier(a["arch"], a["in_chans"], a["small_stem"], a["width"], a["mlp_layers"], a["mlp_hidden"],
                          a["mlp_out"], tuple(a["cls_sizes"]), logit_bn=a["method"] == "twist")


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain Python values only, never pickled code. A file that
    does not load, or is not a train.py checkpoint, stops with one line that says so and how to go on."""
    import pickle
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"{path} is not a plain checkpoint of tensors and Python values; refusing to load it "
                         f"(it may carry code). Details: {str(e).splitlines()[0]}") from None
    except Exception as e:  # cut short by a copy or a quota, or not torch.save's at all
        problem = (f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}" if zipfile.is_zipfile(path) else
                   "not a whole zip archive, torch.save's format: a copy cut short, or a full disk?")
    else:
        if isinstance(ckpt, dict) and {"args", "model", "step"} <= ckpt.keys():
            return ckpt
        problem = "it loads, but holds no train.py checkpoint (no args, model and step)"
    kept = sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(path) or "."), "ckpt_ep*.pt")),
                  key=lambda f: int(re.sub(r"\D", "", os.path.basename(f)) or 0))
    way = f"; or copy {kept[-1]} (--keep_every's latest) over it to resume from there" if kept else ""
    raise SystemExit(f"{path} cannot be read ({os.path.getsize(path):,} bytes; {problem}); nothing was changed. "
                     f"Move it aside to start afresh{way}")


def save_atomically(path, write):
    """write(f) into path.tmp, flushed to the disk, then renamed over path: a crash never leaves a half-written
    path. A write that fails (a full disk, a quota, a read-only folder) removes path.tmp and raises again."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
            raise e.__context__ from None  # torch.save's zip writer hides the disk's error behind its own
        raise


class _Counter:
    # a file that keeps only its length: the bytes a torch.save needs, without the disk
    n = 0

    def write(self, b):
        self.n += len(b)
        return len(b)

    def flush(self):
        pass


def failed_save(e, path, state, intact):
    """The one line for a save of state (None: a copy) to path that raised OSError e: what failed, the bytes it
    needs and the free space, where known, and intact: what the folder still holds."""
    what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else e.strerror or str(e)
    if e.errno in errno.errorcode:
        what += f" ({errno.errorcode[e.errno]})"
    need = ""
    if state is not None:
        counter = _Counter()
        torch.save(state, counter)
        need = f"; it needs {counter.n:,} bytes"
    try:
        need += f", {shutil.disk_usage(os.path.dirname(path) or '.').free:,} free there"
    except OSError:
        pass
    return f"saving {path} failed: {what}{need}; the partial file was removed, {intact}"


# -----------------------------------------------------------------------------
# published networks: the authors' Self-Classifier file, TWIST's and SeLa's ResNets, torchvision's (the
# layouts: docs/experiments.md, "starting from a published model")


class Unread:
    """Built by the unpickler in place of a pickled object whose class or function is not on torch's
    weights_only allowlist (the authors' utils.NNQueue, TWIST's argparse.Namespace): the named code is
    neither imported nor called, and the object's state is dropped."""
    name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def unread_names(obj):
    """The pickled names of the Unread placeholders anywhere inside obj (dict keys included)."""
    if isinstance(obj, Unread):
        return {type(obj).name}
    if isinstance(obj, dict):
        return set().union(*map(unread_names, obj.keys()), *map(unread_names, obj.values()))
    if isinstance(obj, (list, tuple, set)):
        return set().union(*map(unread_names, obj))
    return set()


def unpickler_error(e):
    # the reason inside torch's weights_only message, which wraps it in advice
    text = str(e).split("WeightsUnpickler error:")[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)[:200]


def read_torch_file(path):
    """torch.load with weights_only=True, to the CPU; where the pickle names classes or functions off torch's
    allowlist, each becomes an Unread placeholder, so no pickled code is imported or run. Modules torch
    blocks outright (os, sys) stay refused. Stops with one message for anything that is not such a file."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        error = unpickler_error(e)
    except Exception as e:  # a directory, a truncated download
        raise SystemExit(f"{path}: not a file torch.save wrote ({type(e).__name__}: {unpickler_error(e)})") from None
    try:  # a static scan of the pickle's opcodes: nothing is imported or run
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not torch.save's zip format: the legacy format, or not a checkpoint at all
        names = None
        if not any(w in error for w in ("GLOBAL", "blocked", "reduce", "allowlisted")):
            raise SystemExit(f"{path}: not a file torch.save wrote ({error})") from None
    if names:
        stand_ins = [(type("Unread", (Unread,), {"name": n}), n) for n in names]
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            error = unpickler_error(e)
    raise SystemExit(f"{path}: refusing to load it (it may carry code): its pickle names "
                     f"{', '.join(names or []) or 'objects torch does not allow'}; {error}")


def strip_prefix(sd, prefix):
    # the keys below prefix, without it ("module." of DDP, "backbone." of a wrapped network)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def is_state_dict(x):
    return isinstance(x, dict) and len(x) > 0 and all(isinstance(k, str) and torch.is_tensor(v) for k, v in x.items())


def unwrap_ddp(sd):
    return strip_prefix(sd, "module.") if all(k.startswith("module.") for k in sd) else sd


def torchvision_resnet(sd):
    """'resnetN' where sd's keys, fc aside, are exactly those of torchvision's ResNet-N; None if they are not."""
    if "conv1.weight" not in sd or "layer4.0.conv1.weight" not in sd:
        return None
    blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4))
    bottleneck = "layer1.0.conv3.weight" in sd
    depth = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
             ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}.get((blocks, bottleneck))
    if depth is None:
        return None
    with torch.device("meta"):  # the key set without initialising any weight
        want = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
    same = {k for k in sd if not k.startswith("fc.")} == {k for k in want if not k.startswith("fc.")}
    return f"resnet{depth}" if same else None


def describe(obj, n=6):
    # what a file holds, for a refusal: top-level keys and the first few names below them
    if is_state_dict(obj):
        return f"a state_dict of {len(obj)} tensors, first names {list(obj)[:n]}"
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a dict"
    text = f"top-level keys {list(map(str, obj))[:12]}"
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            text += f"; under {k!s}: {list(map(str, v))[:n]}"
    return text


def read_pretrained(path):
    """Read a network from a file, recognised by its content, never by its name:
    this project's checkpoint; the authors' Self-Classifier .pth.tar (backbone, projection MLP, weight-
    normalised heads); TWIST's "backbone only" and "full ckpt" files; SeLa's torchvision-format files; a
    torchvision ResNet state_dict, with or without DDP's "module.". Returns a dict:
    kind (words), config (the build_model arguments), state (the weights in this project's keys: backbone.*
    always, mlp.* and heads.* where the file has them), epoch (or None), ckpt (this project's checkpoint
    itself, else None) and report (what was loaded and what left out, to print). Stops with one message,
    naming what the file holds, when it is none of these."""
    obj = read_torch_file(path)
    top = obj if isinstance(obj, dict) and not is_state_dict(obj) else {}
    # this project's checkpoint: its arguments are a plain dict
    if isinstance(top.get("args"), dict) and "cls_sizes" in top["args"] and is_state_dict(top.get("model")):
        unread = unread_names(obj)
        if unread:
            raise SystemExit(f"{path}: refusing to load it (it may carry code): it holds pickled "
                             f"{', '.join(sorted(unread))}")
        a = obj["args"]
        kind = f"this project's checkpoint ({a['method']}, {a['arch']}, epoch {obj.get('epoch')})"
        return dict(kind=kind, config=a, state=obj["model"], epoch=obj.get("epoch"), ckpt=obj,
                    report=f"read {path}: {kind}")
    config = dict(in_chans=3, small_stem=False, width=32, mlp_layers=0, mlp_hidden=4096, mlp_out=0, cls_sizes=[],
                  method="self_classifier")
    sd, model_sd = (unwrap_ddp(top[k]) if is_state_dict(top.get(k)) else {} for k in ("state_dict", "model"))
    plain = unwrap_ddp(obj) if is_state_dict(obj) else {}
    epoch = top.get("epoch") if isinstance(top.get("epoch"), int) else None
    notes = dict(optimizer="training state", scaler="training state", nn_queue="the training queue")
    state, parts, used = None, [], {"epoch"}

    def backbone(sd):
        arch = torchvision_resnet(sd)
        if arch not in ARCHS:
            raise SystemExit(f"{path}: a torchvision {arch}; this project builds "
                             f"{', '.join(a for a in ARCHS if a.startswith('resnet'))}")
        config["arch"] = arch
        return {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}

    if any(k.startswith("cls_") for k in sd) and torchvision_resnet(strip_prefix(sd, "backbone.")):
        # the authors' Self-Classifier: backbone.*, mlp_head.mlp.* and cls_{i}.weight_{g,v}
        kind, used = "the Self-Classifier authors' checkpoint", used | {"state_dict"}
        state = backbone(strip_prefix(sd, "backbone."))
        mlp = strip_prefix(sd, "mlp_head.mlp.")
        linears = [v for k, v in mlp.items() if k.endswith("weight") and v.dim() == 2]
        config["mlp_out"] = 2048 if config["arch"] == "resnet50" else 512  # no MLP: the heads read the backbone
        if mlp:
            config.update(mlp_layers=len(linears), mlp_hidden=linears[0].shape[0], mlp_out=linears[-1].shape[0])
            # one Linear is the module itself ("mlp_head.mlp.weight"); more are numbered as in ProjectionMLP
            state.update({f"mlp.net.{'0.' if len(linears) == 1 else ''}{k}": v for k, v in mlp.items()})
            parts.append(f"projection MLP {linears[0].shape[1]}-{'-'.join(str(w.shape[0]) for w in linears)} "
                         f"({len(mlp)} tensors)")
        heads = sorted(int(k.split(".")[0][4:]) for k in sd if k.startswith("cls_") and k.endswith(".weight_v"))
        for i in heads:
            state[f"heads.{i}.v"] = sd[f"cls_{i}.weight_v"]
            state[f"heads.{i}.g"] = sd[f"cls_{i}.weight_g"].reshape(-1)  # weight_norm keeps g as [C, 1]
        config["cls_sizes"] = [sd[f"cls_{i}.weight_v"].shape[0] for i in heads]
        parts.append(f"weight-normalised heads of {' '.join(map(str, config['cls_sizes']))} classes")
        extra = [k for k in sd if not k.startswith(("backbone.", "mlp_head.mlp.", "cls_"))]
        if extra:
            raise SystemExit(f"{path}: the Self-Classifier authors' layout, with names it does not have: {extra[:6]}")
    elif any(k.startswith("projection_heads.") for k in model_sd) \
            and torchvision_resnet(strip_prefix(model_sd, "backbone.")):
        kind, used = "TWIST's full checkpoint", used | {"model"}
        state = backbone(strip_prefix(model_sd, "backbone."))
        parts.append("model's projection_heads left out (TWIST's head has no counterpart here)")
        notes["backbone"] = "the backbone is read from model"
    elif any("top_layer" in k for k in plain or sd) and any("features." in k for k in plain or sd):
        raise SystemExit(f"{path}: SeLa's pre-activation ResNet-50 (features.*, top_layer*), which does not load "
                         f"into torchvision's ResNet; SeLa's Aug++ files (resnet50-1k_pp.pth, ...) do")
    else:
        # a torchvision ResNet: the file itself (TWIST's "backbone only"), or under state_dict (SeLa's Aug++)
        for where, cand in (("", plain), ("state_dict", sd), ("model", model_sd)):
            if torchvision_resnet(cand):
                kind = "a torchvision ResNet state_dict" + (f" under {where!r}" if where else "")
                state, used = backbone(cand), used | {where}
                if "fc.weight" in cand:
                    parts.append(f"fc left out ({cand['fc.weight'].shape[0]} classes on the backbone feature: no "
                                 f"counterpart after a projection MLP)")
                break
    if state is None:
        raise SystemExit(f"{path}: not a checkpoint this project can read: {describe(obj)}")
    report = (f"read {path}: {kind}{f', epoch {epoch}' if epoch is not None else ''}\n  loaded: backbone "
              f"{config['arch']} ({sum(k.startswith('backbone.') for k in state)} tensors)"
              + "".join(f"; {p}" for p in parts))
    rest = []
    for k, v in top.items():
        if k not in used:
            unread = unread_names(v)
            why = f"a pickled {', '.join(sorted(unread))}, neither imported nor run" if unread else notes.get(k)
            rest.append(f"{k} ({why})" if why else str(k))
    if rest:
        report += f"\n  left out: {', '.join(rest)}"
    return dict(kind=kind, config=config, state=state, epoch=epoch, ckpt=None, report=report)


def build_pretrained(pre):
    """The model a read_pretrained result describes, its weights loaded (strict: the layout must be whole)."""
    model = build_model(pre["config"])
    try:
        model.load_state_dict(pre["state"])
    except RuntimeError as e:
        raise SystemExit(f"the file's weights do not fit the network its layout describes: "
                         f"{' '.join(str(e).split())[:400]}") from None
    return model


def init_from(model, pre):
    """Start model from a read_pretrained result: the backbone always (its shapes must match), the projection
    MLP where every shape matches, and each head whose shape matches where the MLP was taken too (a head
    reads the MLP's embedding). Returns (taken, new): descriptions to print."""
    own, src = model.state_dict(), pre["state"]

    def fits(keys):
        return all(k in src and src[k].shape == own[k].shape for k in keys)

    back = [k for k in own if k.startswith("backbone.")]
    if not fits(back):
        bad = [k for k in back if k not in src or src[k].shape != own[k].shape][:3]
        raise SystemExit(f"--init: its backbone ({pre['config']['arch']}) does not fit this run's "
                         f"({', '.join(f'{k}: {tuple(own[k].shape)} here' for k in bad)}); a 3-channel --size "
                         f"above 32 keeps torchvision's stem")
    take, taken, new = back, ["backbone"], []
    mlp = [k for k in own if k.startswith("mlp.")]
    mlp_ok = fits(mlp) and len(mlp) == sum(k.startswith("mlp.") for k in src)
    (taken if mlp_ok else new).append("projection MLP")
    take = take + (mlp if mlp_ok else [])
    for i, head in enumerate(model.heads):
        keys = [f"heads.{i}.v", f"heads.{i}.g"]
        ok = mlp_ok and fits(keys)
        (taken if ok else new).append(f"head {i} ({head.v.shape[0]} classes)")
        take = take + (keys if ok else [])
    model.load_state_dict({**own, **{k: src[k] for k in take}})
    return taken, new


def starting_weights(args, ckpt_path):
    """Where train.py's network starts: a resume from ckpt_path where it exists, which wins over --init (the
    checkpoint's own --init, if it had one, goes into args.init), else the --init file, else fresh weights.
    Returns (resume, init, note, seen, shape): the checkpoint (or None), the --init file as read_pretrained reads
    it (or None), a line saying which won (or None), the checkpoint file's os.stat when it was read (to see
    whether another run rewrote it before this one held the folder), and the network's shape flags it fixes."""
    resume = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    seen = os.stat(ckpt_path) if resume is not None else None
    init, note, shape = None, None, {}
    if resume is not None and resume["args"].get("init"):
        if args.init and args.init != resume["args"]["init"]:
            note = f"--init {args.init} not used: resuming {ckpt_path}, which started from {resume['args']['init']}"
        args.init = resume["args"]["init"]
        shape = {k: resume["args"][k] for k in ("arch", "width", "mlp_layers", "mlp_hidden", "mlp_out")}
    elif args.init and resume is not None:
        note, args.init = f"--init {args.init} not used: resuming {ckpt_path}, which started afresh", None
    elif args.init:
        if not os.path.isfile(args.init):
            raise SystemExit(f"--init {args.init}: no such file")
        init = read_pretrained(args.init)
        c = init["config"]
        # a backbone alone gives the arch only
        shape = dict(arch=c["arch"], **({"width": c["width"]} if c["arch"] == "cnn" else {}),
                     **{k: c[k] for k in ("mlp_layers", "mlp_hidden", "mlp_out") if c["mlp_layers"]})
    return resume, init, note, seen, shape


def wrap_ddp(model, device_ids=None):
    """DistributedDataParallel without a broadcast of BatchNorm statistics from rank 0 before each forward: on a
    CPU each process keeps its own, on CUDA SyncBatchNorm makes them the same within each --bn_group; checkpoints
    hold rank 0's. torch 2.13 renamed the switch (the old name warns), and the new one also broadcasts them once
    here: a no-op, as every process built the same model or loaded the same checkpoint."""
    new_name = "forward_sync_buffers" in inspect.signature(DDP).parameters
    no_sync = dict(forward_sync_buffers=False) if new_name else dict(broadcast_buffers=False)
    return DDP(model, device_ids=device_ids, **no_sync)
