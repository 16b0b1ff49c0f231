"""Weighted k-NN classification of frozen features (DINO's protocol), every (k, T) from one pass.

The vote (DINO's ``knn_classifier``, eval_knn.py): features L2-normalised, cosine similarity
to every training image, the ``k`` most similar vote for their class with weight
``exp(similarity / T)``, the class with the largest sum wins. Top-5: the target among the
``min(5, k)`` classes with the largest sums (DINO's ``min(5, k)``); a class no neighbour voted
for never counts. Exactly equal sums are ordered by ``torch.topk`` (unspecified, as DINO's
``sort``).

One similarity pass per test chunk keeps the ``max(ks)`` nearest; every smaller ``k`` and every
``T`` is a cheap vote over that list. Memory is bounded by chunking both the test and the
training rows (never the whole test x train matrix); similarities are fp32 whatever the
features' dtype (bf16 / fp16 chunks are upcast before the matmul).
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["knn_eval", "knn_counts", "chunk_sizes", "DEFAULT_KS", "DEFAULT_TEMPERATURES"]

DEFAULT_KS = (5, 10, 15, 20, 50, 100, 200)
DEFAULT_TEMPERATURES = (0.07, 0.1, 0.2)
DEFAULT_MEMORY_BYTES = 1 << 30


def chunk_sizes(n_test: int, n_train: int, dim: int, max_k: int, memory_bytes: int) -> tuple:
    """``(test rows, train rows)`` per block so that one block's working set stays within about
    ``memory_bytes``: a quarter for the fp32 copy of the training chunk, the rest for the
    ``[test rows, train rows]`` fp32 similarities and their top-k (about twice the block)."""
    train_rows = max(1, min(n_train, memory_bytes // (16 * dim)))
    test_rows = max(1, min(n_test, (memory_bytes * 3 // 4) // (8 * train_rows + 24 * max_k + 4 * dim)))
    return test_rows, train_rows


def _check(train_features, train_labels, test_features, test_labels, ks, temperatures, num_classes):
    for name, f in (("train_features", train_features), ("test_features", test_features)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or not f.is_floating_point():
            raise TypeError(f"{name}: expected a 2-D floating-point tensor [N, D], got "
                            f"{getattr(f, 'shape', type(f).__name__)} {getattr(f, 'dtype', '')}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes {num_classes!r}: expected a positive integer")
    for name, labels, feats in (("train_labels", train_labels, train_features),
                                ("test_labels", test_labels, test_features)):
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
                or labels.dtype == torch.bool:
            raise TypeError(f"{name}: expected a 1-D integer tensor, got "
                            f"{getattr(labels, 'shape', type(labels).__name__)} {getattr(labels, 'dtype', '')}")
        if len(labels) != len(feats):
            raise ValueError(f"{name}: {len(labels)} labels for {len(feats)} feature rows")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name}: values {int(labels.min())}..{int(labels.max())} outside 0..{num_classes - 1} "
                             f"(num_classes {num_classes})")
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError(f"k-NN needs training and test images (got {len(train_labels)} and {len(test_labels)})")
    ks = list(ks)
    if not ks or any(isinstance(k, (bool, float)) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"ks {ks!r}: expected positive integers")
    ks = [int(k) for k in ks]
    if max(ks) > len(train_labels):
        raise ValueError(f"k {max(ks)}: more than the {len(train_labels)} training images")
    temperatures = [float(t) for t in temperatures]
    if not temperatures or not all(math.isfinite(t) and t > 0 for t in temperatures):
        raise ValueError(f"temperatures {temperatures!r}: expected finite positive numbers")
    return sorted(set(ks)), list(dict.fromkeys(temperatures))


@torch.no_grad()
def _nearest(query: torch.Tensor, train_features: torch.Tensor, train_inv_norm: torch.Tensor, max_k: int,
             train_rows: int) -> tuple:
    """Cosine similarities (descending) and indices of the ``max_k`` nearest training rows of each
    (already normalised, fp32) query row, scanning the training set ``train_rows`` at a time."""
    best_sim = best_idx = None
    for start in range(0, len(train_features), train_rows):
        chunk = train_features[start:start + train_rows].float()
        sim = (query @ chunk.T).mul_(train_inv_norm[start:start + train_rows])
        sim, idx = sim.topk(min(max_k, sim.shape[1]), dim=1)
        idx += start
        if best_sim is not None:
            sim, pos = torch.cat([best_sim, sim], 1).topk(min(max_k, best_sim.shape[1] + sim.shape[1]), dim=1)
            idx = torch.cat([best_idx, idx], 1).gather(1, pos)
        best_sim, best_idx = sim, idx
    return best_sim, best_idx


@torch.no_grad()
def knn_counts(train_features, train_labels, test_features, test_labels, *, ks, temperatures, num_classes,
               memory_bytes: int = DEFAULT_MEMORY_BYTES, test_rows: int | None = None,
               train_rows: int | None = None) -> tuple:
    """The hit counts behind :func:`knn_eval`: ``(hits [len(ks), len(T), 2] int64 on CPU (top-1,
    top-5), ks sorted, temperatures)``; summed over processes, each holding a share of the test
    set, they give the whole set's accuracy."""
    ks, temperatures = _check(train_features, train_labels, test_features, test_labels, ks, temperatures,
                              num_classes)
    for name, rows in (("test_rows", test_rows), ("train_rows", train_rows)):
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1):
            raise ValueError(f"{name} {rows!r}: expected a positive integer (or None: chosen from memory_bytes)")
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, numbers.Real) or not memory_bytes >= 1:
        raise ValueError(f"memory_bytes {memory_bytes!r}: expected a positive number of bytes")
    device = train_features.device
    max_k = max(ks)
    auto_test, auto_train = chunk_sizes(len(test_features), len(train_features), train_features.shape[1], max_k,
                                        int(memory_bytes))
    test_rows, train_rows = test_rows or auto_test, train_rows or auto_train
    inv_norm = torch.cat([train_features[s:s + train_rows].float().norm(dim=1)
                          for s in range(0, len(train_features), train_rows)]).clamp_min_(1e-12).reciprocal_()
    train_labels = train_labels.to(device)
    hits = torch.zeros(len(ks), len(temperatures), 2, dtype=torch.int64, device=device)
    for start in range(0, len(test_features), test_rows):
        query = torch.nn.functional.normalize(test_features[start:start + test_rows].to(device).float(), dim=1)
        target = test_labels[start:start + test_rows].to(device)
        sim, idx = _nearest(query, train_features, inv_norm, max_k, train_rows)
        neighbour_labels = train_labels[idx]                     # [n, max_k], nearest first
        same = neighbour_labels == target[:, None]
        # rank of the nearest neighbour of the target's class (max_k when none): voted for within k
        first_same = torch.where(same.any(1), same.int().argmax(1), max_k)
        for j, t in enumerate(temperatures):
            # exp((s - s_max) / T): the same ranking as exp(s / T), finite for any small T
            weights = ((sim - sim[:, :1]) / t).exp_()
            votes = torch.zeros(len(query), num_classes, dtype=torch.float32, device=device)
            done = 0
            for i, k in enumerate(ks):                           # ks ascending: add the next neighbours
                votes.scatter_add_(1, neighbour_labels[:, done:k], weights[:, done:k])
                done = k
                top = votes.topk(min(5, k, num_classes), dim=1).indices
                voted = first_same < k
                hits[i, j, 0] += (top[:, 0] == target).sum()
                hits[i, j, 1] += ((top == target[:, None]).any(1) & voted).sum()
    return hits.cpu(), ks, temperatures


def knn_eval(train_features, train_labels, test_features, test_labels, *, ks=DEFAULT_KS,
             temperatures=DEFAULT_TEMPERATURES, num_classes: int, memory_bytes: int = DEFAULT_MEMORY_BYTES,
             test_rows: int | None = None, train_rows: int | None = None) -> dict:
    """Weighted k-NN top-1 / top-5 (percent) of ``test_features`` against ``train_features`` for
    every ``(k, T)`` in ``ks x temperatures``: ``{(k, T): (top1, top5)}``.

    Features ``[N, D]`` in any floating dtype (not normalised: this normalises), labels ``[N]``
    integers in ``0..num_classes-1``. Runs on ``train_features``' device. ``memory_bytes`` bounds
    one block's working set (``test_rows`` / ``train_rows`` override the chunk sizes it implies).
    A ``k`` above the number of training images is a ``ValueError``."""
    hits, ks, temperatures = knn_counts(train_features, train_labels, test_features, test_labels, ks=ks,
                                        temperatures=temperatures, num_classes=num_classes,
                                        memory_bytes=memory_bytes, test_rows=test_rows, train_rows=train_rows)
    pct = (100.0 * hits.double() / len(test_labels)).tolist()
    return {(k, t): (pct[i][j][0], pct[i][j][1]) for i, k in enumerate(ks) for j, t in enumerate(temperatures)}
