"""What a run's heads will take, estimated before any work and refused when it cannot fit.

The heads are built on PyTorch's ``meta`` device (shapes only, no memory), so the counts are
exact for every head kind. Per process, in float32: the parameters, their gradients and the
optimizer's one momentum buffer (LARS and SGD), the BatchNorm buffers, and the classifier
inputs of one batch (features, normalised features and their gradient: three copies of
``[B, sum of classifier input widths]``; the pooling's own intermediates come on top). The
checkpoint holds the parameters, buffers and momentum. docs/architecture.md ("Sizes up front").
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from .heads import ProbeHeads

GiB = 2 ** 30


class RunTooLargeError(ValueError):
    """The heads' parameters, optimizer state or checkpoint would not fit."""


@dataclass(frozen=True)
class HeadSizes:
    parameters: int      # trainable elements, every pair
    buffers: int         # BatchNorm running statistics and other buffers
    features: int        # classifier input width summed over the pairs (per image)

    def memory_bytes(self, batch_size: int) -> int:
        """Training memory of the heads per process: parameters, gradients, momentum, buffers, one
        batch's classifier inputs (three copies)."""
        return 4 * (3 * self.parameters + self.buffers + 3 * batch_size * self.features)

    def checkpoint_bytes(self) -> int:
        return 4 * (2 * self.parameters + self.buffers)


def head_sizes(specs, lrs, dim: int, num_classes: int, num_prefix_tokens: int, grid_size=None) -> HeadSizes:
    with torch.device("meta"):
        heads = ProbeHeads(specs, lrs, dim, num_classes, num_prefix_tokens, grid_size=grid_size)
    features = sum(m.in_features for name, m in heads.named_modules()
                   if name.startswith("classifiers.") and isinstance(m, nn.Linear))
    return HeadSizes(parameters=sum(p.numel() for p in heads.parameters()),
                     buffers=sum(b.numel() for b in heads.buffers()), features=features)


def seeds_sizes(sizes: HeadSizes, seeds: int) -> HeadSizes:
    """The sizes of ``seeds`` copies of the heads (``--seeds``): parameters and buffers for every
    seed; the classifier inputs of one, since each seed's step frees its batch's before the next."""
    return HeadSizes(parameters=sizes.parameters * seeds, buffers=sizes.buffers * seeds, features=sizes.features)


def free_memory(device: torch.device) -> int:
    """Free bytes where the heads will live: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(folder: str) -> int:
    while folder and not os.path.exists(folder):  # a folder not created yet: its nearest existing parent
        folder = os.path.dirname(os.path.abspath(folder))
    return shutil.disk_usage(folder or ".").free


def check_fits(sizes: HeadSizes, heads: str, batch_size: int, device: torch.device, output_dir: str) -> None:
    """Refuse (:class:`RunTooLargeError`, with the estimate) heads that cannot fit the device's free
    memory or whose checkpoint cannot fit the output folder's disk (written beside the previous one)."""
    memory, checkpoint = sizes.memory_bytes(batch_size), sizes.checkpoint_bytes()
    estimate = (f"{sizes.parameters:,} parameters in all pairs: about {memory / GiB:.2f} GiB of training memory "
                f"per process (parameters, gradients, momentum, batch {batch_size} features) and a "
                f"{checkpoint / GiB:.2f} GiB checkpoint")
    available = free_memory(device)
    if memory > available:
        raise RunTooLargeError(f"--heads {heads}: {estimate}; only {available / GiB:.2f} GiB free on {device} "
                               "(fewer branches K, heads or --lrs, or a smaller --batch-size)")
    space = free_disk(output_dir)
    if checkpoint > space:
        raise RunTooLargeError(f"--heads {heads}: {estimate}; only {space / GiB:.2f} GiB free for --output-dir "
                               f"{output_dir} (fewer branches K, heads or --lrs, or another --output-dir)")
