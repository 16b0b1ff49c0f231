"""A finished probe run rebuilt for inspection: Selective Aggregation weights and [cls] attention maps."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from ..backbone import BackboneSettings
from ..files import CheckpointError, load_torch_file
from ..probe.heads import ProbeHeads, canonical_pair_name, pair_name, parse_heads, parse_lrs
from ..selection import capture_attention_rows, weights_from_rows


def probe_run_state(path: str) -> dict:
    """A probe run's ``checkpoint.pt``, refused in one line when it is not one."""
    state = load_torch_file(path, flag="--probe")  # the run's own file: plain types, never code
    if not isinstance(state, dict) or not {"config", "heads", "classes"} <= state.keys():
        raise CheckpointError(f"--probe {path}: not a checkpoint of a `selagg-fast probe` run (no run settings in it)")
    return state


# Heads with softmax weights over the patches: selective, attentive (ap) and efficient (ep) probes.
MAP_HEADS = ("selective", "ap", "ep")


def diverged_pairs(state: dict) -> set:
    """Names (``head@lr``) of the pairs a probe run reported as diverged."""
    return {pair_name(p["head"], p["base_lr"]) for p in state.get("results", {}).get("pairs", []) if p.get("diverged")}


def refuse_diverged(state: dict, pairs: list, flag: str) -> None:
    """A pair whose training diverged has non-finite weights: its maps would be NaN, and scores of
    them would read as results. Refused in one line."""
    gone = diverged_pairs(state)
    bad = [p for p in pairs if p in gone]
    if bad:
        ok = [pair_name(p["head"], p["base_lr"]) for p in state["results"]["pairs"]
              if not p.get("diverged") and p["head"].startswith(MAP_HEADS)]
        raise ValueError(f"{flag} {', '.join(bad)}: diverged in training (top-1 null in results.json), no map to "
                         f"show; {'choose one of ' + ', '.join(ok) if ok else 'every selective pair diverged'}")


class ProbeMaps:
    """Backbone + trained heads of ``selagg-fast probe`` output ``run_dir``.

    ``maps(images)`` returns ``(selection [B, gh, gw], cls_attention [B, gh, gw] or None)``:
    the softmax weights of one selective pair (mean over its K branches) and the last block's
    [cls]-row attention over the patches (mean over heads).
    """

    def __init__(self, run_dir: str, head: str | None = None, device: str = "auto", trust_checkpoint: bool = False):
        path = os.path.join(run_dir, "checkpoint.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--probe {run_dir}: no checkpoint.pt (a `selagg-fast probe` output folder?)")
        state = probe_run_state(path)
        cfg = state["config"]
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        torch.manual_seed(cfg["seed"])  # a --random-init probe's backbone is re-created from its seed
        self.backbone = BackboneSettings.from_config(cfg, trust_checkpoint=trust_checkpoint).create_backbone().to(self.device)
        self.info = self.backbone.info
        specs = parse_heads(cfg["heads"], has_cls=self.info.has_cls)
        if not any(s.learns_weights for s in specs):
            raise ValueError(f"{run_dir}: the probe has no selective head (heads: {cfg['heads']})")
        self.heads = ProbeHeads(specs, parse_lrs(cfg["lrs"]), self.info.embed_dim, len(state["classes"]),
                                self.info.num_prefix_tokens, grid_size=self.info.patch_grid).to(self.device).eval()
        self.heads.load_state_dict(state["heads"])
        self.head = canonical_pair_name(head) if head else self._best_selective(state)
        if self.head not in self.heads.pair_names():
            raise ValueError(f"--head {head!r}: the probe has {self.heads.pair_names()}")
        refuse_diverged(state, [self.head], "--head")

    @staticmethod
    def _best_selective(state) -> str:
        pairs = [p for p in state["results"]["pairs"] if p["head"].startswith(MAP_HEADS)]
        best = max(pairs, key=lambda p: -1.0 if p["top1"] is None else p["top1"])  # None: a diverged pair
        return pair_name(best["head"], best["base_lr"])

    @torch.no_grad()
    def maps(self, images: torch.Tensor):
        # the tokens and the last run block's [cls] row from one pass (no attention map)
        P = self.info.num_prefix_tokens
        capture = capture_attention_rows(self.backbone, [0]) if self.info.has_cls else contextlib.nullcontext()
        with capture as rows:
            tokens = self.backbone(images.to(self.device))
        gh, gw = self.info.patch_grid
        B = len(images)
        selection = self.heads.trained_weights(tokens.float(), self.head)
        selection = selection.reshape(B, -1, selection.shape[-1]).mean(1)
        # selective_all pools prefix tokens too: the map shows the patch part
        selection = selection[:, -gh * gw:].reshape(B, gh, gw)
        cls = None
        if self.info.has_cls:  # mean over heads of A_0j over the patch keys (min-max normalised when drawn)
            cls = weights_from_rows(rows.rows, "cls_mean", P, 0, renormalize=False).reshape(B, gh, gw)
        return selection.float().cpu(), None if cls is None else cls.float().cpu()


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, gh, gw]`` -> ``[B, size, size]`` bilinear, then min-max normalised to [0, 1] per image."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return (up - lo) / (hi - lo).clamp_min(1e-12)
