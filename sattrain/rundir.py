"""The run directory: the one module that spells its file names, and reads and writes them.

A run directory (``sattrain run --out``) holds::

    config.json     CONFIG_JSON     the resolved options, the store, placement, accel, provenance
    metrics.jsonl   METRICS_JSONL   one line per epoch (appended, never through a link)
    checkpoint.pt   CHECKPOINT_NAME the last epoch (sattrain.checkpoint)
    best.pt         BEST_NAME       the epoch with the best held-out monitor
    summary.json    SUMMARY_JSON    the end-of-run strong evaluation
    metrics.json    METRICS_JSON    written last: the run is finished
    eval.json       EVAL_JSON       `sattrain eval` (strong protocol)
    eval-paper.json PAPER_EVAL_JSON `sattrain eval --protocol paper`

Everything here refuses what could send a write elsewhere (a symbolic link at --out or at a
file's name) and reads what a damaged or crafted directory holds with bounds and one-line
errors (sattrain.trainer's resume, sattrain.report).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from satdata.atomic import probe_writable
from satdata.errors import SatkitError
from sattrain import __version__

CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
SUMMARY_JSON = "summary.json"
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
EVAL_JSON = "eval.json"
PAPER_EVAL_JSON = "eval-paper.json"
# Largest metrics.jsonl read back (a crafted file can be any size).
MAX_METRICS_BYTES = 256 * 1024**2


def git_revision() -> dict[str, Any] | None:
    """The satkit source's git commit and whether it had uncommitted changes (None outside git)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions of what computed the run, and the device it ran on."""
    import zarr

    env: dict[str, Any] = {
        "satkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def default_run_dir(method: str, model: str, seed: int, dataset: str) -> Path:
    """runs/<dataset>-<method>-<model>-s<seed>, always one plain directory under runs/.

    The dataset name comes from the store: each part is reduced to letters, digits and
    ``._-`` (anything else becomes '_', no leading dot, no '..', at most 64 characters),
    so that no store can send a run's files elsewhere. Plain names are kept as they are.
    """
    import re

    def plain(text: str) -> str:
        t = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
        t = re.sub(r"\.{2,}", ".", t).lstrip("._-")[:64]
        return t or "unnamed"

    return Path("runs") / f"{plain(dataset)}-{plain(method.replace('+', '_'))}-{plain(model)}-s{int(seed)}"


def read_metrics_lines(path: Path, keep_below: int) -> list[dict[str, Any]]:
    """metrics.jsonl lines of epochs < keep_below (a killed run may have written one more).

    Resuming after ``keep_below`` epochs needs exactly the lines of epochs 0 .. keep_below - 1:
    a line cut by a kill is tolerated only at the end (it belongs to the epoch being redone);
    anything else (not UTF-8, not JSON, not an epoch record, epochs missing or repeated) is
    a damaged run directory and raises SatkitError naming the file and line.
    """
    if keep_below <= 0:
        return []
    if not path.is_file():
        raise SatkitError(f"{path}: missing, but the run's checkpoint has {keep_below} epoch(s) done; "
                          "the run directory is damaged (start a new run)")
    try:
        text = read_run_text(path, MAX_METRICS_BYTES, "a run's metrics")
    except SatkitError as e:
        raise SatkitError(f"{e}; the run directory is damaged") from None
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    out = []
    for n, (i, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            if n == len(lines) - 1:
                break  # a line cut by a kill: its epoch is redone
            raise SatkitError(f"{path}:{i}: not a JSON line ({type(e).__name__}); the run directory is damaged") from None
        epoch = rec.get("epoch") if isinstance(rec, dict) else None
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
            raise SatkitError(f"{path}:{i}: not an epoch record (expected an object with an integer epoch >= 0)")
        secs = rec.get("seconds")
        if not (isinstance(secs, (int, float)) and not isinstance(secs, bool) and math.isfinite(secs) and secs >= 0):
            raise SatkitError(f"{path}:{i}: seconds is {repr(secs)[:40]}; expected a finite number >= 0")
        if epoch < keep_below:
            out.append(rec)
    got = [r["epoch"] for r in out]
    if got != list(range(keep_below)):
        raise SatkitError(f"{path}: holds epochs {_ranges(got)}, but the run's checkpoint has epochs 0-{keep_below - 1} "
                          "done; the run directory is damaged (start a new run)")
    return out


def _ranges(epochs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (at most a few ranges)."""
    if not epochs:
        return "none"
    parts: list[str] = []
    start = prev = epochs[0]
    for e in epochs[1:] + [None]:  # type: ignore[list-item]
        if e is not None and e == prev + 1:
            prev = e
            continue
        parts.append(f"{start}-{prev}" if prev != start else str(start))
        if e is not None:
            start = prev = e
    return ", ".join(parts[:5]) + (", ..." if len(parts) > 5 else "")


def check_run_dir(run_dir: Path) -> None:
    """Refuse a --out that cannot be a run directory, before anything is read or written there."""
    if run_dir.is_symlink():
        raise SatkitError(f"--out: {run_dir} is a symbolic link (to {os.readlink(run_dir)}); give the directory "
                          "itself, so that the run's files cannot be redirected")
    if run_dir.exists() and not run_dir.is_dir():
        raise SatkitError(f"--out: {run_dir} exists and is not a directory")


def make_run_dir(run_dir: Path) -> None:
    """Create the run directory and prove it is writable (a probe file, created exclusively
    and removed), so that an unwritable --out fails before any data is read or any training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f", {e.filename}" if e.filename and str(e.filename) != str(run_dir) else ""
        raise SatkitError(f"--out: cannot create the run directory {run_dir} "
                          f"({(e.strerror or str(e)).lower()}{where})") from None
    probe_writable(run_dir, "--out", kind="the run directory ")


def append_line(path: Path, line: str) -> None:
    """Append one line to metrics.jsonl (never through a symbolic link planted at its name)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "a") as f:
        f.write(line)


def lock_run_dir(run_dir: Path, held: list[int]) -> None:
    """Hold an exclusive lock on the run directory for the run: a second `sattrain run`
    (or a --resume while a killed launcher's processes still train) is refused, not mixed in."""
    from satdata.store import LockBusy, describe_holders, flock_dir

    if held or not run_dir.is_dir():
        return
    try:
        fd = flock_dir(run_dir, exclusive=True)
    except LockBusy as e:
        raise SatkitError(f"--out: {run_dir} is in use by another run ({describe_holders(e.holders)}); "
                          "wait for it to end or stop it, then run again") from None
    if fd is not None:
        held.append(fd)


# --------------------------------------------------------------------------- reading back


# Largest run file read (an eval.json is a few kilobytes; metrics.jsonl a few hundred bytes
# per epoch), and deepest nesting accepted in one: a crafted file must not exhaust memory
# or the interpreter's recursion limit while it is read or reported.
MAX_FILE_BYTES = 64 * 1024**2
MAX_DEPTH = 32


def depth_ok(data: Any) -> bool:
    """Whether ``data`` nests at most MAX_DEPTH lists and objects (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > MAX_DEPTH:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def short_repr(v: Any, n: int = 40) -> str:
    """A bounded repr for error lines (huge integers and containers by size, not by content)."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int) and v.bit_length() > 64:
        return "a huge integer"
    if isinstance(v, dict):
        return f"an object of {len(v)} key(s)"
    if isinstance(v, list):
        return f"a list of {len(v)} item(s)"
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def read_text(path: Path) -> str | None:
    """The UTF-8 text of a run file, None when there is no such (regular) file; SatkitError
    naming the file for anything unreadable."""
    if not path.is_file():
        return None
    return read_run_text(path)


def read_run_text(path: Path, max_bytes: int = MAX_FILE_BYTES, what: str = "a sattrain run file") -> str:
    """The UTF-8 text of a run directory's file, at most ``max_bytes``; SatkitError naming
    the file for anything else (too large, not UTF-8, unreadable). Used to read
    metrics.jsonl back on ``--resume`` and by sattrain.report."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SatkitError(f"{path}: {size:,} bytes, too large for {what}")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SatkitError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start:e.start + 1].hex()} at position "
                          f"{e.start})") from None
    except OSError as e:
        raise SatkitError(f"{path}: cannot be read ({(e.strerror or str(e)).lower()})") from None


def parse_json(text: str, where: str) -> Any:
    """json.loads with every failure (syntax, 4300-digit integers, nesting) as SatkitError naming ``where``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SatkitError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise SatkitError(f"{where}: not readable JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise SatkitError(f"{where}: not readable JSON ({str(e)[:100]})") from None
    if not depth_ok(data):
        raise SatkitError(f"{where}: not readable JSON (nested more than {MAX_DEPTH} levels deep)")
    return data


def read_json(path: Path) -> dict[str, Any] | None:
    text = read_text(path)
    if text is None:
        return None
    data = parse_json(text, str(path))
    if not isinstance(data, dict):
        raise SatkitError(f"{path}: expected a JSON object, got {short_repr(data)}")
    return data


def recorded_store(target: str | Path) -> str:
    """The store a run trained from, as its config.json records it, for ``sattrain eval RUN``
    without --store. ``target``: a run directory or a checkpoint file in one. SatkitError
    naming the file and what to pass when nothing usable is recorded."""
    p = Path(target)
    run_dir = p if p.is_dir() else p.parent
    cfg_path = run_dir / CONFIG_JSON
    cfg = read_json(cfg_path)
    store = cfg.get("store") if cfg else None
    path = store.get("path") if isinstance(store, dict) else None
    if not isinstance(path, str) or not path.strip():
        raise SatkitError(f"--store: not given, and {cfg_path} records no store; pass --store")
    if "://" not in path and not Path(path).exists():
        raise SatkitError(f"--store: not given, and the store {cfg_path} records ({path}) is not there "
                          "(moved, or recorded relative to another directory); pass --store")
    return path
