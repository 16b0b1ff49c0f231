"""Probe heads: aggregation -> BatchNorm1d(affine=False) -> Linear, many trained at once.

Every (head, learning rate) pair is an independent probe. They share one backbone pass,
and the Selective Aggregation pairs share one fused ``abmilp_pool`` call per prefix
setting: all their score vectors are stacked as branches of one op, so the tokens are
read once for all of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..modules import SelectiveAggregation
from ..ops import abmilp_pool

HEAD_KINDS = ("cls", "avg", "selective", "selective_all", "selective_k<K>")


@dataclass(frozen=True)
class HeadSpec:
    """One aggregation: ``kind`` in cls / avg / selective / selective_all, ``branches`` K."""
    name: str
    kind: str
    branches: int = 1

    @property
    def selective(self) -> bool:
        return self.kind.startswith("selective")


def parse_heads(text: str, has_cls: bool = True) -> list:
    """``"cls,avg,selective,selective_k4"`` -> HeadSpecs; clear errors for unknown or impossible heads."""
    specs = []
    for name in [t.strip() for t in text.split(",") if t.strip()]:
        m = re.fullmatch(r"selective_k(\d+)", name)
        if m:
            if int(m.group(1)) < 1:
                raise ValueError(f"head {name!r}: K must be >= 1")
            spec = HeadSpec(name, "selective", int(m.group(1)))
        elif name in ("cls", "avg", "selective", "selective_all"):
            spec = HeadSpec(name, name)
        else:
            raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEAD_KINDS)}")
        if spec.kind == "cls" and not has_cls:
            raise ValueError("head 'cls' needs a [cls] token, and this model has none "
                             "(use avg / selective)")
        if spec in specs:
            raise ValueError(f"head {name!r} given twice")
        specs.append(spec)
    if not specs:
        raise ValueError("no heads given (--heads cls,avg,selective)")
    return specs


def pair_name(spec: HeadSpec, lr: float) -> str:
    return f"{spec.name}@{lr:g}"


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d(affine=False, eps=1e-6)`` whose training statistics span every process.

    With several processes the batch mean and variance are all-reduced (differentiably), so a
    run on N processes normalises exactly like one process seeing the same global batch.
    """

    def __init__(self, dim: int):
        super().__init__(dim, affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        # one differentiable all-reduce of [sum, sum of squares, count] in float64 (no cancellation
        # worth mentioning for float32 features), and no host sync: the step stays asynchronous
        x64 = x.double()
        local = torch.cat([x64.sum(0), (x64 * x64).sum(0), x64.new_full((1,), x.shape[0])])
        total = all_reduce(local)
        D = x.shape[1]
        count = total[-1]
        mean = total[:D] / count
        var = (total[D:2 * D] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked += 1
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        return (x - mean) * torch.rsqrt(var + self.eps)


class LinearProbe(nn.Module):
    """BatchNorm1d(affine=False, eps=1e-6) + Linear.

    ``init="paper"`` (the default): the default-initialised ``nn.Linear`` of the paper's reference
    code; ``init="mae"``: MAE's ``trunc_normal_(std=0.01)`` weight and zero bias.
    """

    def __init__(self, dim: int, num_classes: int, init: str = "paper"):
        super().__init__()
        self.norm = GlobalBatchNorm1d(dim)
        self.fc = nn.Linear(dim, num_classes)
        if init != "paper":
            self.reset_classifier(init)

    @torch.no_grad()
    def reset_classifier(self, init: str) -> None:
        if init == "paper":
            self.fc.reset_parameters()
        elif init == "mae":
            nn.init.trunc_normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)
        else:
            raise ValueError(f"classifier init {init!r}: choose paper or mae")


    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features.float()))


class ProbeHeads(nn.Module):
    """Every (head, lr) pair of a probing run, evaluated from one token tensor.

    ``forward(tokens [B, T, D])`` returns ``{pair name: logits [B, C]}``. ``selective_k<K>``
    heads concatenate their K pooled vectors (``[B, K*D]``) before the BatchNorm, so each
    branch keeps its own features and the classifier weighs them.
    """

    def __init__(self, specs, lrs, dim: int, num_classes: int, num_prefix_tokens: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend  # abmilp_pool's backend: "auto", "triton" or "reference" (benchmarks compare)
        self.specs, self.lrs = list(specs), [float(lr) for lr in lrs]
        self.dim, self.num_classes, self.num_prefix_tokens = dim, num_classes, num_prefix_tokens
        self.pairs = [(spec, lr) for spec in self.specs for lr in self.lrs]
        self.aggregators = nn.ModuleDict()
        self.classifiers = nn.ModuleDict()
        for spec, lr in self.pairs:
            key = self._key(spec, lr)
            if spec.selective:
                prefix = 0 if spec.kind == "selective_all" else num_prefix_tokens
                self.aggregators[key] = SelectiveAggregation(dim, spec.branches, prefix)
            self.classifiers[key] = LinearProbe(dim * spec.branches, num_classes)

    @staticmethod
    def _key(spec: HeadSpec, lr: float) -> str:
        return pair_name(spec, lr).replace(".", "_")  # ModuleDict keys may not contain dots

    def pair_names(self) -> list:
        return [pair_name(s, lr) for s, lr in self.pairs]

    def pair_parameters(self, spec: HeadSpec, lr: float) -> list:
        key = self._key(spec, lr)
        params = list(self.classifiers[key].parameters())
        if key in self.aggregators:
            params += list(self.aggregators[key].parameters())
        return params

    def _selective_features(self, tokens: torch.Tensor, features: dict) -> None:
        # One fused call per prefix setting: every pair's score vectors become branches of it.
        groups: dict = {}
        for spec, lr in self.pairs:
            if spec.selective:
                groups.setdefault(self.aggregators[self._key(spec, lr)].num_prefix_tokens, []).append((spec, lr))
        for prefix, members in groups.items():
            aggs = [self.aggregators[self._key(s, lr)] for s, lr in members]
            if len(aggs) == 1:  # the parameters themselves: no concatenated copy to backpropagate through
                weight, bias = aggs[0].weight, aggs[0].bias
            else:
                weight = torch.cat([a.weight for a in aggs])
                bias = torch.cat([a.bias for a in aggs])
            if weight.shape[0] == 1:  # views, whose backward is free (indexing's fills zeros)
                weight, bias = weight.view(self.dim), bias.view(())
            pooled = abmilp_pool(tokens, weight, bias, num_prefix_tokens=prefix, backend=self.backend)
            pooled = pooled.reshape(tokens.shape[0], -1, self.dim)
            # split, not slicing: the backward concatenates the pairs' gradients in one op, where each
            # slice's backward would zero-fill a full-size gradient and the pieces would then be added
            pieces = pooled.split([agg.branches for agg in aggs], dim=1)
            for (spec, lr), agg, piece in zip(members, aggs, pieces):
                features[self._key(spec, lr)] = piece.reshape(tokens.shape[0], agg.branches * self.dim)

    def forward(self, tokens: torch.Tensor) -> dict:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"ProbeHeads: expected tokens [B, T, {self.dim}], got {tuple(tokens.shape)}")
        features: dict = {}
        shared = {}
        if any(s.kind == "cls" for s in self.specs):
            shared["cls"] = tokens[:, 0].float()  # cast once for the pairs that share it (LinearProbe's is then free)
        if any(s.kind == "avg" for s in self.specs):
            shared["avg"] = tokens[:, self.num_prefix_tokens:].mean(1, dtype=torch.float32)  # no fp32 copy of the tokens
        for spec, lr in self.pairs:
            if spec.kind in shared:
                features[self._key(spec, lr)] = shared[spec.kind]
        self._selective_features(tokens, features)
        return {pair_name(s, lr): self.classifiers[self._key(s, lr)](features[self._key(s, lr)])
                for s, lr in self.pairs}

    @torch.no_grad()
    def selection_weights(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        """Softmax weights ``[B, K, N]`` of one selective pair (for selection maps)."""
        for spec, lr in self.pairs:
            if pair_name(spec, lr) == name:
                if not spec.selective:
                    raise ValueError(f"{name} is not a selective head")
                agg = self.aggregators[self._key(spec, lr)]
                _, w = abmilp_pool(tokens, agg.weight, agg.bias,
                                   num_prefix_tokens=agg.num_prefix_tokens, return_weights=True)
                return w
        raise KeyError(f"no head {name!r}; have {self.pair_names()}")


def probe_loss(logits: dict, labels: torch.Tensor):
    """Sum over pairs of each pair's cross-entropy (each pair's gradient is its own), and per-pair losses."""
    losses = {name: F.cross_entropy(out.float(), labels) for name, out in logits.items()}
    return torch.stack(list(losses.values())).sum(), losses  # two ops, not one add per pair
