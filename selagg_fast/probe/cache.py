"""Memory-mapped store of backbone tokens, extracted once, resumable, and trusted only when whole
and current.

Layout of a store directory: ``meta.json`` (what was extracted, shapes, dtype, each file's exact
byte length), ``tokens.bin`` (``[N, T, D]``, bf16 stored as its raw 16 bits, or fp32),
``labels.npy``, ``valid.bin`` (1 byte per sample: 0 until written, 2 when the image was
unreadable), ``done.bin`` (1 byte per extraction batch), ``sums.bin`` (``[N, F]`` uint32: the
Adler-32 of each written row of ``tokens.bin`` and, with ``weights.bin``, of its row there) and
``images.txt`` (``size mtime_ns path`` of every source file the tokens were read from); with
attention-weighted heads (cls_attn & co.) also ``weights.bin`` (``[N, M, n_patches]`` float32:
each method's weight vector, so a cached run needs no backbone or selector pass). A batch is
marked done only after its rows and their sums are on the disk, so an interrupted extraction
resumes at the first batch not marked, and several processes (on several machines too) can fill
disjoint batches of one store: each writes exactly its batches' bytes (positional writes, never
through a shared map). Once every batch is done the store is sealed: ``meta.json`` records the checksums of
``valid.bin``, ``sums.bin`` and ``labels.npy``.

What is checked (docs/architecture.md, "Feature cache integrity"): at every open, the settings,
every file's exact byte length, the seal, the source files' sizes and mtimes (one ``stat`` per
image) and a sample of rows against their sums; at every read, each row read against its sum
(one Adler-32 pass over bytes already in memory). A truncated, zero-filled, half-written or
stale store is refused (:class:`CacheError`, naming the first differing file), never read as
zeros; ``--refresh-cache`` re-extracts it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import zlib

import numpy as np
import torch
from tqdm import tqdm

from ..data import collate_skipping
from ..files import atomic_json

_DTYPES = {"bf16": (torch.bfloat16, np.int16), "fp32": (torch.float32, np.float32)}
FORMAT = 2             # meta.json's "format": stores without it predate the checksums
_SAMPLED_ROWS = 16     # rows checked against their sums at every open (besides the first and last)
_REFRESH = "re-extract it with --refresh-cache (or delete the folder)"


class DiskSpaceError(OSError):
    """The feature cache would not fit on its disk."""


class CacheError(ValueError):
    """A feature cache that is damaged, incomplete on disk, or older than its images."""


def _check_disk_space(path: str, needed: int) -> None:
    # the memmap file is sparse until written: running out of space mid-extraction would end in a
    # SIGBUS, so refuse up front
    free = shutil.disk_usage(path).free
    if free < needed * 1.02:
        raise DiskSpaceError(
            f"feature cache {path}: needs {needed / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free "
            "(choose another --cache-features folder, fewer heads needing all tokens, or no cache)")


def _write_rows(path: str, rows: np.ndarray, values: np.ndarray) -> None:
    """``values[i]`` written at row ``rows[i]`` of ``path`` (rows ascending), one ``pwrite`` per run
    of consecutive rows, then synced to the disk."""
    values = np.ascontiguousarray(values)
    if not len(rows):
        return
    row_bytes = values[0].nbytes
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    fd = os.open(path, os.O_WRONLY)
    try:
        for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            data = memoryview(values[a:b].reshape(-1).view(np.uint8))
            offset = int(rows[a]) * row_bytes
            while len(data):
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        os.fdatasync(fd)
    finally:
        os.close(fd)


def row_sum(row: np.ndarray) -> int:
    """Adler-32 of one row's bytes (an all-zero row of any length sums to 1, never to a written row's sum)."""
    return zlib.adler32(np.ascontiguousarray(row).view(np.uint8).reshape(-1))


def _file_sum(path: str) -> int:
    total = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            total = zlib.adler32(chunk, total)
    return total


def source_lines(paths) -> "iter":
    """``size mtime_ns path`` of each source file (``-1 -1 path`` for one that cannot be stat'ed)."""
    for path in paths:
        try:
            st = os.stat(path)
            yield f"{st.st_size} {st.st_mtime_ns} {path}"
        except OSError:
            yield f"-1 -1 {path}"


def _first_source_change(recorded_path: str, paths) -> str | None:
    """What differs first between ``images.txt`` and the source files now, or None."""
    with open(recorded_path, encoding="utf-8", errors="surrogateescape") as f:
        recorded = (line.rstrip("\n") for line in f)
        now = source_lines(paths)
        for i, (old, new) in enumerate(itertools.zip_longest(recorded, now)):
            if old == new:
                continue
            if old is None:
                return f"{new.split(' ', 2)[2]} was added since the tokens were extracted"
            if new is None:
                return f"{old.split(' ', 2)[2]} is no longer part of the data"
            old_size, old_time, old_name = old.split(" ", 2)
            new_size, new_time, new_name = new.split(" ", 2)
            if old_name != new_name:
                return f"entry {i} of the image list was {old_name}, is now {new_name}"
            if new_size == "-1":
                return f"{new_name} is missing"
            return (f"{new_name} changed since the tokens were extracted (size {old_size} -> {new_size} bytes, "
                    f"mtime_ns {old_time} -> {new_time})")
    return None



def _read_meta(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"feature cache {path}: not valid JSON ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}): truncated or damaged; {_REFRESH}") from None
    if not isinstance(meta, dict):
        raise CacheError(f"feature cache {path}: not a store's meta.json; {_REFRESH}")
    return meta


def _verify_rows(path: str, name: str, data: np.ndarray, sums: np.ndarray, rows) -> None:
    """Each row of ``data`` (read from ``name``, store rows ``rows``) against its recorded sum."""
    for row, values, expected in zip(rows, data, sums):
        if row_sum(values) != int(expected):
            raise CacheError(f"feature cache {path}: {name} row {int(row)} does not match the checksum recorded "
                             f"when it was written (damaged, zero-filled or overwritten); {_REFRESH}")


class TokenStore:
    """One split's store. Opening an existing one checks it (module docstring); ``quick`` skips
    the per-image and sampled-row checks (a second process opening what the first just checked)."""

    def __init__(self, path: str, fingerprint: dict, num_samples: int, token_shape: tuple, dtype: str,
                 batch_size: int, labels: np.ndarray, weight_shape: tuple | None = None, sources=(),
                 quick: bool = False):
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype {dtype!r}: choose bf16 or fp32")
        os.makedirs(path, exist_ok=True)
        self.path, self.dtype = path, dtype
        self.torch_dtype, np_dtype = _DTYPES[dtype]
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_batches = -(-num_samples // batch_size)
        self.labels = np.asarray(labels).astype(np.int64)
        settings = dict(fingerprint=fingerprint, num_samples=num_samples, token_shape=list(token_shape),
                        dtype=dtype, batch_size=batch_size)
        if weight_shape is not None:
            settings["weight_shape"] = list(weight_shape)
        self.num_sums = 1 + (weight_shape is not None)
        sizes = {"tokens.bin": num_samples * int(np.prod(token_shape)) * np.dtype(np_dtype).itemsize,
                 "valid.bin": num_samples, "done.bin": self.num_batches, "sums.bin": 4 * num_samples * self.num_sums}
        if weight_shape is not None:
            sizes["weights.bin"] = 4 * num_samples * int(np.prod(weight_shape))
        meta_path = os.path.join(path, "meta.json")
        fresh = not os.path.exists(meta_path)
        if fresh:  # files at their exact lengths (sparse until written), meta.json last: without it, incomplete
            _check_disk_space(path, sum(sizes.values()))
            for name, size in sizes.items():
                with open(os.path.join(path, name), "wb") as f:
                    f.truncate(size)
            np.save(os.path.join(path, "labels.npy"), self.labels)
            with open(os.path.join(path, "images.txt"), "w", encoding="utf-8", errors="surrogateescape") as f:
                for line in source_lines(sources):
                    f.write(line + "\n")
            self.meta = dict(settings, format=FORMAT, files=sizes,
                             labels_sum=_file_sum(os.path.join(path, "labels.npy")),
                             images_sum=_file_sum(os.path.join(path, "images.txt")))
            atomic_json(meta_path, self.meta)
        else:
            self.meta = _read_meta(meta_path)
            self._check(settings, sizes, sources, quick)
        # read-only maps: extraction writes with pwrite (see write_batch), never through a map
        mode = "r"
        shape = (num_samples,)
        self.tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=np_dtype, mode=mode,
                                shape=(num_samples, *token_shape))
        self.valid = np.memmap(os.path.join(path, "valid.bin"), dtype=np.uint8, mode=mode, shape=shape)
        self.done = np.memmap(os.path.join(path, "done.bin"), dtype=np.uint8, mode=mode, shape=(self.num_batches,))
        self.sums = np.memmap(os.path.join(path, "sums.bin"), dtype=np.uint32, mode=mode,
                              shape=(num_samples, self.num_sums))
        self.weights = None if weight_shape is None else np.memmap(
            os.path.join(path, "weights.bin"), dtype=np.float32, mode=mode, shape=(num_samples, *weight_shape))
        if not fresh and not quick:
            self._check_sampled_rows()

    def _fail(self, what: str):
        raise CacheError(f"feature cache {self.path}: {what}; {_REFRESH}")

    def _check(self, settings: dict, sizes: dict, sources, quick: bool) -> None:
        """Settings, exact file lengths, the seal and the source files, in that order."""
        meta = self.meta
        if meta.get("format") != FORMAT:
            self._fail("written by an older version of the package, without checksums")
        changed = {k: (meta.get(k), v) for k, v in settings.items() if meta.get(k) != v}
        if changed:
            raise ValueError(f"feature cache {self.path} was extracted with different settings (cached, now): "
                             f"{changed}; delete it or choose another --cache-features folder")
        for name, size in {**sizes, "labels.npy": None, "images.txt": None}.items():
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                self._fail(f"{name} is missing")
            if size is not None and os.path.getsize(file) != size:
                self._fail(f"{name} is {os.path.getsize(file)} bytes, {size} expected (truncated or overwritten)")
        for name, key in (("labels.npy", "labels_sum"), ("images.txt", "images_sum"),
                          *((n, n) for n in meta.get("sealed", {}))):
            expected = meta["sealed"][key] if key in meta.get("sealed", {}) else meta.get(key)
            if _file_sum(os.path.join(self.path, name)) != expected:
                self._fail(f"{name} does not match the checksum recorded when it was written (damaged or overwritten)")
        if not np.array_equal(np.load(os.path.join(self.path, "labels.npy")), self.labels):
            self._fail("labels.npy differs from the data's labels now (classes renamed or images relabelled)")
        if not quick:
            change = _first_source_change(os.path.join(self.path, "images.txt"), sources)
            if change:
                raise CacheError(f"feature cache {self.path} is stale: {change}; {_REFRESH}")

    def _check_sampled_rows(self) -> None:
        """The first, the last and a few seeded random written rows against their sums: a zero-filled
        or overwritten store is refused at open, before any training (every read checks its rows too)."""
        written = np.flatnonzero((np.asarray(self.valid) == 1) &
                                 (np.asarray(self.done)[np.arange(self.num_samples) // self.batch_size] != 0))
        if not len(written):
            return
        rng = np.random.default_rng(len(written))
        rows = np.unique(np.concatenate([written[[0, -1]], rng.choice(written, min(_SAMPLED_ROWS, len(written)))]))
        self.verify(rows, np.asarray(self.tokens[rows]), None if self.weights is None else np.asarray(self.weights[rows]))

    def verify(self, rows, tokens: np.ndarray, weights: np.ndarray | None) -> None:
        sums = np.asarray(self.sums[rows])
        _verify_rows(self.path, "tokens.bin", tokens, sums[:, 0], rows)
        if weights is not None:
            _verify_rows(self.path, "weights.bin", weights, sums[:, 1], rows)

    def pending_batches(self, rank: int = 0, world: int = 1) -> list:
        return [b for b in range(self.num_batches) if b % world == rank and not self.done[b]]

    def complete(self) -> bool:
        # read afresh, not through this process's map: on a network filesystem a fresh open sees
        # the batches other machines wrote
        return bool(np.all(np.fromfile(os.path.join(self.path, "done.bin"), dtype=np.uint8)))

    def seal(self) -> None:
        """Record the checksums of the files extraction fills (valid.bin, sums.bin) once every batch is done."""
        sealed = {name: _file_sum(os.path.join(self.path, name)) for name in ("valid.bin", "sums.bin")}
        if self.meta.get("sealed") != sealed:
            self.meta = dict(self.meta, sealed=sealed)
            atomic_json(os.path.join(self.path, "meta.json"), self.meta)

    def write_batch(self, batch: int, indices: torch.Tensor, tokens, skipped_indices) -> None:
        """``tokens``: ``[B, T, D]``, or ``(tokens, weights [B, M, n])`` for a store with weights.

        Every file is written with positional writes of exactly this batch's bytes, never through a
        shared map: a dirty mapped page is written back whole, so two machines filling neighbouring
        batches of one store on a network filesystem would overwrite each other's bytes (and a full
        disk under a map is a SIGBUS, here an ``OSError``). The rows and sums reach the disk before
        the batch's ``done`` byte, so an interrupted extraction never trusts an unwritten batch."""
        idx = indices.cpu().numpy().astype(np.int64)
        order = np.argsort(idx)
        rows_idx = idx[order]
        sums = np.zeros((len(idx), self.num_sums), dtype=np.uint32)
        writes = []
        if isinstance(tokens, (tuple, list)):
            tokens, weights = tokens
            weights = weights.detach().float().cpu().numpy()[order]
            sums[:, 1] = [row_sum(w) for w in weights]
            writes.append(("weights.bin", rows_idx, weights))
        rows = tokens.detach().to(self.torch_dtype).cpu()
        if self.dtype == "bf16":
            rows = rows.view(torch.int16)
        rows = rows.numpy()[order]
        sums[:, 0] = [row_sum(r) for r in rows]
        writes += [("tokens.bin", rows_idx, rows), ("sums.bin", rows_idx, sums)]
        # the batch's whole range of valid bytes: 1 read, 2 unreadable (a redone batch overwrites all)
        start = batch * self.batch_size
        flags = np.zeros(min(start + self.batch_size, self.num_samples) - start, dtype=np.uint8)
        flags[idx - start] = 1
        if len(skipped_indices):
            flags[np.asarray(skipped_indices, dtype=np.int64) - start] = 2
        writes.append(("valid.bin", np.arange(start, start + len(flags)), flags))
        for name, at, values in writes:
            _write_rows(os.path.join(self.path, name), at, values)
        _write_rows(os.path.join(self.path, "done.bin"), np.array([batch]), np.ones(1, dtype=np.uint8))

    def _valid_now(self) -> np.ndarray:
        # read afresh, as complete(): other machines' flags of this store, never a stale mapped page
        return np.fromfile(os.path.join(self.path, "valid.bin"), dtype=np.uint8)

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(self._valid_now() == 1)

    def num_unreadable(self) -> int:
        return int(np.count_nonzero(self._valid_now() == 2))

    def batches(self, batches: list) -> "CachedBatches":
        return CachedBatches(self.path, self.dtype, self.tokens.shape, self.labels, batches,
                             None if self.weights is None else self.weights.shape)


class CachedBatches(torch.utils.data.Dataset):
    """Item ``i`` is the whole batch ``batches[i]`` (row indices) as ``(tokens, labels)``, each row
    checked against its recorded sum (:class:`CacheError` on a mismatch).

    Picklable for DataLoader workers: each process maps the files itself, read-only. A store
    with weights gives ``((tokens, weights), labels)``.
    """

    def __init__(self, path: str, dtype: str, shape: tuple, labels: np.ndarray, batches: list,
                 weight_shape: tuple | None = None):
        self.path, self.dtype, self.shape, self.labels, self.batch_list = path, dtype, tuple(shape), labels, batches
        self.weight_shape = None if weight_shape is None else tuple(weight_shape)
        self._maps = None

    def __len__(self):
        return len(self.batch_list)

    def _open(self) -> dict:
        def mapped(name, dtype, shape):
            return np.memmap(os.path.join(self.path, name), dtype=dtype, mode="r", shape=shape)
        maps = dict(tokens=mapped("tokens.bin", _DTYPES[self.dtype][1], self.shape),
                    sums=mapped("sums.bin", np.uint32, (self.shape[0], 1 + (self.weight_shape is not None))))
        if self.weight_shape is not None:
            maps["weights"] = mapped("weights.bin", np.float32, self.weight_shape)
        return maps

    def __getitem__(self, i):
        if self._maps is None:
            self._maps = self._open()
        rows = np.sort(np.asarray(self.batch_list[i]))  # sorted reads are sequential on disk
        tokens = np.ascontiguousarray(self._maps["tokens"][rows])
        sums = np.asarray(self._maps["sums"][rows])
        _verify_rows(self.path, "tokens.bin", tokens, sums[:, 0], rows)
        tokens = torch.from_numpy(tokens)
        if self.dtype == "bf16":
            tokens = tokens.view(torch.bfloat16)
        if self.weight_shape is not None:
            weights = np.ascontiguousarray(self._maps["weights"][rows])
            _verify_rows(self.path, "weights.bin", weights, sums[:, 1], rows)
            tokens = (tokens, torch.from_numpy(weights))
        return tokens, torch.from_numpy(self.labels[rows])

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}


def file_stamp(path):
    """(size, mtime) of a checkpoint, so a replaced file invalidates its cached tokens."""
    if path is None:
        return None
    st = os.stat(path)
    return [st.st_size, int(st.st_mtime)]


def source_files(dataset, layout_files=()) -> list:
    """The files a split's images are read from: each image file of an ImageFiles split, else
    ``layout_files`` (the dataset's array files, e.g. CIFAR's batches; none for generated images)."""
    base = getattr(dataset, "base", dataset)
    samples = getattr(base, "samples", None)
    return [p for p, _ in samples] if samples is not None else list(layout_files)


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def open_store(root: str, settings: dict, dataset, token_shape: tuple, dtype: str, batch_size: int,
               is_main: bool = True, barrier=lambda: None, weight_shape: tuple | None = None,
               sources=None, refresh: bool = False) -> TokenStore:
    """The store for ``settings`` under ``root``: one folder per setting, so changing the model,
    data, dtype or batch never reuses stale tokens. Rank 0 checks (``refresh``: deletes and
    re-creates) it before the others map it. ``weight_shape`` ``(M, n)``: the store also keeps M
    weight vectors per image (settings must then name the methods and the selector).
    ``sources``: the files the images come from (default :func:`source_files`)."""
    key = _digest(dict(settings, dtype=dtype, batch_size=batch_size))
    path = os.path.join(root, f"{settings['split']}-{key}")
    args = (path, settings, len(dataset), token_shape, dtype, batch_size,
            np.asarray(dataset.base.labels(), dtype=np.int64), weight_shape,
            source_files(dataset) if sources is None else sources)
    store = None
    if is_main:
        if refresh and os.path.isdir(path):
            shutil.rmtree(path)
        store = TokenStore(*args)
    barrier()
    return store if store is not None else TokenStore(*args, quick=True)


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
