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
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..backbone import BackboneSettings
from ..datasets import check_data_flags
from ..distributed import DistInfo, all_reduce_sum, barrier, check_device, init_distributed
from ..files import (CheckpointError, absolute_path, check_number, check_writable, interrupts_deferred, load_torch_file,
                     refuse_existing_run, run_holding_output)
from ..precision import PRECISIONS
from ..profiling import nvtx_range
from .curves import plot_curves
from .data_plan import DataPlan, num_train_images, read_splits
from .knn_run import parse_ks, parse_temperatures, run_knn
from .heads import pair_name, parse_heads, parse_lrs, probe_loss
from .optim import set_lr
from .probe_model import ProbeModel
from .sizes import check_fits, head_sizes, seeds_sizes
from .selector import check_selector_flags
from .outputs import append_metrics, atomic_json, atomic_save, summarize, summarize_seeds, truncate_metrics
from .seeds import SeedHeads, parse_seeds
from .tokens import TokenSource

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
                "synthetic_train_size", "synthetic_val_size", "synthetic_classes",
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
    """One probing run (one per process), composed of its three parts: ``source`` (a
    :class:`TokenSource`: backbone, selector, tokens, cache extraction), ``plan`` (a
    :class:`DataPlan`: datasets, loaders, sharding, unreadable counts) and ``probe`` (a
    :class:`ProbeModel`: every seed's heads, optimizer, DDP, checkpoint state)."""

    def __init__(self, cfg: ProbeConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        self.protocol = PROTOCOLS[cfg.protocol]
        torch.manual_seed(cfg.seed)

        # the data's files first: a class-folder, --train-list or --knn-k error costs no backbone build
        splits = read_splits(cfg)
        num_train = num_train_images(cfg, splits)
        if cfg.knn and max(parse_ks(cfg.knn_k)) > num_train:
            raise ValueError(f"--knn-k {cfg.knn_k}: k {max(parse_ks(cfg.knn_k))} is more than the "
                             f"{num_train} training images")
        self.source = source = TokenSource(cfg, self.device)
        self.lrs = cfg.lr_list()
        self.plan = plan = DataPlan(cfg, dist_info, self.protocol.drop_last, source.info.img_size, splits,
                                    tokens=source.tokens, token_dtype=source.token_dtype)
        self.effective_batch = cfg.batch_size * cfg.accum_iter * dist_info.world_size
        check_fits(seeds_sizes(head_sizes(source.specs, self.lrs, source.info.embed_dim, plan.num_classes,
                                          source.head_prefix, grid_size=source.info.patch_grid),
                               len(cfg.seed_list())),
                   cfg.heads, cfg.batch_size, self.device, cfg.output_dir)
        plan.start_control_group()
        self.probe = ProbeModel(
            source.specs, self.lrs, cfg.seed_list(), source.info.embed_dim, plan.num_classes, source.head_prefix,
            grid_size=source.info.patch_grid, classifier_init=self.protocol.classifier_init,
            optimizer=cfg.optimizer, effective_batch=self.effective_batch, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, device=self.device, ddp=dist_info.active)
        # the parts' members that the epoch loop, k-NN (knn_run.py) and the outputs read
        self.backbone, self.info, self.forward_backbone = source.backbone, source.info, source.forward_backbone
        self.specs, self.compact, self.selection = source.specs, source.compact, source.selection
        self.head_prefix, self.autocast_dtype = source.head_prefix, source.autocast_dtype
        self.train_set, self.val_set, self.num_classes = plan.train_set, plan.val_set, plan.num_classes
        self.stores, self.unreadable = plan.stores, plan.unreadable
        self.seed_heads = self.probe.seed_heads
        first = self.probe.first
        self.heads, self.optimizer, self.model, self.diverged = first.heads, first.optimizer, first.model, first.diverged

    def autocast(self):
        return self.source.autocast()

    def tokens(self, images: torch.Tensor):
        return self.source.tokens(images)

    def _loader(self, dataset, **kw):
        return self.plan.loader(dataset, **kw)

    def batches(self, split: str, epoch: int, order_seed: int | None = None):
        return self.plan.batches(split, epoch, order_seed)

    def live_batches(self, split: str, epoch: int):
        return self.plan.live_batches(split, epoch)

    def cached_batches(self, split: str, epoch: int, order_seed: int | None = None):
        return self.plan.cached_batches(split, epoch, order_seed)

    def num_batches(self, split: str) -> int:
        return self.plan.num_batches(split)

    def note_unreadable(self, split: str, indices) -> None:
        self.plan.note_unreadable(split, indices)

    def build_cache(self) -> None:
        """Open (extracting what is missing) the train and val token stores of this run."""
        self.plan.use_stores(self.source.open_stores(self.plan.datasets, self.plan.loader, self.dist))


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
        # The step follows the batch count, not the batches read: a skipped batch (unreadable on
        # some process, skipped by all) at a step boundary still ends its accumulation window, so
        # no window doubles and no gradient carries into the next epoch.
        step_now = (it + 1) % cfg.accum_iter == 0 or it + 1 == n_batches
        if tokens is not None:
            for g, member in enumerate(group):  # one backbone pass, every seed's heads on it
                sync = member.model.no_sync() if run.dist.active and not step_now else contextlib.nullcontext()
                with sync, nvtx_range("heads"), run.autocast():
                    logits = member.model(tokens)
                    loss, per_pair = probe_loss(logits, labels)
                    (loss / cfg.accum_iter).backward()
                loss_sums[g] += torch.stack([per_pair[n].detach() for n in names]).double() * len(labels)
            seen += len(labels)
            images_done += len(labels)
        if step_now:
            for member in group:
                _step(member, synced=tokens is not None, dist=run.dist)
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


def _step(member, synced: bool, dist) -> None:
    """The optimizer step that ends an accumulation window, then cleared gradients. ``synced``:
    DDP all-reduced the window's gradients in its last backward; when that batch was skipped the
    earlier ones ran under ``no_sync``, so they are averaged over the processes here. A window
    with no batch read steps nothing."""
    grads = [p.grad for p in member.model.parameters() if p.grad is not None]
    if not grads:
        return
    if dist.active and not synced:
        for grad in grads:
            torch.distributed.all_reduce(grad)
            grad.div_(dist.world_size)
    member.optimizer.step()
    member.optimizer.zero_grad(set_to_none=True)


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
    return absolute_path(value, keep=("synthetic",) if key == "data" else ())


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
            changed.append((k, f"--{k.replace('_', '-')} {_flag_value(k, then)} then, "
                               f"{_flag_value(k, getattr(cfg, k))} now"))
    if any(k == "seeds" for k, _ in changed):  # the seed follows the seeds (their first): one line says it
        changed = [(k, text) for k, text in changed if k != "seed"]
    return [text for _, text in changed]


def _flag_value(key: str, value) -> str:
    """A setting as its flag is written: ``--seeds 0,1`` (``none`` when not given), else the value's repr."""
    if key == "seeds":
        return "none" if value is None else ",".join(map(str, value))
    return repr(value)


def saved_run_config(out: str) -> dict | None:
    """The settings ``out/config.json`` records, or None (a missing or unreadable file is left to
    the run's own checks, which name it)."""
    try:
        with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _saved_world_size(out: str) -> int | None:
    """The process count config.json records (checkpoints written before they recorded it)."""
    world = (saved_run_config(out) or {}).get("world_size")
    return world if isinstance(world, int) else None


def _resume(run: _Run, saved: dict | None) -> tuple:
    """Load the saved heads and optimizer into ``run``; returns (first epoch to run, last results)."""
    if saved is None:
        return 0, None
    old, cfg = saved["config"], run.cfg
    changed = _changed_settings(old, cfg)
    if changed:
        raise ValueError(f"--resume: {cfg.output_dir} was started with different settings: {'; '.join(changed)}")
    # the global batch (and with it each pair's peak lr and the epoch's batches) follows the process
    # count: another count would continue a different run
    then_procs, now_procs = saved.get("world_size", _saved_world_size(cfg.output_dir)), run.dist.world_size
    if then_procs is not None and then_procs != now_procs:
        per_step = cfg.batch_size * cfg.accum_iter
        raise ValueError(f"--resume: {cfg.output_dir} ran on {then_procs} process(es) (global batch "
                         f"{per_step * then_procs}), this run has {now_procs} (global batch {per_step * now_procs}); "
                         f"resume it with {then_procs} (torchrun --nproc_per_node {then_procs}, or no torchrun "
                         "for 1) or start a new run in another --output-dir")
    then, now = list(saved.get("classes") or []), list(run.train_set.classes)
    if then and then != now:
        added, removed = [c for c in now if c not in then], [c for c in then if c not in now]
        raise ValueError(f"--resume: the classes of --data {cfg.data} changed since {cfg.output_dir} was started "
                         f"(added: {', '.join(added[:10]) or 'none'}; removed: {', '.join(removed[:10]) or 'none'}"
                         f"{'' if added or removed else '; reordered'}); start a new run in another --output-dir")
    run.probe.load(saved, cfg.output_dir)
    for k, v in saved.get("unreadable", {}).items():
        run.unreadable[k] = v
    log.info("resuming %s after epoch %d", cfg.output_dir, saved["epoch"])
    return saved["epoch"], saved.get("results")


def _write_config(run: _Run, start_epoch: int, command: str | None) -> None:
    """config.json: every setting, and ``command`` (this invocation's command line) with
    ``commands`` (every invocation of the run, a resumed run's earlier ones first)."""
    out = run.cfg.output_dir
    path = os.path.join(out, "config.json")
    commands = []
    old = saved_run_config(out) if run.cfg.resume else None  # earlier invocations, a start without an epoch too
    if old:
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
        epoch=epoch + 1, **run.probe.state(with_seeds=run.cfg.seeds is not None),
        config=dataclasses.asdict(run.cfg), backbone=dataclasses.asdict(run.info), results=results,
        pairs=run.heads.pair_names(), classes=run.train_set.classes, unreadable=dict(run.unreadable),
        world_size=run.dist.world_size))
    atomic_json(os.path.join(out, "results.json"), results)
    best = ", ".join(f"{h} {'diverged' if p['top1'] is None else format(p['top1'], '.2f')}"
                     for h, p in results["best_per_head"].items())
    mean = f" (mean of seeds {', '.join(map(str, run.cfg.seeds))})" if run.cfg.seeds is not None else ""
    log.info("epoch %d/%d: top-1 best per head%s: %s", epoch + 1, run.cfg.epochs, mean, best)


def _knn(run: _Run, saved_results: dict | None) -> dict | None:
    """``results.json``'s ``knn`` with --knn: a resumed run's when it has the same k and T lists,
    else computed now (before the first epoch of this invocation)."""
    cfg = run.cfg
    if not cfg.knn:  # none computed; a resumed run's saved result stays in results.json
        return (saved_results or {}).get("knn")
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
    return run_holding_output(
        cfg.output_dir, lambda is_main: _run_locked(cfg, is_main, command),
        lambda: f"interrupted after epoch {_epochs_saved(cfg.output_dir)} of {cfg.epochs}; continue with --resume")


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
    if cfg.cache_features:  # before config.json: a stale or failed store leaves no run file behind
        run.build_cache()
    if dist_info.is_main:
        _write_config(run, start_epoch, command)
    barrier()
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
