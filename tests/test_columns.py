"""The per-block analysis columns (kernel) against the float64 definitions of the paper's columns."""
import pytest
import torch

from conftest import DEVICE, AtenOps, requires_kernels
from selagg_fast import attention_with_stats
from selagg_fast.modules import AttentionStatsRecorder
from selagg_fast.ops.columns import attention_column_sums, attention_column_sums_reference, column_names, num_columns

def make_rows(B, H, T, P):
    """Plausible statistics: probabilities in (0, 1) with the prefix mass below 1, entropies >= 0."""
    self_attn = torch.rand(B, H, T, device=DEVICE) * 0.5
    prefix = torch.rand(B, H, T, device=DEVICE) * 0.9 if P > 0 else torch.zeros(B, H, T, device=DEVICE)
    entropy = torch.rand(B, H, T, device=DEVICE) * 5
    cls_attn = torch.rand(B, H, T, device=DEVICE) * 0.5
    return torch.stack([self_attn, prefix, entropy, cls_attn])


def expected64(rows, P, has_cls):
    """The table of columns in docs/statistics.md written out here (not through
    reference.py, whose attention_stats_columns the reference path runs), summed over the
    images: float64 [C, H]."""
    self_attn, prefix, entropy, cls_attn = rows.double().unbind(0)  # [B, H, T] each
    T = self_attn.shape[-1]
    n = T - P  # patch rows; the means below are sums over them divided by n
    den = 1.0 - prefix  # mass on patch keys
    per_image = {
        "pos_self_attention": self_attn[..., P:].sum(-1) / n,
        "pos_self_attention_adj_for_cls": (self_attn / den)[..., P:].sum(-1) / n,
        "pos_pos_entropy": entropy[..., P:].sum(-1) / n,
    }
    if has_cls:
        per_image.update(
            pos_cls_attention=cls_attn[..., P:].sum(-1) / n,
            cls_cls_attention=self_attn[..., 0],
            cls_cls_attention_adj_for_cls=self_attn[..., 0] / den[..., 0],
            cls_pos_attention=den[..., 0] / n,
            cls_pos_entropy=entropy[..., 0],
        )
    assert set(per_image) == set(column_names(has_cls))
    return torch.stack([per_image[name].sum(0) for name in column_names(has_cls)])


@requires_kernels
@pytest.mark.parametrize("B,H,T,P,has_cls", [
    (1, 1, 2, 1, True), (5, 3, 17, 1, True), (33, 12, 197, 1, True), (9, 2, 261, 5, True),
    (4, 3, 261, 4, False), (6, 2, 17, 0, False), (3, 2, 577, 1, True), (2, 1, 1025, 1, True)])
def test_column_sums_match_the_float64_definitions(B, H, T, P, has_cls, poisoned):
    rows = make_rows(B, H, T, P)
    got = attention_column_sums(rows, P, has_cls)
    assert got.dtype == torch.float64 and got.shape == (num_columns(has_cls), H)
    torch.testing.assert_close(got.cpu(), expected64(rows, P, has_cls).cpu(), rtol=1e-5, atol=1e-6 * B)
    # the running sums: chunk 0 adds the previous totals
    previous = torch.randn(num_columns(has_cls), H, device=DEVICE, dtype=torch.float64)
    again = attention_column_sums(rows, P, has_cls, previous)
    torch.testing.assert_close(again.cpu(), (previous + got).cpu(), rtol=1e-12, atol=1e-9)


@requires_kernels
def test_kernel_and_reference_paths_agree_and_bad_rows_are_refused():
    rows = make_rows(20, 4, 197, 1)
    torch.testing.assert_close(attention_column_sums(rows, 1, True, backend="triton").cpu(),
                               attention_column_sums(rows, 1, True, backend="reference").cpu(), rtol=1e-6, atol=1e-6)
    # the reference path (reference.attention_stats_columns) against the definitions written out here
    torch.testing.assert_close(attention_column_sums_reference(rows, 1, True).cpu(),
                               expected64(rows, 1, True).cpu(), rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="float32"):
        attention_column_sums(rows.double(), 1, True)
    with pytest.raises(ValueError, match="previous"):
        attention_column_sums(rows, 1, True, torch.zeros(3, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="previous"):  # running sums on another device
        attention_column_sums(rows, 1, True, torch.zeros(8, 4, dtype=torch.float64, device="meta"))


@requires_kernels
def test_a_recorded_block_is_one_kernel_and_one_sum():
    # ops that launch nothing on a GPU (views; under the interpreter also its argument copies)
    free = {"select", "slice", "view", "detach", "alias", "unbind", "empty", "new_empty", "set_", "copy_"}
    q, k, v = (torch.randn(2, 3, 17, 32, device=DEVICE) for _ in range(3))
    _, stats = attention_with_stats(q, k, v)
    recorder = AttentionStatsRecorder([0], num_prefix_tokens=1, magnitudes=False)
    recorder.record(0, stats)  # the first batch sets the running sums
    with AtenOps() as ops:
        recorder.record(0, stats)
    assert [n for n in ops.names if n not in free] == ["sum"], ops.names
    torch.testing.assert_close(recorder.summary()["pos_pos_entropy"][0],
                               stats.patch_entropy[..., 1:].double().mean(-1).mean(0).cpu(), rtol=1e-5, atol=1e-6)
