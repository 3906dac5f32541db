"""LARS: layer-wise adaptive rate scaling around SGD with momentum (You et al., 2017).

The semantics of NVIDIA apex LARC with clip=False, which the original Self-Classifier used: the
gradient of each parameter is rescaled by its trust ratio, weight decay included, before plain SGD.
"""
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-parameter step is scaled by eta * ||p|| / (||g|| + wd * ||p||).

    Parameters with a zero norm, or a zero gradient, take the plain gradient without weight decay
    (apex LARC does the same). No parameter is excluded: biases, BatchNorm and the heads' g included.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay} or trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:  # zero, so the first step stores the scaled gradient
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(self.state[p]["momentum_buffer"])
            # All parameters at once (torch._foreach_*): one Python call per pass instead of one per
            # parameter, and every pass in place, since allocating a gradient-sized temporary costs as
            # much as the arithmetic on a CPU. torch.where keeps the step free of host syncs on a GPU.
            p_norm = torch.stack(torch._foreach_norm(params))  # (P,)
            g_norm = torch.stack(torch._foreach_norm(grads))  # (P,)
            scaled = (p_norm > 0) & (g_norm > 0)
            trust = torch.where(scaled, eta * p_norm / (g_norm + wd * p_norm + 1e-8), 1.0)  # (P,)
            decay = torch.where(scaled, trust * wd, 0.0)  # (P,), no weight decay where the plain gradient is taken
            # buf <- momentum * buf + trust * (g + wd * p); p <- p - lr * buf
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_addcmul_(bufs, grads, list(trust.unbind()))
            torch._foreach_addcmul_(bufs, params, list(decay.unbind()))
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss
