"""The analysis columns of one block: per-image values from the attention statistics, summed
over the images into running float64 sums (``record_attention_stats`` calls it per block)."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..kernels.columns import attention_columns_kernel
from ..reference import CLS_COLUMNS, AttentionStats, attention_stats_columns
from . import _dispatch
from ._dispatch import MAX_TILE_ELEMENTS, LaunchConfig, choose_backend, dot_dim, next_pow2

OP = "attention_column_sums"
MAX_T = MAX_TILE_ELEMENTS  # a whole row of statistics in one tile row
TILE = 2048  # statistics of one kind per program: BB images x BT (>= T) query rows


# The recorder's column order, the order the kernel writes: three over the patch rows, then (with a
# [cls] token) the patch rows' mean [cls] attention and the [cls] row's own four.
COLUMNS = ("pos_self_attention", "pos_self_attention_adj_for_cls", "pos_pos_entropy", "pos_cls_attention",
           "cls_cls_attention", "cls_cls_attention_adj_for_cls", "cls_pos_attention", "cls_pos_entropy")
assert set(COLUMNS[3:]) == set(CLS_COLUMNS)


def column_names(has_cls: bool) -> tuple:
    return COLUMNS if has_cls else COLUMNS[:3]


def num_columns(has_cls: bool) -> int:
    return len(column_names(has_cls))


def columns_config(T: int) -> LaunchConfig:
    """The launch: whole rows of T statistics (BT >= T), as many images a program as fill TILE."""
    BT = dot_dim(T)
    return dict(BB=max(1, TILE // BT), BT=BT, num_warps=4)


def attention_column_sums_reference(rows: torch.Tensor, num_prefix_tokens: int, has_cls: bool) -> torch.Tensor:
    """The paper's per-image columns (``reference.attention_stats_columns``, float64), summed over
    the images: ``[C, H]`` in ``column_names(has_cls)`` order."""
    per_image = attention_stats_columns(AttentionStats(*rows.unbind(0)), num_prefix_tokens)
    return torch.stack([per_image[name].sum(0) for name in column_names(has_cls)])


def attention_column_sums(rows: torch.Tensor, num_prefix_tokens: int, has_cls: bool,
                          previous: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """``previous`` (float64 ``[C, H]`` running sums, or None) plus this batch's column sums.

    ``rows``: float32 ``[4, B, H, T]`` (self, prefix, patch entropy, [cls] attention per query row,
    as ``attention_with_stats`` writes them). Columns, in order: the patch rows' mean self
    attention, the same adjusted for the prefix mass, the patch rows' mean entropy; with a [cls]
    token also the patch rows' mean [cls] attention and the [cls] row's self attention, adjusted
    self attention, patch mass per patch and entropy (``column_names``).
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
    cfg = columns_config(T)
    chunks = triton.cdiv(B, cfg["BB"])
    part = _dispatch.empty((chunks, C, H), rows.device, torch.float64)
    attention_columns_kernel[(H, chunks)](
        rows_ptr=rows, prev_ptr=previous if previous is not None else part, part_ptr=part,
        B=B, H=H, T=T, P=num_prefix_tokens,
        HAS_CLS=has_cls, HAS_PREV=previous is not None, **cfg)
    return part.sum(0)
