"""One process's share of a resumable pass over images: the batch loop analyze and compare share.

Batches are fixed (``batch_size`` consecutive images each); process ``rank`` of ``W`` takes every
W-th batch. The running sums themselves belong to the caller: it hands over ``state()`` (what to
save beside the bookkeeping) and ``load(saved)`` (how to restore it), and the pass saves them
atomically every ``save_every`` batches and at the end, so an interrupted run resumes at the first
unfinished batch with the same sums.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import collate_skipping
from ..files import absolute_path, atomic_save, load_torch_file

log = logging.getLogger("selagg_fast")

INTERRUPTED = "interrupted; continue with --resume (the running sums are saved every --save-every batches)"


# settings that hold paths: compared resolved (a saved relative path is resolved as before, from here)
_PATH_SETTINGS = ("data", "checkpoint")


def load_partial(path: str, settings: dict) -> dict:
    """A process's saved running sums, refused (naming each changed setting) when the run's
    settings changed."""
    state = load_torch_file(path, flag="--resume")  # written by this tool: plain types only
    saved = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} holds no run settings; move it away or choose another --output-dir")
    saved = {k: absolute_path(v, keep=("synthetic",) if k == "data" else ()) if k in _PATH_SETTINGS else v
             for k, v in saved.items()}
    if isinstance(saved.get("selector"), list) and len(saved["selector"]) > 1:  # [model, checkpoint, kwargs, ...]
        saved["selector"] = [saved["selector"][0], absolute_path(saved["selector"][1], keep=()), *saved["selector"][2:]]
    if "random_init_seed" in settings and "random_init_seed" not in saved:
        # sums saved before the seed was recorded: their random backbone's seed is unknown, taken as this one
        saved["random_init_seed"] = settings["random_init_seed"]
    if saved != settings:
        changed = [f"{k} {saved.get(k)!r} then, {settings.get(k)!r} now"
                   for k in list(settings) + [k for k in saved if k not in settings] if saved.get(k) != settings.get(k)]
        raise ValueError(f"--resume: {os.path.dirname(path)} was started with other settings: {'; '.join(changed)}")
    return state


class ImagePass:
    """``for images in pass_.batches(): ...`` over this process's unfinished batches (CPU tensors,
    unreadable images already dropped); ``unreadable``, ``seen`` and ``elapsed`` after the loop."""

    def __init__(self, dataset, *, batch_size: int, dist_info, out: str, settings: dict, resume: bool,
                 state: Callable[[], dict], load: Callable[[dict], None], workers: int, save_every: int,
                 desc: str, progress: bool):
        self.dataset, self.batch_size, self.dist_info = dataset, batch_size, dist_info
        self.settings, self.state, self.save_every = settings, state, save_every
        self.path = os.path.join(out, f"partial.rank{dist_info.rank}.pt")
        n_batches = -(-len(dataset) // batch_size)
        mine = list(range(dist_info.rank, n_batches, dist_info.world_size))
        self.done, self.unreadable, self.seen, self.elapsed = set(), 0, 0, 0.0
        self._start = None
        # images and seconds of the invocations before this one: the throughput is the whole pass's
        self.seen_before, self.elapsed_before = 0, 0.0
        if resume and os.path.exists(self.path):
            saved = load_partial(self.path, settings)
            load(saved)
            self.done, self.unreadable = set(saved["done"]), saved["unreadable"]
            self.seen_before, self.elapsed_before = saved.get("seen", 0), saved.get("elapsed", 0.0)
            log.info("resuming %s: %d of this process's %d batches already summed", out, len(self.done), len(mine))
        self.todo = [b for b in mine if b not in self.done]
        self.workers, self.desc, self.progress = workers, desc, progress

    def save(self) -> None:
        """Atomic: a failed write keeps the previous running sums."""
        elapsed = self.elapsed if self._start is None else time.perf_counter() - self._start
        atomic_save(self.path, dict(settings=self.settings, done=sorted(self.done), unreadable=self.unreadable,
                                    seen=self.seen_before + self.seen, elapsed=self.elapsed_before + elapsed,
                                    **self.state()))

    def images_per_s(self) -> float:
        """Images per second of the whole pass, every invocation of a resumed run together (all
        processes: this one's rate times their count); 0.0 when no image was read."""
        seen, elapsed = self.seen_before + self.seen, self.elapsed_before + self.elapsed
        return seen * self.dist_info.world_size / elapsed if seen and elapsed > 0 else 0.0

    def batches(self):
        bs, n_images, world = self.batch_size, len(self.dataset), self.dist_info.world_size
        loader = DataLoader(self.dataset, num_workers=self.workers, collate_fn=collate_skipping,
                            batch_sampler=[list(range(b * bs, min((b + 1) * bs, n_images))) for b in self.todo],
                            pin_memory=self.dist_info.device.type == "cuda")
        bar = tqdm(total=n_images, initial=min(n_images, len(self.done) * bs * world), unit="img", desc=self.desc,
                   disable=not (self.progress and self.dist_info.is_main), smoothing=0.1)
        start = self._start = time.perf_counter()
        for n, (b, (images, _labels, _idx, skipped)) in enumerate(zip(self.todo, loader)):
            self.unreadable += len(skipped)
            if images is not None:
                yield images
                self.seen += len(images)
            self.done.add(b)
            bar.update((len(skipped) + (0 if images is None else len(images))) * world)
            bar.set_postfix(img_s=f"{self.seen * world / (time.perf_counter() - start):.0f}")
            if (n + 1) % self.save_every == 0:
                self.save()
        bar.close()
        self.elapsed = time.perf_counter() - start
        self._start = None
        self.save()
