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
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from ..backbone import BackboneSettings
from ..distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shard_indices
from ..profiling import nvtx_range
from .cache import extract, file_stamp, open_store
from .curves import plot_curves
from ..data import collate_skipping, image_folder_datasets, synthetic_datasets
from .heads import ProbeHeads, pair_name, parse_heads, probe_loss
from .outputs import atomic_json, atomic_save, summarize, truncate_metrics
from .optim import build_optimizer, set_lr

log = logging.getLogger("selagg_fast")


@dataclass
class ProbeConfig(BackboneSettings):
    """Every setting of a probing run; defaults are the paper's protocol (App. B.2)."""
    compile_backbone: bool = False
    data: str | None = None
    train_list: str | None = None
    synthetic_train_size: int = 4000
    synthetic_val_size: int = 1000
    synthetic_classes: int = 10
    heads: str = "cls,avg,selective"
    lrs: str = "0.1"
    optimizer: str = "lars"
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 1024
    accum_iter: int = 1
    momentum: float = 0.9
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

    def lr_list(self) -> list:
        try:
            lrs = [float(v) for v in str(self.lrs).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--lrs {self.lrs!r}: expected comma-separated numbers, e.g. 0.05,0.1,0.3") from None
        if not lrs or any(v <= 0 for v in lrs) or len(set(lrs)) != len(lrs):
            raise ValueError(f"--lrs {self.lrs!r}: expected distinct positive base learning rates")
        return lrs


# Settings that change what a run computes; --resume refuses a run whose values differ.
_RESUME_KEYS = ("model", "checkpoint", "return_block", "final_norm", "model_kwargs", "data", "train_list",
                "heads", "lrs", "optimizer", "epochs", "warmup_epochs", "batch_size", "accum_iter", "augment",
                "precision", "seed", "cache_features", "cache_dtype")


def _validate(cfg: ProbeConfig) -> None:
    if cfg.data is None:
        raise ValueError("--data is required: an ImageFolder root with train/ and val/, or 'synthetic'")
    for name in ("epochs", "batch_size", "accum_iter"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.optimizer not in ("lars", "sgd"):
        raise ValueError(f"--optimizer {cfg.optimizer!r}: choose lars or sgd")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision {cfg.precision!r}: choose auto, bf16 or fp32")
    if cfg.cache_features and cfg.augment:
        raise ValueError("--cache-features trains without augmentation: add --no-augment")
    cfg.lr_list()


class _Run:
    """State of one probing run (one per process)."""

    def __init__(self, cfg: ProbeConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
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
        self.compact = cfg.cache_features is not None and not any(s.selective for s in self.specs)
        self.head_prefix = int(self.info.has_cls) if self.compact else self.info.num_prefix_tokens

        if cfg.data == "synthetic":
            self.train_set, self.val_set = synthetic_datasets(
                self.info.img_size, cfg.synthetic_train_size, cfg.synthetic_val_size, cfg.synthetic_classes,
                seed=cfg.seed, augment=cfg.augment)
        else:
            self.train_set, self.val_set = image_folder_datasets(
                cfg.data, self.info.img_size, cfg.train_list, augment=cfg.augment, seed=cfg.seed)
        self.num_classes = len(self.train_set.classes)

        self.effective_batch = cfg.batch_size * cfg.accum_iter * dist_info.world_size
        self.heads = ProbeHeads(self.specs, self.lrs, self.info.embed_dim, self.num_classes,
                                self.head_prefix).to(self.device)
        self.optimizer = build_optimizer(self.heads, cfg.optimizer, self.effective_batch, cfg.momentum,
                                         cfg.weight_decay)
        self.model = self.heads
        # gloo group for host-side agreement (skipping a batch) without a device round trip
        self.control_group = torch.distributed.new_group(backend="gloo") if dist_info.active else None
        if dist_info.active:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.heads, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.unreadable = {"train": 0, "val": 0}

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast(), nvtx_range("backbone"):
            tokens = self.forward_backbone(images)
        if self.compact:
            parts = ([tokens[:, :1]] if self.info.has_cls else []) + \
                    [tokens[:, self.info.num_prefix_tokens:].mean(1, keepdim=True, dtype=torch.float32)]
            tokens = torch.cat([p.to(tokens.dtype) for p in parts], 1)
        return tokens.to(self.autocast_dtype or torch.float32)

    # data ------------------------------------------------------------------------------------
    def _loader(self, dataset, **kw):
        cuda = self.device.type == "cuda"
        return DataLoader(dataset, num_workers=self.cfg.workers, pin_memory=cuda,
                          persistent_workers=False, **kw)

    def live_batches(self, split: str, epoch: int):
        """Yields (images on device, labels on device, n_unreadable) of this process's shard."""
        dataset = self.train_set if split == "train" else self.val_set
        dataset.set_epoch(epoch)
        if split == "train":
            sampler = DistributedSampler(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                         shuffle=True, seed=self.cfg.seed)
            sampler.set_epoch(epoch)
            loader = self._loader(dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                                  collate_fn=collate_skipping)
        else:
            shard = Subset(dataset, shard_indices(len(dataset), self.dist.rank, self.dist.world_size))
            loader = self._loader(shard, batch_size=self.cfg.batch_size, collate_fn=collate_skipping)
        for images, labels, _idx, skipped in loader:
            if split == "train" and not self._every_rank_has_images(images is not None):
                images = None  # a training step is taken by all processes or by none (collectives inside)
            if images is None:
                yield None, None, len(skipped)
                continue
            with nvtx_range("data"):
                yield (self.tokens(images.to(self.device, non_blocking=True)),
                       labels.to(self.device, non_blocking=True), len(skipped))

    def _every_rank_has_images(self, mine: bool) -> bool:
        """False when some process's batch was entirely unreadable (a CPU all-reduce: no GPU sync)."""
        if not self.dist.active:
            return mine
        flag = torch.tensor([int(mine)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.control_group)
        return bool(flag.item())

    def cached_batches(self, split: str, epoch: int):
        store = self.stores[split]
        valid = store.valid_indices()
        if split == "train":
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            order = valid[torch.randperm(len(valid), generator=g).numpy()]
            per_rank = -(-len(order) // self.dist.world_size)
            order = np.resize(order, per_rank * self.dist.world_size)  # pad like DistributedSampler
            mine = order[self.dist.rank::self.dist.world_size]
        else:
            mine = valid[self.dist.rank::self.dist.world_size]
        bs = self.cfg.batch_size
        batches = [mine[i:i + bs] for i in range(0, len(mine), bs)]
        loader = self._loader(store.batches(batches), batch_size=None)
        for tokens, labels in loader:
            with nvtx_range("data"):
                yield (tokens.to(self.device, non_blocking=True).to(self.autocast_dtype or torch.float32),
                       labels.to(self.device, non_blocking=True), 0)

    def batches(self, split: str, epoch: int):
        return (self.cached_batches if self.cfg.cache_features else self.live_batches)(split, epoch)

    def num_batches(self, split: str) -> int:
        if self.cfg.cache_features:
            n = len(self.stores[split].valid_indices())
        else:
            n = len(self.train_set if split == "train" else self.val_set)
        per_rank = -(-n // self.dist.world_size) if split == "train" else len(range(self.dist.rank, n, self.dist.world_size))
        return max(1, -(-per_rank // self.cfg.batch_size))

    # feature cache ---------------------------------------------------------------------------
    def build_cache(self) -> None:
        """Open (extracting what is missing) the train and val token stores of this run."""
        cfg = self.cfg
        with torch.no_grad():
            probe = self.tokens(torch.zeros(1, 3, self.info.img_size, self.info.img_size, device=self.device))
        self.stores = {}
        for split, dataset in (("train", self.train_set), ("val", self.val_set)):
            settings = dict(
                split=split, model=cfg.model, model_kwargs=cfg.model_kwargs, return_block=cfg.return_block,
                final_norm=cfg.final_norm, compact=self.compact, precision=str(self.autocast_dtype),
                checkpoint=cfg.checkpoint, checkpoint_stat=file_stamp(cfg.checkpoint), data=cfg.data,
                train_list=cfg.train_list, num_samples=len(dataset),
                synthetic=[cfg.synthetic_train_size, cfg.synthetic_val_size, cfg.synthetic_classes, cfg.seed]
                if cfg.data == "synthetic" else None)
            store = open_store(cfg.cache_features, settings, dataset, tuple(probe.shape[1:]), cfg.cache_dtype,
                               cfg.batch_size, is_main=self.dist.is_main, barrier=barrier)
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
    start, images_done, unreadable = time.perf_counter(), 0, 0
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
    run.unreadable["train_live"] = unreadable
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
    unreadable = 0
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
        run.unreadable["val"] = int(all_reduce_sum(torch.tensor(unreadable, device=run.device)).item())
    acc = (100.0 * correct / total.clamp(min=1)).tolist()
    return {name: dict(top1=a[0], top5=a[1]) for name, a in zip(names, acc)}


def run_probe(cfg: ProbeConfig) -> dict:
    """Train every (head, lr) pair; returns (and on rank 0 writes) ``results.json``'s content."""
    _validate(cfg)
    dist_info = init_distributed(cfg.device)
    run = _Run(cfg, dist_info)
    out = cfg.output_dir
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if dist_info.is_main:
        os.makedirs(out, exist_ok=True)
    start_epoch, results = 0, None
    if cfg.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=run.device, weights_only=False)
        old = state["config"]
        changed = {k: (old.get(k), getattr(cfg, k)) for k in _RESUME_KEYS if old.get(k) != getattr(cfg, k)}
        if changed:
            raise ValueError(f"--resume: {out} was started with different settings {changed}")
        run.heads.load_state_dict(state["heads"])
        run.optimizer.load_state_dict(state["optimizer"])
        start_epoch, results = state["epoch"], state.get("results")
        log.info("resuming %s after epoch %d", out, start_epoch)
    elif os.path.exists(ckpt_path):
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose another "
                              "--output-dir")
    if dist_info.is_main:
        atomic_json(os.path.join(out, "config.json"), dict(
            **dataclasses.asdict(cfg), world_size=dist_info.world_size, effective_batch=run.effective_batch,
            backbone=dataclasses.asdict(run.info), head_prefix_tokens=run.head_prefix,
            pairs=run.heads.pair_names(), classes=run.train_set.classes))
        truncate_metrics(os.path.join(out, "metrics.jsonl"), start_epoch)
    barrier()
    if cfg.cache_features:
        run.build_cache()

    last = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    for epoch in range(start_epoch, last):
        train = _train_epoch(run, epoch)
        metrics = evaluate(run, epoch)
        results = summarize(
            [(spec.name, lr, metrics[pair_name(spec, lr)]) for spec, lr in run.heads.pairs],
            model=cfg.model, checkpoint=cfg.checkpoint, epochs_done=epoch + 1, val_images=len(run.val_set),
            train_images=len(run.train_set), num_classes=run.num_classes, unreadable_images=run.unreadable,
            train_images_per_s=train["images_per_s"])
        if dist_info.is_main:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                for spec, lr in run.heads.pairs:
                    name = pair_name(spec, lr)
                    group = run.optimizer.param_groups[run.heads.pairs.index((spec, lr))]
                    f.write(json.dumps(dict(epoch=epoch + 1, head=spec.name, base_lr=lr, lr=group["lr"],
                                            train_loss=train["losses"][name], **metrics[name],
                                            images_per_s=train["images_per_s"])) + "\n")
            atomic_save(ckpt_path, dict(epoch=epoch + 1, heads=run.heads.state_dict(),
                                         optimizer=run.optimizer.state_dict(), config=dataclasses.asdict(cfg),
                                         backbone=dataclasses.asdict(run.info), results=results,
                                         pairs=run.heads.pair_names(), classes=run.train_set.classes))
            atomic_json(os.path.join(out, "results.json"), results)
            best = ", ".join(f"{h} {p['top1']:.2f}" for h, p in results["best_per_head"].items())
            log.info("epoch %d/%d: top-1 best per head: %s", epoch + 1, cfg.epochs, best)
        barrier()
    if results is None:
        raise RuntimeError("no epoch was run (already finished? see results.json)")
    if dist_info.is_main and os.path.exists(os.path.join(out, "metrics.jsonl")):
        plot_curves(out)  # curves.png: top-1 and loss per epoch, every pair
    return results
