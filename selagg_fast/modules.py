"""nn.Modules that hold parameters and call the fused ops."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .branches import PoolingProtocol, check_pooled, pool_branches, single_branch
from .ops import abmilp_pool, mlp_scores, softmax_pool
from .ops.columns import attention_column_sums, column_names
from .ops.norms import token_norm_ratio


_ACTIVATIONS = ("tanh", "relu")
_SELF_ATTENTION = ("none", "map", "both")


def _grid_hw(grid_size) -> tuple:
    """``g`` or ``(h, w)`` -> ``(h, w)``, positive ints; ValueError otherwise."""
    hw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise ValueError(f"grid_size must be a positive int or (rows, cols), got {grid_size!r}")
    return hw


def sincos_pos_embed_2d(dim: int, grid_size, cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table ``get_2d_sincos_pos_embed``: float32 ``[(1 +) h*w, dim]``.

    Patch ``i = r * w + c`` (row-major): channels ``[0, dim/2)`` encode the column ``c`` and
    ``[dim/2, dim)`` the row ``r``, each as ``[sin(p * omega), cos(p * omega)]`` with
    ``omega_j = 10000^(-j / (dim/4))``; ``cls_token`` prepends a zero row. Computed in float64
    and rounded once, as MAE's numpy code does.
    """
    h, w = _grid_hw(grid_size)
    if dim % 4:
        raise ValueError(f"positional conditioning needs dim divisible by 4 (2-D sin-cos table), got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def one_d(pos):  # [h*w] -> [h*w, dim/2]
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([one_d(cols), one_d(rows)], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, dim), table])
    return table.float()


class HeadSelfAttention(nn.Module):
    """The reference head's ``self_attn`` (timm's ``Attention`` layout): ``[q, k, v] = qkv(z)`` (no
    bias), per head ``softmax(q k^T / sqrt(d)) v`` with ``d = D / num_heads``, then ``proj`` (with
    bias). One head of width D by default (the reference code's). Runs through
    ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, N, D = z.shape
        if z.dtype != self.qkv.weight.dtype and not torch.is_autocast_enabled(z.device.type):
            z = z.to(self.qkv.weight.dtype)  # e.g. bf16 tokens, float32 head, no autocast
        q, k, v = self.qkv(z).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d]
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class SelectiveAggregation(PoolingProtocol, nn.Module):
    """AbMILP head: softmax over the pooled tokens of a learned score, then their weighted sum.

    The default (``depth=1``, no self-attention, not positional) is the paper's main head,
    ``softmax_i(w_k . z_i + b_k)``, one fused ``abmilp_pool``. The other settings are the
    reference head's (``ABMILPHead``, paper App. C.2, Table 4), state-dict keys included, so a
    head trained by the paper's code loads (``load_state_dict``) and gives the same outputs. Maths:
    docs/semantics.md ("The Selective Aggregation head's configurations").

    Args:
        dim: token width D.
        branches: K independent score vectors; ``forward`` returns ``[B, D]`` for K = 1
            and ``[B, K, D]`` otherwise (the self-attention and the hidden layer are shared).
        num_prefix_tokens: leading tokens left out of the pool (1 for a ViT with [cls],
            more with registers, 0 to pool every token: the reference's content "all").
        depth: 1 (one linear layer) or 2 (``Linear(D, D)`` -> activation -> ``Linear(D, K)``).
        activation: "tanh" or "relu" (depth 2).
        self_attention: "none", "map" (scores from the self-attended tokens ``y``, pool the
            tokens) or "both" (scores from and pool ``y``); one head of width D.
        positional: add MAE's fixed 2-D sin-cos table to the scorer's input (needs ``grid_size``).
        grid_size: the patch grid, ``g`` or ``(rows, cols)``; with it ``pos_embed`` is kept as
            the reference does (a buffer, with a zero [cls] row when ``num_prefix_tokens == 0``).
        self_attention_heads: heads of the self-attention (1, as the reference code has it;
            the same parameters and keys for any count that divides D).

    The default head follows the pooling protocol (``selagg_fast.branches``): ``branch_weights()``
    is ``(weight, bias)`` and ``finish`` the identity (a view for K = 1), so probe heads pool it in
    one call with others; the variants' ``branch_weights()`` is None (they pool by themselves).
    """

    def __init__(self, dim: int, branches: int = 1, num_prefix_tokens: int = 1, *, depth: int = 1,
                 activation: str = "tanh", self_attention: str = "none", positional: bool = False,
                 grid_size=None, self_attention_heads: int = 1):
        super().__init__()
        for name, value in (("dim", dim), ("branches", branches), ("num_prefix_tokens", num_prefix_tokens),
                            ("depth", depth), ("self_attention_heads", self_attention_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"SelectiveAggregation: {name} must be an int, got {value!r}")
        if dim <= 0 or branches <= 0:
            raise ValueError(f"SelectiveAggregation: dim and branches must be positive, got {dim}, {branches}")
        if num_prefix_tokens < 0:
            raise ValueError(f"SelectiveAggregation: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if depth not in (1, 2):
            raise ValueError(f"SelectiveAggregation: depth must be 1 or 2, got {depth!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"SelectiveAggregation: unknown activation {activation!r}; choose tanh or relu")
        if self_attention not in _SELF_ATTENTION:
            raise ValueError(f"SelectiveAggregation: unknown self_attention {self_attention!r}; "
                             "choose none, map or both")
        if self_attention_heads < 1 or dim % self_attention_heads:
            raise ValueError(f"SelectiveAggregation: self_attention_heads={self_attention_heads} does not divide "
                             f"dim={dim}")
        if positional and grid_size is None:
            raise ValueError("SelectiveAggregation: positional=True needs the patch grid (grid_size=g or (rows, cols))")
        self.dim, self.branches, self.num_prefix_tokens = dim, branches, num_prefix_tokens
        self.depth, self.activation, self.self_attention = depth, activation, self_attention
        self.positional = bool(positional)
        self.grid_size = None if grid_size is None else _grid_hw(grid_size)
        # the paper's main head: weight [K, D] / bias [K] and one fused abmilp_pool
        self.linear = depth == 1 and self_attention == "none" and not self.positional
        if self.linear:
            self.weight = nn.Parameter(torch.empty(branches, dim))
            self.bias = nn.Parameter(torch.empty(branches))
        else:
            layers = [nn.Linear(dim, dim), nn.Tanh() if activation == "tanh" else nn.ReLU()] if depth == 2 else []
            self.attention_predictor = nn.Sequential(*layers, nn.Linear(dim, branches))
        if self_attention != "none":
            self.self_attn = HeadSelfAttention(dim, self_attention_heads)
        if self.grid_size is not None and (self.positional or dim % 4 == 0):
            # reference layout: a zero [cls] row with content "all" (here: num_prefix_tokens == 0); kept
            # without positional conditioning only as the reference keeps it (a table D % 4 allows)
            self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid_size,
                                                                  cls_token=num_prefix_tokens == 0)[None])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.linear:  # same initialisation as nn.Linear(dim, branches)
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(self.dim)
            nn.init.uniform_(self.bias, -bound, bound)
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def extra_repr(self) -> str:
        text = f"dim={self.dim}, branches={self.branches}, num_prefix_tokens={self.num_prefix_tokens}"
        if not self.linear:
            text += (f", depth={self.depth}, activation={self.activation!r}, "
                     f"self_attention={self.self_attention!r}, positional={self.positional}")
        return text

    @property
    def out_features(self) -> int:
        """Width of the flattened output: K * D."""
        return self.branches * self.dim

    def check_num_tokens(self, num_tokens: int) -> None:
        """ValueError when ``num_tokens`` tokens (prefix included) cannot be pooled: nothing left
        after the prefix, or a positional grid that does not fit the pooled tokens."""
        super().check_num_tokens(num_tokens)
        if self.positional:
            self._pos_table(num_tokens - self.num_prefix_tokens)

    def branch_weights(self):
        """``(weight [K, D], bias [K])`` for the shared pooling call; None for the variants whose
        scores are not linear in the tokens (MLP scorer, self-attention, positional), which pool
        by themselves."""
        return (self.weight, self.bias) if self.linear else None

    def finish(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled ``[B, K, D]`` -> the output: ``[B, D]`` (a view) for K = 1, else ``[B, K, D]``."""
        check_pooled("SelectiveAggregation", pooled, self.branches, self.dim)
        return pooled.view(pooled.shape[0], self.dim) if self.branches == 1 else pooled

    def _pos_table(self, n: int) -> torch.Tensor:
        """The table rows for the ``n`` pooled tokens: [n, D]."""
        h, w = self.grid_size
        table = self.pos_embed[0]
        if n == table.shape[0]:
            return table
        if n == h * w:  # content "all" on a model without [cls]: no prefix row to skip
            return table[-n:]
        raise ValueError(f"SelectiveAggregation: positional grid {h}x{w} ({h * w} patches) does not match the "
                         f"{n} pooled tokens (T - num_prefix_tokens)")

    def forward(self, tokens: torch.Tensor, return_weights: bool = False):
        """``tokens [B, T, D]`` -> pooled ``[B, D]`` / ``[B, K, D]`` (and the float32 softmax
        weights ``[B, N]`` / ``[B, K, N]`` over the ``N = T - num_prefix_tokens`` pooled tokens)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"SelectiveAggregation: expected tokens [B, T, {self.dim}], got {tuple(tokens.shape)}")
        if self.linear:
            res = pool_branches(tokens, self.weight, self.bias, num_prefix_tokens=self.num_prefix_tokens,
                                return_weights=return_weights)
            if not return_weights:
                return self.finish(res)
            pooled, weights = res
            return self.finish(pooled), weights[:, 0] if self.branches == 1 else weights
        P = self.num_prefix_tokens
        n = tokens.shape[1] - P
        if n <= 0:
            raise ValueError(f"SelectiveAggregation: no tokens left to pool: T={tokens.shape[1]} with "
                             f"num_prefix_tokens={P}")
        last = self.attention_predictor[-1]
        w_out, b_out = single_branch(last.weight, last.bias)
        if self.self_attention == "none":
            x, prefix, scorer_in = tokens, P, tokens
        else:
            y = self.self_attn(tokens[:, P:])
            x, prefix = (y, 0) if self.self_attention == "both" else (tokens, P)
            scorer_in = y
        scorer_prefix = 0 if self.self_attention != "none" else P
        if self.depth == 1 and self.self_attention == "both" and not self.positional:
            return abmilp_pool(y, w_out, b_out, return_weights=return_weights)  # scores and pool over y: one op
        if self.depth == 1:
            # s = w . (u + E) + b = w . u + (w . E + b): the table becomes a per-token score offset
            # (softmax_pool then reads the tokens a second time; E itself is never added to them)
            u = scorer_in[:, scorer_prefix:]
            offset = last.bias
            if self.positional:
                offset = F.linear(self._pos_table(n).to(last.weight.dtype), last.weight, last.bias)  # [N, K]
            scores = (F.linear(u, last.weight.to(u.dtype)).float() + offset.float()).transpose(1, 2)  # [B, K, N]
            scores = scores[:, 0] if self.branches == 1 else scores
        else:
            first = self.attention_predictor[0]
            u, u_prefix = scorer_in, scorer_prefix
            if self.positional:  # the table enters the hidden layer: one [B, N, D] sum
                u, u_prefix = u[:, u_prefix:] + self._pos_table(n).to(u.dtype), 0
            scores = mlp_scores(u, first.weight, first.bias, w_out, b_out, activation=self.activation,
                                 num_prefix_tokens=u_prefix)
        return softmax_pool(scores, x, num_prefix_tokens=prefix, return_weights=return_weights)

    def reference_state_dict(self) -> dict:
        """The state dict under the reference head's keys (``attention_predictor.0.*`` for the
        default's ``weight``/``bias``); the other settings already use them."""
        state = self.state_dict()
        if self.linear:
            state["attention_predictor.0.weight"] = state.pop("weight")
            state["attention_predictor.0.bias"] = state.pop("bias")
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.linear:
            # Accept the paper code's head: attention_predictor.0.weight [K, D] / .bias [K].
            ref_w, ref_b = prefix + "attention_predictor.0.weight", prefix + "attention_predictor.0.bias"
            if ref_w in state_dict:
                state_dict[prefix + "weight"] = state_dict.pop(ref_w)
                if ref_b in state_dict:
                    state_dict[prefix + "bias"] = state_dict.pop(ref_b)
        if self.grid_size is None:
            for key in [k for k in state_dict if k.startswith(prefix + "pos_embed")]:
                state_dict.pop(key)  # the reference's table, unused without a grid
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _stacked(stats) -> torch.Tensor:
    """The four statistics as one [4, B, H, T] tensor; no copy when they are the slices of one
    buffer, as ``attention_with_stats`` writes them."""
    base = stats.self_attn._base
    if (base is not None and base.dim() == 4 and base.shape[0] == 4 and base.is_contiguous()
            and all(t._base is base and t.data_ptr() == base[i].data_ptr() for i, t in enumerate(stats))):
        return base
    return torch.stack(tuple(stats))


class AttentionStatsRecorder:
    """Running per-block, per-head sums of the paper's attention columns (see ``summary``).

    Created by :func:`record_attention_stats`; everything stays on the model's device as
    float64 sums, so memory does not grow with the number of images.
    """

    def __init__(self, block_indices, num_prefix_tokens: int, magnitudes: bool, has_cls: bool | None = None):
        self.block_indices = list(block_indices)
        self.num_prefix_tokens = num_prefix_tokens
        # registers without [cls] (e.g. *_reg4_gap): token 0 is a register, so no [cls] columns
        self.has_cls = num_prefix_tokens > 0 if has_cls is None else has_cls
        self.magnitudes = magnitudes
        self.last: dict = {}  # block index -> AttentionStats of the latest forward (per image)
        self.images = 0
        # Running sums as one float64 [C, H] tensor per block (and [M, 1] for the magnitudes), in
        # the order of ops/columns.py's column_names (the kernel's): a block's columns cost
        # one kernel and one sum on a GPU, not a chain of tensor ops per column.
        self.columns = list(column_names(self.has_cls))
        self.magnitude_columns = (["cls_magnitude_ratio"] if self.has_cls else []) + ["pos_magnitude_ratio"]
        self._sums: dict = {}  # block index -> float64 [len(columns), H]
        self._magnitude_sums: dict = {}  # block index -> float64 [len(magnitude_columns), 1]

    def record(self, block: int, stats) -> None:
        """Add one forward's per-image columns (definitions: ``reference.attention_stats_columns``)."""
        self.last[block] = stats
        rows = _stacked(stats)  # [4, B, H, T] float32: self, prefix, entropy, cls
        # per-image means over the patch rows in float32, running sums over images in float64, in
        # the order of self.columns; on a GPU one kernel and one sum a block (ops/columns.py)
        self._sums[block] = attention_column_sums(rows, self.num_prefix_tokens, self.has_cls,
                                                  self._sums.get(block))
        if block == self.block_indices[0]:
            self.images += stats.self_attn.shape[0]

    def record_magnitude(self, block: int, residual: torch.Tensor, branch: torch.Tensor) -> None:
        # ||attention branch|| / ||residual input|| per token; the exact ratio (no 1e-6 term); the
        # kernel reads each tensor once (two torch norm reductions read them twice; bench/RESULTS.md)
        ratio = token_norm_ratio(branch, residual)  # [B, T] float32; one read of each on a GPU
        patch = ratio[:, self.num_prefix_tokens:].mean(-1, keepdim=True)
        # per-image values in float32, running sums in float64 (as the attention columns)
        per_image = torch.stack((ratio[:, :1], patch) if self.has_cls else (patch,))  # [M, B, 1]
        total = per_image.sum(1, dtype=torch.float64)
        previous = self._magnitude_sums.get(block)
        self._magnitude_sums[block] = total if previous is None else previous + total

    def _by_column(self) -> dict:
        out = {}
        for names, sums in ((self.columns, self._sums), (self.magnitude_columns, self._magnitude_sums)):
            for block, total in sums.items():
                for name, row in zip(names, total):
                    out.setdefault(name, {})[block] = row
        return out

    def state_dict(self) -> dict:
        """Running sums and image count, to resume an interrupted analysis: column -> block -> [H]."""
        return {"images": self.images,
                "sums": {c: {b: t.cpu() for b, t in by.items()} for c, by in self._by_column().items()}}

    def load_state_dict(self, state: dict, device=None) -> None:
        self.images = state["images"]
        sums = state["sums"]
        self._sums, self._magnitude_sums = {}, {}
        for names, into in ((self.columns, self._sums), (self.magnitude_columns, self._magnitude_sums)):
            if names and names[0] in sums:
                for block in sums[names[0]]:
                    into[int(block)] = torch.stack([sums[n][block] for n in names]).to(device)

    def summary(self) -> dict:
        """Column name -> float64 ``[L, H]`` (blocks x heads; magnitudes ``[L, 1]``), mean over images."""
        if self.images == 0:
            raise RuntimeError("record_attention_stats: no images recorded yet")
        return {column: torch.stack([by_block[b] for b in self.block_indices]).cpu() / self.images
                for column, by_block in self._by_column().items()}


def _attention_dtype(q, k, v):
    """q, k, v in the dtype the layer's own SDPA call would use: the autocast dtype inside autocast
    (on CUDA timm's q/k LayerNorms return float32 beside a bf16 v), else the promoted one."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return tuple(t.to(dtype) for t in (q, k, v))


def _stats_attention_forward(attn: nn.Module, adapter, recorder: AttentionStatsRecorder, block: int):
    """A forward for ``attn`` that runs the streaming kernel on the family's q, k, v and logit
    bias (``attention_adapters``) and records the statistics; its output is the layer's."""
    from .ops import attention_with_stats

    def forward(x, *args, **kwargs):
        h = adapter.heads(attn, x, *args, **kwargs)
        q, k, v = _attention_dtype(h.q, h.k, h.v)
        out, stats = attention_with_stats(q, k, v, scale=h.scale, num_prefix_tokens=recorder.num_prefix_tokens,
                                          bias=h.bias)
        recorder.record(block, stats)
        return adapter.finish(attn, out, x)

    return forward


class record_attention_stats:
    """Context manager: every attention layer of a ViT runs the streaming statistics kernel.

    Usage::

        with record_attention_stats(model) as rec:
            model.forward_features(images)
        rec.summary()["cls_cls_attention"]  # float64 [L, H]

    Args:
        model: a ViT whose attention family has an adapter (``attention_adapters``: timm
            VisionTransformer with any prefix-token count, with or without [cls]; timm Beit with
            per-block or shared relative position bias; CAPIViT), or a Backbone of one.
        blocks: block indices to record (default: all).
        magnitudes: also record ``||attention branch|| / ||block input||`` ([cls] and patch mean);
            the branch is the attention layer's output (after ``proj``, before any layer scale).

    The layers' outputs are unchanged (up to the kernel's rounding); every hook and replaced
    forward is removed on exit, also after an exception.
    """

    def __init__(self, model: nn.Module, blocks=None, magnitudes: bool = True):
        from .attention_adapters import attention_layers, token_layout

        self.model = model
        self.layers = attention_layers(model)  # TypeError for an unsupported attention layer
        n = len(self.layers)
        self.block_indices = list(range(n)) if blocks is None else [int(b) for b in blocks]
        for b in self.block_indices:
            if not 0 <= b < n:
                raise ValueError(f"record_attention_stats: block {b} out of range (model has {n})")
        layout = token_layout(model)
        self.recorder = AttentionStatsRecorder(self.block_indices, layout.num_prefix_tokens, magnitudes,
                                               has_cls=layout.has_cls)
        self._handles = []
        self._patched = []  # (attn, its own instance forward or None)
        self._residual = None  # the current block's input, set by its pre-hook

    def __enter__(self) -> AttentionStatsRecorder:
        try:
            for b in self.block_indices:
                block, attn, adapter = self.layers[b]
                self._patched.append((attn, attn.__dict__.get("forward")))
                attn.forward = _stats_attention_forward(attn, adapter, self.recorder, b)
                if self.recorder.magnitudes:
                    self._handles.append(block.register_forward_pre_hook(self._residual_hook, with_kwargs=True))
                    self._handles.append(attn.register_forward_hook(self._branch_hook(b)))
        except Exception:
            self._restore()
            raise
        return self.recorder

    def _residual_hook(self, _module, args, kwargs):
        self._residual = args[0] if args else kwargs["x"]

    def _branch_hook(self, b):
        def hook(_module, _args, output):
            self.recorder.record_magnitude(b, self._residual, output)
        return hook

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for attn, own in reversed(self._patched):
            if own is None:
                attn.__dict__.pop("forward", None)
            else:
                attn.forward = own
        self._patched = []

    def __exit__(self, *exc) -> None:
        self._restore()
