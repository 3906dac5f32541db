"""Backbone, projection MLP and weight-normalised classifier heads of Self-Classifier (section 3.3 of
the paper), the logit BatchNorm of TWIST, and the nearest-neighbour queue of the v2 method.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

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


def build_model(a):
    """The model described by a training run's arguments (a dict, as stored in the checkpoint)."""
    return SelfClassifier(a["arch"], a["in_chans"], a["small_stem"], a["width"], a["mlp_layers"], a["mlp_hidden"],
                          a["mlp_out"], tuple(a["cls_sizes"]), logit_bn=a["method"] == "twist")


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain Python values only, never pickled code."""
    import pickle
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"{path} is not a plain checkpoint of tensors and Python values; refusing to load it "
                         f"(it may carry code). Details: {str(e).splitlines()[0]}") from None
