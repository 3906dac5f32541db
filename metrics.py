"""Clustering metrics for Self-Classifier evaluation: NMI, AMI and ARI with scikit-learn's definitions and
edge cases (arithmetic normalisation; AMI after Vinh, Epps & Bailey, 2010), Hungarian-matched ACC, and the
weighted kNN classifier of the authors' knn_eval.py, head 0 scored during training, and k-means with restarts.
"""
import math
import time

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

_EPS = np.finfo(np.float64).eps
_DENSE_MAX = 1 << 24        # largest classes x clusters table kept dense (bincount); sparse beyond
_EMI_BLOCK = 1 << 20        # elements per vectorised block in the expected-MI sum


def _as_labels(x, name):
    """A 1-D numpy array from a numpy array, a list or a (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    if hasattr(x, "numpy"):
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    return x


class _Table:
    """Contingency table of true classes (rows, as in sklearn) x predicted clusters (columns).

    n: number of samples; a: class sizes; b: cluster sizes (int64, all > 0);
    rows, cols, vals: the nonzero cells (row-major order); dense: the full table or None if too large.
    """
    __slots__ = ("n", "a", "b", "rows", "cols", "vals", "dense")


def _table(y_true, y_pred):
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    if y_true.shape[0] != y_pred.shape[0]:
        raise ValueError(f"y_true and y_pred must have the same length, got {y_true.shape[0]} "
                         f"and {y_pred.shape[0]}")
    if y_true.shape[0] == 0:
        raise ValueError("y_true and y_pred are empty")
    _, ti = np.unique(y_true, return_inverse=True)
    _, pi = np.unique(y_pred, return_inverse=True)
    ti = ti.reshape(-1).astype(np.int64, copy=False)
    pi = pi.reshape(-1).astype(np.int64, copy=False)
    t = _Table()
    t.n = int(y_true.shape[0])
    t.a = np.bincount(ti).astype(np.int64, copy=False)
    t.b = np.bincount(pi).astype(np.int64, copy=False)
    n_cls, n_clu = t.a.size, t.b.size
    key = ti * n_clu + pi
    if n_cls * n_clu <= _DENSE_MAX:
        t.dense = np.bincount(key, minlength=n_cls * n_clu).astype(np.int64, copy=False)
        nz = np.flatnonzero(t.dense)
        t.vals = t.dense[nz]
        t.dense = t.dense.reshape(n_cls, n_clu)
    else:
        t.dense = None
        nz, t.vals = np.unique(key, return_counts=True)
        t.vals = t.vals.astype(np.int64, copy=False)
    t.rows, t.cols = np.divmod(nz, n_clu)
    return t


# ----------------------------------------------------------------------------------- internals

def _entropy(counts, n):
    """Entropy (nats) of a labelling with these nonzero class counts (sklearn: 0 for a single class)."""
    if counts.size == 1:
        return 0.0
    p = counts.astype(np.float64)
    return float(-np.sum((p / n) * (np.log(p) - np.log(n))))


def _mi(t):
    """Mutual information (nats) from the nonzero cells; per-cell terms below eps are zeroed, the sum
    is clipped at 0 (sklearn's mutual_info_score)."""
    if t.a.size == 1 or t.b.size == 1:
        return 0.0
    n = t.n
    v = t.vals.astype(np.float64)
    p = v / n
    outer = t.a[t.rows] * t.b[t.cols]                               # int64: a_i * b_j <= n^2
    terms = p * (np.log(v) - np.log(n)) + p * (2.0 * np.log(n) - np.log(outer))
    terms[np.abs(terms) < _EPS] = 0.0
    return float(max(terms.sum(), 0.0))


def _emi(a, b, n):
    """Expected mutual information of two labellings with marginals a and b under the hypergeometric
    (permutation) model: sum_ij sum_nij nij/n log(n nij / (a_i b_j)) P(nij | a_i, b_j, n).

    The summand depends on (a_i, b_j) only, so the sum runs over distinct sizes weighted by their
    multiplicities (at most ~sqrt(2n) distinct values each); one loop over distinct a, vectorised over
    distinct b and the nij range, in blocks of at most _EMI_BLOCK elements."""
    if a.size == 1 or b.size == 1:
        return 0.0
    ua, wa = np.unique(a, return_counts=True)
    ub, wb = np.unique(b, return_counts=True)
    if ua.size > ub.size:                                           # symmetric: loop the shorter one
        ua, wa, ub, wb = ub, wb, ua, wa
    lfact = gammaln(np.arange(n + 1, dtype=np.float64) + 1.0)      # log k!, k = 0..n
    logk = np.log(np.maximum(np.arange(n + 1, dtype=np.float64), 1.0))
    log_n = np.log(n)
    wb = wb.astype(np.float64)
    total = 0.0
    for ai, wai in zip(ua.tolist(), wa.tolist()):
        lo_all = np.maximum(1, ai + ub - n)
        hi_all = np.minimum(ai, ub)
        # log of the nij-independent part of the hypergeometric pmf, per distinct b
        base_all = lfact[ai] + lfact[n - ai] + lfact[ub] + lfact[n - ub] - lfact[n]
        const_all = log_n - logk[ai] - logk[ub]
        width = int((hi_all - lo_all).max()) + 1
        step = max(1, _EMI_BLOCK // width)
        acc = 0.0
        for s in range(0, ub.size, step):
            sl = slice(s, s + step)
            lo, hi, bj = lo_all[sl, None], hi_all[sl, None], ub[sl, None]
            w = int((hi - lo).max()) + 1
            nij = lo + np.arange(w)
            valid = nij <= hi
            nij = np.minimum(nij, hi)                              # keep padded cells indexable
            logp = (base_all[sl, None] - lfact[nij] - lfact[ai - nij] - lfact[bj - nij]
                    - lfact[n - ai - bj + nij])
            term = nij * (const_all[sl, None] + logk[nij]) * np.exp(logp)
            acc += float(np.dot(wb[sl], np.where(valid, term, 0.0).sum(axis=1)))
        total += wai * acc
    return total / n


def _nmi(t):
    if t.a.size == 1 and t.b.size == 1:        # neither labelling splits the data: a perfect match
        return 1.0
    mi = _mi(t)
    if mi == 0.0:
        return 0.0
    return float(mi / (0.5 * (_entropy(t.a, t.n) + _entropy(t.b, t.n))))


def _ami(t):
    if t.a.size == 1 and t.b.size == 1:
        return 1.0
    if t.a.size == 1 or t.b.size == 1:
        return 0.0
    mi = _mi(t)
    emi = _emi(t.a, t.b, t.n)
    num = mi - emi
    den = 0.5 * (_entropy(t.a, t.n) + _entropy(t.b, t.n)) - emi
    # sklearn's guard against 0/0 (e.g. emi == mi == entropy): keep the sign, floor |.| at eps
    num = min(num, -_EPS) if num < 0 else max(num, _EPS)
    den = min(den, -_EPS) if den < 0 else max(den, _EPS)
    return float(num / den)


def _ari(t):
    n = t.n
    sum_sq = int(np.dot(t.vals, t.vals))                  # pairs together in both labellings (x2 + n)
    sum_a = int(np.dot(t.a, t.a))
    sum_b = int(np.dot(t.b, t.b))
    # pair confusion counts (ordered pairs), Python ints so nothing overflows
    tp = sum_sq - n
    fp = sum_b - sum_sq
    fn = sum_a - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fp == 0 and fn == 0:                               # identical partitions (up to relabelling)
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def _acc(t):
    """Hungarian accuracy on M[cluster, class]. Every class gets a distinct cluster maximising the
    matched count; clusters left over (more clusters than classes) take their majority class. Among
    maximum matchings, ties are broken towards leaving the clusters with the largest majority unmatched,
    so the value does not depend on the solver's choice."""
    if t.dense is not None:
        m = t.dense.T
    else:
        m = np.zeros((t.b.size, t.a.size), dtype=np.int64)
        m[t.cols, t.rows] = t.vals
    n_clu, n_cls = m.shape
    weight = m
    if n_clu > n_cls:
        rowmax = m.max(axis=1)
        scale = int(rowmax.sum()) + 1
        if int(m.max()) * scale * n_cls < 2 ** 52:          # exact in float64
            weight = m.astype(np.float64) * scale - rowmax[:, None]
    r, c = linear_sum_assignment(weight, maximize=True)
    correct = int(m[r, c].sum())
    if n_clu > n_cls:
        unmatched = np.ones(n_clu, dtype=bool)
        unmatched[r] = False
        correct += int(m[unmatched].max(axis=1).sum())
    return correct / t.n


# ------------------------------------------------------------------------------------ public API

def cluster_acc(y_true, y_pred):
    """Hungarian-matched clustering accuracy in [0, 1] (majority class for unmatched clusters)."""
    return _acc(_table(y_true, y_pred))


def nmi(y_true, y_pred):
    """Normalised mutual information, arithmetic mean of entropies (= sklearn's default)."""
    return _nmi(_table(y_true, y_pred))


def ami(y_true, y_pred):
    """Adjusted mutual information, arithmetic mean of entropies (= sklearn's default)."""
    return _ami(_table(y_true, y_pred))


def ari(y_true, y_pred):
    """Adjusted Rand index (= sklearn.metrics.adjusted_rand_score)."""
    return _ari(_table(y_true, y_pred))


def cluster_metrics(y_true, y_pred):
    """{'nmi', 'ami', 'ari', 'acc'} from one shared contingency table."""
    t = _table(y_true, y_pred)
    return {"nmi": _nmi(t), "ami": _ami(t), "ari": _ari(t), "acc": _acc(t)}


def cluster_metrics_from_counts(counts):
    """cluster_metrics of the labellings whose (true class x predicted class) counts these are: what a
    distributed evaluation sums over processes, instead of gathering every label."""
    m = np.asarray(counts.cpu().numpy() if hasattr(counts, "cpu") else counts, dtype=np.int64)
    if m.ndim != 2 or (m < 0).any() or m.sum() == 0:
        raise ValueError(f"counts must be a 2-D table of non-negative counts, not all zero; got shape {m.shape}")
    m = m[m.sum(1) > 0][:, m.sum(0) > 0]  # classes and clusters without samples are not labels at all
    t = _Table()
    t.n, t.a, t.b, t.dense = int(m.sum()), m.sum(1), m.sum(0), m
    nz = np.flatnonzero(m)
    t.vals = m.reshape(-1)[nz]
    t.rows, t.cols = np.divmod(nz, m.shape[1])
    return {"nmi": _nmi(t), "ami": _ami(t), "ari": _ari(t), "acc": _acc(t)}


def balance(counts):
    """Entropy of the class sizes over log C: 1 when every class of the head is used equally, as the uniform
    prior asks, 0 when one class takes every image."""
    p = counts.double() / counts.sum()
    return float(-torch.xlogy(p, p).sum() / math.log(len(p))) if len(p) > 1 else 1.0


@torch.no_grad()
def score_head0(model, loader, classes, n_true, device, autocast, distributed=False):
    """train.py --eval_every: head 0 on the evaluation split as evaluate.py scores it (center crops, eval mode),
    each process its share of the loader; the (true class x class) counts are summed over processes. n_true: the
    true classes, 0 without labels. NMI, AMI, ARI and ACC where labelled; classes used and balance always."""
    t0 = time.time()
    # every process scores with rank 0's BatchNorm statistics, the checkpoint's: each process keeps its own on a
    # CPU and per --bn_group; its own come back afterwards, so that training does not depend on --eval_every
    own = [b.clone() for b in model.buffers()] if distributed else []
    for b in model.buffers() if distributed else ():
        dist.broadcast(b, 0)
    model.eval()
    rows = max(n_true, 1)
    counts = torch.zeros(rows * classes, dtype=torch.long, device=device)
    for x, y, _ in loader:
        with autocast:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            pred = model.predict(x, heads=[0])[1][0].argmax(dim=1)
        row = y.to(device).clamp(min=0) if n_true else torch.zeros_like(pred)
        counts.index_add_(0, row * classes + pred, torch.ones_like(pred))
    if distributed:
        dist.all_reduce(counts)
    for b, mine in zip(model.buffers(), own):
        b.copy_(mine)
    model.train()
    counts = counts.view(rows, classes).cpu()
    sizes = counts.sum(0)
    return dict(cluster_metrics_from_counts(counts) if n_true else {}, classes=int((sizes > 0).sum()),
                balance=balance(sizes), num_eval=int(sizes.sum()), seconds=time.time() - t0)


@torch.no_grad()
def knn_top1(train_f, train_y, test_f, test_y, k=20, temp=0.1, chunk=1024, progress=None):
    """Weighted kNN top-1 of Self-Classifier's knn_eval.py (after DINO): cosine similarity of L2-normalised
    features, the k most similar training samples vote with weight exp(cosine / temp). Tensors in, a float out.
    progress: called with the number of test samples of each chunk once it is done."""
    if k < 1 or temp <= 0 or len(train_f) < k:
        raise ValueError(f"kNN needs k >= 1, temp > 0 and at least k training samples; got k {k}, temp {temp}, "
                         f"{len(train_f)} samples")
    C = int(train_y.max()) + 1
    train_f, test_f = torch.nn.functional.normalize(train_f, dim=1), torch.nn.functional.normalize(test_f, dim=1)
    correct = 0
    for s in range(0, len(test_f), chunk):
        sim, idx = (test_f[s:s + chunk] @ train_f.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(sim), C, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / temp).exp())
        correct += (votes.argmax(dim=1) == test_y[s:s + chunk]).sum().item()
        if progress:
            progress(len(sim))
    return correct / len(test_f)


def _sq_distances(x, c, x2):
    # squared distances of the rows of x to the rows of c, from |x|^2 - 2 x.c + |c|^2 (clamped: rounding can dip below 0)
    return (x2[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp_(min=0)


def _nearest(x, c, x2, chunk):
    # each sample's nearest centroid and its squared distance, a chunk of rows at a time: (N, k) at once is 5 GB at
    # ImageNet's 1.28 M x 1,000 in float32
    idx = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist2 = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for s in range(0, len(x), chunk):
        dist2[s:s + chunk], idx[s:s + chunk] = _sq_distances(x[s:s + chunk], c, x2[s:s + chunk]).min(1)
    return idx, dist2


def _kmeans_plus_plus(x, k, x2, gen, chunk):
    """Greedy k-means++ (Arthur & Vassilvitskii, 2007, with 2 + ln k candidates a centre, keeping the one that
    lowers the total squared distance most): k rows of x as the first centroids."""
    n, trials = len(x), 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen, device=x.device))
    centres = [first]
    closest = _sq_distances(x, x[first:first + 1], x2).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every sample sits on a centre already (fewer distinct samples than k): any sample
            cand = torch.randint(n, (trials,), generator=gen, device=x.device)
        else:  # samples drawn with probability proportional to their squared distance to the nearest centre
            u = torch.rand(trials, generator=gen, device=x.device, dtype=x.dtype) * total
            cand = torch.searchsorted(closest.cumsum(0), u).clamp_(max=n - 1)
        # each candidate's nearest-centre distances, a chunk of samples at a time: one pass over x a centre
        d = torch.cat([torch.minimum(closest[s:s + chunk, None], _sq_distances(x[s:s + chunk], x[cand], x2[s:s + chunk]))
                       for s in range(0, n, chunk)])
        best = d.sum(0).argmin()
        centres.append(int(cand[best]))
        closest = d[:, best].contiguous()
    return x[centres].clone()


def _lloyd(x, c, x2, max_iter, chunk):
    # Lloyd's iterations from centroids c until no sample changes cluster, at most max_iter updates; an empty
    # cluster restarts at the sample farthest from its centroid. (assignment, inertia, updates made) out
    k = len(c)
    assign, dist2 = _nearest(x, c, x2, chunk)
    for it in range(max_iter):
        counts = torch.bincount(assign, minlength=k)
        c = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp(min=1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):
            c[empty] = x[dist2.topk(len(empty)).indices]
        new, dist2 = _nearest(x, c, x2, chunk)
        if torch.equal(new, assign):
            return assign, float(dist2.sum()), it + 1
        assign = new
    return assign, float(dist2.sum()), max_iter


def kmeans(x, k, n_init=10, max_iter=300, seed=0, progress=None, chunk=None):
    """k-means as clustering papers run it (scikit-learn's KMeans(k, n_init=10) in kind): n_init starts of
    greedy k-means++, each followed by Lloyd's iterations until no sample changes cluster (at most max_iter), the
    start of lowest inertia (the sum of squared distances to the centroids) kept. Deterministic for a seed; the
    first start is the one n_init=1 makes with the same seed.

    x: (N, D) numpy array or torch tensor, computed in its dtype on its device (a CUDA tensor on the GPU).
    progress: called after each start with (1, its inertia, its updates). The (N,) cluster indices out, numpy."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"k-means needs an (N, D) float array, got {tuple(x.shape)} {x.dtype}")
    if not 1 <= k <= len(x) or n_init < 1 or max_iter < 1:
        raise ValueError(f"k-means needs 1 <= k <= N samples, n_init >= 1 and max_iter >= 1; got k {k}, "
                         f"N {len(x)}, n_init {n_init}, max_iter {max_iter}")
    chunk = chunk or max(1, (1 << 24) // max(k, 2 + int(math.log(k))))  # 16 M distances at a time
    x2 = (x * x).sum(1)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        assign, inertia, updates = _lloyd(x, _kmeans_plus_plus(x, k, x2, gen, chunk), x2, max_iter, chunk)
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
        if progress:
            progress(1, inertia, updates)
    return best.cpu().numpy()


def silhouette(x, labels, chunk=2048):
    """The mean silhouette (Rousseeuw, 1987) with Euclidean distances, as scikit-learn's silhouette_score: per
    sample, a = its mean distance to the rest of its cluster, b = the lowest mean distance to another cluster,
    (b - a) / max(a, b), and 0 for a sample alone in its cluster. x: (N, D) array or tensor; a float out."""
    x = torch.as_tensor(x)
    _, inv = np.unique(_as_labels(labels, "labels"), return_inverse=True)
    inv = torch.from_numpy(inv).to(x.device)
    if not 2 <= int(inv.max()) + 1 < len(x):
        raise ValueError(f"a silhouette needs 2 to N - 1 clusters, got {int(inv.max()) + 1} for {len(x)} samples")
    onehot = torch.nn.functional.one_hot(inv).to(x.dtype)  # (N, k)
    counts = onehot.sum(0)
    x2 = (x * x).sum(1)
    sums = torch.cat([_sq_distances(x[s:s + chunk], x, x2[s:s + chunk]).sqrt_() @ onehot for s in range(0, len(x), chunk)])
    rows = torch.arange(len(x), device=x.device)
    own = counts[inv]
    a = sums[rows, inv] / (own - 1).clamp(min=1)
    mean = sums / counts
    mean[rows, inv] = math.inf
    b = mean.min(1).values
    score = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp(min=1e-30), torch.zeros_like(a))
    return float(score.mean())


def k_criteria(x, lo, hi, starts=10, seed=0, sample=2000, progress=None):
    """What k-means says of each number of clusters K in lo..hi: (agreement, silhouette). Agreement: how well k-means
    finds the same partition again, the mean ARI over the pairs of `starts` single k-means++ starts (seeds seed,
    seed + 1, ...): groups really in the data come back whatever the start, a K that cuts one in two cuts it anew
    each time. Silhouette: how compact and apart the clusters of the start of lowest inertia are, on `sample`
    samples at random (seed 0; all where fewer). x: (N, D) array or tensor. progress: called with 1 after each K."""
    x = torch.as_tensor(x)
    if not 2 <= lo <= hi < len(x) or starts < 2:
        raise ValueError(f"the number of classes needs 2 <= LO <= HI < {len(x):,} samples and 2 starts or more; "
                         f"got LO {lo}, HI {hi}, starts {starts}")
    few = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:sample].numpy()
    out = {}
    for k in range(lo, hi + 1):
        runs = []
        for s in range(starts):
            inertia = []
            runs.append((kmeans(x, k, n_init=1, seed=seed + s, progress=lambda n, i, u: inertia.append(i)), inertia[0]))
        parts = [a for a, _ in runs]
        agreement = float(np.mean([ari(a, b) for i, a in enumerate(parts) for b in parts[i + 1:]]))
        best = min(runs, key=lambda r: r[1])[0][few]
        out[k] = (agreement, silhouette(x[torch.from_numpy(few).to(x.device)], best) if len(set(best)) > 1 else -1.0)
        if progress:
            progress(1)
    return out


def estimate_k(criteria):
    """The number of classes from k_criteria's {K: (agreement, silhouette)}: the K of the highest product, a partition
    k-means finds again whose clusters stand apart (docs/experiments.md, "how many classes"; fewer classes on a tie)."""
    score = {k: a * s for k, (a, s) in criteria.items()}
    return max(sorted(score), key=score.get)
