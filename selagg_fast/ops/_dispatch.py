"""Choosing between the Triton kernels and the eager reference, and shared checks."""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional, TypedDict

import torch

logger = logging.getLogger("selagg_fast")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "reference")


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, reason: str) -> None:
    logger.warning("%s: falling back to the PyTorch reference (%s)", op, reason)


def choose_backend(op: str, backend: str, device: torch.device, unsupported: Optional[str]) -> str:
    """Return "triton" or "reference" for one call.

    ``unsupported`` is None when the kernels handle this case, else the reason they do not.
    CUDA tensors and CPU tensors under the Triton interpreter run the kernels; any other
    CPU call runs the reference. ``backend="triton"`` on an unsupported case raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    runnable = device.type == "cuda" or (device.type == "cpu" and interpreter_active())
    if backend == "triton":
        if unsupported is not None:
            raise ValueError(f"{op}: the Triton kernels do not support this call: {unsupported}")
        if not runnable:
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"(got device {device})"
            )
        return "triton"
    if unsupported is not None:
        _warn_once(op, unsupported)
        return "reference"
    return "triton" if runnable else "reference"


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device ({listing})")
    return next(iter(present.values())).device


def check_num_prefix_tokens(op: str, num_prefix_tokens) -> None:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"{op}: num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")


def dot_settings(dtype: torch.dtype) -> dict:
    """Constexprs that tell a kernel how to feed ``tl.dot``.

    On a GPU, bf16/fp16 operands go to the tensor cores as they are (LOWP) and float32
    ones use 3xTF32, which is as accurate as float32 FMA. The interpreter computes bf16
    dots on raw bit patterns, so there everything is upcast to float32 first.
    """
    interp = interpreter_active()
    return {
        "LOWP": dtype in (torch.bfloat16, torch.float16) and not interp,
        "F32_PRECISION": "ieee" if interp else "tf32x3",
    }


def empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation for the launchers; tests swap it for a NaN-filled one (poisoning)."""
    return torch.empty(shape, device=device, dtype=dtype)


def autotuning(device: torch.device) -> bool:
    """Whether launches on ``device`` are tuned: CUDA only; SELAGG_AUTOTUNE=0 turns tuning off
    and launches the default configs (e.g. test runs that compile many shapes)."""
    return device.type == "cuda" and os.environ.get("SELAGG_AUTOTUNE", "1") != "0"


class LaunchConfig(TypedDict, total=False):
    """One launch of a Triton kernel, the one config format of every op: tile sizes and other
    tuned constexprs (the keys a kernel declares) plus Triton's ``num_warps`` / ``num_stages``.

    A plain dict at run time, so a default config can be updated with a tuned one
    (``dict(default, **tuned)``), which is how tests and the bench sweep patch them. An absent
    ``num_stages`` leaves Triton's own default."""

    BM: int  # query / token rows a program
    BN: int  # key columns, hidden units or scores a step
    BD: int  # features (head dim, token dim), padded to a power of two
    BK: int  # branches (K), padded for tl.dot
    BC: int  # feature chunk a program pools
    BT: int  # tokens (or query rows) a step
    BB: int  # images a program
    num_warps: int
    num_stages: int
    PREFETCH: bool  # abmilp K = 1: load the next tile before this tile's math
    WHOLE: bool  # abmilp K > 1: one program an image
    PEEL_TAIL: bool  # attention: the last key block peeled off the unmasked loop


# the entries of a LaunchConfig that are options of the launch, not kernel arguments
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def without(cfg: LaunchConfig, fixed) -> LaunchConfig:
    """``cfg`` less the ``fixed`` entries: those every candidate of a launcher shares (a padded
    dim), which the launcher passes to the kernel directly; what is left is what is tuned."""
    return {k: v for k, v in cfg.items() if k not in fixed}


def config_list(first: LaunchConfig, *more: LaunchConfig, fits=None) -> list:
    """An autotune list: ``first`` (the untuned default), then each of ``more`` that is not in
    the list yet and, where ``fits`` is given, fits its budget."""
    configs = [first]
    for cfg in more:
        if cfg not in configs and (fits is None or fits(cfg)):
            configs.append(cfg)
    return configs


def launcher(kernel, configs: list, key: list):
    """Pick the kernel to launch: autotuned over ``configs`` (LaunchConfigs) on a GPU, fixed on
    the interpreter.

    Returns ``launch(grid, device, default, **kwargs)``; ``default`` is the LaunchConfig used
    where nothing is tuned. ``launch`` returns the config it ran (a launcher whose grid depends
    on the config needs it).
    """
    import triton

    tuned = triton.autotune(
        configs=[triton.Config(without(c, LAUNCH_OPTIONS),
                               num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2))
                 for c in configs],
        key=key,
    )(kernel)

    # tuning key -> the config Triton's autotuner picked for it. Later launches with that key go
    # straight to the kernel: the autotuner's wrapper adds host time to every call, which decides
    # the eager timing of a small kernel when the host is the bottleneck (measured: bench/RESULTS.md, host overhead).
    picked = {}

    def launch(grid, device, default: LaunchConfig, **kwargs):
        if len(configs) > 1 and autotuning(device):
            # the autotuner's own key: the named arguments plus every tensor argument's dtype
            tuning_key = tuple(kwargs[k] for k in key) + tuple(
                str(v.dtype) for v in kwargs.values() if hasattr(v, "dtype"))
            config = picked.get(tuning_key)
            if config is None:
                tuned[grid](**kwargs)
                config = picked[tuning_key] = tuned.best_config.all_kwargs()
            else:
                kernel[grid](**kwargs, **config)
            return config
        kernel[grid(default) if callable(grid) else grid](**kwargs, **default)
        return default

    return launch


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_dim(n: int) -> int:
    """A tile dim covering ``n``: a power of two, at least MIN_DOT_DIM (tl.dot's smallest)."""
    return max(MIN_DOT_DIM, next_pow2(n))


# Budgets shared by every op's launch configs, in float32 elements a program holds at once.
# A kernel that reads whole tokens (rows of D features) by default keeps a [BT, BD] tile of about
# TILE_ELEMENTS (32 KB of float32 across the program's 4-8 warps): enough tokens in flight to
# stream at bandwidth without spilling. Autotune candidates may go up to MAX_TILE_ELEMENTS.
TILE_ELEMENTS = 8192
MAX_TILE_ELEMENTS = 16384
# A K-branch pooling kernel keeps a [BC, BK] float32 accumulator beside its tiles: the default
# configs hold ACC_ELEMENTS, the largest autotune candidates (whole images over 8 warps) up to
# MAX_ACC_ELEMENTS.
ACC_ELEMENTS = 4096
MAX_ACC_ELEMENTS = 16384
# tl.dot needs every tile dim to be at least 16
MIN_DOT_DIM = 16
# a whole-token tile up to this many features a row streams with 4 warps; wider rows take 8
FOUR_WARP_FEATURES = 1024


def token_tile(D: int, max_tokens: Optional[int] = None) -> LaunchConfig:
    """The default tile of a kernel that reads whole tokens of D features (token_norm_ratio, K = 1
    pooling): BD = D rounded up to a power of two (>= 16), BT tokens (<= ``max_tokens``) so that
    the tile holds ~TILE_ELEMENTS, 8 warps once a token is wider than FOUR_WARP_FEATURES."""
    BD = dot_dim(D)
    BT = TILE_ELEMENTS // BD if max_tokens is None else min(max_tokens, TILE_ELEMENTS // BD)
    return dict(BD=BD, BT=max(1, BT), num_warps=4 if BD <= FOUR_WARP_FEATURES else 8)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Number of programs for kernels that loop over images and reduce partials (on the CPU,
    where the interpreter runs programs one after another, ``per_sm`` programs in all)."""
    if device.type == "cuda":
        return max(1, min(work_items, _sm_count(device) * per_sm))
    return max(1, min(work_items, per_sm))
