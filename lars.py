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
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                # where(...) instead of an if keeps the step free of host syncs on a GPU
                trust = eta * p_norm / (g_norm + wd * p_norm + 1e-8)
                scaled = (g + wd * p) * trust
                g = torch.where((p_norm > 0) & (g_norm > 0), scaled, g)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
