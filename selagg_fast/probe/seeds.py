"""``--seeds``: every (head, lr) pair trained once per seed in one invocation.

Each seed has its own :class:`ProbeHeads` (initialised from the seed alone, so a seed's heads
start as a ``--seed`` run's do) and its own optimizer. From a feature cache each seed reads the
training tokens in its own seeded order (one pass over the cache per seed); in a live run every
seed trains on the same batches and augmentation (those of the first seed) from one backbone
pass, and the seeds differ only in their heads' initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import HEAD_INIT, seed_for
from .heads import LinearProbe, ProbeHeads


def parse_seeds(value) -> list | None:
    """``--seeds`` as a list of distinct non-negative ints: from ``"0,1,2"`` or a sequence; None stays None."""
    if value is None:
        return None
    items = str(value).split(",") if isinstance(value, str) else list(value)
    try:
        seeds = [_as_int(v) for v in items if not (isinstance(v, str) and not v.strip())]
    except (TypeError, ValueError):
        raise ValueError(f"--seeds {value!r}: expected comma-separated non-negative integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {value!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def _as_int(v) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    return int(str(v).strip()) if isinstance(v, str) else int(v)


@dataclass
class SeedHeads:
    """One seed's heads, optimizer, the module stepped (the heads, or their DDP wrapper) and the
    names of its pairs that diverged."""
    seed: int
    heads: ProbeHeads
    optimizer: torch.optim.Optimizer | None = None
    model: torch.nn.Module | None = None
    diverged: set = field(default_factory=set)


def seeded_heads(seed: int, classifier_init: str, *args, **kwargs) -> ProbeHeads:
    """``ProbeHeads(*args, **kwargs)`` on the CPU, initialised from ``seed`` alone (the global
    random state is left as it was): the same seed gives the same heads in any run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(seed, HEAD_INIT))
        heads = ProbeHeads(*args, **kwargs)
        for module in heads.modules():
            if isinstance(module, LinearProbe):
                module.reset_classifier(classifier_init)
    return heads
