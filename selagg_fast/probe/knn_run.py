"""`selagg-fast probe --knn`: weighted k-NN of the linear probe's representation, every (k, T).

The representation is the linear probe's: ``[cls]``, or the patch mean for a backbone without
``[cls]``; two variants where the backbone has a final norm: ``raw`` (the probed block's tokens,
as the heads see them) and ``final_norm`` (the backbone's final norm applied to that vector; for
``[cls]`` exactly the normed token, for the patch mean the norm of the mean). With
``--final-norm`` the tokens are normed already and ``final_norm`` is the only variant.

Features are never augmented (DINO's protocol: resize + center crop for train and val). With
``--cache-features`` they are read from the cache (extracted with --no-augment: no backbone pass
at all); otherwise one pass over the training and validation images at the validation transform
runs before the first epoch, since the training epochs see augmented images.

Under torchrun each process extracts every W-th image of each split; the training features are
all-gathered (every process votes against the whole training set) and each process votes for its
own validation share; the hit counts are summed.
"""
from __future__ import annotations

import copy
import logging
import time

import torch
import torch.distributed as dist

from ..data import SeededTransform, collate_skipping, split_batches
from ..distributed import all_reduce_sum
from ..files import parse_number_list
from ..knn import knn_counts

log = logging.getLogger("selagg_fast")

GIB = 1 << 30


def parse_ks(text: str) -> list:
    return parse_number_list("--knn-k", text, integer=True, example="10,20,100")


def parse_temperatures(text: str) -> list:
    return parse_number_list("--knn-temperatures", text, example="0.07,0.1")


def representation_name(has_cls: bool) -> str:
    return "cls" if has_cls else "avg"


def representation(tokens: torch.Tensor, has_cls: bool, num_prefix: int, compact: bool) -> torch.Tensor:
    """``[B, D]``: ``[cls]``, or the patch mean without ``[cls]``, from full tokens ``[B, T, D]`` or a
    compact cache's ``[B, 1 or 2, D]`` (``[cls]`` first, the patch mean last)."""
    if has_cls:
        return tokens[:, 0]
    if compact:
        return tokens[:, -1]
    return tokens[:, num_prefix:].mean(1, dtype=torch.float32).to(tokens.dtype)


def final_norm_of(backbone, already_normed: bool):
    """The backbone's final norm as an fp32 copy, or None when it has none (an Identity, a family
    without one), its checkpoint left it at init, or the tokens are normed already."""
    norm = getattr(backbone.model, "norm", None)
    if already_normed or norm is None or isinstance(norm, torch.nn.Identity):
        return None
    if not backbone.info.final_norm_loaded:
        log.info("k-NN: the checkpoint has no final norm: the 'raw' variant only")
        return None
    return copy.deepcopy(norm).float().eval()


def _features(run, split: str) -> tuple:
    """This process's ``{variant: [n, D]}`` and labels ``[n]`` of ``split``, on the run's device."""
    cfg, info = run.cfg, run.info
    variants = {"final_norm" if cfg.final_norm else "raw": []}
    norm = final_norm_of(run.backbone, cfg.final_norm)
    if norm is not None:
        variants["final_norm"] = []
    labels = []
    store_dtype = run.autocast_dtype or torch.float32

    def add(tokens, y):
        if isinstance(tokens, (tuple, list)):  # a cache with attention weights: the tokens only
            tokens = tokens[0]
        rep = representation(tokens, info.has_cls, info.num_prefix_tokens, run.compact)
        first = next(iter(variants))
        variants[first].append(rep.to(store_dtype))
        if norm is not None:
            with torch.no_grad():
                variants["final_norm"].append(norm.to(rep.device)(rep.float()).to(store_dtype))
        labels.append(y.to(rep.device))

    rank, world = run.dist.rank, run.dist.world_size
    if cfg.cache_features:
        store = run.stores[split]
        mine = store.valid_indices()[rank::world].tolist()
        loader = run._loader(store.batches(split_batches(mine, cfg.batch_size, False)), batch_size=None)
        for tokens, y in loader:
            if isinstance(tokens, (tuple, list)):
                tokens = tokens[0]
            add(tokens.to(run.device), y)
    else:
        dataset = run.val_set if split == "val" else SeededTransform(run.train_set.base, run.val_set.transform,
                                                                       cfg.seed)
        batches = split_batches(list(range(rank, len(dataset), world)), cfg.batch_size, False)
        for images, y, _idx, _skipped in run._loader(dataset, batch_sampler=batches, collate_fn=collate_skipping):
            if images is None:
                continue
            with torch.no_grad(), run.autocast():
                tokens = run.forward_backbone(images.to(run.device, non_blocking=True))
            add(tokens, y)
    # a process without a readable image still sends the others' dtype to the all-gather
    dim = info.embed_dim
    out = {name: torch.cat(rows) if rows else torch.zeros(0, dim, device=run.device, dtype=store_dtype)
           for name, rows in variants.items()}
    return out, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=run.device)


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows, concatenated in rank order (shares may differ by a row)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    world = dist.get_world_size()
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    # gloo has no bf16 all-gather: such rows travel as fp32
    wire = torch.float32 if dist.get_backend() == "gloo" and x.dtype == torch.bfloat16 else x.dtype
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=wire, device=x.device)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.dtype)


def run_knn(run) -> dict:
    """``results.json``'s ``knn``: every (variant, k, T) top-1 / top-5 and the best (by top-1)."""
    cfg = run.cfg
    ks, temperatures = parse_ks(cfg.knn_k), parse_temperatures(cfg.knn_temperatures)
    start = time.perf_counter()
    train, train_labels = _features(run, "train")
    val, val_labels = _features(run, "val")
    train = {name: _all_gather_rows(f) for name, f in train.items()}
    train_labels = _all_gather_rows(train_labels)
    extracted = time.perf_counter()
    total = torch.tensor([len(val_labels)], dtype=torch.float64, device=run.device)
    all_reduce_sum(total)
    variants = {}
    for name, features in train.items():
        if len(val_labels):
            hits, ks_sorted, ts = knn_counts(features, train_labels, val[name], val_labels, ks=ks,
                                             temperatures=temperatures, num_classes=run.num_classes,
                                             memory_bytes=int(cfg.knn_memory_gb * GIB))
        else:  # a process without validation images (more processes than images) still joins the sum
            ks_sorted, ts = sorted(ks), temperatures
            hits = torch.zeros(len(ks), len(ts), 2, dtype=torch.int64)
        hits = hits.to(run.device)
        all_reduce_sum(hits)
        pct = (100.0 * hits.double().cpu() / max(float(total.item()), 1.0)).tolist()
        pairs = [dict(k=k, T=t, top1=pct[i][j][0], top5=pct[i][j][1])
                 for i, k in enumerate(ks_sorted) for j, t in enumerate(ts)]
        variants[name] = dict(pairs=pairs, best=max(pairs, key=lambda p: p["top1"]))
    best_name = max(variants, key=lambda n: variants[n]["best"]["top1"])
    result = dict(representation=representation_name(run.info.has_cls),
                  source="feature cache" if cfg.cache_features else "validation-transform pass",
                  ks=sorted(ks), temperatures=temperatures, train_images=len(train_labels),
                  val_images=int(total.item()), variants=variants,
                  best=dict(variant=best_name, **variants[best_name]["best"]),
                  seconds=dict(features=extracted - start, vote=time.perf_counter() - extracted))
    b = result["best"]
    log.info("k-NN (%s, %s features): best top-1 %.2f at k=%d, T=%g (%d train, %d val images, %.1f s vote)",
             result["representation"], b["variant"], b["top1"], b["k"], b["T"], result["train_images"],
             result["val_images"], result["seconds"]["vote"])
    return result


def format_knn(knn: dict) -> str:
    """One line per variant: its best (k, T) and top-1 / top-5."""
    lines = []
    for name, v in knn["variants"].items():
        b = v["best"]
        lines.append(f"k-NN {knn['representation']} {name:<10} best top-1 {b['top1']:6.2f}  top-5 {b['top5']:6.2f}  "
                     f"(k={b['k']}, T={b['T']:g}; {len(v['pairs'])} settings)")
    return "\n".join(lines)
