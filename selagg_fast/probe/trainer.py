"""`selagg-fast probe`: train every (head, lr) pair on one frozen backbone pass per batch.

Flow per step: images -> frozen backbone (no grad, bf16 autocast on GPUs, fused attention)
-> tokens [B, T, D] -> ProbeHeads (cls / avg / one fused abmilp_pool for all selective
pairs) -> summed cross-entropies -> one optimizer step with a param group per pair.
With ``--cache-features`` the tokens come from a memory-mapped store extracted once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..backbone import BackboneSettings
from ..data import (check_data_folder, collate_skipping, epoch_shard, image_folder_datasets, split_batches,
                    synthetic_datasets)
from ..distributed import DistInfo, all_reduce_sum, barrier, check_device, init_distributed
from ..files import check_number, check_writable, load_torch_file
from ..profiling import nvtx_range
from .cache import extract, file_stamp, open_store
from .curves import plot_curves
from .heads import LinearProbe, ProbeHeads, pair_name, parse_heads, probe_loss
from .optim import build_optimizer, set_lr
from .selector import attention_weights_for, batch_to, cache_settings, check_selector_flags
from .outputs import append_metrics, atomic_json, atomic_save, summarize, truncate_metrics

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
    output_dir: str = "probe_out"
    resume: bool = False
    stop_after_epochs: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    # external_cls_attn's second frozen backbone (probe/selector.py), flags as the backbone's
    selector_model: str | None = None
    selector_checkpoint: str | None = None
    selector_checkpoint_key: str | None = None
    selector_random_init: bool = False
    selector_model_kwargs: dict = dataclasses.field(default_factory=dict)

    def lr_list(self) -> list:
        try:
            lrs = [float(v) for v in str(self.lrs).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--lrs {self.lrs!r}: expected comma-separated numbers, e.g. 0.05,0.1,0.3") from None
        if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs) or len(set(lrs)) != len(lrs):
            raise ValueError(f"--lrs {self.lrs!r}: expected distinct finite positive base learning rates")
        return lrs


# Settings that change what a run computes; --resume refuses a run whose values differ.
_RESUME_KEYS = ("model", "checkpoint", "checkpoint_key", "return_block", "final_norm", "model_kwargs", "data", "train_list",
                "heads", "lrs", "optimizer", "protocol", "epochs", "warmup_epochs", "batch_size", "accum_iter",
                "momentum", "weight_decay", "augment", "precision", "seed", "cache_features", "cache_dtype",
                "selector_model", "selector_checkpoint", "selector_checkpoint_key", "selector_model_kwargs")
# What a saved config without the key ran with (runs saved before the key existed).
_SAVED_BEFORE = {"protocol": "mae", "selector_model_kwargs": {}, "checkpoint_key": None,
                 "selector_checkpoint_key": None}


def validate(cfg: ProbeConfig) -> None:
    """Every flag's value, checked before any model is built or any data read (one error each)."""
    if cfg.data is None:
        raise ValueError("--data is required: an ImageFolder root with train/ and val/, or 'synthetic'")
    for name in ("epochs", "batch_size", "accum_iter"):
        check_number(f"--{name.replace('_', '-')}", getattr(cfg, name), minimum=1, integer=True)
    check_number("--stop-after-epochs", cfg.stop_after_epochs, minimum=1, integer=True, optional=True)
    check_number("--workers", cfg.workers, minimum=0, integer=True)
    check_number("--seed", cfg.seed, minimum=0, integer=True)
    check_number("--warmup-epochs", cfg.warmup_epochs, minimum=0)
    check_number("--momentum", cfg.momentum, minimum=0, below=1, optional=True)
    check_number("--weight-decay", cfg.weight_decay, minimum=0)
    if cfg.data == "synthetic":
        check_number("--synthetic-train-size", cfg.synthetic_train_size, minimum=1, integer=True)
        check_number("--synthetic-val-size", cfg.synthetic_val_size, minimum=1, integer=True)
        check_number("--synthetic-classes", cfg.synthetic_classes, minimum=2, integer=True)
        if cfg.synthetic_classes > 16:
            raise ValueError(f"--synthetic-classes {cfg.synthetic_classes}: must be 2 to 16")
    else:
        check_data_folder(cfg.data)
        if cfg.train_list is not None and not os.path.isfile(cfg.train_list):
            what = "is a folder, not a list file" if os.path.isdir(cfg.train_list) else "no such file"
            raise (ValueError if os.path.isdir(cfg.train_list) else FileNotFoundError)(
                f"--train-list {cfg.train_list}: {what}")
    for flag, value, choices in (("--optimizer", cfg.optimizer, ("lars", "sgd")),
                                 ("--precision", cfg.precision, ("auto", "bf16", "fp32")),
                                 ("--cache-dtype", cfg.cache_dtype, ("bf16", "fp32")),
                                 ("--protocol", cfg.protocol, (None, *PROTOCOLS))):
        if value not in choices:
            raise ValueError(f"{flag} {value!r}: choose {' or '.join(c for c in choices if c)}")
    if cfg.cache_features and cfg.augment:
        raise ValueError("--cache-features trains without augmentation: add --no-augment")
    cfg.lr_list()
    check_selector_flags(cfg, parse_heads(cfg.heads))  # names only here; 'cls' on a model without [cls] is
    # refused once it is known, a --selector-model of another patch grid once both are built
    check_device(cfg.device)
    cfg.check_backbone()


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
    return dataclasses.replace(cfg, protocol=protocol, momentum=float(momentum))


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
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        torch.manual_seed(cfg.seed)

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
            self.train_set, self.val_set = image_folder_datasets(
                cfg.data, self.info.img_size, cfg.train_list, augment=cfg.augment, seed=cfg.seed)
        self.num_classes = len(self.train_set.classes)
        if self.num_batches("train") == 0:
            raise ValueError(
                f"--batch-size {cfg.batch_size}: more than the {len(self.train_set)} training images give each of "
                f"{dist_info.world_size} process(es); the {cfg.protocol} protocol drops the last partial batch, so "
                "no step would run (lower --batch-size, or --protocol mae keeps the partial batch)")

        self.effective_batch = cfg.batch_size * cfg.accum_iter * dist_info.world_size
        self.heads = ProbeHeads(self.specs, self.lrs, self.info.embed_dim, self.num_classes,
                                self.head_prefix, grid_size=self.info.patch_grid).to(self.device)
        for module in self.heads.modules():
            if isinstance(module, LinearProbe):
                module.reset_classifier(self.protocol.classifier_init)
        self.optimizer = build_optimizer(self.heads, cfg.optimizer, self.effective_batch, cfg.momentum,
                                         cfg.weight_decay)
        self.model = self.heads
        # gloo group for host-side agreement (skipping a batch, counting) without a device round trip
        self.control_group = torch.distributed.new_group(backend="gloo") if dist_info.active else None
        if dist_info.active:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.heads, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)

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

    def _my_batches(self, split: str, epoch: int, indices) -> list:
        """This process's batches of ``indices``: training shuffles per epoch (and drops a last
        partial batch under the paper protocol); validation takes every W-th image, unpadded."""
        if split == "train":
            mine = epoch_shard(indices, self.cfg.seed, epoch, self.dist.rank, self.dist.world_size)
            return split_batches(mine.tolist(), self.cfg.batch_size, self.protocol.drop_last)
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

    def cached_batches(self, split: str, epoch: int):
        store = self.stores[split]
        loader = self._loader(store.batches(self._my_batches(split, epoch, store.valid_indices())), batch_size=None)
        for tokens, labels in loader:
            with nvtx_range("data"):
                yield (batch_to(tokens, self.device, self.autocast_dtype or torch.float32),
                       labels.to(self.device, non_blocking=True), ())

    def batches(self, split: str, epoch: int):
        return (self.cached_batches if self.cfg.cache_features else self.live_batches)(split, epoch)

    def num_batches(self, split: str) -> int:
        if split in self.stores:
            n = len(self.stores[split].valid_indices())
        else:
            n = len(self.train_set if split == "train" else self.val_set)
        if split == "train":
            per_rank = -(-n // self.dist.world_size)
            return per_rank // self.cfg.batch_size if self.protocol.drop_last else -(-per_rank // self.cfg.batch_size)
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
            if self.selection is not None:  # the cached weights' methods and selector
                settings["attention_weights"] = cache_settings(cfg, self.selection.methods)
            store = open_store(cfg.cache_features, settings, dataset, tuple(probe.shape[1:]), cfg.cache_dtype,
                               cfg.batch_size, is_main=self.dist.is_main, barrier=barrier, weight_shape=weight_shape)
            extract(store, dataset, self.tokens, self._loader, self.device, self.dist.rank, self.dist.world_size,
                    desc=f"extract {split} tokens", progress=cfg.progress and self.dist.is_main)
            barrier()
            if not store.complete():
                raise RuntimeError(f"feature cache {store.path}: extraction incomplete after all ranks finished")
            self.unreadable[split] = store.num_unreadable()
            self.stores[split] = store


def _train_epoch(run: _Run, epoch: int) -> dict:
    cfg = run.cfg
    run.model.train()
    n_batches = run.num_batches("train")
    loss_sums = torch.zeros(len(run.heads.pairs), device=run.device, dtype=torch.float64)
    seen = torch.zeros((), device=run.device, dtype=torch.float64)
    bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               disable=not (cfg.progress and run.dist.is_main))
    start, images_done, unreadable = time.perf_counter(), 0, []
    names = run.heads.pair_names()
    for it, (tokens, labels, skipped) in enumerate(run.batches("train", epoch)):
        unreadable += skipped
        if it % cfg.accum_iter == 0:
            set_lr(run.optimizer, epoch + it / n_batches, cfg.epochs, cfg.warmup_epochs)
        if tokens is not None:
            step_now = (it + 1) % cfg.accum_iter == 0 or it + 1 == n_batches
            sync = run.model.no_sync() if run.dist.active and not step_now else contextlib.nullcontext()
            with sync, nvtx_range("heads"), run.autocast():
                logits = run.model(tokens)
                loss, per_pair = probe_loss(logits, labels)
                (loss / cfg.accum_iter).backward()
            if step_now:
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            loss_sums += torch.stack([per_pair[n].detach() for n in names]).double() * len(labels)
            seen += len(labels)
            images_done += len(labels)
        bar.set_postfix(img_s=f"{images_done * run.dist.world_size / (time.perf_counter() - start):.0f}",
                        refresh=False)
        bar.update(1)
    bar.close()
    all_reduce_sum(loss_sums)
    all_reduce_sum(seen)
    if not cfg.cache_features:  # cached tokens: the store counted them once at extraction
        run.note_unreadable("train", unreadable)
    elapsed = time.perf_counter() - start
    losses = (loss_sums / seen.clamp(min=1)).tolist()
    return dict(losses=dict(zip(names, losses)), images_per_s=images_done * run.dist.world_size / elapsed)


@torch.no_grad()
def evaluate(run: _Run, epoch: int) -> dict:
    """Top-1 / top-5 accuracy (percent) of every pair on the whole validation set."""
    run.model.eval()
    names = run.heads.pair_names()
    correct = torch.zeros(len(names), 2, device=run.device, dtype=torch.float64)
    total = torch.zeros((), device=run.device, dtype=torch.float64)
    unreadable = []
    bar = tqdm(total=run.num_batches("val"), desc="validate", unit="batch",
               disable=not (run.cfg.progress and run.dist.is_main))
    for tokens, labels, skipped in run.batches("val", epoch):
        unreadable += skipped
        bar.update(1)
        if tokens is None:
            continue
        with run.autocast():
            logits = run.heads(tokens)
        for i, name in enumerate(names):
            top5 = logits[name].float().topk(min(5, run.num_classes), dim=1).indices
            hit = top5 == labels[:, None]
            correct[i, 0] += hit[:, 0].sum()
            correct[i, 1] += hit.any(1).sum()
        total += len(labels)
    bar.close()
    all_reduce_sum(correct)
    all_reduce_sum(total)
    if not run.cfg.cache_features:
        run.note_unreadable("val", unreadable)
    acc = (100.0 * correct / total.clamp(min=1)).tolist()
    return {name: dict(top1=a[0], top5=a[1]) for name, a in zip(names, acc)}


def _find_diverged(run: _Run, losses: dict, epoch: int) -> None:
    """Pairs whose training loss or parameters went non-finite: reported as diverged from now on
    (their parameters stay non-finite, so a resumed run finds them again); the others train on."""
    for spec, lr in run.heads.pairs:
        name = pair_name(spec, lr)
        if name in run.diverged:
            continue
        finite = math.isfinite(losses[name]) and all(
            bool(torch.isfinite(p).all()) for p in run.heads.pair_parameters(spec, lr))
        if not finite:
            run.diverged.add(name)
            log.warning("pair %s diverged in epoch %d (train loss %s): reported as diverged (top-1 null); "
                        "the other pairs train on", name, epoch + 1, losses[name])


# run_probe's steps --------------------------------------------------------------------------------
def _read_saved_run(cfg: ProbeConfig) -> dict | None:
    """The checkpoint to continue (``--resume``), or None for a new run; refuses to overwrite a run."""
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    if not os.path.exists(ckpt_path):
        return None
    if not cfg.resume:
        raise FileExistsError(f"--output-dir {cfg.output_dir} already holds a run: pass --resume to continue it, "
                              "or choose another --output-dir")
    return load_torch_file(ckpt_path, flag="--resume")  # written by this tool: plain types only


def _resume(run: _Run, saved: dict | None) -> tuple:
    """Load the saved heads and optimizer into ``run``; returns (first epoch to run, last results)."""
    if saved is None:
        return 0, None
    old, cfg = saved["config"], run.cfg
    changed = {k: (old.get(k, _SAVED_BEFORE.get(k)), getattr(cfg, k)) for k in _RESUME_KEYS
               if old.get(k, _SAVED_BEFORE.get(k)) != getattr(cfg, k)}
    if changed:
        raise ValueError(f"--resume: {cfg.output_dir} was started with different settings (saved, now): {changed}")
    run.heads.load_state_dict(saved["heads"])
    run.optimizer.load_state_dict(saved["optimizer"])
    for k, v in saved.get("unreadable", {}).items():
        run.unreadable[k] = v
    log.info("resuming %s after epoch %d", cfg.output_dir, saved["epoch"])
    return saved["epoch"], saved.get("results")


def _write_config(run: _Run, start_epoch: int) -> None:
    out = run.cfg.output_dir
    atomic_json(os.path.join(out, "config.json"), dict(
        **dataclasses.asdict(run.cfg), world_size=run.dist.world_size, effective_batch=run.effective_batch,
        backbone=dataclasses.asdict(run.info), head_prefix_tokens=run.head_prefix,
        pairs=run.heads.pair_names(), classes=run.train_set.classes))
    truncate_metrics(os.path.join(out, "metrics.jsonl"), start_epoch)


def _epoch(run: _Run, epoch: int) -> tuple:
    """Train and evaluate one epoch; returns (training summary, per-pair metrics, results)."""
    cfg = run.cfg
    train = _train_epoch(run, epoch)
    metrics = evaluate(run, epoch)
    _find_diverged(run, train["losses"], epoch)
    results = summarize(
        [(spec.name, lr, metrics[pair_name(spec, lr)]) for spec, lr in run.heads.pairs], diverged=run.diverged,
        model=cfg.model, checkpoint=cfg.checkpoint, protocol=cfg.protocol, optimizer=cfg.optimizer,
        momentum=cfg.momentum, epochs_done=epoch + 1, val_images=len(run.val_set),
        train_images=len(run.train_set), num_classes=run.num_classes, unreadable_images=dict(run.unreadable),
        train_images_per_s=train["images_per_s"])
    return train, metrics, results


def _write_epoch(run: _Run, epoch: int, train: dict, metrics: dict, results: dict) -> None:
    """metrics.jsonl lines, checkpoint.pt and results.json of a finished epoch (rank 0), each
    atomic: a failed write leaves the previous epoch's files as they were."""
    out = run.cfg.output_dir
    rows = []
    for i, (spec, lr) in enumerate(run.heads.pairs):
        name = pair_name(spec, lr)
        gone = name in run.diverged
        rows.append(dict(epoch=epoch + 1, head=spec.name, base_lr=lr, lr=run.optimizer.param_groups[i]["lr"],
                         train_loss=train["losses"][name], top1=None if gone else metrics[name]["top1"],
                         top5=None if gone else metrics[name]["top5"], diverged=gone,
                         images_per_s=train["images_per_s"]))
    append_metrics(os.path.join(out, "metrics.jsonl"), epoch + 1, rows)
    atomic_save(os.path.join(out, "checkpoint.pt"), dict(
        epoch=epoch + 1, heads=run.heads.state_dict(), optimizer=run.optimizer.state_dict(),
        config=dataclasses.asdict(run.cfg), backbone=dataclasses.asdict(run.info), results=results,
        pairs=run.heads.pair_names(), classes=run.train_set.classes, unreadable=dict(run.unreadable)))
    atomic_json(os.path.join(out, "results.json"), results)
    best = ", ".join(f"{h} {'diverged' if p['top1'] is None else format(p['top1'], '.2f')}"
                     for h, p in results["best_per_head"].items())
    log.info("epoch %d/%d: top-1 best per head: %s", epoch + 1, run.cfg.epochs, best)


def run_probe(cfg: ProbeConfig) -> dict:
    """Train every (head, lr) pair; returns (and on rank 0 writes) ``results.json``'s content.

    Every flag is checked, and the output folder proven writable, before a model is built."""
    validate(cfg)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        _check_outputs(cfg)
    saved = _read_saved_run(cfg)
    cfg = _resolved(cfg, saved["config"] if saved else None)
    dist_info = init_distributed(cfg.device)
    run = _Run(cfg, dist_info)
    start_epoch, results = _resume(run, saved)
    if dist_info.is_main:
        _write_config(run, start_epoch)
    barrier()
    if cfg.cache_features:
        run.build_cache()
    last = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    for epoch in range(start_epoch, last):
        train, metrics, results = _epoch(run, epoch)
        if dist_info.is_main:
            _write_epoch(run, epoch, train, metrics, results)
        barrier()
    if results is None:
        raise ValueError(f"--output-dir {cfg.output_dir}: no epoch was run and no results were saved")
    if dist_info.is_main and start_epoch >= last:  # nothing left to run: results.json as the checkpoint has them
        atomic_json(os.path.join(cfg.output_dir, "results.json"), results)
    if dist_info.is_main and os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl")):
        plot_curves(cfg.output_dir)  # curves.png: top-1 and loss per epoch, every pair
    return results
