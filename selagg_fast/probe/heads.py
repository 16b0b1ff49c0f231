"""Probe heads: aggregation -> BatchNorm1d(affine=False) -> Linear, many trained at once.

Every (head, learning rate) pair is an independent probe. They share one backbone pass,
and the linear Selective Aggregation, attentive-probing and efficient-probing pairs share one
fused ``abmilp_pool`` call per (prefix, token standardisation) setting: through the pooling
protocol (``selagg_fast.branches``) their score vectors and folded queries are stacked as
branches of one op, so the tokens are read once for all of them. The reference head's other
variants (MLP scorer, self-attention, positional conditioning) run one head each.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..attention_methods import ATTENTION_METHODS, BY_HEAD, BY_WEIGHTS, MASS, MEAN
from ..attentive import AttentivePooling
from ..branches import branch_groups, pool_branches
from ..efficient import EfficientProbing
from ..files import parse_number_list
from ..modules import SelectiveAggregation
from ..ops import softmax_pool

HEAD_KINDS = ("cls", "avg", "selective[_mlp_tanh|_mlp_relu][_sa|_samap][_pe][_all][_k<K>]", "ap<H>[_ln][_all]",
              "ep<Q>[_all]", *BY_HEAD)
# Non-trainable aggregations (paper Table 5, declared in attention_methods): the weight vector comes
# from the backbone's (or the --selector-model's) attention, computed beside the tokens
# (probe/selector.py); only the BatchNorm + Linear train. Head name -> the weights' name.
ATTENTION_HEADS = {m.head: m.weights for m in ATTENTION_METHODS}
_SELECTIVE_NAME = re.compile(r"selective(?:_mlp_(?P<act>tanh|relu))?(?:_(?P<sa>sa|samap))?(?P<pe>_pe)?"
                             r"(?P<all>_all)?(?:_k(?P<k>\d+))?")
_AP_NAME = re.compile(r"ap(?P<h>\d+)(?P<ln>_ln)?(?P<all>_all)?")
_EP_NAME = re.compile(r"ep(?P<q>\d+)(?P<all>_all)?")


@dataclass(frozen=True)
class HeadSpec:
    """One aggregation: ``kind`` in cls / avg / selective / selective_all / ap / ap_all / ep / ep_all
    (``_all``: the prefix tokens are pooled too), ``branches`` K; the reference head's switches
    (``depth``, ``activation``, ``self_attention``, ``positional``) for selective kinds; ``num_heads``
    H and ``token_norm`` for attentive probes (ap); ``num_queries`` Q for efficient probes (ep)."""
    name: str
    kind: str
    branches: int = 1
    depth: int = 1
    activation: str = "tanh"
    self_attention: str = "none"
    positional: bool = False
    num_heads: int = 0
    token_norm: bool = False
    num_queries: int = 0

    @property
    def learns_weights(self) -> bool:
        """Trained weights over the tokens (every Selective Aggregation variant, attentive and
        efficient probe): the head needs every token (a feature cache keeps them all) and has maps."""
        return self.kind not in ("cls", "avg") and not self.attention_weighted

    @property
    def selective(self) -> bool:
        """:attr:`learns_weights` under its earlier name, kept for callers (true for attentive and efficient
        probes too)."""
        return self.learns_weights

    @property
    def attention_weighted(self) -> bool:
        """Pools with fixed attention-derived weights (cls_attn & co.): needs every token and the
        weights (ProbeHeads.forward's ``attention_weights``), trains no aggregation parameter."""
        return self.kind in ATTENTION_HEADS

    @property
    def needs_tokens(self) -> bool:
        """Needs every token (a feature cache keeps them all), not only [cls] and the patch mean."""
        return self.learns_weights or self.attention_weighted

    @property
    def attentive(self) -> bool:
        return self.kind in ("ap", "ap_all")

    @property
    def efficient(self) -> bool:
        return self.kind in ("ep", "ep_all")

    @property
    def pools_prefix(self) -> bool:
        return self.kind.endswith("_all")


def parse_heads(text: str, has_cls: bool = True) -> list:
    """``"cls,avg,selective,selective_k4"`` -> HeadSpecs; clear errors for unknown or impossible heads."""
    specs = []
    for name in [t.strip() for t in text.split(",") if t.strip()]:
        sel, ap, ep = _SELECTIVE_NAME.fullmatch(name), _AP_NAME.fullmatch(name), _EP_NAME.fullmatch(name)
        if sel:
            if sel["k"] is not None and int(sel["k"]) < 1:
                raise ValueError(f"head {name!r}: K must be >= 1")
            spec = HeadSpec(name, "selective_all" if sel["all"] else "selective",
                            1 if sel["k"] is None else int(sel["k"]),
                            depth=2 if sel["act"] else 1, activation=sel["act"] or "tanh",
                            self_attention={None: "none", "sa": "both", "samap": "map"}[sel["sa"]],
                            positional=bool(sel["pe"]))
        elif ap:
            if int(ap["h"]) < 1:
                raise ValueError(f"head {name!r}: the number of heads H must be >= 1")
            spec = HeadSpec(name, "ap_all" if ap["all"] else "ap", num_heads=int(ap["h"]), token_norm=bool(ap["ln"]))
        elif ep:
            if int(ep["q"]) < 1:
                raise ValueError(f"head {name!r}: the number of queries Q must be >= 1")
            spec = HeadSpec(name, "ep_all" if ep["all"] else "ep", num_queries=int(ep["q"]))
        elif name in ("cls", "avg") or name in ATTENTION_HEADS:
            spec = HeadSpec(name, name)
        else:
            raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEAD_KINDS)}")
        if spec.attention_weighted and BY_HEAD[spec.kind].needs_cls and not has_cls:
            raise ValueError(f"head {name!r} needs a [cls] token, and this model has none "
                             "(use center_attn, or external_cls_attn with a --selector-model)")
        if spec.kind == "cls" and not has_cls:
            raise ValueError("head 'cls' needs a [cls] token, and this model has none "
                             "(use avg / selective)")
        if spec in specs:
            raise ValueError(f"head {name!r} given twice")
        specs.append(spec)
    if not specs:
        raise ValueError("no heads given (--heads cls,avg,selective)")
    return specs


def attention_methods(specs) -> list:
    """The weight vectors' names of the attention-weighted heads among ``specs``, each once in the
    order of the heads: the method axis M of ``ProbeHeads.forward``'s ``[B, M, N]`` weights."""
    return list(dict.fromkeys(ATTENTION_HEADS[s.kind] for s in specs if s.attention_weighted))


def pair_name(spec: HeadSpec | str, lr: float) -> str:
    """``head@lr``: a pair's name in results and checkpoints (``spec``: a HeadSpec or its name)."""
    return f"{spec if isinstance(spec, str) else spec.name}@{lr:g}"


def canonical_pair_name(text: str) -> str:
    """A user's ``head@lr`` with the lr written as :func:`pair_name` writes it (``selective@1.0`` ->
    ``selective@1``, ``@1e30`` -> ``@1e+30``); text without a number after ``@`` is kept as given."""
    name, at, lr = text.rpartition("@")
    if not at:
        return text
    try:
        return pair_name(name, float(lr))
    except ValueError:
        return text


def parse_lrs(text) -> list:
    """``"0.05,0.1,0.3"`` -> the base learning rates of a run's pairs (distinct, finite, positive,
    and distinct as pair names: ``%g``, 6 significant digits)."""
    lrs = parse_number_list("--lrs", text, example="0.05,0.1,0.3", what="base learning rates")
    names = {}
    for lr in lrs:
        other = names.setdefault(f"{lr:g}", lr)
        if other != lr:
            raise ValueError(f"--lrs {text}: {other!r} and {lr!r} are one pair name (@{lr:g}); learning rates "
                             "must differ in their first 6 significant digits")
    return lrs


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of each process's input is the sum of
    every process's output gradient (torch.distributed.nn's all_reduce is deprecated)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad)
        return grad


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
        # one differentiable all-reduce of [sum, sum of squares, count] in float64 (no cancellation
        # worth mentioning for float32 features), and no host sync: the step stays asynchronous
        x64 = x.double()
        local = torch.cat([x64.sum(0), (x64 * x64).sum(0), x64.new_full((1,), x.shape[0])])
        total = _AllReduceSum.apply(local)
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

    ``forward(tokens [B, T, D])`` returns ``{pair name: logits [B, C]}``. ``selective*_k<K>``
    heads concatenate their K pooled vectors (``[B, K*D]``) before the BatchNorm, so each
    branch keeps its own features and the classifier weighs them; ``ap<H>`` heads give ``[B, D]``,
    ``ep<Q>`` heads ``[B, D]`` (their Q value slices concatenated).
    ``grid_size`` (the patch grid, rows x cols) is needed by positional (``_pe``) heads only; given,
    every aggregation checks the token count at construction, not at the first batch.
    """

    def __init__(self, specs, lrs, dim: int, num_classes: int, num_prefix_tokens: int, backend: str = "auto",
                 grid_size=None):
        super().__init__()
        self.backend = backend  # abmilp_pool's backend: "auto", "triton" or "reference" (benchmarks compare)
        self.specs, self.lrs = list(specs), [float(lr) for lr in lrs]
        self.dim, self.num_classes, self.num_prefix_tokens = dim, num_classes, num_prefix_tokens
        self.pairs = [(spec, lr) for spec in self.specs for lr in self.lrs]
        # the attention-weighted heads' methods, in the order of forward's attention weights [B, M, N]
        self.attention_methods = attention_methods(self.specs)
        self.aggregators = nn.ModuleDict()
        self.classifiers = nn.ModuleDict()
        for spec, lr in self.pairs:
            key = self._key(spec, lr)
            if spec.learns_weights:
                agg = self.aggregators[key] = _aggregator(spec, dim, 0 if spec.pools_prefix else num_prefix_tokens,
                                                          grid_size)
                if grid_size is not None:  # a grid that cannot fit the pooled tokens: refused now
                    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
                    agg.check_num_tokens(num_prefix_tokens + rows * cols)
            width = self.aggregators[key].out_features if key in self.aggregators else dim
            self.classifiers[key] = LinearProbe(width, num_classes)

    @property
    def selection_methods(self) -> list:
        """:attr:`attention_methods` under its earlier name, kept for callers."""
        return self.attention_methods

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
        # Through the pooling protocol: every aggregation with branch weights joins one fused call per
        # (prefix, standardize) setting (calls of at most the kernels' K, whole members each), and
        # finishes on its slice of the pooled [B, K, D]; the others pool by themselves.
        B = tokens.shape[0]
        groups: dict = {}
        for spec, lr in self.pairs:
            if not spec.learns_weights:
                continue
            key = self._key(spec, lr)
            agg = self.aggregators[key]
            branches = agg.branch_weights()
            if branches is None:
                features[key] = agg(tokens).reshape(B, -1)
            else:
                groups.setdefault((agg.num_prefix_tokens, agg.standardize, agg.eps), []).append((key, agg, *branches))
        for (prefix, standardize, eps), members in groups.items():
            for group in branch_groups([weight.shape[0] for _, _, weight, _ in members]):
                self._pool_group([members[i] for i in group], tokens, prefix, standardize, eps, features)

    def _pool_group(self, members, tokens, prefix: int, standardize: bool, eps, features: dict) -> None:
        weights = [weight for _, _, weight, _ in members]
        biases = [bias for _, _, _, bias in members]
        if len(members) == 1:  # the parameters themselves: no concatenated copy to backpropagate through
            weight, bias = weights[0], biases[0]
        else:
            weight = torch.cat(weights)
            # folded queries have no score bias (theirs cancels in the softmax): zeros beside a selective one
            bias = None if all(b is None for b in biases) else torch.cat(
                [w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])
        pooled = pool_branches(tokens, weight, bias, num_prefix_tokens=prefix, standardize=standardize, eps=eps,
                               backend=self.backend)
        # split, not slicing: the backward concatenates the pairs' gradients in one op, where each
        # slice's backward would zero-fill a full-size gradient and the pieces would then be added
        pieces = pooled.split([w.shape[0] for w in weights], dim=1)
        for (key, agg, _, _), piece in zip(members, pieces):
            features[key] = agg.finish(piece).reshape(tokens.shape[0], -1)

    def _attention_features(self, tokens: torch.Tensor, weights, features: dict) -> None:
        # every method pooled once (one fused softmax-pool call, K = methods), shared by its lrs
        if not self.attention_methods:
            return
        M = len(self.attention_methods)
        if weights is None or weights.dim() != 3 or weights.shape[1] != M or \
                weights.shape[0] != tokens.shape[0] or weights.shape[2] != tokens.shape[1] - self.num_prefix_tokens:
            raise ValueError(f"ProbeHeads: heads {', '.join(s.name for s in self.specs if s.attention_weighted)} "
                             f"need their weights: forward((tokens, attention_weights [B, {M}, N])) for methods "
                             f"{self.attention_methods}, got {None if weights is None else tuple(weights.shape)}")
        pooled = pool_attention(tokens, weights, self.attention_methods, self.num_prefix_tokens, self.backend)
        for spec, lr in self.pairs:
            if spec.attention_weighted:
                features[self._key(spec, lr)] = pooled[:, self.attention_methods.index(ATTENTION_HEADS[spec.kind])]

    def forward(self, tokens, attention_weights=None, *, selection=None) -> dict:
        """``tokens [B, T, D]``; heads of fixed attention weights (cls_attn & co.) also need
        ``attention_weights [B, M, N]`` (float32, methods in ``attention_methods`` order), given as
        the argument or as ``tokens = (tokens, attention_weights)`` (the trainer's batches carry
        that pair); ``selection``: the keyword's earlier name, still accepted."""
        if attention_weights is None:
            attention_weights = selection
        if isinstance(tokens, (tuple, list)):
            tokens, attention_weights = tokens
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
        self._attention_features(tokens, attention_weights, features)
        return {pair_name(s, lr): self.classifiers[self._key(s, lr)](features[self._key(s, lr)])
                for s, lr in self.pairs}

    @torch.no_grad()
    def trained_weights(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        """Softmax weights ``[B, K, N]`` of one selective, attentive or efficient pair (for selection
        maps): K branches of a selective head, H heads of an attentive one, Q queries of an efficient
        one (maps average them)."""
        for spec, lr in self.pairs:
            if pair_name(spec, lr) == name:
                if not spec.learns_weights:
                    raise ValueError(f"{name} is not a selective or attentive head")
                _, w = self.aggregators[self._key(spec, lr)](tokens, return_weights=True)
                return w.reshape(tokens.shape[0], -1, w.shape[-1])
        raise KeyError(f"no head {name!r}; have {self.pair_names()}")

    selection_weights = trained_weights  # its earlier name, kept for callers


def _aggregator(spec: HeadSpec, dim: int, prefix: int, grid_size) -> nn.Module:
    """The aggregation module of one selective, attentive or efficient pair."""
    parts = spec.num_heads if spec.attentive else spec.num_queries if spec.efficient else None
    if parts is not None and dim % parts:  # each head / query takes an equal slice of the width
        what = "attention heads" if spec.attentive else "queries"
        fits = ", ".join(str(n) for n in range(1, 65) if dim % n == 0)
        raise ValueError(f"--heads {spec.name}: {parts} {what} do not divide the backbone's width {dim} "
                         f"(counts that do, up to 64: {fits})")
    if spec.attentive:
        return AttentivePooling(dim, spec.num_heads, token_norm=spec.token_norm, num_prefix_tokens=prefix)
    if spec.efficient:
        return EfficientProbing(dim, spec.num_queries, num_prefix_tokens=prefix)
    if spec.positional and grid_size is None:
        raise ValueError(f"head {spec.name!r} (positional conditioning) needs the patch grid "
                         "(ProbeHeads(..., grid_size=(rows, cols)))")
    return SelectiveAggregation(dim, spec.branches, prefix, depth=spec.depth, activation=spec.activation,
                                self_attention=spec.self_attention, positional=spec.positional,
                                grid_size=grid_size if spec.positional else None)


def pool_attention(tokens: torch.Tensor, weights: torch.Tensor, methods, num_prefix_tokens: int,
                   backend: str = "auto") -> torch.Tensor:
    """Pooled features ``[B, M, D]`` float32 of the methods' weight vectors ``[B, M, N]``.

    One fused softmax-weighted-sum over the tokens with ``log(weights)`` as scores (softmax of
    ``log a`` is ``a / sum a``: no ``[B, N, D]`` temporary), then the reference's scaling per method:
    ``sum_t a_t z_t`` for the [cls] methods, ``(1/N) sum_t a_t z_t`` for the central patch, and
    ``(1/N) sum_t abar_t z_t = (sum abar / N) * sum_t renorm(abar)_t z_t`` for the external selector
    (the per-image patch mass, which BatchNorm does not remove).
    """
    N = weights.shape[-1]
    scores = weights.float().clamp_min(0).log()  # a zero weight: -inf, that token masked
    pooled = softmax_pool(scores, tokens, num_prefix_tokens=num_prefix_tokens, backend=backend).float()
    scale = torch.ones(weights.shape[:2], device=weights.device, dtype=torch.float32)
    for i, m in enumerate(methods):
        if BY_WEIGHTS[m].scale == MEAN:
            scale[:, i] = 1.0 / N
        elif BY_WEIGHTS[m].scale == MASS:
            scale[:, i] = weights[:, i].float().sum(-1) / N
    return pooled * scale[..., None]


def probe_loss(logits: dict, labels: torch.Tensor):
    """Sum over pairs of each pair's cross-entropy (each pair's gradient is its own), and per-pair losses."""
    losses = {name: F.cross_entropy(out.float(), labels) for name, out in logits.items()}
    return torch.stack(list(losses.values())).sum(), losses  # two ops, not one add per pair
