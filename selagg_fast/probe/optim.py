"""LARS (MAE's variant) and the per-iteration warm-up + half-cycle cosine learning rate."""
from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probe: SGD with momentum on a trust-ratio-scaled gradient.

    For a parameter with ``ndim > 1``: ``u = g + wd·p`` and ``u *= η·‖p‖/‖u‖`` (η = trust
    coefficient; the factor is 1 when either norm is 0). Parameters with ``ndim ≤ 1``
    (biases) use ``u = g`` unscaled. Then ``μ ← m·μ + u``, ``p ← p − lr·μ``.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if not (lr >= 0 and weight_decay >= 0 and 0 <= momentum < 1):  # NaN fails every comparison
            raise ValueError(f"LARS: bad hyper-parameters lr={lr}, weight_decay={weight_decay}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        # The rule of the class docstring for every parameter of every group at once, in a few
        # foreach calls. A probe run steps ~40 small tensors (12 heads); one op per tensor and
        # formula term made ~270 launches a step (over a millisecond of host time on a GPU).
        loss = closure() if closure is not None else None
        params, updates, mus, momenta, neg_lrs = [], [], [], [], []
        matrices, matrix_at, decays, trusts = [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim > 1:
                    matrix_at.append(len(params))
                    matrices.append(p)
                    decays.append(group["weight_decay"])
                    trusts.append(group["trust_coefficient"])
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                params.append(p)
                updates.append(p.grad)
                mus.append(state["mu"])
                momenta.append(group["momentum"])
                neg_lrs.append(-group["lr"])
        if not params:
            return loss
        if matrices:
            grads = [updates[i] for i in matrix_at]
            if len(set(decays)) == 1:  # the usual case: one weight decay, one op (as MAE's add(p, alpha=wd))
                scaled = torch._foreach_add(grads, matrices, alpha=decays[0])
            else:
                scaled = torch._foreach_add(grads, torch._foreach_mul(matrices, decays))
            p_norm = torch.stack(torch._foreach_norm(matrices))
            u_norm = torch.stack(torch._foreach_norm(scaled))
            # per-group coefficients in the parameters' dtype (a float32 tensor would round them)
            trust = trusts[0] if len(set(trusts)) == 1 else torch.tensor(trusts, device=p_norm.device,
                                                                         dtype=p_norm.dtype)
            ratio = torch.where((p_norm > 0) & (u_norm > 0), trust * p_norm / u_norm, torch.ones_like(p_norm))
            torch._foreach_mul_(scaled, list(ratio.unbind()))
            for i, u in zip(matrix_at, scaled):
                updates[i] = u
        torch._foreach_mul_(mus, momenta)
        torch._foreach_add_(mus, updates)
        torch._foreach_add_(params, torch._foreach_mul(mus, neg_lrs))
        return loss


def cosine_lr(peak_lr: float, epoch: float, epochs: float, warmup_epochs: float, min_lr: float = 0.0) -> float:
    """Learning rate at a fractional ``epoch``: linear warm-up, then half-cycle cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return peak_lr
    progress = min(1.0, (epoch - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(heads, name: str, effective_batch: int, momentum: float = 0.9, weight_decay: float = 0.0):
    """One optimizer with a param group per (head, lr) pair; each group's ``peak_lr`` is
    ``base lr × effective batch / 256`` (MAE's scaling rule)."""
    groups = []
    for spec, blr in heads.pairs:
        groups.append(dict(params=heads.pair_parameters(spec, blr), lr=0.0,
                           peak_lr=blr * effective_batch / 256, base_lr=blr))
    if name == "lars":
        return LARS(groups, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose lars or sgd")


def set_lr(optimizer, epoch: float, epochs: float, warmup_epochs: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(group["peak_lr"], epoch, epochs, warmup_epochs)
