"""The photometric half of data.MultiCrop, batched on the training device with parameters drawn per sample: flip,
torchvision's ColorJitter (its four operations in a random order per sample), grayscale, Gaussian blur, solarisation,
normalisation. The formulas are torchvision.transforms.functional's on float images in [0, 1]."""
import torch
import torch.nn.functional as F

# ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, RandomGrayscale(0.2), blur sigma 0.1-2.0: data.MultiCrop's PIL path
JITTER_P, GRAY_P, SIGMA = 0.8, 0.2, (0.1, 2.0)
FACTOR_LO = torch.tensor([0.6, 0.6, 0.8, -0.1])  # brightness, contrast, saturation, hue
FACTOR_HI = torch.tensor([1.4, 1.4, 1.2, 0.1])
BLUR_RADIUS = 6  # a 13-tap kernel: 3 sigma either side at the largest sigma
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2)
# where each of a view's draws sits in its row of uniforms
FLIP, JITTER, ORDER, FACTORS, GRAY, BLUR, SIGMA_U, SOLARIZE, N_DRAWS = 0, 1, 2, 6, 10, 11, 12, 13, 14

# -----------------------------------------------------------------------------
# random numbers: a hash of (seed, epoch, index, view, draw), so a resumed run draws them again with no state to save
M32 = 0xFFFFFFFF


def _mul32(x, c):
    # x * c mod 2**32 for x < 2**32, in int64 without overflow (c in 16-bit halves): the same bits on every device
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _mix32(x):
    # an invertible 32-bit integer hash in which each input bit flips each output bit about half the time
    # (C. Wellons' "lowbias32")
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed, epoch, index, view, n=N_DRAWS):
    """(B, n) float32 uniform in [0, 1): draw j of view view[b] of dataset image index[b] in epoch, for the run's
    seed. index, view: (B,) int64. Each row depends on its own key alone, never on the batch it came in."""
    h = torch.zeros_like(index)
    for key in (seed & M32, seed >> 32, epoch, index, view):
        h = _mix32(((h + 0x9E3779B9) & M32) ^ (key & M32))
    draws = torch.arange(1, n + 1, device=index.device) * 0x9E3779B9
    h = _mix32((h[:, None] + draws) & M32)
    return (h >> 8).float() * 2.0 ** -24  # 24 bits: every value exact in float32


def draw(seed, epoch, index, view, blur_p, solarize_p, flip=True):
    """One view's parameters per row, as data.MultiCrop's PIL path draws them: index, view (B,) int64; blur_p,
    solarize_p: (B,) probabilities of each row's view. Host tensors in, host tensors out (apply groups rows on the
    host, so it never waits for the device)."""
    u = uniforms(seed, epoch, index, view)
    return dict(flip=(u[:, FLIP] < 0.5) & flip,
                jitter=u[:, JITTER] <= JITTER_P,  # RandomApply keeps the image when p < rand
                order=u[:, ORDER:ORDER + 4].argsort(dim=1),  # (B, 4): the operation at each position, as randperm(4)
                factors=FACTOR_LO + (FACTOR_HI - FACTOR_LO) * u[:, FACTORS:FACTORS + 4],  # (B, 4)
                gray=u[:, GRAY] < GRAY_P,
                blur=u[:, BLUR] < blur_p,
                sigma=SIGMA[0] + (SIGMA[1] - SIGMA[0]) * u[:, SIGMA_U],
                solarize=u[:, SOLARIZE] < solarize_p)

# -----------------------------------------------------------------------------
# the operations on (R, C, H, W) float images in [0, 1], one factor per row


def grayscale(x):
    # (R, 1, H, W)
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def _blend(x, other, f):
    f = f[:, None, None, None]
    return (f * x + (1 - f) * other).clamp_(0, 1)


def brightness(x, f):
    return _blend(x, 0.0, f)


def contrast(x, f):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def saturation(x, f):
    return x if x.shape[1] == 1 else _blend(x, grayscale(x), f)


def hue(x, f):
    """Hue rotated by f turns (RGB -> HSV -> RGB); greyscale images stay as they are, as PIL's."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    v = x.amax(dim=1)  # (R, H, W)
    chroma = v - x.amin(dim=1)
    c = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey pixels: any hue, chroma 0 erases it
    h = torch.where(v == r, (g - b) / c, torch.where(v == g, 2 + (b - r) / c, 4 + (r - g) / c))
    h = (h / 6 + f[:, None, None]) % 1
    # back to RGB: channel n of (R, G, B) is v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n' + 6 h) mod 6, n' = 5, 3, 1
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device)[None, :, None, None] + 6 * h[:, None]) % 6
    return v[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp_(0, 1)


JITTER_OPS = (brightness, contrast, saturation, hue)  # ColorJitter's numbering of its operations


def gaussian_blur(x, sigma, radius=BLUR_RADIUS):
    """Each row blurred by its own sigma: a separable (2 radius + 1)-tap kernel, reflected borders."""
    R, C, H, W = x.shape
    radius = min(radius, H - 1, W - 1)  # reflection needs a border narrower than the image
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (R * C, K): one kernel per row and channel
    y = F.pad(x.reshape(1, R * C, H, W), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=R * C)
    return F.conv2d(y, k[:, None, :, None], groups=R * C).reshape(R, C, H, W)


def solarize(x, threshold=128 / 255):
    return torch.where(x >= threshold, 1 - x, x)

# -----------------------------------------------------------------------------


def _where(mask, a, b):
    return torch.where(mask[:, None, None, None], a, b)


def _rows(mask, device):
    # the rows of a host mask, as device indices: their number is known on the host, so nothing waits for the device
    return mask.nonzero().flatten().to(device, non_blocking=True)


def apply(x, p, mean, std):
    """x: (B, C, H, W) uint8 crops on the device; p: draw's parameters for its rows. Returns the crops as the PIL
    path makes them: flipped, jittered, grey, blurred, solarised as drawn, normalised, float32 channels_last."""
    dev = x.device
    x = x.float().div_(255)
    q = {k: v.to(dev, non_blocking=True) for k, v in p.items()}
    x = _where(q["flip"], x.flip(-1), x)
    for k in range(4):  # position k of each row's order: every operation on the rows that have it there
        for op, fn in enumerate(JITTER_OPS):
            mask = p["jitter"] & (p["order"][:, k] == op)
            if mask.any():
                rows = _rows(mask, dev)
                x.index_copy_(0, rows, fn(x.index_select(0, rows), q["factors"][rows, op]))
    if x.shape[1] == 3:
        x = _where(q["gray"], grayscale(x).expand_as(x), x)
    if p["blur"].any():
        rows = _rows(p["blur"], dev)
        x.index_copy_(0, rows, gaussian_blur(x.index_select(0, rows).contiguous(), q["sigma"][rows]))
    x = _where(q["solarize"], solarize(x), x)
    mean = torch.tensor(mean, device=dev)[:, None, None]
    std = torch.tensor(std, device=dev)[:, None, None]
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
