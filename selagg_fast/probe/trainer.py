"""`selagg-fast probe`: train every (head, lr) pair on one frozen backbone pass per batch.

Flow per step: images -> frozen backbone (no grad, bf16 autocast on GPUs, fused attention)
-> tokens [B, T, D] -> ProbeHeads (cls / avg / one fused abmilp_pool for all selective
pairs) -> summed cross-entropies -> one optimizer step with a param group per pair.
With ``--cache-features`` the tokens come from a memory-mapped store extracted once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..backbone import BackboneSettings
from ..data import collate_skipping, epoch_shard, split_batches, synthetic_datasets
from ..datasets import check_data_flags, layout_files, probe_datasets, probe_splits
from ..distributed import DistInfo, all_reduce_sum, barrier, check_device, init_distributed
from ..files import (CheckpointError, Interrupted, check_number, check_writable, interrupts_deferred, load_torch_file,
                     output_lock, refuse_existing_run)
from ..precision import PRECISIONS, uses_bf16
from ..profiling import nvtx_range
from .cache import CacheError, extract, file_stamp, open_store, source_files
from .curves import plot_curves
from .knn_run import parse_ks, parse_temperatures, run_knn
from .heads import pair_name, parse_heads, parse_lrs, probe_loss
from .optim import build_optimizer, set_lr
from .sizes import check_fits, head_sizes, seeds_sizes
from .selector import attention_weights_for, batch_to, cache_settings, check_selector_flags
from .outputs import append_metrics, atomic_json, atomic_save, summarize, summarize_seeds, truncate_metrics
from .seeds import SeedHeads, parse_seeds, seeded_heads

log = logging.getLogger("selagg_fast")


@dataclass(frozen=True)
class Protocol:
    """The defaults that differ between the paper's reference code and MAE's linear probe."""
    classifier_init: str   # LinearProbe init: "paper" (nn.Linear's default) or "mae" (trunc-normal 0.01, zero bias)
    sgd_momentum: float    # --optimizer sgd's momentum when --momentum is not given (LARS: 0.9 in both)
    drop_last: bool        # the training loader drops the last partial batch


PROTOCOLS = {
    "paper": Protocol(classifier_init="paper", sgd_momentum=0.0, drop_last=True),
    "mae": Protocol(classifier_init="mae", sgd_momentum=0.9, drop_last=False),
}
LARS_MOMENTUM = 0.9


@dataclass
class ProbeConfig(BackboneSettings):
    """Every setting of a probing run; defaults are the paper's protocol (App. B.2 and its code).

    ``protocol`` and ``momentum`` left ``None`` are resolved by :func:`run_probe`: a new run takes
    the ``"paper"`` protocol, a resumed run the one it was started with (``"mae"`` for runs saved
    before the protocol was recorded); ``momentum`` then follows the protocol and optimizer."""
    compile_backbone: bool = False
    data: str | None = None
    dataset: str = "imagefolder"
    train_list: str | None = None
    synthetic_train_size: int = 4000
    synthetic_val_size: int = 1000
    synthetic_classes: int = 10
    heads: str = "cls,avg,selective"
    lrs: str = "0.1"
    optimizer: str = "lars"
    protocol: str | None = None
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 1024
    accum_iter: int = 1
    momentum: float | None = None
    weight_decay: float = 0.0
    augment: bool = True
    precision: str = "auto"
    workers: int = 8
    cache_features: str | None = None
    cache_dtype: str = "bf16"
    refresh_cache: bool = False
    output_dir: str = "probe_out"
    resume: bool = False
    stop_after_epochs: int | None = None
    seed: int = 0
    # --seeds: every pair once per seed (probe/seeds.py); the run's data seed is the first
    seeds: list | None = None
    device: str = "auto"
    progress: bool = True
    # external_cls_attn's second frozen backbone (probe/selector.py), flags as the backbone's
    selector_model: str | None = None
    selector_checkpoint: str | None = None
    selector_checkpoint_key: str | None = None
    selector_random_init: bool = False
    selector_model_kwargs: dict = dataclasses.field(default_factory=dict)
    # --knn: weighted k-NN of the linear probe's representation (probe/knn_run.py)
    knn: bool = False
    knn_k: str = "5,10,15,20,50,100,200"
    knn_temperatures: str = "0.07,0.1,0.2"
    knn_memory_gb: float = 1.0

    def lr_list(self) -> list:
        return parse_lrs(self.lrs)

    def seed_list(self) -> list:
        """The seeds the heads train with: ``seeds``, or ``[seed]``."""
        seeds = parse_seeds(self.seeds)
        return [self.seed] if seeds is None else seeds


# Settings that change what a run computes; --resume refuses a run whose values differ.
_RESUME_KEYS = ("model", "checkpoint", "checkpoint_key", "return_block", "final_norm", "model_kwargs", "data",
                "dataset", "train_list",
                "heads", "lrs", "optimizer", "protocol", "epochs", "warmup_epochs", "batch_size", "accum_iter",
                "momentum", "weight_decay", "augment", "precision", "seed", "seeds", "cache_features", "cache_dtype",
                "selector_model", "selector_checkpoint", "selector_checkpoint_key", "selector_model_kwargs")
# What a saved config without the key ran with (runs saved before the key existed).
_SAVED_BEFORE = {"protocol": "mae", "selector_model_kwargs": {}, "dataset": "imagefolder", "checkpoint_key": None,
                 "selector_checkpoint_key": None, "seeds": None}


def validate(cfg: ProbeConfig) -> None:
    """Every flag's value, checked before any model is built or any data read (one error each)."""
    if cfg.data is None:
        raise ValueError("--data is required: the dataset's folder (see --dataset), or 'synthetic'")
    for name in ("epochs", "batch_size", "accum_iter"):
        check_number(f"--{name.replace('_', '-')}", getattr(cfg, name), minimum=1, integer=True)
    check_number("--stop-after-epochs", cfg.stop_after_epochs, minimum=1, integer=True, optional=True)
    check_number("--workers", cfg.workers, minimum=0, integer=True)
    check_number("--seed", cfg.seed, minimum=0, integer=True)
    _check_seeds(cfg)
    check_number("--warmup-epochs", cfg.warmup_epochs, minimum=0)
    check_number("--momentum", cfg.momentum, minimum=0, below=1, optional=True)
    check_number("--weight-decay", cfg.weight_decay, minimum=0)
    if cfg.data == "synthetic":
        check_number("--synthetic-train-size", cfg.synthetic_train_size, minimum=1, integer=True)
        check_number("--synthetic-val-size", cfg.synthetic_val_size, minimum=1, integer=True)
        check_number("--synthetic-classes", cfg.synthetic_classes, minimum=2, integer=True)
        if cfg.synthetic_classes > 16:
            raise ValueError(f"--synthetic-classes {cfg.synthetic_classes}: must be 2 to 16")
    check_data_flags(cfg.dataset, cfg.data, cfg.train_list)
    if cfg.data != "synthetic" and cfg.train_list is not None and not os.path.isfile(cfg.train_list):
        what = "is a folder, not a list file" if os.path.isdir(cfg.train_list) else "no such file"
        raise (ValueError if os.path.isdir(cfg.train_list) else FileNotFoundError)(
            f"--train-list {cfg.train_list}: {what}")
    for flag, value, choices in (("--optimizer", cfg.optimizer, ("lars", "sgd")),
                                 ("--precision", cfg.precision, PRECISIONS),
                                 ("--cache-dtype", cfg.cache_dtype, ("bf16", "fp32")),
                                 ("--protocol", cfg.protocol, (None, *PROTOCOLS))):
        if value not in choices:
            raise ValueError(f"{flag} {value!r}: choose {' or '.join(c for c in choices if c)}")
    if cfg.cache_features and cfg.augment:
        raise ValueError("--cache-features trains without augmentation: add --no-augment")
    if cfg.refresh_cache and not cfg.cache_features:
        raise ValueError("--refresh-cache: only with --cache-features DIR")
    cfg.lr_list()
    if cfg.knn:
        parse_ks(cfg.knn_k)
        parse_temperatures(cfg.knn_temperatures)
        check_number("--knn-memory-gb", cfg.knn_memory_gb, minimum=0.001)
    check_selector_flags(cfg, parse_heads(cfg.heads))  # names only here; 'cls' on a model without [cls] is
    # refused once it is known, a --selector-model of another patch grid once both are built
    check_device(cfg.device)
    cfg.check_backbone()


def _check_seeds(cfg: ProbeConfig) -> None:
    seeds = parse_seeds(cfg.seeds)
    if seeds is not None and cfg.seed not in (0, seeds[0]):
        raise ValueError(f"--seed {cfg.seed} with --seeds {cfg.seeds}: give one of them (--seeds' first seed is the "
                         "run's data seed)")


def _check_outputs(cfg: ProbeConfig) -> None:
    check_writable(cfg.output_dir)
    if cfg.cache_features:
        check_writable(cfg.cache_features, flag="--cache-features")


def _resolved(cfg: ProbeConfig, saved: dict | None) -> ProbeConfig:
    """``cfg`` with ``protocol`` and ``momentum`` decided: given values win; else the resumed run's
    (``saved``: its config); else the protocol's defaults."""
    def saved_value(key):
        return saved.get(key, _SAVED_BEFORE.get(key)) if saved is not None else None
    protocol = cfg.protocol or saved_value("protocol") or "paper"
    momentum = cfg.momentum if cfg.momentum is not None else saved_value("momentum")
    if momentum is None:
        momentum = LARS_MOMENTUM if cfg.optimizer == "lars" else PROTOCOLS[protocol].sgd_momentum
    seeds = parse_seeds(cfg.seeds)  # a list in config.json; its first seed seeds the data and the backbone
    return dataclasses.replace(cfg, protocol=protocol, momentum=float(momentum), seeds=seeds,
                               seed=cfg.seed if seeds is None else seeds[0])


class _Run:
    """State of one probing run (one per process): backbone, data, heads, optimizer, counters."""

    def __init__(self, cfg: ProbeConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        self.protocol = PROTOCOLS[cfg.protocol]
        self.stores = {}                          # split -> TokenStore, with --cache-features
        self.unreadable = {"train": 0, "val": 0}  # distinct unreadable images, all processes
        # this invocation's unreadable indices per split: each epoch drops a different last partial
        # batch (paper protocol), so one epoch alone can miss some; the count is over every epoch
        self.unreadable_indices = {"train": set(), "val": set()}
        self.diverged = set()                     # pair names whose loss or parameters went non-finite
        self.autocast_dtype = torch.bfloat16 if uses_bf16(cfg.precision, self.device) else None
        torch.manual_seed(cfg.seed)

        # the data's files first: a class-folder, --train-list or --knn-k error costs no backbone build
        splits = None if cfg.data == "synthetic" else probe_splits(cfg.dataset, cfg.data, cfg.train_list)
        num_train = cfg.synthetic_train_size if splits is None else len(splits[0])
        if cfg.knn and max(parse_ks(cfg.knn_k)) > num_train:
            raise ValueError(f"--knn-k {cfg.knn_k}: k {max(parse_ks(cfg.knn_k))} is more than the "
                             f"{num_train} training images")
        self.backbone = cfg.create_backbone().to(self.device)
        self.info = self.backbone.info
        # torch.compile of the frozen forward: compiled on the first batch (and again for the
        # last, smaller one), the same tokens up to float rounding afterwards
        self.forward_backbone = torch.compile(self.backbone) if cfg.compile_backbone else self.backbone
        self.specs = parse_heads(cfg.heads, has_cls=self.info.has_cls)
        self.lrs = cfg.lr_list()
        # Without selective heads the cache keeps only [cls] and the patch mean per image.
        self.compact = cfg.cache_features is not None and not any(s.needs_tokens for s in self.specs)
        # cls_attn & co.: their weights from this backbone's pass (and the selector's), beside the tokens
        self.selection = attention_weights_for(cfg, self.backbone, self.specs, self.device)
        if self.selection is not None and cfg.compile_backbone:
            log.warning("--compile-backbone: not with attention-weighted heads (their hook reads the probed "
                        "block's attention input); the backbone runs uncompiled")
            self.forward_backbone = self.backbone
        self.head_prefix = int(self.info.has_cls) if self.compact else self.info.num_prefix_tokens

        if cfg.data == "synthetic":
            self.train_set, self.val_set = synthetic_datasets(
                self.info.img_size, cfg.synthetic_train_size, cfg.synthetic_val_size, cfg.synthetic_classes,
                seed=cfg.seed, augment=cfg.augment)
        else:
            self.train_set, self.val_set = probe_datasets(
                cfg.dataset, cfg.data, self.info.img_size, cfg.train_list, augment=cfg.augment, seed=cfg.seed,
                splits=splits)
        self.num_classes = len(self.train_set.classes)
        if self.num_batches("train") == 0:
            raise ValueError(
                f"--batch-size {cfg.batch_size}: more than the {len(self.train_set)} training images give each of "
                f"{dist_info.world_size} process(es); the {cfg.protocol} protocol drops the last partial batch, so "
                "no step would run (lower --batch-size, or --protocol mae keeps the partial batch)")

        self.effective_batch = cfg.batch_size * cfg.accum_iter * dist_info.world_size
        check_fits(seeds_sizes(head_sizes(self.specs, self.lrs, self.info.embed_dim, self.num_classes,
                                          self.head_prefix, grid_size=self.info.patch_grid), len(cfg.seed_list())),
                   cfg.heads, cfg.batch_size, self.device, cfg.output_dir)
        # gloo group for host-side agreement (skipping a batch, counting) without a device round trip
        self.control_group = torch.distributed.new_group(backend="gloo") if dist_info.active else None
        self.seed_heads = [self._seed_heads(seed) for seed in cfg.seed_list()]
        # the first seed's: what the selection maps and comparisons read, and a one-seed run's all
        first = self.seed_heads[0]
        self.heads, self.optimizer, self.model, self.diverged = first.heads, first.optimizer, first.model, first.diverged

    def _seed_heads(self, seed: int) -> SeedHeads:
        """One seed's heads (initialised from the seed alone), optimizer and DDP wrapper."""
        cfg = self.cfg
        heads = seeded_heads(seed, self.protocol.classifier_init, self.specs, self.lrs, self.info.embed_dim,
                             self.num_classes, self.head_prefix, grid_size=self.info.patch_grid).to(self.device)
        optimizer = build_optimizer(heads, cfg.optimizer, self.effective_batch, cfg.momentum, cfg.weight_decay)
        model = heads
        if self.dist.active:
            model = torch.nn.parallel.DistributedDataParallel(
                heads, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        return SeedHeads(seed, heads, optimizer, model)

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def tokens(self, images: torch.Tensor):
        """The backbone's tokens; ``(tokens, weights [B, M, N] float32)`` with attention-weighted heads."""
        weights = None
        with torch.no_grad(), self.autocast(), nvtx_range("backbone"):
            if self.selection is not None:
                tokens, weights = self.selection(self.forward_backbone, images)
            else:
                tokens = self.forward_backbone(images)
        if self.compact:
            parts = ([tokens[:, :1]] if self.info.has_cls else []) + \
                    [tokens[:, self.info.num_prefix_tokens:].mean(1, keepdim=True, dtype=torch.float32)]
            tokens = torch.cat([p.to(tokens.dtype) for p in parts], 1)
        tokens = tokens.to(self.autocast_dtype or torch.float32)
        return tokens if weights is None else (tokens, weights)

    # data ------------------------------------------------------------------------------------
    def _loader(self, dataset, **kw):
        cuda = self.device.type == "cuda"
        return DataLoader(dataset, num_workers=self.cfg.workers, pin_memory=cuda,
                          persistent_workers=False, **kw)

    def _my_batches(self, split: str, epoch: int, indices, order_seed: int | None = None) -> list:
        """This process's batches of ``indices``: training shuffles per epoch by ``order_seed`` (default
        the run's seed; and drops a last partial batch under the paper protocol); validation takes
        every W-th image, unpadded."""
        if split == "train":
            seed = self.cfg.seed if order_seed is None else order_seed
            mine = epoch_shard(indices, seed, epoch, self.dist.rank, self.dist.world_size)
            batches = split_batches(mine.tolist(), self.cfg.batch_size, self.protocol.drop_last)
            if self._last_batch_too_small(len(mine)):
                batches = batches[:-1]
            return batches
        mine = np.asarray(indices)[self.dist.rank::self.dist.world_size]
        return split_batches(mine.tolist(), self.cfg.batch_size, drop_last=False)

    def live_batches(self, split: str, epoch: int):
        """Yields (tokens on device, labels on device, indices of unreadable images) of this process."""
        dataset = self.train_set if split == "train" else self.val_set
        dataset.set_epoch(epoch)
        loader = self._loader(dataset, batch_sampler=self._my_batches(split, epoch, range(len(dataset))),
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
        loader = self._loader(store.batches(self._my_batches(split, epoch, store.valid_indices(), order_seed)),
                              batch_size=None)
        try:
            for tokens, labels in loader:
                with nvtx_range("data"):
                    yield (batch_to(tokens, self.device, self.autocast_dtype or torch.float32),
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
        small = not self.protocol.drop_last and per_rank % self.cfg.batch_size == 1 and self.dist.world_size == 1
        if small and warn and not getattr(self, "_warned_small_batch", False):
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
            if self.protocol.drop_last:
                return per_rank // self.cfg.batch_size
            return -(-per_rank // self.cfg.batch_size) - int(self._last_batch_too_small(per_rank, warn=False))
        return -(-len(range(self.dist.rank, n, self.dist.world_size)) // self.cfg.batch_size)

    # feature cache ---------------------------------------------------------------------------
    def build_cache(self) -> None:
        """Open (extracting what is missing) the train and val token stores of this run."""
        cfg = self.cfg
        with torch.no_grad():
            probe = self.tokens(torch.zeros(1, 3, self.info.img_size, self.info.img_size, device=self.device))
        probe, weight_shape = (probe[0], tuple(probe[1].shape[1:])) if isinstance(probe, tuple) else (probe, None)
        for split, dataset in (("train", self.train_set), ("val", self.val_set)):
            settings = dict(
                split=split, model=cfg.model, model_kwargs=cfg.model_kwargs, return_block=cfg.return_block,
                final_norm=cfg.final_norm, compact=self.compact, precision=str(self.autocast_dtype),
                checkpoint=cfg.checkpoint, checkpoint_stat=file_stamp(cfg.checkpoint), data=cfg.data,
                **({"checkpoint_key": cfg.checkpoint_key} if cfg.checkpoint_key is not None else {}),
                train_list=cfg.train_list, num_samples=len(dataset),
                synthetic=[cfg.synthetic_train_size, cfg.synthetic_val_size, cfg.synthetic_classes, cfg.seed]
                if cfg.data == "synthetic" else None)
            if cfg.dataset != "imagefolder":  # imagefolder stores keep the key they were extracted under
                settings["dataset"] = cfg.dataset
            if self.selection is not None:  # the cached weights' methods and selector
                settings["attention_weights"] = cache_settings(cfg, self.selection.methods)
            store = open_store(cfg.cache_features, settings, dataset, tuple(probe.shape[1:]), cfg.cache_dtype,
                               cfg.batch_size, is_main=self.dist.is_main, barrier=barrier, weight_shape=weight_shape,
                               sources=source_files(dataset, layout_files(cfg.dataset, cfg.data)),
                               refresh=cfg.refresh_cache)
            extract(store, dataset, self.tokens, self._loader, self.device, self.dist.rank, self.dist.world_size,
                    desc=f"extract {split} tokens", progress=cfg.progress and self.dist.is_main)
            barrier()
            if not store.complete():
                raise RuntimeError(f"feature cache {store.path}: extraction incomplete after all ranks finished")
            if self.dist.is_main:
                store.seal()
            self.unreadable[split] = store.num_unreadable()
            self.stores[split] = store


def _train_epoch(run: _Run, epoch: int, group: list | None = None, order_seed: int | None = None) -> dict:
    """One pass over the training batches (ordered by ``order_seed``, default the run's seed) that
    trains every seed's heads of ``group`` (default: all) on each batch; returns the per-seed
    per-pair mean losses (``losses``: {seed: {pair: loss}}) and the images per second."""
    cfg = run.cfg
    group = run.seed_heads if group is None else group
    for member in group:
        member.model.train()
    n_batches = run.num_batches("train")
    names = run.heads.pair_names()
    loss_sums = torch.zeros(len(group), len(names), device=run.device, dtype=torch.float64)
    seen = torch.zeros((), device=run.device, dtype=torch.float64)
    seeds_note = f" seed {group[0].seed}" if len(group) == 1 and len(run.seed_heads) > 1 else ""
    bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}{seeds_note}", unit="batch",
               disable=not (cfg.progress and run.dist.is_main))
    start, images_done, unreadable = time.perf_counter(), 0, []
    for it, (tokens, labels, skipped) in enumerate(run.batches("train", epoch, order_seed)):
        unreadable += skipped
        if it % cfg.accum_iter == 0:
            for member in group:
                set_lr(member.optimizer, epoch + it / n_batches, cfg.epochs, cfg.warmup_epochs)
        if tokens is not None:
            step_now = (it + 1) % cfg.accum_iter == 0 or it + 1 == n_batches
            for g, member in enumerate(group):  # one backbone pass, every seed's heads on it
                sync = member.model.no_sync() if run.dist.active and not step_now else contextlib.nullcontext()
                with sync, nvtx_range("heads"), run.autocast():
                    logits = member.model(tokens)
                    loss, per_pair = probe_loss(logits, labels)
                    (loss / cfg.accum_iter).backward()
                if step_now:
                    member.optimizer.step()
                    member.optimizer.zero_grad(set_to_none=True)
                loss_sums[g] += torch.stack([per_pair[n].detach() for n in names]).double() * len(labels)
            seen += len(labels)
            images_done += len(labels)
        bar.set_postfix(img_s=f"{images_done * run.dist.world_size / (time.perf_counter() - start):.0f}",
                        refresh=False)
        bar.update(1)
    bar.close()
    all_reduce_sum(loss_sums)
    all_reduce_sum(seen)
    if seen.item() == 0:  # every batch unreadable: a loss of 0.0 and untrained heads are no result
        raise ValueError(f"--data {cfg.data}: no training step ran in epoch {epoch + 1}: no training image could "
                         f"be read ({max(len(set(unreadable)), run.unreadable['train'])} unreadable); nothing was trained")
    if not cfg.cache_features:  # cached tokens: the store counted them once at extraction
        run.note_unreadable("train", unreadable)
    elapsed = time.perf_counter() - start
    losses = (loss_sums / seen.clamp(min=1)).tolist()
    return dict(losses={member.seed: dict(zip(names, row)) for member, row in zip(group, losses)},
                images=images_done * run.dist.world_size, seconds=elapsed,
                images_per_s=images_done * run.dist.world_size / elapsed)


@torch.no_grad()
def evaluate(run: _Run, epoch: int) -> dict:
    """Top-1 / top-5 accuracy (percent) of every seed's every pair on the whole validation set
    (one pass): ``{seed: {pair: {"top1", "top5"}}}``."""
    for member in run.seed_heads:
        member.model.eval()
    names = run.heads.pair_names()
    seeds = [member.seed for member in run.seed_heads]
    correct = torch.zeros(len(seeds), len(names), 2, device=run.device, dtype=torch.float64)
    total = torch.zeros((), device=run.device, dtype=torch.float64)
    unreadable = []
    bar = tqdm(total=run.num_batches("val"), desc="validate", unit="batch",
               disable=not (run.cfg.progress and run.dist.is_main))
    for tokens, labels, skipped in run.batches("val", epoch):
        unreadable += skipped
        bar.update(1)
        if tokens is None:
            continue
        for g, member in enumerate(run.seed_heads):
            with run.autocast():
                logits = member.heads(tokens)
            for i, name in enumerate(names):
                top5 = logits[name].float().topk(min(5, run.num_classes), dim=1).indices
                hit = top5 == labels[:, None]
                correct[g, i, 0] += hit[:, 0].sum()
                correct[g, i, 1] += hit.any(1).sum()
        total += len(labels)
    bar.close()
    all_reduce_sum(correct)
    all_reduce_sum(total)
    if total.item() == 0:  # a top-1 of 0.00 over no image would read as a result
        raise ValueError(f"--data {run.cfg.data}: no validation image could be read ({len(set(unreadable))} "
                         f"unreadable here, of {len(run.val_set)}); nothing to evaluate")
    if not run.cfg.cache_features:
        run.note_unreadable("val", unreadable)
    acc = (100.0 * correct / total.clamp(min=1)).tolist()
    return {seed: {name: dict(top1=a[0], top5=a[1]) for name, a in zip(names, rows)} for seed, rows in zip(seeds, acc)}


def _find_diverged(run: _Run, member: SeedHeads, losses: dict, epoch: int) -> None:
    """Pairs (of one seed's heads) whose training loss or parameters went non-finite: reported as
    diverged from now on (their parameters stay non-finite, so a resumed run finds them again);
    the others train on."""
    for spec, lr in member.heads.pairs:
        name = pair_name(spec, lr)
        if name in member.diverged:
            continue
        finite = math.isfinite(losses[name]) and all(
            bool(torch.isfinite(p).all()) for p in member.heads.pair_parameters(spec, lr))
        if not finite:
            member.diverged.add(name)
            seed = f" (seed {member.seed})" if run.cfg.seeds is not None else ""
            log.warning("pair %s%s diverged in epoch %d (train loss %s): reported as diverged (top-1 null); "
                        "the other pairs train on", name, seed, epoch + 1, losses[name])


# run_probe's steps --------------------------------------------------------------------------------
# What a probing run writes in --output-dir: any of them there means a run, refused without --resume.
RUN_FILES = ("config.json", "results.json", "metrics.jsonl", "checkpoint.pt")
# Settings that are paths: stored absolute, so `DIR/` resumes `DIR` and another working directory
# cannot silently read other files.
_PATH_KEYS = ("data", "train_list", "checkpoint", "cache_features", "selector_checkpoint", "output_dir")


def _absolute_paths(cfg: ProbeConfig) -> ProbeConfig:
    return dataclasses.replace(cfg, **{k: _absolute(k, getattr(cfg, k)) for k in _PATH_KEYS})


def _absolute(key: str, value):
    if not isinstance(value, str) or (key == "data" and value == "synthetic"):
        return value
    return os.path.abspath(value)


def _read_saved_run(cfg: ProbeConfig) -> dict | None:
    """The checkpoint to continue (``--resume``), or None for a new run; refuses to overwrite a run."""
    refuse_existing_run(cfg.output_dir, RUN_FILES, cfg.resume)
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    if not os.path.exists(ckpt_path):
        if os.path.exists(os.path.join(cfg.output_dir, "results.json")):
            raise FileExistsError(f"--resume: {cfg.output_dir} holds results.json but no checkpoint.pt to continue "
                                  "from; move its files away or choose another --output-dir")
        return None  # a run stopped in its first epoch: it starts over
    saved = load_torch_file(ckpt_path, flag="--resume")  # written by this tool: plain types only
    if not isinstance(saved, dict) or not {"config", "heads", "optimizer", "epoch"} <= saved.keys():
        raise CheckpointError(f"--resume {ckpt_path}: not a checkpoint of a `selagg-fast probe` run (no run "
                              "settings in it); move it away or choose another --output-dir")
    return saved


def _changed_settings(old: dict, cfg: ProbeConfig) -> list:
    """``--flag then -> now`` for every setting of ``_RESUME_KEYS`` that differs (paths resolved)."""
    changed = []
    for k in _RESUME_KEYS:
        then = old.get(k, _SAVED_BEFORE.get(k))
        if k in _PATH_KEYS:
            then = _absolute(k, then)
        if then != getattr(cfg, k):
            changed.append(f"--{k.replace('_', '-')} {then!r} then, {getattr(cfg, k)!r} now")
    return changed


def _resume(run: _Run, saved: dict | None) -> tuple:
    """Load the saved heads and optimizer into ``run``; returns (first epoch to run, last results)."""
    if saved is None:
        return 0, None
    old, cfg = saved["config"], run.cfg
    changed = _changed_settings(old, cfg)
    if changed:
        raise ValueError(f"--resume: {cfg.output_dir} was started with different settings: {'; '.join(changed)}")
    then, now = list(saved.get("classes") or []), list(run.train_set.classes)
    if then and then != now:
        added, removed = [c for c in now if c not in then], [c for c in then if c not in now]
        raise ValueError(f"--resume: the classes of --data {cfg.data} changed since {cfg.output_dir} was started "
                         f"(added: {', '.join(added[:10]) or 'none'}; removed: {', '.join(removed[:10]) or 'none'}"
                         f"{'' if added or removed else '; reordered'}); start a new run in another --output-dir")
    _load_seed_heads(run, saved)
    for k, v in saved.get("unreadable", {}).items():
        run.unreadable[k] = v
    log.info("resuming %s after epoch %d", cfg.output_dir, saved["epoch"])
    return saved["epoch"], saved.get("results")


def _load_seed_heads(run: _Run, saved: dict) -> None:
    """Every seed's heads and optimizer from the checkpoint (``seed_heads``; a one-seed run's are
    ``heads`` and ``optimizer``)."""
    states = saved.get("seed_heads") or [dict(seed=run.seed_heads[0].seed, heads=saved["heads"],
                                              optimizer=saved["optimizer"])]
    if [s["seed"] for s in states] != [m.seed for m in run.seed_heads]:
        raise ValueError(f"--resume: {run.cfg.output_dir}'s checkpoint holds seeds {[s['seed'] for s in states]}, "
                         f"this run trains {[m.seed for m in run.seed_heads]}")
    for member, state in zip(run.seed_heads, states):
        member.heads.load_state_dict(state["heads"])
        member.optimizer.load_state_dict(state["optimizer"])


def _seed_heads_state(run: _Run) -> dict:
    """The checkpoint's heads: ``heads``/``optimizer`` (the first seed's, what maps and comparisons
    read) and, with --seeds, ``seed_heads``: every seed's."""
    first = run.seed_heads[0]
    state = dict(heads=first.heads.state_dict(), optimizer=first.optimizer.state_dict())
    if run.cfg.seeds is not None:
        state["seed_heads"] = [dict(seed=m.seed, heads=m.heads.state_dict(), optimizer=m.optimizer.state_dict())
                               for m in run.seed_heads]
    return state


def _write_config(run: _Run, start_epoch: int, command: str | None) -> None:
    """config.json: every setting, and ``command`` (this invocation's command line) with
    ``commands`` (every invocation of the run, a resumed run's earlier ones first)."""
    out = run.cfg.output_dir
    path = os.path.join(out, "config.json")
    commands = []
    if start_epoch > 0 and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        commands = old.get("commands") or ([old["command"]] if old.get("command") else [])
    if command is not None:
        commands.append(command)
    atomic_json(path, dict(
        **dataclasses.asdict(run.cfg), world_size=run.dist.world_size, effective_batch=run.effective_batch,
        backbone=dataclasses.asdict(run.info), head_prefix_tokens=run.head_prefix,
        pairs=run.heads.pair_names(), classes=run.train_set.classes,
        command=command if command is not None else (commands[-1] if commands else None), commands=commands))
    truncate_metrics(os.path.join(out, "metrics.jsonl"), start_epoch)


def _train_seeds(run: _Run, epoch: int) -> dict:
    """One epoch of every seed's heads: from a feature cache one pass per seed in the seed's own
    order; live, one pass (the run's seed's batches and augmentation) that trains every seed."""
    if not (run.cfg.cache_features and len(run.seed_heads) > 1):
        return _train_epoch(run, epoch)
    passes = [_train_epoch(run, epoch, [member], member.seed) for member in run.seed_heads]
    images, seconds = sum(p["images"] for p in passes), sum(p["seconds"] for p in passes)
    return dict(losses={seed: losses for p in passes for seed, losses in p["losses"].items()}, images=images,
                seconds=seconds, images_per_s=images / seconds)


def _summarize_epoch(run: _Run, metrics: dict, **info) -> dict:
    """results.json's content: one seed's pairs (``summarize``), or with --seeds every seed's and
    their mean and standard deviation (``summarize_seeds``)."""
    pairs = run.heads.pairs
    if run.cfg.seeds is None:
        only = metrics[run.seed_heads[0].seed]
        return summarize([(spec.name, lr, only[pair_name(spec, lr)]) for spec, lr in pairs],
                         diverged=run.seed_heads[0].diverged, **info)
    return summarize_seeds(
        [m.seed for m in run.seed_heads],
        [(spec.name, lr, {seed: by_pair[pair_name(spec, lr)] for seed, by_pair in metrics.items()})
         for spec, lr in pairs], diverged={m.seed: m.diverged for m in run.seed_heads}, **info)


def _epoch(run: _Run, epoch: int) -> tuple:
    """Train and evaluate one epoch; returns (training summary, per-seed per-pair metrics, results)."""
    cfg = run.cfg
    train = _train_seeds(run, epoch)
    metrics = evaluate(run, epoch)
    for member in run.seed_heads:
        _find_diverged(run, member, train["losses"][member.seed], epoch)
    results = _summarize_epoch(
        run, metrics, model=cfg.model, checkpoint=cfg.checkpoint, dataset=cfg.dataset, protocol=cfg.protocol, optimizer=cfg.optimizer,
        momentum=cfg.momentum, epochs_done=epoch + 1, val_images=len(run.val_set),
        train_images=len(run.train_set), num_classes=run.num_classes, unreadable_images=dict(run.unreadable),
        train_images_per_s=train["images_per_s"], classes=run.train_set.classes)
    return train, metrics, results


def _write_epoch(run: _Run, epoch: int, train: dict, metrics: dict, results: dict) -> None:
    """metrics.jsonl lines, checkpoint.pt and results.json of a finished epoch (rank 0), each
    atomic: a failed write leaves the previous epoch's files as they were."""
    out = run.cfg.output_dir
    rows = []
    for member in run.seed_heads:
        losses, by_pair = train["losses"][member.seed], metrics[member.seed]
        for i, (spec, lr) in enumerate(member.heads.pairs):
            name = pair_name(spec, lr)
            gone = name in member.diverged
            rows.append(dict(epoch=epoch + 1, head=spec.name, base_lr=lr, seed=member.seed,
                             lr=member.optimizer.param_groups[i]["lr"], train_loss=losses[name],
                             top1=None if gone else by_pair[name]["top1"], top5=None if gone else by_pair[name]["top5"],
                             diverged=gone, images_per_s=train["images_per_s"]))
    append_metrics(os.path.join(out, "metrics.jsonl"), epoch + 1, rows)
    atomic_save(os.path.join(out, "checkpoint.pt"), dict(
        epoch=epoch + 1, **_seed_heads_state(run),
        config=dataclasses.asdict(run.cfg), backbone=dataclasses.asdict(run.info), results=results,
        pairs=run.heads.pair_names(), classes=run.train_set.classes, unreadable=dict(run.unreadable)))
    atomic_json(os.path.join(out, "results.json"), results)
    best = ", ".join(f"{h} {'diverged' if p['top1'] is None else format(p['top1'], '.2f')}"
                     for h, p in results["best_per_head"].items())
    mean = f" (mean of seeds {', '.join(map(str, run.cfg.seeds))})" if run.cfg.seeds is not None else ""
    log.info("epoch %d/%d: top-1 best per head%s: %s", epoch + 1, run.cfg.epochs, mean, best)


def _knn(run: _Run, saved_results: dict | None) -> dict | None:
    """``results.json``'s ``knn`` with --knn: a resumed run's when it has the same k and T lists,
    else computed now (before the first epoch of this invocation)."""
    cfg = run.cfg
    if not cfg.knn:
        return None
    ks, temperatures = sorted(parse_ks(cfg.knn_k)), parse_temperatures(cfg.knn_temperatures)
    old = (saved_results or {}).get("knn")
    if old and old.get("ks") == ks and old.get("temperatures") == temperatures:
        return old
    return run_knn(run)


def run_probe(cfg: ProbeConfig, command: str | None = None) -> dict:
    """Train every (head, lr) pair; returns (and on rank 0 writes) ``results.json``'s content.

    Every flag is checked, and the output folder proven writable, before a model is built. Rank 0
    holds the output folder's lock for the whole run: a second run on it is refused at once. An
    interrupt (SIGINT / SIGTERM) ends with :class:`Interrupted` naming the last saved epoch.
    ``command``: the command line recorded in config.json (the CLI passes its own)."""
    validate(cfg)
    cfg = _absolute_paths(cfg)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with output_lock(cfg.output_dir) if is_main else contextlib.nullcontext():
        try:
            return _run_locked(cfg, is_main, command)
        except KeyboardInterrupt as err:
            raise Interrupted(f"interrupted after epoch {_epochs_saved(cfg.output_dir)} of {cfg.epochs}; "
                              "continue with --resume", signum=getattr(err, "signum", signal.SIGINT)) from None


def _epochs_saved(out: str) -> int:
    try:
        with open(os.path.join(out, "results.json")) as f:
            return int(json.load(f).get("epochs_done", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _run_locked(cfg: ProbeConfig, is_main: bool, command: str | None) -> dict:
    if is_main:
        _check_outputs(cfg)
    saved = _read_saved_run(cfg)
    cfg = _resolved(cfg, saved["config"] if saved else None)
    dist_info = init_distributed(cfg.device)
    run = _Run(cfg, dist_info)
    start_epoch, results = _resume(run, saved)
    if dist_info.is_main:
        _write_config(run, start_epoch, command)
    barrier()
    if cfg.cache_features:
        run.build_cache()
    knn = _knn(run, results)
    if knn is not None and results is not None and results.get("knn") != knn:
        results = dict(results, knn=knn)
        if dist_info.is_main and start_epoch > 0:
            atomic_json(os.path.join(cfg.output_dir, "results.json"), results)
    last = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    for epoch in range(start_epoch, last):
        train, metrics, results = _epoch(run, epoch)
        if knn is not None:
            results["knn"] = knn
        if dist_info.is_main:
            with interrupts_deferred():  # metrics, checkpoint and results of an epoch: all or none
                _write_epoch(run, epoch, train, metrics, results)
        barrier()
    if results is None:
        raise ValueError(f"--output-dir {cfg.output_dir}: no epoch was run and no results were saved")
    if dist_info.is_main and start_epoch >= last:  # nothing left to run: results.json as the checkpoint has them
        atomic_json(os.path.join(cfg.output_dir, "results.json"), results)
    if dist_info.is_main and os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl")):
        plot_curves(cfg.output_dir)  # curves.png: top-1 and loss per epoch, every pair
    return results
