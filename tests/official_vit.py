"""Float64 transcription of each family's official encoder forward, from official parameter names.

Plain tensor maths, independent of timm and of selagg_fast: patch embedding as a matrix product,
hand-written LayerNorm / RMSNorm / GELU / softmax, each family's token assembly ([cls], registers,
position embeddings, DINO / DINOv2 forward-time interpolation), BEiT's relative position bias
and q/v biases, layer scales, CAPI's RoPE with the stored frequencies and edge registers.

``official_forward`` returns the tokens of the probed block (prefix tokens first, as selagg_fast
orders them: ``[cls]`` then registers; CAPI's registers first) without the final norm unless
asked, and every block's full attention probabilities ``[B, H, T, T]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LN_EPS = 1e-6      # every LayerNorm of these families (partial(nn.LayerNorm, eps=1e-6))
RMS_EPS = 1e-5     # CAPI's RMSNorm
FAMILY_PATCH = {"ijepa": 14, "capi": 14, "dinov2": 14, "dinov2_reg4": 14}


@dataclass
class Forward:
    tokens: torch.Tensor          # [B, T, D] float64, prefix tokens first
    attn: list                    # per block run: [B, H, T, T] float64 softmax probabilities
    branch_ratio: list            # per block: [B, T] ||attention branch after proj|| / ||block input||
    num_prefix_tokens: int
    has_cls: bool
    grid: tuple


def layer_norm(x, w, b, eps=LN_EPS):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rms_norm(x, w=None, eps=RMS_EPS):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def softmax(z):
    z = z - z.amax(-1, keepdim=True)
    e = z.exp()
    return e / e.sum(-1, keepdim=True)


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def patch_embed(images, w, b):
    """Conv2d(kernel = stride = p) as a product over flattened (channel, row, col) patches."""
    B, C, Hh, Ww = images.shape
    D, _, p, _ = w.shape
    gh, gw = Hh // p, Ww // p
    x = images[:, :, :gh * p, :gw * p].reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
    x = x.reshape(B, gh * gw, C * p * p)
    return x @ w.reshape(D, -1).T + b, (gh, gw)


def heads(x, H):
    B, T, D = x.shape
    return x.reshape(B, T, H, D // H).transpose(1, 2)


def attention(q, k, v, bias=None):
    """q, k, v ``[B, H, T, d]``; scale ``d ** -0.5``; returns output ``[B, T, H*d]`` and probabilities."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    a = softmax(logits)
    out = (a @ v).transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1), a


def _ratio(branch, x):
    return branch.norm(dim=-1) / x.norm(dim=-1)


# ---------------------------------------------------------------- token assembly

def dino_interpolate(pos_embed, grid, *, offset=0.1, antialias=False):
    """DINO / iBOT / DINOv2 ``interpolate_pos_encoding``: the patch part of ``pos_embed`` (square
    grid M x M after its [cls] row) resampled bicubically to ``grid`` at forward time. With an
    offset (DINO, iBOT, DINOv2 without registers: 0.1) the scale factor ``(g + 0.1) / M`` is passed
    to the interpolation; without (DINOv2 with registers) the output size, and antialiasing."""
    n = pos_embed.shape[1] - 1
    if n == grid[0] * grid[1] and grid[0] == grid[1]:
        return pos_embed
    M = int(math.sqrt(n))
    assert M * M == n
    D = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)
    if offset:
        patch = F.interpolate(patch, scale_factor=((grid[0] + offset) / M, (grid[1] + offset) / M), mode="bicubic",
                              antialias=antialias)
    else:
        patch = F.interpolate(patch, size=grid, mode="bicubic", antialias=antialias)
    assert tuple(patch.shape[-2:]) == tuple(grid)
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, D)], 1)


def beit_rel_bias(table, index):
    """``[H, T, T]`` bias: ``table[index]`` per head."""
    T = index.shape[0]
    return table[index.reshape(-1)].reshape(T, T, -1).permute(2, 0, 1)


def capi_coords(grid, n_registers, dtype):
    """Patch coordinates ``linspace(0, 1)`` per axis (row, col) and the registers' edge coordinates
    (four sides of the unit square, ``n/4`` each), scaled to the visible span (all patches: [0, 1])."""
    rows = torch.linspace(0, 1, grid[0], dtype=dtype)
    cols = torch.linspace(0, 1, grid[1], dtype=dtype)
    patches = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
    side = n_registers // 4
    c = torch.arange(side, dtype=dtype) / side
    zero, one = torch.zeros(side, dtype=dtype), torch.ones(side, dtype=dtype)
    reg = torch.cat([torch.stack([c, zero], -1), torch.stack([one, c], -1),
                     torch.stack([1 - c, one], -1), torch.stack([zero, 1 - c], -1)])
    lo, hi = patches.min(0).values, patches.max(0).values
    reg = lo + reg * (hi - lo)
    return torch.cat([reg, patches])


def rope(x, coords, freqs):
    """CAPI's rotation: ``angle = coords @ freqs``; ``x cos + rotate_half(x) sin`` (halves swapped, first negated)."""
    angle = coords @ freqs  # [T, d]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * angle.cos() + rot * angle.sin()


# ---------------------------------------------------------------- forwards

def official_forward(family: str, state: dict, images: torch.Tensor, *, num_heads: int,
                     return_block: int | None = None, final_norm: bool = False) -> Forward:
    """Float64 forward of ``family`` from its official-name ``state``; ``return_block`` counts from 1."""
    s = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    x = images.double()
    H = num_heads
    depth = 1 + max(int(k.split(".")[2 if family == "capi" else 1]) for k in s if ".blocks." in f".{k}")
    run = depth if return_block is None else return_block
    if family == "capi":
        return _capi_forward(s, x, H, run, final_norm)

    x, grid = patch_embed(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"])
    B = x.shape[0]
    has_cls = "cls_token" in s
    P = int(has_cls)
    if family in ("mae", "mae_visualize", "mae_finetuned", "maskfeat", "mocov3"):
        x = torch.cat([s["cls_token"].expand(B, -1, -1), x], 1) + s["pos_embed"]
    elif family in ("dino", "ibot", "dinov2"):
        x = torch.cat([s["cls_token"].expand(B, -1, -1), x], 1) + dino_interpolate(s["pos_embed"], grid)
    elif family == "dinov2_reg4":
        x = torch.cat([s["cls_token"].expand(B, -1, -1), x], 1)
        x = x + dino_interpolate(s["pos_embed"], grid, offset=0.0, antialias=True)
        reg = s["register_tokens"]
        x = torch.cat([x[:, :1], reg.expand(B, -1, -1), x[:, 1:]], 1)  # registers after [cls], no position
        P += reg.shape[1]
    elif family == "ijepa":
        x = x + s["pos_embed"]
    elif family in ("simmim", "beitv2"):
        x = torch.cat([s["cls_token"].expand(B, -1, -1), x], 1)  # BEiT: an absolute table only where built with one
        if "pos_embed" in s:
            x = x + s["pos_embed"]
    else:
        raise ValueError(f"unknown family {family!r}")

    shared_bias = None
    if "rel_pos_bias.relative_position_bias_table" in s:
        shared_bias = beit_rel_bias(s["rel_pos_bias.relative_position_bias_table"],
                                    s["rel_pos_bias.relative_position_index"])

    attns, ratios = [], []
    for i in range(run):
        b = lambda k: s.get(f"blocks.{i}.{k}")  # noqa: E731
        h = layer_norm(x, b("norm1.weight"), b("norm1.bias"))
        D = x.shape[-1]
        qkv_bias = b("attn.qkv.bias")
        if b("attn.q_bias") is not None:  # BEiT: k has no bias
            qkv_bias = torch.cat([b("attn.q_bias"), torch.zeros_like(b("attn.q_bias")), b("attn.v_bias")])
        qkv = linear(h, b("attn.qkv.weight"), qkv_bias)
        q, k, v = (heads(t, H) for t in qkv.split(D, -1))
        bias = shared_bias
        if b("attn.relative_position_bias_table") is not None:
            own = beit_rel_bias(b("attn.relative_position_bias_table"), b("attn.relative_position_index"))
            bias = own if bias is None else bias + own
        out, a = attention(q, k, v, bias)
        branch = linear(out, b("attn.proj.weight"), b("attn.proj.bias"))
        attns.append(a)
        ratios.append(_ratio(branch, x))
        g1 = b("gamma_1") if b("gamma_1") is not None else b("ls1.gamma")
        g2 = b("gamma_2") if b("gamma_2") is not None else b("ls2.gamma")
        x = x + (branch if g1 is None else g1 * branch)
        h = layer_norm(x, b("norm2.weight"), b("norm2.bias"))
        m = linear(gelu(linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"), b("mlp.fc2.bias"))
        x = x + (m if g2 is None else g2 * m)
    if final_norm:
        x = layer_norm(x, s["norm.weight"], s["norm.bias"])
    return Forward(x, attns, ratios, P, has_cls, grid)


def _capi_forward(s, images, H, run, final_norm) -> Forward:
    x, grid = patch_embed(images, s["patch_embed.weight"], s["patch_embed.bias"])
    B = x.shape[0]
    reg = s["registers"]
    R = reg.shape[1]
    x = torch.cat([reg.expand(B, -1, -1), x], 1)
    coords = capi_coords(grid, R, x.dtype)
    attns, ratios = [], []
    for i in range(run):
        b = lambda k: s[f"encoder.blocks.{i}.{k}"]  # noqa: E731
        h = rms_norm(x, b("residual1.norm.weight"))
        q, k, v = (heads(linear(h, b(f"residual1.fn.{n}_proj.weight")), H) for n in "qkv")
        freqs = b("residual1.fn.rope.freqs")
        q, k = rope(q, coords, freqs), rope(k, coords, freqs)
        out, a = attention(q, k, v)
        branch = linear(out, b("residual1.fn.proj.weight"))
        attns.append(a)
        ratios.append(_ratio(branch, x))
        x = x + branch
        h = rms_norm(x, b("residual2.norm.weight"))
        x = x + linear(gelu(linear(h, b("residual2.fn.fc1.weight"))), b("residual2.fn.fc2.weight"))
    if final_norm:
        x = rms_norm(x)  # enc_norm: no affine weights
    return Forward(x, attns, ratios, R, False, grid)
