"""What every command reads and writes: output folders checked before any work, atomic writes
that leave the previous file intact when a write fails, strict JSON, and safe checkpoint loading.

Every failure here raises :class:`OutputError` (an ``OSError``) or :class:`CheckpointError` (a
``ValueError``) with a one-line message naming the path; the CLI prints it and exits with status 2.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pickle
import re
import tempfile

import torch


class OutputError(OSError):
    """An output that cannot be written (full disk, read-only or non-writable folder, a file in
    the way). Nothing that was already saved is lost."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely, or does not fit the requested model."""


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _last_line(err: BaseException) -> str:
    """The informative line of a long torch.load message (its first lines are generic advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "weights_only" not in line
             and "documentation" not in line and "file an issue" not in line]
    return (lines[-1] if lines else type(err).__name__)[:160]


def check_writable(folder: str, flag: str = "--output-dir") -> str:
    """Create ``folder`` if needed and prove a file can be written in it, before any work is done.

    Raises :class:`OutputError` naming ``flag`` when ``folder`` is a file, cannot be created, or
    refuses a write (read-only, no permission, full disk)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{flag} {folder}: is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".selagg-write-test-", dir=folder)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as err:
        raise OutputError(f"{flag} {folder}: cannot write there ({_reason(err)})") from err
    return folder


def check_output_file(path: str, flag: str = "--output") -> str:
    """An output file's folder must be writable and the path must not be a folder."""
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path}: is a folder, not a file name")
    check_writable(os.path.dirname(os.path.abspath(path)), flag=flag)
    return path


def atomic_write(path: str, write) -> str:
    """``write(tmp_path)`` then rename over ``path``: on any failure the temporary file is removed,
    ``path`` keeps its previous content, and an :class:`OutputError` names ``path``."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OutputError(f"cannot write {path}: {_reason(err)} (the previous version, if any, is intact)") from err
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def json_safe(obj):
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON has no NaN / Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_json(path: str, obj) -> str:
    """Strict JSON (non-finite floats written as ``null``), written atomically."""
    text = json.dumps(json_safe(obj), indent=1, allow_nan=False)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            _sync(f)
    return atomic_write(path, write)


def atomic_save(path: str, obj) -> str:
    """``torch.save`` atomically (through a Python file, so a full disk reads "No space left on
    device" rather than the zip writer's internal error)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            _sync(f)
    return atomic_write(path, write)


def _sync(f) -> None:
    """On disk before the rename: a crash right after it leaves the new file, never an empty one."""
    f.flush()
    os.fsync(f.fileno())


# Harmless types that real checkpoints carry beside their tensors; torch.load(weights_only=True)
# refuses anything else. MAE, DeiT and BEiT-v2 pickle their argparse Namespace of plain values;
# SimMIM its yacs CfgNode (a dict subclass of plain values), read as an OrderedDict of the same
# items without importing yacs.
SAFE_GLOBALS = [argparse.Namespace, (collections.OrderedDict, "yacs.config.CfgNode")]


def load_torch_file(path: str, trust: bool = False, flag: str = "--checkpoint"):
    """``torch.load`` on the CPU without running code from the file.

    Tensors, containers, numbers, strings and :data:`SAFE_GLOBALS` (argparse Namespace, yacs
    CfgNode) load; any other pickled object
    is refused with a :class:`CheckpointError` that names its type and ``--trust-checkpoint``
    (``trust=True``: full unpickling, which runs whatever code the file holds). A file that is not
    a PyTorch checkpoint, or is truncated, is one :class:`CheckpointError` line too."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{flag} {path}: is a folder, not a checkpoint file")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:  # fully qualified names of what the file would import
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint: the error message is all there is
            found = re.findall(r"GLOBAL ([\w.]+)", str(err))
        if not found:  # not a pickled object at all: garbage or a cut-off file
            raise CheckpointError(f"{flag} {path}: not a PyTorch checkpoint, or truncated "
                                  f"({type(err).__name__}: {_last_line(err)})") from None
        raise CheckpointError(
            f"{flag} {path}: holds a pickled {', '.join(dict.fromkeys(found))} object, which loading would have "
            "to run code for; refused. Pass --trust-checkpoint to load it anyway (this runs any code the file "
            "holds: only for files you trust)") from None
    except (RuntimeError, KeyError, EOFError, ValueError, AttributeError, ImportError, IndexError,
            TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{flag} {path}: not a PyTorch checkpoint, or truncated "
                              f"({type(err).__name__}: {_reason(err)[:160]})") from None


def check_number(flag: str, value, *, minimum=None, above=None, below=None, integer: bool = False,
                 optional: bool = False) -> None:
    """A numeric flag's value, checked before any work: finite, an integer where asked, and
    ``>= minimum`` / ``> above`` / ``< below``; ``None`` passes when ``optional``."""
    if value is None and optional:
        return
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if below is not None:
        bounds.append(f"< {below:g}")
    want = ("an integer" if integer else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (below is None or value < below)
    if not ok:
        raise ValueError(f"{flag} {value!r}: must be {want}")
