"""The probe's data plan: which images (or cached tokens) each process reads, in which batches.

:class:`DataPlan` owns the training and validation datasets, the DataLoaders, the per-epoch
sharding across processes, the host-side (gloo) agreement on skipped batches and the count of
unreadable images. Images become tokens through the ``tokens`` callable it is given (the token
source's), so it runs alone on synthetic data with any stand-in.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import collate_skipping, epoch_shard, split_batches, synthetic_datasets
from ..datasets import probe_datasets, probe_splits
from ..profiling import nvtx_range
from .cache import CacheError
from .selector import batch_to

log = logging.getLogger("selagg_fast")


def read_splits(cfg):
    """The data's file lists (train, val), or None for ``--data synthetic``: read before any model is
    built, so a class-folder or --train-list error costs no backbone build."""
    return None if cfg.data == "synthetic" else probe_splits(cfg.dataset, cfg.data, cfg.train_list)


def num_train_images(cfg, splits) -> int:
    return cfg.synthetic_train_size if splits is None else len(splits[0])


class DataPlan:
    """Datasets, loaders, this process's batches of each split and the unreadable-image counts."""

    def __init__(self, cfg, dist, drop_last: bool, img_size: int, splits=None, tokens=None,
                 token_dtype: torch.dtype = torch.float32):
        """``drop_last``: the protocol's (the training loader drops its last partial batch);
        ``splits``: :func:`read_splits`'s; ``tokens``: images on the device -> what the heads read."""
        self.cfg, self.dist, self.drop_last = cfg, dist, drop_last
        self.device = dist.device
        self.tokens, self.token_dtype = tokens, token_dtype
        self.stores = {}                          # split -> TokenStore, with --cache-features
        self.unreadable = {"train": 0, "val": 0}  # distinct unreadable images, all processes
        # this invocation's unreadable indices per split: each epoch drops a different last partial
        # batch (paper protocol), so one epoch alone can miss some; the count is over every epoch
        self.unreadable_indices = {"train": set(), "val": set()}
        self._warned_small_batch = False
        if cfg.data == "synthetic":
            self.train_set, self.val_set = synthetic_datasets(
                img_size, cfg.synthetic_train_size, cfg.synthetic_val_size, cfg.synthetic_classes,
                seed=cfg.seed, augment=cfg.augment)
        else:
            self.train_set, self.val_set = probe_datasets(
                cfg.dataset, cfg.data, img_size, cfg.train_list, augment=cfg.augment, seed=cfg.seed,
                splits=splits)
        self.num_classes = len(self.train_set.classes)
        if self.num_batches("train") == 0:
            raise ValueError(
                f"--batch-size {cfg.batch_size}: more than the {len(self.train_set)} training images give each of "
                f"{dist.world_size} process(es); the {cfg.protocol} protocol drops the last partial batch, so "
                "no step would run (lower --batch-size, or --protocol mae keeps the partial batch)")
        self.control_group = None  # gloo group for host-side agreement: see start_control_group

    def start_control_group(self) -> None:
        """The gloo group for host-side agreement (skipping a batch, counting) without a device round trip."""
        self.control_group = torch.distributed.new_group(backend="gloo") if self.dist.active else None

    @property
    def datasets(self) -> dict:
        return {"train": self.train_set, "val": self.val_set}

    def use_stores(self, stores: dict) -> None:
        """Read these token stores from now on; their unreadable counts are the splits'."""
        for split, store in stores.items():
            self.unreadable[split] = store.num_unreadable()
            self.stores[split] = store

    def loader(self, dataset, **kw):
        cuda = self.device.type == "cuda"
        return DataLoader(dataset, num_workers=self.cfg.workers, pin_memory=cuda,
                          persistent_workers=False, **kw)

    def my_batches(self, split: str, epoch: int, indices, order_seed: int | None = None) -> list:
        """This process's batches of ``indices``: training shuffles per epoch by ``order_seed`` (default
        the run's seed; and drops a last partial batch under the paper protocol); validation takes
        every W-th image, unpadded."""
        if split == "train":
            seed = self.cfg.seed if order_seed is None else order_seed
            mine = epoch_shard(indices, seed, epoch, self.dist.rank, self.dist.world_size)
            batches = split_batches(mine.tolist(), self.cfg.batch_size, self.drop_last)
            if self._last_batch_too_small(len(mine)):
                batches = batches[:-1]
            return batches
        mine = np.asarray(indices)[self.dist.rank::self.dist.world_size]
        return split_batches(mine.tolist(), self.cfg.batch_size, drop_last=False)

    def live_batches(self, split: str, epoch: int):
        """Yields (tokens on device, labels on device, indices of unreadable images) of this process."""
        dataset = self.train_set if split == "train" else self.val_set
        dataset.set_epoch(epoch)
        loader = self.loader(dataset, batch_sampler=self.my_batches(split, epoch, range(len(dataset))),
                             collate_fn=collate_skipping)
        for images, labels, _idx, skipped in loader:
            if split == "train" and not self._every_rank_has_images(images is not None):
                images = None  # a training step is taken by all processes or by none (collectives inside)
            if images is None:
                yield None, None, skipped
                continue
            with nvtx_range("data"):
                yield (self.tokens(images.to(self.device, non_blocking=True)),
                       labels.to(self.device, non_blocking=True), skipped)

    def _every_rank_has_images(self, mine: bool) -> bool:
        """False when some process's batch was entirely unreadable (a CPU all-reduce: no GPU sync)."""
        if not self.dist.active:
            return mine
        flag = torch.tensor([int(mine)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.control_group)
        return bool(flag.item())

    def note_unreadable(self, split: str, indices) -> None:
        """Add an epoch's unreadable indices; the count never drops below a resumed run's."""
        self.unreadable_indices[split].update(int(i) for i in indices)
        self.unreadable[split] = max(self.unreadable[split], self.distinct_count(self.unreadable_indices[split]))

    def distinct_count(self, indices) -> int:
        """How many distinct indices all processes saw (padding repeats some across processes)."""
        indices = set(int(i) for i in indices)
        if not self.dist.active:
            return len(indices)
        everyone = [None] * self.dist.world_size
        torch.distributed.all_gather_object(everyone, indices, group=self.control_group)
        return len(set().union(*everyone))

    def cached_batches(self, split: str, epoch: int, order_seed: int | None = None):
        store = self.stores[split]
        loader = self.loader(store.batches(self.my_batches(split, epoch, store.valid_indices(), order_seed)),
                             batch_size=None)
        try:
            for tokens, labels in loader:
                with nvtx_range("data"):
                    yield (batch_to(tokens, self.device, self.token_dtype),
                           labels.to(self.device, non_blocking=True), ())
        except CacheError as err:  # from a DataLoader worker: its message is the traceback's last line
            raise CacheError(str(err).strip().splitlines()[-1].split("CacheError: ", 1)[-1]) from None

    def batches(self, split: str, epoch: int, order_seed: int | None = None):
        """The split's batches; ``order_seed`` orders a feature cache's training batches (a live run's
        batches are the run's seed's)."""
        if self.cfg.cache_features:
            return self.cached_batches(split, epoch, order_seed)
        return self.live_batches(split, epoch)

    def _last_batch_too_small(self, per_rank: int, warn: bool = True) -> bool:
        """A kept last training batch of one image in all (one process): BatchNorm cannot train on
        it, so it is dropped (the image is seen in other epochs, in another order)."""
        small = not self.drop_last and per_rank % self.cfg.batch_size == 1 and self.dist.world_size == 1
        if small and warn and not self._warned_small_batch:
            self._warned_small_batch = True
            log.warning("the last training batch of each epoch holds 1 image (%d images, --batch-size %d): "
                        "dropped, BatchNorm needs 2", per_rank, self.cfg.batch_size)
        return small

    def num_batches(self, split: str) -> int:
        if split in self.stores:
            n = len(self.stores[split].valid_indices())
        else:
            n = len(self.train_set if split == "train" else self.val_set)
        if split == "train":
            per_rank = -(-n // self.dist.world_size)
            if self.drop_last:
                return per_rank // self.cfg.batch_size
            return -(-per_rank // self.cfg.batch_size) - int(self._last_batch_too_small(per_rank, warn=False))
        return -(-len(range(self.dist.rank, n, self.dist.world_size)) // self.cfg.batch_size)
