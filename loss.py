"""Objectives of the three single-stage self-classification methods, in float32.

Self-Classifier (Amrani et al., ECCV 2022, eq. 5-7), TWIST (Wang et al., 2021, eq. 4-6) and SeLa (Asano et
al., ICLR 2020, eq. 6-8: its Sinkhorn-Knopp step and the relabelling pass around it). Under torch.distributed
every batch statistic is over the global batch, combined across processes as C-vectors, never [N, C] gathers.
"""
import itertools
import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from progress import Progress

# -----------------------------------------------------------------------------
# collectives


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    # The loss on every process depends on the sum over all processes, so the gradient of that sum
    # with respect to this process's share is the sum of the upstream gradients of all processes.
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x):
    """Differentiable sum over processes; the identity without a process group."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


def all_reduce_max(x):
    """Maximum over processes, without gradient (it only shifts exponents)."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def _many(reduce, vectors):
    # one collective for several vectors: each collective costs a network round trip, whatever its size
    if world_size() == 1:
        return list(vectors)
    return list(reduce(torch.cat(vectors)).split([len(v) for v in vectors]))


def all_gather_cat(x):
    """Concatenation of x from all processes along dim 0, without gradient (queue pushes, labels)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def _float32(logits):
    return [[z.float() for z in views] for views in logits]


# -----------------------------------------------------------------------------
# Self-Classifier


def self_classifier_loss(logits, row_tau=0.1, col_tau=0.05, eps=1e-12, log_prior=None):
    """Cross-entropy between views with a class prior (Self-Classifier, Amrani et al. 2022).

    logits: list over heads of lists over views of [B, C] tensors; views 0 and 1 are the global crops.
    Every ordered pair of views (i -> j), i != j, except local -> local, contributes
    -(1/N) sum_n <Q^i_n, log P^j_n>; the result is the mean over pairs and heads. No stop-gradient.
    log_prior: list over heads of [C] tensors of log-probabilities, log p(y), in the prediction's Bayes rule
    log P = log(N p(y) p(y|x) / sum_n p(y|x_n)); None is the paper's uniform prior, p(y) = 1/C. The target
    keeps its uniform-prior normalisation either way (see the comment on Qv below).
    """
    if log_prior is not None:
        _check_log_prior(log_prior, [views[0].shape[1] for views in logits])
    # Each view is processed on its own [B, C] tensors: stacking the views into one [V, B, C] tensor
    # is slower on a CPU, as every elementwise pass then leaves the cache. Dividing a [B, C] tensor by
    # a vector is written as a multiplication by the vector's reciprocal, which is cheaper both ways.
    with torch.autocast(device_type=logits[0][0].device.type, enabled=False):
        logits = _float32(logits)
        flat = [z for views in logits for z in views]  # every head's views, each [B, C]
        N = flat[0].shape[0] * world_size()  # every process holds the same number of rows (drop_last)
        # target: softmax over the N samples of each class column (then rows normalised to 1 below);
        # prediction: p(y|x) = p(x|y) p(y) / p(x) with p(y) = 1/C and p(x) = 1/N, which needs the
        # column sums of the row softmax. All the vectors of a step go through one all-reduce.
        P = [F.softmax(z / row_tau, dim=1) for z in flat]
        if world_size() == 1:
            Q = [F.softmax(z / col_tau, dim=0) for z in flat]  # one fused pass forward and backward
            col_sums = [p.sum(dim=0) for p in P]
        else:
            # amax: max(dim).values also computes indices, 20x slower on a CPU
            col_max = _many(all_reduce_max, [z.amax(dim=0) / col_tau for z in flat])
            E = [torch.exp(z / col_tau - m) for z, m in zip(flat, col_max)]
            sums = _many(all_reduce_sum, [e.sum(dim=0) for e in E] + [p.sum(dim=0) for p in P])
            Q = [e * (1 / s) for e, s in zip(E, sums)]  # (B, C), columns sum to 1 over N
            col_sums = sums[len(E):]
        total, n_terms, k = 0.0, 0, 0
        for h, views in enumerate(logits):
            V = len(views)
            C = views[0].shape[1]
            # The target's rows are normalised to sum to 1: Bayes' rule with a uniform prior, whatever log_prior
            # says, so the target still asks for classes of equal size. A target with the prior p(y) would weight
            # each column of Q by p(y) before this normalisation.
            Qv = [q * (1 / q.sum(dim=1, keepdim=True).clamp_min(eps)) for q in Q[k:k + V]]
            prior_n = (N / C) if log_prior is None else N * log_prior[h].float().exp()  # N p(y): scalar or (C,)
            logP = [torch.log(p * (prior_n / s.clamp_min(eps)) + eps) for p, s in zip(P[k:k + V], col_sums[k:k + V])]
            k += V
            # sum_{(i,j)} <Q^i, logP^j> grouped by the predicted view j: a global view j is predicted
            # from every other view, a local view only from the two global ones
            Q_all = sum(Qv)
            targets = [Q_all - Qv[0], Q_all - Qv[1]] + [Qv[0] + Qv[1]] * (V - 2)
            for target, log_p in zip(targets, logP):
                total = total - (target * log_p).sum() / views[0].shape[0]
            n_terms += V * (V - 1) - (V - 2) * (V - 3)
        return total / n_terms


def _check_log_prior(log_prior, cls_sizes):
    # probabilities passed for log-probabilities, or a head's prior in another head's place, would train
    # silently on another objective: refuse them by name
    if len(log_prior) != len(cls_sizes):
        raise ValueError(f"log_prior: {len(log_prior)} tensors for {len(cls_sizes)} heads (one [C] tensor per head)")
    for h, (lp, C) in enumerate(zip(log_prior, cls_sizes)):
        if tuple(lp.shape) != (C,):
            raise ValueError(f"log_prior[{h}]: shape {tuple(lp.shape)}, head {h} has {C} classes")
        mass = lp.detach().double().exp().sum().item()  # a host sync per step, only when a prior is given
        if not abs(mass - 1) < 1e-4:
            raise ValueError(f"log_prior[{h}]: exp() sums to {mass:.6g}, not 1; pass log-probabilities, "
                             f"e.g. torch.log(prior) of a prior summing to 1")


def view_cross_entropy(logits, tau=0.1):
    """The same pairs of views as self_classifier_loss without Bayes' rule and its prior: plain cross-entropy
    between the views' class distributions, -<softmax(z_i / tau), log softmax(z_j / tau)>. Nothing keeps the
    classes apart, so every image ends in one class at zero loss (train.py --no_prior shows it)."""
    with torch.autocast(device_type=logits[0][0].device.type, enabled=False):
        total, n_terms = 0.0, 0
        for views in _float32(logits):
            logP = [F.log_softmax(z / tau, dim=1) for z in views]
            for i, j in itertools.permutations(range(len(views)), 2):
                if i < 2 or j < 2:  # no local -> local pairs, as above
                    total = total - (logP[i].exp() * logP[j]).sum(dim=1).mean()
                    n_terms += 1
        return total / n_terms


# -----------------------------------------------------------------------------
# TWIST


def _entropy(p, eps):
    return -(p * torch.log(p + eps)).sum(dim=-1)


def twist_loss(logits, lam1=0.0, lam2=1.0, tau=1.0, eps=1e-5):
    """Symmetric KL between twin class distributions minus a batch-entropy term (TWIST, Wang et al. 2021).

    Pairs (i, j) with i in {0, 1} and j > i. The mean distribution in the batch-entropy term is over
    the global batch; per-sample terms are means over this process's rows (DDP averages them).
    """
    with torch.autocast(device_type=logits[0][0].device.type, enabled=False):
        logits = _float32(logits)
        N = logits[0][0].shape[0] * world_size()
        Q = [[F.softmax(z / tau, dim=1) for z in views] for views in logits]
        # the mean distributions of every head and view, summed over processes in one all-reduce
        means = iter([s / N for s in _many(all_reduce_sum, [q.sum(dim=0) for qs in Q for q in qs])])
        total, n_terms = 0.0, 0
        for views, qs in zip(logits, Q):
            P = [F.softmax(z, dim=1) for z in views]
            logP = [torch.log(p + eps) for p in P]
            EH = [_entropy(q, eps).mean() for q in qs]  # mean per-sample entropy
            HE = [_entropy(next(means), eps) for _ in qs]  # entropy of the mean over the global batch
            for i in range(min(2, len(views))):
                for j in range(i + 1, len(views)):
                    kl_ij = (P[i] * (logP[i] - logP[j])).sum(dim=1).mean()
                    kl_ji = (P[j] * (logP[j] - logP[i])).sum(dim=1).mean()
                    term = 0.5 * (kl_ij + kl_ji)
                    term = term + (1 + lam1) * 0.5 * (EH[i] + EH[j]) - lam2 * 0.5 * (HE[i] + HE[j])
                    total, n_terms = total + term, n_terms + 1
        return total / n_terms


# -----------------------------------------------------------------------------
# SeLa


def sela_loss(logits, targets, tau=0.1):
    """Cross-entropy of every head and view against the stored pseudo-labels (SeLa, Asano et al. 2020).

    targets: LongTensor [H, B], head h's labels of this batch's images. The heads here output cosines
    (times g), so the softmax has a temperature tau.
    """
    with torch.autocast(device_type=logits[0][0].device.type, enabled=False):
        terms = [F.cross_entropy(z.float() / tau, targets[h]) for h, views in enumerate(logits) for z in views]
        return torch.stack(terms).mean()


def _global_logsumexp(x, dim):
    # logsumexp over rows held by all processes: local logsumexp, then a max and a sum of K-vectors
    lse = torch.logsumexp(x, dim=dim)
    m = all_reduce_max(lse)
    return m + torch.log(all_reduce_sum(torch.exp(lse - m)))


@torch.no_grad()
def sinkhorn_knopp(log_p, lamb=25.0, tol=0.1, max_iter=100_000, return_iters=False):
    """Equipartitioned hard labels from log p(y|x) by Sinkhorn-Knopp on P^lamb (SeLa, Asano et al. 2020).

    log_p: [B, K] rows of this process (the whole N rows without a process group). Works in the log
    domain in float64, so P^25 does not underflow. Runs until the error is below tol, as the original
    does (sharp problems need thousands of iterations); max_iter is only a guard and warns when hit.
    Returns the labels of this process's rows, LongTensor [B] (and the iterations run, if asked).
    """
    if log_p.ndim != 2 or max_iter < 1:
        raise ValueError(f"sinkhorn_knopp needs log_p of shape [B, K] and max_iter >= 1, got shape "
                         f"{tuple(log_p.shape)} and max_iter {max_iter}")
    log_a = lamb * log_p.double()  # (B, K), log of P^lamb
    B, K = log_a.shape
    N = all_reduce_sum(torch.tensor(float(B), dtype=torch.float64, device=log_a.device)).item()
    log_c = torch.full((B,), -math.log(N), dtype=torch.float64, device=log_a.device)
    err = math.inf
    it = 0
    while err > tol and it < max_iter:
        # r <- (1/K) / (A c): a sum over all N samples, K numbers per process cross the network
        log_r = -math.log(K) - _global_logsumexp(log_a + log_c[:, None], dim=0)
        # c <- (1/N) / (A^T r): local to each row
        log_c_new = -math.log(N) - torch.logsumexp(log_a + log_r[None, :], dim=1)
        if it % 10 == 0:  # the original's schedule: after iterations 1, 11, 21, ...
            err = all_reduce_sum(torch.exp(log_c - log_c_new).sub(1).abs().sum()).item()
        log_c = log_c_new
        it += 1
    if err > tol:
        warnings.warn(f"sinkhorn_knopp stopped at max_iter={max_iter} with error {err:.3g} > tol {tol:g}; "
                      f"the labels are not converged (raise max_iter)", RuntimeWarning, stacklevel=2)
    labels = (log_a + log_r[None, :]).argmax(dim=1)
    return (labels, it) if return_iters else labels


@torch.no_grad()
def sela_relabel(model, loader, labels, row_tau, lamb, autocast):
    """SeLa's label step: log p(y|x) of every training image at row_tau (loader: this process's share of them,
    center crops; the model in eval mode meanwhile), then Sinkhorn-Knopp per head into labels, (heads, images).
    Each process labels its share; the shares are gathered, so that every process's table is the same."""
    model.eval()
    device, n_procs = labels.device, world_size()
    total = len(loader.dataset.dataset)
    mine = torch.tensor(loader.dataset.indices, dtype=torch.long)  # this process's share of the training images
    # the log-probabilities wait in host memory in float16 and go to the device one head at a time:
    # on ImageNet, 10 heads of 3000 classes over 160k images per process would take 19 GB in float32
    log_p = [[] for _ in range(len(labels))]
    progress = Progress("relabelling", total)
    for x, _, _ in loader:
        with autocast:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            for h, logits in enumerate(model.predict(x)[1]):
                log_p[h].append(torch.log_softmax(logits.float() / row_tau, dim=1).to("cpu", torch.float16))
        progress.update(len(x) * n_procs)  # rank 0's share stands for every process's
    pad = -(-total // n_procs) - len(mine)  # all_gather needs equal shares
    index = all_gather_cat(F.pad(mine.to(device), (0, pad), value=-1))
    iters = []
    for h in range(len(labels)):
        new, n = sinkhorn_knopp(torch.cat(log_p[h]).to(device), lamb, return_iters=True)
        iters.append(n)
        log_p[h] = None
        new = all_gather_cat(F.pad(new, (0, pad), value=-1))
        labels[h, index[index >= 0]] = new[index >= 0]
    progress.close(f"Sinkhorn-Knopp iterations per head {iters}")
    model.train()
