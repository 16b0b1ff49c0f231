"""What every command reads and writes: output folders checked before any work and locked while a
run uses them, atomic writes that leave the previous file intact when a write fails, strict JSON,
safe checkpoint loading, and interrupts (SIGINT / SIGTERM) that end a command cleanly.

Every failure here raises :class:`OutputError` (an ``OSError``) or :class:`CheckpointError` (a
``ValueError``) with a one-line message naming the path; the CLI prints it and exits with status 2.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import pickle
import re
import signal
import tempfile
import threading
from typing import Callable

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
            TypeError, UnicodeDecodeError, OSError) as err:  # OSError: a cut-off zip seeks past its end
        raise CheckpointError(f"{flag} {path}: not a PyTorch checkpoint, or truncated "
                              f"({type(err).__name__}: {_reason(err)[:160]})") from None


def absolute_path(value, keep=("synthetic",)):
    """``value`` as an absolute path (``DIR/`` and ``DIR`` alike), for settings a resumed run is
    checked against: a relative path resumed from another directory names other files. None and
    the names in ``keep`` (``--data synthetic``) stay as they are."""
    if not isinstance(value, str) or value in keep:
        return value
    return os.path.abspath(value)


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


# One run per output folder ---------------------------------------------------------------------
LOCK_NAME = ".selagg.lock"


@contextlib.contextmanager
def output_lock(folder: str, flag: str = "--output-dir"):
    """Hold an exclusive lock on ``folder`` (created if needed) while the block runs.

    ``fcntl.flock`` on ``folder/.selagg.lock``: a second run on the same folder is refused at
    once with an :class:`OutputError`; the operating system releases the lock when the holder
    exits, is killed or crashes, so a stale lock file never blocks anyone. Local file systems
    and NFSv4 (and NFSv3 with lockd; Linux maps flock to NFS byte-range locks) honour it across
    machines; a share mounted with ``nolock`` honours it only within one machine. On a platform
    without ``fcntl`` the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks to take
        yield folder
        return
    check_writable(folder, flag=flag)
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(f"{flag} {folder}: cannot create its lock file {LOCK_NAME} ({_reason(err)})") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            raise OutputError(f"{flag} {folder}: another selagg-fast run{holder} is using it; wait for it to "
                              f"finish or choose another {flag}") from None
        except OSError as err:  # e.g. ENOLCK on a share without a lock manager: run, but say so
            logging.getLogger("selagg_fast").warning(
                "%s %s: cannot lock it (%s); make sure no other run uses it", flag, folder, _reason(err))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a run opening it)


def run_holding_output(folder: str, work, interrupted: str | Callable[[], str]):
    """``work(is_main)`` with rank 0 holding ``folder``'s lock (:func:`output_lock`) for the whole
    run; an interrupt (SIGINT, or SIGTERM through :func:`interrupts_raise`) ends with
    :class:`Interrupted` and the message ``interrupted`` (or what it returns, read at that time)."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    with output_lock(folder) if is_main else contextlib.nullcontext():
        try:
            return work(is_main)
        except KeyboardInterrupt as err:
            message = interrupted() if callable(interrupted) else interrupted
            raise Interrupted(message, signum=getattr(err, "signum", signal.SIGINT)) from None


def _lock_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def refuse_existing_run(folder: str, run_files, resume: bool, flag: str = "--output-dir") -> None:
    """Without ``resume``, a folder holding any of ``run_files`` (names or glob patterns) is
    refused: a new run would overwrite another run's results."""
    import glob
    if resume or not os.path.isdir(folder):
        return
    found = [os.path.basename(p) for name in run_files
             for p in sorted(glob.glob(os.path.join(glob.escape(folder), name)))]
    if found:
        raise FileExistsError(f"{flag} {folder} already holds a run ({', '.join(found)}): pass --resume to continue "
                              f"it, or choose another {flag}")


def check_distinct_outputs(outputs: dict, inputs: dict = None) -> None:
    """No two outputs on one path and no output over an input: ``outputs`` / ``inputs`` map a
    path to the flag or role that names it (paths compared resolved)."""
    seen = {}
    for path, what in outputs.items():
        key = os.path.realpath(path)
        if key in seen:
            raise OutputError(f"{what} {path}: the same file as {seen[key]}; one would overwrite the other")
        seen[key] = f"{what} {path}"
    for path, what in (inputs or {}).items():
        key = os.path.realpath(path)
        if key in seen:
            raise OutputError(f"{seen[key]}: would overwrite the input {what} {path}")


# Signals -------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command; its message says what was kept and how to go on."""

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum=signum)


@contextlib.contextmanager
def interrupts_raise():
    """SIGTERM raises :class:`Interrupted` in the main thread, as SIGINT raises KeyboardInterrupt,
    so ``finally`` blocks and atomic writes clean up either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred():
    """SIGINT / SIGTERM arriving inside the block take effect when it ends: a group of files
    written together (an epoch's metrics, checkpoint and results) is never left half written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    handlers = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if pending:
            raise Interrupted(signum=pending[0])


def parse_number_list(flag: str, text, *, integer: bool = False, example: str = "", what: str = "") -> list:
    """A comma-separated flag value as distinct finite positive numbers (ints with ``integer``), in
    the order given; ``ValueError`` naming ``flag`` otherwise."""
    kind = "positive integers" if integer else "numbers"
    try:
        values = [(int if integer else float)(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        hint = f", e.g. {example}" if example else ""
        raise ValueError(f"{flag} {text!r}: expected comma-separated {kind}{hint}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r}: expected distinct finite positive "
                         + (what or ("integers" if integer else "numbers")))
    return values
