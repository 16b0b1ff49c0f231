"""Memory-mapped store of backbone tokens, extracted once and resumable.

Layout of a store directory: ``meta.json`` (what was extracted, shapes, dtype),
``tokens.bin`` (``[N, T, D]``, bf16 stored as its raw 16 bits, or fp32), ``labels.npy``,
``valid.bin`` (1 byte per sample: 0 until written, 2 when the image was unreadable) and
``done.bin`` (1 byte per extraction batch); with attention-weighted heads (cls_attn & co.)
also ``weights.bin`` (``[N, M, n_patches]`` float32: each method's weight vector, so a cached
run needs no backbone or selector pass). A batch is marked done only after its rows are
flushed, so an interrupted extraction resumes at the first batch not marked, and several
processes can fill disjoint batches of one store.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from ..data import collate_skipping
from ..files import atomic_json

_DTYPES = {"bf16": (torch.bfloat16, np.int16), "fp32": (torch.float32, np.float32)}


class DiskSpaceError(OSError):
    """The feature cache would not fit on its disk."""


def _check_disk_space(path: str, needed: int) -> None:
    # the memmap file is sparse until written: running out of space mid-extraction would end in a
    # SIGBUS, so refuse up front
    import shutil
    free = shutil.disk_usage(path).free
    if free < needed * 1.02:
        raise DiskSpaceError(
            f"feature cache {path}: needs {needed / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free "
            "(choose another --cache-features folder, fewer heads needing all tokens, or no cache)")


class TokenStore:
    def __init__(self, path: str, fingerprint: dict, num_samples: int, token_shape: tuple, dtype: str,
                 batch_size: int, labels: np.ndarray, weight_shape: tuple | None = None):
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype {dtype!r}: choose bf16 or fp32")
        os.makedirs(path, exist_ok=True)
        self.path, self.dtype = path, dtype
        self.torch_dtype, np_dtype = _DTYPES[dtype]
        meta = dict(fingerprint=fingerprint, num_samples=num_samples, token_shape=list(token_shape),
                    dtype=dtype, batch_size=batch_size)
        if weight_shape is not None:
            meta["weight_shape"] = list(weight_shape)
        meta_path = os.path.join(path, "meta.json")
        fresh = not os.path.exists(meta_path)
        if not fresh:
            with open(meta_path) as f:
                old = json.load(f)
            if old != meta:
                changed = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
                raise ValueError(f"feature cache {path} was extracted with different settings (cached, now): "
                                 f"{changed}; delete it or choose another --cache-features folder")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_batches = -(-num_samples // batch_size)
        if fresh:
            _check_disk_space(path, num_samples * (int(np.prod(token_shape)) * np.dtype(np_dtype).itemsize +
                                                   4 * int(np.prod(weight_shape or (0,)))))
        mode = "w+" if fresh else "r+"
        self.tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=np_dtype, mode=mode,
                                shape=(num_samples, *token_shape))
        self.valid = np.memmap(os.path.join(path, "valid.bin"), dtype=np.uint8, mode=mode, shape=(num_samples,))
        self.done = np.memmap(os.path.join(path, "done.bin"), dtype=np.uint8, mode=mode, shape=(self.num_batches,))
        self.weights = None if weight_shape is None else np.memmap(
            os.path.join(path, "weights.bin"), dtype=np.float32, mode=mode, shape=(num_samples, *weight_shape))
        self.labels = labels.astype(np.int64)
        if fresh:
            np.save(os.path.join(path, "labels.npy"), self.labels)
            atomic_json(meta_path, meta)  # meta last: a store without it is incomplete

    def pending_batches(self, rank: int = 0, world: int = 1) -> list:
        return [b for b in range(self.num_batches) if b % world == rank and not self.done[b]]

    def complete(self) -> bool:
        return bool(np.all(np.asarray(self.done)))

    def write_batch(self, batch: int, indices: torch.Tensor, tokens, skipped_indices) -> None:
        """``tokens``: ``[B, T, D]``, or ``(tokens, weights [B, M, n])`` for a store with weights."""
        idx = indices.cpu().numpy()
        if isinstance(tokens, (tuple, list)):
            tokens, weights = tokens
            order = np.argsort(idx)
            self.weights[idx[order]] = weights.detach().float().cpu().numpy()[order]
            self.weights.flush()
        rows = tokens.detach().to(self.torch_dtype).cpu()
        if self.dtype == "bf16":
            rows = rows.view(torch.int16)
        order = np.argsort(idx)
        self.tokens[idx[order]] = rows.numpy()[order]
        self.valid[idx] = 1
        if len(skipped_indices):
            self.valid[np.asarray(skipped_indices)] = 2
        self.tokens.flush()
        self.valid.flush()
        self.done[batch] = 1
        self.done.flush()

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.valid) == 1)

    def num_unreadable(self) -> int:
        return int(np.count_nonzero(np.asarray(self.valid) == 2))

    def batches(self, batches: list) -> "CachedBatches":
        return CachedBatches(self.path, self.dtype, self.tokens.shape, self.labels, batches,
                             None if self.weights is None else self.weights.shape)


class CachedBatches(torch.utils.data.Dataset):
    """Item ``i`` is the whole batch ``batches[i]`` (row indices) as ``(tokens, labels)``.

    Picklable for DataLoader workers: each process maps ``tokens.bin`` itself, read-only. A store
    with weights gives ``((tokens, weights), labels)``.
    """

    def __init__(self, path: str, dtype: str, shape: tuple, labels: np.ndarray, batches: list,
                 weight_shape: tuple | None = None):
        self.path, self.dtype, self.shape, self.labels, self.batch_list = path, dtype, tuple(shape), labels, batches
        self.weight_shape = None if weight_shape is None else tuple(weight_shape)
        self._tokens = None
        self._weights = None

    def __len__(self):
        return len(self.batch_list)

    def __getitem__(self, i):
        if self._tokens is None:
            self._tokens = np.memmap(os.path.join(self.path, "tokens.bin"), dtype=_DTYPES[self.dtype][1],
                                     mode="r", shape=self.shape)
        rows = np.sort(np.asarray(self.batch_list[i]))  # sorted reads are sequential on disk
        tokens = torch.from_numpy(np.ascontiguousarray(self._tokens[rows]))
        if self.dtype == "bf16":
            tokens = tokens.view(torch.bfloat16)
        if self.weight_shape is not None:
            if self._weights is None:
                self._weights = np.memmap(os.path.join(self.path, "weights.bin"), dtype=np.float32, mode="r",
                                          shape=self.weight_shape)
            tokens = (tokens, torch.from_numpy(np.ascontiguousarray(self._weights[rows])))
        return tokens, torch.from_numpy(self.labels[rows])

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None, "_weights": None}


def file_stamp(path):
    """(size, mtime) of a checkpoint, so a replaced file invalidates its cached tokens."""
    if path is None:
        return None
    st = os.stat(path)
    return [st.st_size, int(st.st_mtime)]


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def open_store(root: str, settings: dict, dataset, token_shape: tuple, dtype: str, batch_size: int,
               is_main: bool = True, barrier=lambda: None, weight_shape: tuple | None = None) -> TokenStore:
    """The store for ``settings`` under ``root``: one folder per setting, so changing the model,
    data, dtype or batch never reuses stale tokens. Rank 0 creates it before the others map it.
    ``weight_shape`` ``(M, n)``: the store also keeps M weight vectors per image (settings must
    then name the methods and the selector)."""
    key = _digest(dict(settings, dtype=dtype, batch_size=batch_size))
    args = (os.path.join(root, f"{settings['split']}-{key}"), settings, len(dataset), token_shape, dtype,
            batch_size, np.asarray(dataset.base.labels(), dtype=np.int64), weight_shape)
    if is_main:
        TokenStore(*args)
    barrier()
    return TokenStore(*args)


def extract(store: TokenStore, dataset, tokens_fn, make_loader, device, rank: int = 0, world: int = 1,
            desc: str = "extract tokens", progress: bool = True) -> None:
    """Fill this process's pending batches (every ``world``-th) with ``tokens_fn(images)``."""
    pending = store.pending_batches(rank, world)
    if not pending:
        return
    bs = store.batch_size
    batch_indices = [list(range(b * bs, min((b + 1) * bs, len(dataset)))) for b in pending]
    loader = make_loader(dataset, batch_sampler=batch_indices, collate_fn=collate_skipping)
    bar = tqdm(total=len(pending) * bs, desc=desc, unit="img", smoothing=0.1, disable=not progress)
    for b, (images, _labels, indices, skipped) in zip(pending, loader):
        if images is None:
            store.write_batch(b, torch.empty(0, dtype=torch.long), torch.empty(0, *store.tokens.shape[1:]), skipped)
        else:
            store.write_batch(b, indices, tokens_fn(images.to(device, non_blocking=True)), skipped)
        bar.update(len(skipped) + (0 if images is None else len(images)))
    bar.close()
