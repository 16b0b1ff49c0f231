"""`selagg-fast compare`: trained and non-trainable token selections side by side (paper Table 5, Figs. 7, 9).

On a folder of validation images, every method's weight vector over the patch tokens of the
probed block: the probe run's trained selective / attentive heads (best learning rate per head,
branches or heads averaged), the non-trainable attention selections of
:mod:`selagg_fast.selection` and, with ``--selector-model``, another model's [cls] attention.
One backbone pass per batch gives the probe's tokens and the probed block's attention rows of
the [cls] and central tokens at once. Per method the entropy (nats) and, per pair of methods,
``KL(a_m || a_n)`` are summed over the images in float64 on the device; ``torchrun`` shards the
batches and ``--resume`` continues from the per-process running sums, as ``analyze`` does.
Entropies and divergences are of the renormalised vectors (each sums to 1 over the patches).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field

import torch

from ..attention_methods import ATTENTION_METHODS, BY_HEAD, attention_method
from ..backbone import BackboneSettings
from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..datasets import analysis_dataset
from ..distributed import all_reduce_sum, barrier, init_distributed
from ..files import (absolute_path, atomic_json, atomic_write, check_number, check_writable, refuse_existing_run,
                     run_holding_output)
from ..precision import uses_bf16
from ..probe.heads import ProbeHeads, canonical_pair_name, pair_name, parse_heads, parse_lrs
from ..probe.selector import AttentionWeights, build_selector, check_selector_backbone
from ..attention_adapters import token_layout
from .analyze import check_image_pass
from .image_pass import INTERRUPTED, ImagePass
from .probe_maps import diverged_pairs, probe_run_state, refuse_diverged, upsample

log = logging.getLogger("selagg_fast")

EPS = 1e-12  # weights clamped here inside the logarithms (a float32 softmax weight can be 0)
# An attention method goes by its probe head's name (attention_methods), so a probe run's top-1 of
# that head goes beside it; --methods also takes the method's other names.
SELECTOR = next(m.head for m in ATTENTION_METHODS if m.selector)  # --selector-model's last-block [cls] attention
# the names the running sums' settings record: a run's partial sums saved under a method's weights
# name (or selector_cls) resume whichever name the command line gives
_SETTINGS_NAME = {m.head: "selector_cls" if m.selector else m.weights for m in ATTENTION_METHODS}


def method_label(method: str) -> str:
    """A method's title in the table and figures: the attention method's label, else its name."""
    return BY_HEAD[method].label if method in BY_HEAD else method


@dataclass
class CompareConfig:
    probe: str | None = None
    data: str | None = None
    dataset: str = "imagefolder"
    methods: str | None = None
    limit: int | None = None
    batch_size: int = 256
    workers: int = 8
    precision: str = "auto"
    output_dir: str = "compare_out"
    resume: bool = False
    save_every: int = 20
    examples: int = 4
    device: str = "auto"
    progress: bool = True
    trust_checkpoint: bool = False
    selector_model: str | None = None
    selector_checkpoint: str | None = None
    selector_checkpoint_key: str | None = None
    selector_random_init: bool = False
    selector_model_kwargs: dict = field(default_factory=dict)


class DivergenceSums:
    """Running float64 sums over images of each method's entropy (and its square) and of
    ``KL(a_m || a_n)`` for every ordered pair: memory flat in the number of images."""

    def __init__(self, num_methods: int, device):
        self.images = 0
        self.entropy = torch.zeros(num_methods, dtype=torch.float64, device=device)
        self.entropy_sq = torch.zeros_like(self.entropy)
        self.kl = torch.zeros(num_methods, num_methods, dtype=torch.float64, device=device)

    def update(self, weights: torch.Tensor) -> None:
        """``weights``: ``[B, M, N]``, each row summing to 1."""
        a = weights.double()
        log_a = a.clamp_min(EPS).log()
        neg_entropy = (a * log_a).sum(-1)  # [B, M]
        self.entropy -= neg_entropy.sum(0)
        self.entropy_sq += (neg_entropy * neg_entropy).sum(0)
        # KL(a_m || a_n) = sum_j a_m (log a_m - log a_n), summed over the images
        self.kl += neg_entropy.sum(0)[:, None] - torch.einsum("bmj,bnj->mn", a, log_a)
        self.images += a.shape[0]

    def all_reduce(self) -> None:
        count = torch.tensor([float(self.images)], dtype=torch.float64, device=self.entropy.device)
        for t in (self.entropy, self.entropy_sq, self.kl, count):
            all_reduce_sum(t)
        self.images = int(count.item())

    def state_dict(self) -> dict:
        return dict(images=self.images, entropy=self.entropy.cpu(), entropy_sq=self.entropy_sq.cpu(),
                    kl=self.kl.cpu())

    def load_state_dict(self, state: dict) -> None:
        device = self.entropy.device
        self.images = int(state["images"])
        self.entropy, self.entropy_sq, self.kl = (state[k].to(device) for k in ("entropy", "entropy_sq", "kl"))

    def summary(self) -> dict:
        n = max(self.images, 1)
        mean = self.entropy / n
        std = (self.entropy_sq / n - mean * mean).clamp_min(0).sqrt()
        kl = (self.kl / n).clone()
        kl.fill_diagonal_(0.0)  # KL(a || a) = 0 exactly (the sums differ in rounding only)
        return dict(entropy_mean=mean.cpu().tolist(), entropy_std=std.cpu().tolist(), kl=kl.cpu().tolist())


def _probe_state(run_dir: str) -> dict:
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--probe {run_dir}: no such folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--probe {run_dir}: no checkpoint.pt (a `selagg-fast probe` output folder?)")
    return probe_run_state(path)


def validate_compare(cfg: CompareConfig) -> None:
    """Flags checked before a model is built or an image read."""
    if cfg.probe is None:
        raise ValueError("--probe is required: a `selagg-fast probe` output folder")
    if not os.path.isfile(os.path.join(cfg.probe, "checkpoint.pt")):
        _probe_state(cfg.probe)  # raises with the reason
    check_image_pass(cfg)
    check_number("--examples", cfg.examples, minimum=0, integer=True)
    check_selector_backbone(cfg)
    if cfg.methods is not None and not [m for m in cfg.methods.split(",") if m.strip()]:
        raise ValueError("--methods: empty list")


def _best_pairs(state: dict, heads: ProbeHeads) -> dict:
    """Trained selective / attentive pairs: head name -> its best-lr pair name (by top-1)."""
    top1 = {pair_name(p["head"], p["base_lr"]): p["top1"] for p in state.get("results", {}).get("pairs", [])}
    best = {}
    for spec, lr in heads.pairs:
        if not spec.learns_weights:
            continue
        name = pair_name(spec, lr)
        score = top1.get(name)
        score = -1.0 if score is None else score
        if spec.name not in best or score > best[spec.name][1]:
            best[spec.name] = (name, score)
    return {head: name for head, (name, _) in best.items()}


def choose_methods(requested: str | None, has_cls: bool, selector: bool, trained: dict, pairs: list):
    """``(methods, omitted)``: method names in order and the [cls] methods left out (with why)."""
    own = [m for m in ATTENTION_METHODS if not m.selector]
    available = [m.head for m in own if has_cls or not m.needs_cls] + ([SELECTOR] if selector else [])
    if requested is None:
        methods = list(trained.values()) + available
        omitted = [] if has_cls else [m.head for m in own if m.needs_cls]
        return methods, omitted
    methods = []
    for name in [canonical_pair_name(m.strip()) for m in requested.split(",") if m.strip()]:
        if name in trained:  # a head name: its best learning rate
            name = trained[name]
        elif attention_method(name) is not None:  # any of an attention method's names: its head's
            name = attention_method(name).head
        if name in BY_HEAD and BY_HEAD[name].needs_cls and not has_cls:
            raise ValueError(f"--methods {name}: the probed model has no [cls] token (center_attn works)")
        if name == SELECTOR and not selector:
            raise ValueError(f"--methods {SELECTOR}: pass --selector-model")
        if name not in available and name not in pairs:
            raise ValueError(f"--methods {name!r}: unknown; choose from {', '.join(list(trained) + pairs + available)}")
        if name not in methods:
            methods.append(name)
    return methods, []


def _spread(batches: int, count: int) -> dict:
    """``{batch position: images to take}``: ``count`` example images from ``batches`` batches, one
    per batch at evenly spaced positions (the rest from the last pick when batches are fewer)."""
    if batches == 0 or count == 0:
        return {}
    positions = sorted({i * batches // count for i in range(count)})
    picks = dict.fromkeys(positions, 1)
    picks[positions[-1]] += count - len(positions)
    return picks


def _examples_figure(path: str, images: torch.Tensor, weights: torch.Tensor, methods: list, grid) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, size = len(images), images.shape[-1]
    shown = (images.permute(0, 2, 3, 1) * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)).clamp(0, 1)
    cols = len(methods) + 1
    fig, axes = plt.subplots(max(n, 1), cols, figsize=(2.2 * cols, 2.3 * max(n, 1)), squeeze=False,
                             constrained_layout=True)
    for i in range(n):
        axes[i, 0].imshow(shown[i].numpy())
        for j, m in enumerate(methods):
            heat = upsample(weights[i:i + 1, j].reshape(1, *grid), size)[0]
            axes[i, j + 1].imshow(shown[i].numpy())
            axes[i, j + 1].imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                axes[i, j + 1].set_title(method_label(m), fontsize=8)
    if n:
        axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path


def write_figures(out: str, result: dict, examples: dict | None) -> list:
    """``kld.png`` (the KL matrix, Fig. 7), ``entropy.png`` (bars, log N marked) and ``maps.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = result["methods"]
    labels = [method_label(m) for m in methods]
    kl = np.asarray(result["kl"])
    written = []
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 3, 1.0 * len(methods) + 2.5), constrained_layout=True)
    im = ax.imshow(kl, cmap="viridis")
    ax.set_xticks(range(len(methods)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), labels, fontsize=8)
    ax.set_xlabel("n")
    ax.set_ylabel("m")
    for i in range(len(methods)):
        for j in range(len(methods)):
            ax.text(j, i, f"{kl[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if kl[i, j] < kl.max() / 2 else "black")
    fig.colorbar(im, ax=ax, label="mean KL(a_m || a_n), nats")
    ax.set_title(f"{result['model']}: mean KL over {result['images']} images")
    written.append(atomic_write(os.path.join(out, "kld.png"), lambda tmp: fig.savefig(tmp, dpi=100, format="png")))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.1 * len(methods) + 3, 3.8), constrained_layout=True)
    ax.bar(range(len(methods)), result["entropy_mean"], yerr=result["entropy_std"], color="tab:blue", capsize=3)
    ax.axhline(result["max_entropy"], color="grey", ls="--", label=f"log N = {result['max_entropy']:.2f} (uniform)")
    ax.set_xticks(range(len(methods)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("entropy of the weights (nats)")
    ax.legend(fontsize=8, loc="lower right")
    written.append(atomic_write(os.path.join(out, "entropy.png"),
                                lambda tmp: fig.savefig(tmp, dpi=100, format="png")))
    plt.close(fig)
    if examples is not None:
        written.append(_examples_figure(os.path.join(out, "maps.png"), examples["images"], examples["weights"],
                                        methods, tuple(result["patch_grid"])))
    return written


class _Methods:
    """Every method's ``[B, M, N]`` weights from one backbone pass (plus one selector pass): the
    attention methods through the probe's own :class:`~selagg_fast.probe.selector.AttentionWeights`
    (the selector's row renormalised here: compare measures the weight vectors' shapes)."""

    def __init__(self, backbone, heads, methods: list, selector=None):
        self.backbone, self.heads, self.methods = backbone, heads, methods
        P, _, grid = token_layout(backbone)
        self.N = grid[0] * grid[1]
        self.attention_methods = [BY_HEAD[m].weights for m in methods if m in BY_HEAD]
        self.attention = AttentionWeights(backbone, self.attention_methods, selector)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tokens, attention = self.attention(self.backbone, images)
        out = []
        for m in self.methods:
            if m in BY_HEAD:
                w = attention[:, self.attention_methods.index(BY_HEAD[m].weights)]
            else:  # a trained pair: branches / heads averaged, the patch part
                w = self.heads.trained_weights(tokens, m).float().mean(1)[:, -self.N:]
            out.append(w.float() / w.float().sum(-1, keepdim=True))  # renormalised over the patches
        return torch.stack(out, 1)


# What a compare run writes: any of them in --output-dir means a run, refused without --resume.
COMPARE_FILES = ("compare.json", "partial.rank*.pt")


def run_compare(cfg: CompareConfig) -> dict | None:
    """Rank 0 holds ``--output-dir``'s lock for the whole run: a second run on it is refused."""
    validate_compare(cfg)
    return run_holding_output(cfg.output_dir, lambda is_main: _run_compare(cfg, is_main), INTERRUPTED)


def _run_compare(cfg: CompareConfig, is_main: bool) -> dict | None:
    out = cfg.output_dir
    if is_main:
        check_writable(out)
        refuse_existing_run(out, COMPARE_FILES, cfg.resume)
    state = _probe_state(cfg.probe)
    pcfg = state["config"]
    dist_info = init_distributed(cfg.device)
    device = dist_info.device
    use_bf16 = uses_bf16(cfg.precision, device)
    torch.manual_seed(pcfg["seed"])  # a --random-init probe's backbone is re-created from its seed
    backbone = BackboneSettings.from_config(pcfg, trust_checkpoint=cfg.trust_checkpoint).create_backbone().to(device)
    info = backbone.info
    specs = parse_heads(pcfg["heads"], has_cls=info.has_cls)
    heads = ProbeHeads(specs, parse_lrs(pcfg["lrs"]), info.embed_dim, len(state["classes"]), info.num_prefix_tokens,
                       grid_size=info.patch_grid).to(device).eval()
    heads.load_state_dict(state["heads"])
    trained = _best_pairs(state, heads)
    selective_pairs = [pair_name(s, lr) for s, lr in heads.pairs if s.learns_weights]
    methods, omitted = choose_methods(cfg.methods, info.has_cls, cfg.selector_model is not None, trained,
                                      selective_pairs)
    if cfg.methods is None and SELECTOR not in methods and any(s.name == SELECTOR for s, _ in heads.pairs):
        log.warning("%s (trained by the probe) is left out: it needs the probe's selector model; pass "
                    "--selector-model (and --selector-checkpoint) as the probe did to compare it", SELECTOR)
    if cfg.methods is None:  # by default a head whose every lr diverged is left out, with a warning
        gone = diverged_pairs(state)
        for m in [m for m in methods if m in gone]:
            log.warning("%s diverged in training (top-1 null): left out of the comparison", m)
        methods = [m for m in methods if m not in gone]
    refuse_diverged(state, [m for m in methods if m in selective_pairs], "--methods")
    selector = build_selector(cfg, info, device) if SELECTOR in methods else None
    compute = _Methods(backbone, heads, methods, selector)
    dataset = analysis_dataset(cfg.dataset, cfg.data, info.img_size, cfg.limit)
    os.makedirs(out, exist_ok=True)

    settings = dict(probe=os.path.abspath(cfg.probe), data=absolute_path(cfg.data), dataset=cfg.dataset,
                    limit=cfg.limit, images=len(dataset), batch_size=cfg.batch_size, world_size=dist_info.world_size,
                    methods=[_SETTINGS_NAME.get(m, m) for m in methods],
                    selector=[cfg.selector_model, absolute_path(cfg.selector_checkpoint, keep=()),
                              cfg.selector_model_kwargs]
                    + ([cfg.selector_checkpoint_key] if cfg.selector_checkpoint_key else []),
                    precision="bf16" if use_bf16 else "fp32")
    sums = DivergenceSums(len(methods), device)
    examples = {}  # images and weights for maps.png (saved with the sums)

    def load(saved):
        sums.load_state_dict(saved["sums"])
        examples.update(saved["examples"] or {})

    pass_ = ImagePass(dataset, batch_size=cfg.batch_size, dist_info=dist_info, out=out, settings=settings,
                      resume=cfg.resume, state=lambda: dict(sums=sums.state_dict(), examples=examples or None),
                      load=load, workers=cfg.workers, save_every=cfg.save_every, desc=f"compare {info.name}",
                      progress=cfg.progress)
    # the examples: the first image of batches spread over the pass (a class-sorted folder's first
    # batch would show one class only), more of a batch's images when the batches are fewer
    picks = _spread(len(pass_.todo), cfg.examples) if dist_info.is_main and not examples else {}
    for n, images in enumerate(pass_.batches()):
        images = images.to(device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            weights = compute(images)
        sums.update(weights)
        if n in picks:
            k = min(picks[n], len(images))
            new = dict(images=images[:k].float().cpu(), weights=weights[:k].float().cpu())
            for key, value in new.items():
                examples[key] = torch.cat([examples[key], value]) if key in examples else value
    unreadable = pass_.unreadable
    count = torch.tensor([float(unreadable)], dtype=torch.float64, device=device)
    all_reduce_sum(count)
    sums.all_reduce()
    result = None
    if dist_info.is_main:
        if sums.images == 0:
            raise ValueError(f"--data {cfg.data}: no readable image")
        result = _result(cfg, state, info, methods, omitted, sums, int(count.item()), pass_.images_per_s())
        atomic_json(os.path.join(out, "compare.json"), result)
        write_figures(out, result, examples or None)
        if omitted:
            print(f"{info.name} has no [cls] token: methods {', '.join(omitted)} are left out")
    barrier()
    return result


def _result(cfg, state, info, methods, omitted, sums, unreadable, img_s) -> dict:
    top1 = {}
    for p in state.get("results", {}).get("pairs", []):
        name = pair_name(p["head"], p["base_lr"])
        top1[name] = p["top1"]
        if p["top1"] is not None and (p["head"] not in top1 or (top1[p["head"]] or -1) < p["top1"]):
            top1[p["head"]] = p["top1"]  # a head's best lr
    summary = sums.summary()
    N = info.patch_grid[0] * info.patch_grid[1]
    per_method = {}
    for i, m in enumerate(methods):
        per_method[m] = dict(label=method_label(m), entropy_mean=summary["entropy_mean"][i],
                             entropy_std=summary["entropy_std"][i], top1=top1.get(m))
    pcfg = state["config"]
    return dict(probe=os.path.abspath(cfg.probe), model=pcfg["model"], checkpoint=pcfg.get("checkpoint"),
                block=pcfg.get("return_block") or info.num_blocks, methods=methods, per_method=per_method,
                entropy_mean=summary["entropy_mean"], entropy_std=summary["entropy_std"], kl=summary["kl"],
                kl_layout="kl[m][n] = mean over images of KL(a_m || a_n), nats; m, n in the order of methods",
                N=N, patch_grid=list(info.patch_grid), max_entropy=math.log(N), images=sums.images,
                unreadable_images=unreadable, has_cls=info.has_cls, omitted_methods=omitted,
                omitted_reason="the model has no [cls] token" if omitted else None,
                selector_model=cfg.selector_model, selector_checkpoint=cfg.selector_checkpoint,
                images_per_s=img_s)


def format_compare(result: dict) -> str:
    """Table 5's layout: per method its top-1 (when trained) and mean entropy; then the KL matrix."""
    lines = [f"{'method':<28}{'top-1':>8}{'entropy':>10}{'std':>8}"]
    for m in result["methods"]:
        r = result["per_method"][m]
        top1 = "-" if r["top1"] is None else f"{r['top1']:.1f}"
        lines.append(f"{r['label'][:27]:<28}{top1:>8}{r['entropy_mean']:>10.3f}{r['entropy_std']:>8.3f}")
    lines.append(f"(log N = {result['max_entropy']:.3f}: uniform weights)")
    lines.append("mean KL(row || column), nats:")
    width = max(10, max(len(m) for m in result["methods"]) + 2)
    columns = [max(10, len(m) + 2) for m in result["methods"]]  # whole names over their columns
    lines.append(" " * width + "".join(f"{m:>{c}}" for m, c in zip(result["methods"], columns)))
    for m, row in zip(result["methods"], result["kl"]):
        lines.append(f"{m:<{width}}" + "".join(f"{v:>{c}.3f}" for v, c in zip(row, columns)))
    return "\n".join(lines)


def compare_config_fields() -> set:
    return {f.name for f in dataclasses.fields(CompareConfig)}
