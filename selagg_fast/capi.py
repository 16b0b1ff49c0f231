"""CAPI's ViT encoder (facebookresearch/capi ``model.py``), with the official parameter names.

timm has no CAPI architecture. This module rebuilds the encoder half of CAPI's
``EncoderDecoder`` so that a released file's backbone keys load with ``load_state_dict``
once the outer prefixes are removed (:func:`capi_state_dict`).

Architecture (as the official code computes it):

- ``patch_embed``: a ``Conv2d`` with kernel = stride = patch size (weight and bias).
- ``registers`` ``[1, R, D]`` (R = 16 in the release), **no** [cls] token, no absolute
  position embedding. Token order: registers first, then patches row-major, exactly as the
  official ``torch.cat([registers, patches])`` (no reordering was needed).
- Each block: ``x = x + fn(norm(x))`` twice, as ``residual1.{norm, fn}`` (attention) and
  ``residual2.{norm, fn}`` (MLP); the norms are ``RMSNorm(eps=1e-5)`` with a weight; no layer
  scale; drop-path is off (a frozen encoder).
- Attention: ``q_proj``, ``k_proj``, ``v_proj``, ``proj``, all without bias; softmax scale
  ``head_dim ** -0.5``; 2-D RoPE on q and k with the **stored** angular frequencies
  ``rope.freqs`` ``[2, head_dim]``: ``angle = coords @ freqs``,
  ``x * cos(angle) + rotate_half(x) * sin(angle)``, ``rotate_half`` pairing channel ``j`` with
  ``j + head_dim / 2``.
- RoPE coordinates (row, col): patches at ``linspace(0, 1, rows) x linspace(0, 1, cols)``;
  the R registers on the image edge (R/4 per side, clockwise from the top-left corner:
  top edge (c, 0), right (1, c), bottom (1 - c, 1), left (0, 1 - c), ``c = arange(R/4) / (R/4)``),
  then scaled to the span of the patch coordinates (``min + coord * (max - min)`` per axis;
  with all patches visible that is the identity, except on a one-patch axis where it is 0).
- MLP: ``fc1`` -> exact GELU -> ``fc2``, hidden ``4 D``, no bias.
- Final norm ``enc_norm``: ``RMSNorm(eps=1e-5)`` **without** a weight (no state-dict key).

Interface (what the rest of the package relies on):

- ``CAPIViT(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, num_registers)``;
  :func:`capi_vit_large_patch14` is the released ViT-L/14 (224 px, 16 registers).
- attributes ``patch_embed`` (``.grid_size`` (rows, cols) of ``img_size``, ``.img_size``,
  ``.patch_size``; calling it returns patch tokens ``[B, N, D]``), ``blocks`` (``nn.ModuleList``),
  ``embed_dim``, ``num_heads``, ``num_prefix_tokens`` (= ``num_registers``), ``cls_token = None``,
  ``norm`` (a read-only alias of ``enc_norm``).
- ``prepare_tokens(images) -> [B, T, D]`` (patch embedding + registers, T = R + rows * cols);
  ``forward_features(images)`` = ``forward(images)`` = prepare -> blocks -> norm.
- ``block(x)`` runs one block with no other argument: the RoPE coordinates belong to the grid
  the model last prepared (``model.token_grid``; :meth:`CAPIViT.set_grid` sets it by hand).
  Other input sizes than ``img_size`` are accepted as the official code accepts them (the
  coordinates are relative, recomputed for the new grid; a side that is not a multiple of the
  patch is cropped by the convolution, as in the official code).
- ``block.attn`` (read-only; the module at ``residual1.fn``, called as a module so forward
  hooks fire) provides ``heads(x) -> (q, k, v, bias, scale)`` with q, k, v ``[B, H, T, d]``
  after RoPE and ``bias = None``, and ``merge_heads(out [B, H, T, d]) -> [B, T, D]`` (the output
  projection); its forward is ``merge_heads(scaled_dot_product_attention(q, k, v, scale=scale))``.

Numerics: RoPE angles and rotations are computed in at least float32, also for a bf16 model
(the official code, run in bf16, rounds the coordinates and angles to bf16).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

__all__ = ["CAPIViT", "CAPIAttention", "CAPIBlock", "CAPIRope", "capi_vit_large_patch14", "capi_state_dict",
           "token_coordinates"]

NORM_EPS = 1e-5


def _pair(value, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"CAPIViT: {name} must be a positive int or a pair of them, got {value!r}")
    return pair


def token_coordinates(grid: tuple[int, int], num_registers: int, dtype: torch.dtype = torch.float32,
                      device=None) -> torch.Tensor:
    """RoPE (row, col) coordinates of every token, registers first: ``[R + rows * cols, 2]``."""
    rows, cols = grid
    patches = torch.cartesian_prod(torch.linspace(0, 1, rows, dtype=dtype, device=device),
                                   torch.linspace(0, 1, cols, dtype=dtype, device=device)).reshape(-1, 2)
    side = num_registers // 4
    c = torch.arange(side, dtype=dtype, device=device) / max(side, 1)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    edge = torch.cat([torch.stack(pair, dim=-1) for pair in
                      ((c, zero), (one, c), (1 - c, one), (zero, 1 - c))])  # [R, 2], clockwise
    low, high = patches.min(dim=0).values, patches.max(dim=0).values
    return torch.cat([low + edge * (high - low), patches])


class CAPIRope(nn.Module):
    """2-D rotary embedding with stored angular frequencies ``freqs`` ``[2, head_dim]``."""

    def __init__(self, head_dim: int, max_freq: float = 7.0, min_freq: float = 7e-4):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"CAPIRope: head_dim must be a multiple of 4, got {head_dim}")
        self.head_dim = head_dim
        # official init: geometric frequencies from max_freq down to min_freq, each used twice;
        # row 0 drives the first half of the channels (image rows), row 1 the second half
        base = max_freq * (max_freq / min_freq) ** torch.linspace(0, -1, head_dim // 4)
        base = torch.cat([base, base])
        freqs = torch.zeros(2, head_dim)
        freqs[0, : head_dim // 2] = base
        freqs[1, head_dim // 2:] = base
        self.freqs = nn.Parameter(freqs * 2 * math.pi)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., T, head_dim]`` rotated by ``coords`` ``[T, 2]``."""
        dtype = torch.promote_types(self.freqs.dtype, torch.float32)
        freqs, coords = self.freqs.to(dtype), coords.to(dtype)
        # elementwise rather than a matmul: autocast would round a matmul to bf16
        angle = coords[:, :1] * freqs[0] + coords[:, 1:] * freqs[1]  # [T, head_dim]
        xf = x.to(dtype)
        half = xf.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * angle.cos() + rotated * angle.sin()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"


class CAPIAttention(nn.Module):
    """CAPI self-attention: separate bias-free q/k/v projections, RoPE on q and k, output ``proj``.

    The token grid (``grid``) and register count fix the RoPE coordinates; the model sets them."""

    def __init__(self, dim: int, num_heads: int, num_registers: int, grid: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_registers = num_registers
        self.grid = tuple(grid)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rope = CAPIRope(self.head_dim)
        self._coords_key, self._coords = None, None

    def coordinates(self, device) -> torch.Tensor:
        """RoPE coordinates ``[T, 2]`` of the current grid (cached per grid and device)."""
        dtype = torch.promote_types(self.rope.freqs.dtype, torch.float32)
        key = (self.grid, self.num_registers, torch.device(device), dtype)
        if key != self._coords_key:
            self._coords = token_coordinates(self.grid, self.num_registers, dtype=dtype, device=device)
            self._coords_key = key
        return self._coords

    def heads(self, x: torch.Tensor):
        """``x`` ``[B, T, D]`` (already normed) -> ``(q, k, v, bias, scale)``, q/k/v ``[B, H, T, d]``
        after RoPE, ``bias = None``."""
        if x.dim() != 3:
            raise ValueError(f"CAPIAttention: expected tokens [B, T, D], got shape {tuple(x.shape)}")
        B, T, D = x.shape
        expected = self.num_registers + self.grid[0] * self.grid[1]
        if T != expected:
            raise ValueError(f"CAPIAttention: {T} tokens, but the grid {self.grid} with {self.num_registers} "
                             f"registers has {expected} (prepare tokens with the model first, or call "
                             f"CAPIViT.set_grid)")
        H, d = self.num_heads, self.head_dim
        q, k, v = (p(x).reshape(B, T, H, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        coords = self.coordinates(x.device)
        return self.rope(q, coords), self.rope(k, coords), v, None, self.scale

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``[B, H, T, d]`` -> ``[B, T, D]`` through the output projection."""
        B, H, T, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, T, H * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v, bias, scale = self.heads(x)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, grid={self.grid}, num_registers={self.num_registers}"


class CAPIResidual(nn.Module):
    """``x + fn(norm(x))`` (the official ``NaiveResidual`` without drop-path)."""

    def __init__(self, norm: nn.Module, fn: nn.Module):
        super().__init__()
        self.norm = norm
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.norm(x))


class CAPIBlock(nn.Module):
    """One encoder block: ``residual1`` (RMSNorm + attention), ``residual2`` (RMSNorm + MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, num_registers: int, grid: tuple[int, int],
                 norm_eps: float = NORM_EPS):
        super().__init__()
        self.residual1 = CAPIResidual(nn.RMSNorm(dim, eps=norm_eps),
                                      CAPIAttention(dim, num_heads, num_registers, grid))
        self.residual2 = CAPIResidual(nn.RMSNorm(dim, eps=norm_eps),
                                      Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, bias=False))

    @property
    def attn(self) -> CAPIAttention:
        return self.residual1.fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual2(self.residual1(x))


class PatchEmbed(nn.Conv2d):
    """The official patch ``Conv2d`` (state-dict keys ``weight``, ``bias``) returning tokens
    ``[B, rows * cols, D]`` row-major, with timm's ``img_size`` / ``patch_size`` / ``grid_size``."""

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], in_chans: int, embed_dim: int):
        super().__init__(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).flatten(2).transpose(1, 2)


class CAPIViT(nn.Module):
    """CAPI's encoder: registers + patches -> RMSNorm/RoPE blocks -> ``enc_norm``. See the module
    docstring for the architecture and the interface."""

    cls_token = None

    def __init__(self, img_size=224, patch_size=14, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_registers: int = 16, in_chans: int = 3,
                 norm_eps: float = NORM_EPS):
        super().__init__()
        img_size, patch_size = _pair(img_size, "img_size"), _pair(patch_size, "patch_size")
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                            ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CAPIViT: {name} must be a positive int, got {value!r}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"CAPIViT: embed_dim {embed_dim} / num_heads {num_heads} must give a head "
                             f"dimension that is a multiple of 4 (2-D RoPE)")
        if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 0 \
                or num_registers % 4:
            raise ValueError(f"CAPIViT: num_registers must be a non-negative multiple of 4 (a quarter per image "
                             f"edge), got {num_registers!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"CAPIViT: mlp_ratio must be positive, got {mlp_ratio!r}")
        if min(i // p for i, p in zip(img_size, patch_size)) < 1:
            raise ValueError(f"CAPIViT: img_size {img_size} is smaller than one patch {patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.num_registers = self.num_prefix_tokens = num_registers
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.registers = nn.Parameter(torch.randn(1, num_registers, embed_dim) * 0.02)
        grid = self.patch_embed.grid_size
        self.blocks = nn.ModuleList(CAPIBlock(embed_dim, num_heads, mlp_ratio, num_registers, grid, norm_eps)
                                    for _ in range(depth))
        self.enc_norm = nn.RMSNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.token_grid = grid

    @property
    def norm(self) -> nn.Module:
        return self.enc_norm

    def set_grid(self, grid: tuple[int, int]) -> None:
        """Use the RoPE coordinates of a ``(rows, cols)`` patch grid in every block."""
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"CAPIViT: grid must be (rows, cols) >= 1, got {grid!r}")
        self.token_grid = grid
        for block in self.blocks:
            block.attn.grid = grid

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> registers + patch tokens ``[B, R + rows * cols, D]``."""
        if images.dim() != 4 or images.shape[1] != self.patch_embed.in_channels:
            raise ValueError(f"CAPIViT: expected images [B, {self.patch_embed.in_channels}, H, W], "
                             f"got shape {tuple(images.shape)}")
        ph, pw = self.patch_embed.patch_size
        grid = (images.shape[2] // ph, images.shape[3] // pw)
        if min(grid) < 1:
            raise ValueError(f"CAPIViT: images {tuple(images.shape[2:])} are smaller than one patch {(ph, pw)}")
        if grid != self.token_grid or any(block.attn.grid != grid for block in self.blocks):
            self.set_grid(grid)
        patches = self.patch_embed(images)
        # no cast: under autocast torch.cat promotes to the registers' dtype, as the official code does
        return torch.cat([self.registers.expand(patches.shape[0], -1, -1), patches], dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


def capi_vit_large_patch14(**kwargs) -> CAPIViT:
    """The released CAPI ViT-L/14 (224 px, 16 registers); ``kwargs`` override the sizes."""
    return CAPIViT(**{**dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                             mlp_ratio=4.0, num_registers=16), **kwargs})


_DROPPED = ("decoder.", "dec_norm.", "mask_token")


def capi_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released CAPI file's flat state dict -> :class:`CAPIViT` keys.

    Keeps the ``backbone.`` keys when there are any (the official loader does the same; other
    keys belong to the training heads), strips ``backbone.`` and ``encoder.``, drops the decoder
    (``decoder.*``, ``dec_norm.*``, ``mask_token``). Unknown keys pass through, so that a strict
    ``load_state_dict`` names them."""
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(_DROPPED)}
