"""Helpers shared by the bench/ scripts: the machine they ran on, robust timing, JSON out.

Every bench script prints one JSON object (and may write it to ``--json``); the
``machine`` block below goes into each, so a number is never separated from the CPU,
core count and library versions that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU, cores, load, accelerator and versions of the libraries the numbers depend on."""
    import numpy as np
    import torch
    import zarr

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "zarr": zarr.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import h5py

        info["h5py"] = h5py.__version__
    except ImportError:
        info["h5py"] = None
    return info


def timed(fn: Callable[[], Any], repeats: int, *, warmup: int = 0, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``sync`` (e.g. torch.cuda.synchronize) runs before each clock read, so queued device
    work is counted in the call that queued it.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of ``xs``."""
    xs = [float(x) for x in xs]
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def emit(result: dict[str, Any], path: Path | None) -> None:
    """Print ``result`` as JSON; also write it to ``path`` when given (parents created)."""
    text = json.dumps(result, indent=2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget ``path``'s cached pages (posix_fadvise DONTNEED), file by file.

    Only clean pages are dropped and nothing needs root; returns False where the call is
    unavailable. Used so "load from disk" numbers are not just memory copies, as far as
    an unprivileged process can arrange.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def cached(base: Path, key: str) -> bool:
    """Whether ``base`` already holds the data of ``key`` (its stamp ``.complete-<key>``); if
    not, ``base`` is emptied and made, for the caller to fill and then ``done(base, key)``."""
    if (base / f".complete-{key}").exists():
        return True
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    return False


def done(base: Path, key: str) -> None:
    """Stamp ``base`` as holding the data of ``key`` (see ``cached``)."""
    (base / f".complete-{key}").touch()


def synthetic_store(base: Path, n: int, size: int, *, unit: int | None = None, seed: int = 0,
                    classes: int = 10, map_name: str = "mask") -> Path:
    """A store of ``n`` random ``size`` x ``size`` samples (``classes`` classes) with a binary
    rectangle mask named ``map_name``, written file by file (the whole split is never in
    memory). ``unit``: samples per file (unsharded chunks of that many); None: the writer's
    own layout for the size. Cached in ``base``: a second call with the same arguments
    returns at once."""
    from satdata.store import MapInfo, ArrayWriter
    import numpy as np

    path = base / "store.zarr"
    key = f"{n}-{size}-{unit or 'default'}"
    if cached(base, key):
        return path
    rng = np.random.default_rng(seed)
    w = ArrayWriter(path, dataset="synthetic", classes=[str(i) for i in range(classes)], image_size=(size, size),
                    label_kind="single", maps={map_name: MapInfo(name=map_name, encoding="binary", kind="mask")})
    if unit:
        w.chunk, w.shard = unit, None  # the writer's layout: chunks of `unit` samples, no shards
    w.create_split("train", n)
    step = w.split_chunk["train"]
    rows, cols = np.arange(size)[None, :, None], np.arange(size)[None, None, :]
    for a in range(0, n, step):
        b = min(n, a + step)
        k = b - a
        images = rng.integers(0, 256, size=(k, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, classes, size=k).astype(np.int64)
        y0, x0 = rng.integers(0, size // 2, k), rng.integers(0, size // 2, k)
        hh, ww = rng.integers(4, size // 2, k), rng.integers(4, size // 2, k)
        maps = ((rows >= y0[:, None, None]) & (rows < (y0 + hh)[:, None, None])
                & (cols >= x0[:, None, None]) & (cols < (x0 + ww)[:, None, None])).astype(np.uint8)
        w.write("train", a, images, labels, [f"s{i}" for i in range(a, b)], {map_name: maps})
    w.close_split("train", n)
    w.finish({"source": "bench synthetic (bench/_common.py)"})
    done(base, key)
    return path
