"""The analysis columns of one block: per-image values from the attention statistics, summed
over the images into running float64 sums (``record_attention_stats`` calls it per block)."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..kernels.columns import attention_columns_kernel
from . import _dispatch
from ._dispatch import choose_backend, next_pow2

OP = "attention_column_sums"
MAX_T = 16384
TILE = 2048  # statistics of one kind per program: BB images x BT (>= T) query rows


def num_columns(has_cls: bool) -> int:
    return 8 if has_cls else 3


def attention_column_sums_reference(rows: torch.Tensor, num_prefix_tokens: int, has_cls: bool) -> torch.Tensor:
    """Per-image columns in float32 (as the kernel), summed over the images in float64: ``[C, H]``."""
    P = num_prefix_tokens
    self_attn, prefix, entropy, _ = rows.unbind(0)
    patch_means = rows[..., P:].mean(-1)  # [4, B, H]
    adj = (self_attn[..., P:] / (1.0 - prefix[..., P:])).mean(-1)
    cols = [patch_means[0], adj, patch_means[2]]
    if has_cls:
        cls_den = 1.0 - prefix[..., 0]  # the [cls] row's mass on patch keys
        cols += [patch_means[3], self_attn[..., 0], self_attn[..., 0] / cls_den,
                 cls_den / (rows.shape[-1] - P), entropy[..., 0]]
    return torch.stack(cols).sum(1, dtype=torch.float64)


def attention_column_sums(rows: torch.Tensor, num_prefix_tokens: int, has_cls: bool,
                          previous: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """``previous`` (float64 ``[C, H]`` running sums, or None) plus this batch's column sums.

    ``rows``: float32 ``[4, B, H, T]`` (self, prefix, patch entropy, [cls] attention per query row,
    as ``attention_with_stats`` writes them). Columns, in order: the patch rows' mean self
    attention, the same adjusted for the prefix mass, the patch rows' mean entropy; with a [cls]
    token also the patch rows' mean [cls] attention and the [cls] row's self attention, adjusted
    self attention, patch mass per patch and entropy (``modules.AttentionStatsRecorder.columns``).
    On a GPU: one kernel (per-image values, per-chunk float64 sums) and one sum over the chunks.
    """
    if rows.dim() != 4 or rows.shape[0] != 4 or rows.dtype != torch.float32:
        raise ValueError(f"{OP}: rows must be float32 [4, B, H, T], got {rows.dtype} {tuple(rows.shape)}")
    _, B, H, T = rows.shape
    C = num_columns(has_cls)
    if previous is not None and (previous.shape != (C, H) or previous.dtype != torch.float64
                                 or previous.device != rows.device):
        raise ValueError(f"{OP}: previous sums must be float64 [{C}, {H}] on {rows.device}, got {previous.dtype} "
                         f"{tuple(previous.shape)} on {previous.device}")
    unsupported = f"T={T} exceeds {MAX_T}" if next_pow2(T) > MAX_T else None
    if choose_backend(OP, backend, rows.device, unsupported) == "reference" or B * H == 0:
        total = attention_column_sums_reference(rows, num_prefix_tokens, has_cls)
        return total if previous is None else previous + total
    rows = rows.contiguous()
    BT = max(16, next_pow2(T))
    BB = max(1, TILE // BT)
    chunks = triton.cdiv(B, BB)
    part = _dispatch.empty((chunks, C, H), rows.device, torch.float64)
    attention_columns_kernel[(H, chunks)](
        rows_ptr=rows, prev_ptr=previous if previous is not None else part, part_ptr=part,
        B=B, H=H, T=T, P=num_prefix_tokens,
        HAS_CLS=has_cls, HAS_PREV=previous is not None, BB=BB, BT=BT, num_warps=4)
    return part.sum(0)
