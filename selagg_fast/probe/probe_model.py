"""The probe model: every seed's trainable heads, their optimizers, DDP wrappers and checkpoint state.

:class:`ProbeModel` builds one :class:`SeedHeads` per seed (heads initialised from the seed
alone, see seeds.py), and reads and writes the checkpoint's head keys: ``heads`` / ``optimizer``
(the first seed's, what maps and comparisons read) and, with --seeds, ``seed_heads``. It takes
token shapes and class counts as numbers: no backbone or data is needed to build it.
"""
from __future__ import annotations

import torch

from .optim import build_optimizer
from .seeds import SeedHeads, seeded_heads


class ProbeModel:
    """Every seed's heads, optimizer and the module stepped (the heads, or their DDP wrapper)."""

    def __init__(self, specs, lrs: list, seeds: list, embed_dim: int, num_classes: int, head_prefix: int, *,
                 grid_size=None, classifier_init: str, optimizer: str, effective_batch: int, momentum: float,
                 weight_decay: float, device: torch.device, ddp: bool = False):
        self.specs, self.lrs, self.device, self.ddp = specs, lrs, device, ddp
        self._head_args = (specs, lrs, embed_dim, num_classes, head_prefix)
        self._grid_size, self._classifier_init = grid_size, classifier_init
        self._optimizer_args = (optimizer, effective_batch, momentum, weight_decay)
        self.seed_heads = [self._seed_heads(seed) for seed in seeds]

    def _seed_heads(self, seed: int) -> SeedHeads:
        """One seed's heads (initialised from the seed alone), optimizer and DDP wrapper."""
        heads = seeded_heads(seed, self._classifier_init, *self._head_args, grid_size=self._grid_size).to(self.device)
        optimizer = build_optimizer(heads, *self._optimizer_args)
        model = heads
        if self.ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                heads, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        return SeedHeads(seed, heads, optimizer, model)

    @property
    def first(self) -> SeedHeads:
        """The first seed's: what the selection maps and comparisons read, and a one-seed run's all."""
        return self.seed_heads[0]

    def state(self, with_seeds: bool) -> dict:
        """The checkpoint's heads: ``heads``/``optimizer`` (the first seed's) and, ``with_seeds``
        (a --seeds run), ``seed_heads``: every seed's."""
        first = self.first
        state = dict(heads=first.heads.state_dict(), optimizer=first.optimizer.state_dict())
        if with_seeds:
            state["seed_heads"] = [dict(seed=m.seed, heads=m.heads.state_dict(), optimizer=m.optimizer.state_dict())
                                   for m in self.seed_heads]
        return state

    def load(self, saved: dict, output_dir: str) -> None:
        """Every seed's heads and optimizer from a checkpoint (``seed_heads``; a one-seed run's are
        ``heads`` and ``optimizer``); refuses one of other seeds."""
        states = saved.get("seed_heads") or [dict(seed=self.first.seed, heads=saved["heads"],
                                                  optimizer=saved["optimizer"])]
        if [s["seed"] for s in states] != [m.seed for m in self.seed_heads]:
            raise ValueError(f"--resume: {output_dir}'s checkpoint holds seeds {[s['seed'] for s in states]}, "
                             f"this run trains {[m.seed for m in self.seed_heads]}")
        for member, state in zip(self.seed_heads, states):
            member.heads.load_state_dict(state["heads"])
            member.optimizer.load_state_dict(state["optimizer"])
