"""torchrun glue shared by the trainer and the analysis: process group, sharding, reductions."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def check_device(device: str, flag: str = "--device") -> None:
    """``auto``, ``cpu``, or ``cuda`` where a CUDA device is present; checked before any work."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{flag} {device!r}: choose auto, cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} cuda: no CUDA device is available here (use --device cpu or auto)")


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; NCCL on GPUs, gloo on CPUs. A plain ``python`` run is rank 0 of 1."""
    check_device(device)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed(synchronize: bool = True) -> None:
    """Destroy the process group, if any, before the interpreter exits. Left to interpreter exit,
    gloo's threads can be torn down mid-flight, and a rank then aborts ("terminate called without
    an active exception") after the job has finished. ``synchronize``: wait for
    every rank first (on the success path; after an error the others may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
