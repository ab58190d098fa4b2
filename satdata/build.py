"""Build a store from a source: parallel decode, one geometry per sample, whole-chunk writes.

The build runs in a hidden sibling directory ``.NAME.partial-PID`` and is renamed onto
``--out`` only when every array and digest is written; any failure, Ctrl-C or SIGTERM
removes it. Even a SIGKILL leaves nothing that opens as a store: the 'satkit' attribute
that makes a directory a store is written last (see satdata.store).
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from satdata import __version__
from satdata.errors import SatkitError, SourceError
from satdata.geometry import FIT_MODES, apply_boxes, apply_image, apply_map, keep_boxes, plan_fit, rasterize_boxes
from satdata.ranges import label_row
from satdata.atomic import (commit_path, identity, make_parents, make_private_dir, output_lock, partial_path,
                            probe_writable, remove_empty, remove_partial, remove_stale, resolve_out,
                            sigterm_as_interrupt, store_lock)
from satdata.sources import BadSamples, Decoded, Record, Source, SourceOptions, make_source
from satdata.sources._base import check_box, image_hw, set_reduced_decode
from satdata.store import SPLITS, ArrayWriter, MapInfo, StoreInfo, read_info
from satdata.workers import DecodePool, WorkerDied

MAX_BAD_RECORDED = 1000


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides what a build writes (recorded in the store's provenance)."""

    source: str
    root: str
    out: str
    size: tuple[int, int] = (32, 32)  # (H, W)
    fit: str = "stretch"
    splits: tuple[str, ...] | None = None  # None: every split the source has
    workers: int = 0  # 0: decode in this process
    overwrite: bool = False
    skip_bad: bool = False
    options: SourceOptions = field(default_factory=SourceOptions)
    given_options: tuple[str, ...] = ()  # source options the user set explicitly
    progress: bool = True
    reduced_decode: bool = True  # JPEG DCT-scaled decoding when the store is much smaller
    dask: str | None = None  # decode and write on Dask workers: "local:N" or a scheduler address


@dataclass
class BuildResult:
    path: str
    info: StoreInfo
    bad: list[tuple[str, str]]
    seconds: float
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(source: Source, out_hw: tuple[int, int], fit_mode: str, reduced_decode: bool = True) -> None:
    # Workers only decode and resize; they never touch zarr (its I/O loop is per process).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_decoder(source, out_hw, fit_mode, reduced_decode)


def init_decoder(source: Source, out_hw: tuple[int, int], fit_mode: str, reduced_decode: bool = True) -> None:
    """Set up this process to decode for a build, one of many doing so (a pool worker, a
    Dask task): ``_process`` then works here, and OpenCV uses one thread."""
    _init_worker_inline(source, out_hw, fit_mode, reduced_decode)
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the worker processes


def _process(record: Record) -> tuple[str, Any]:
    """Decode one record and give it the store's geometry. Never raises for bad data."""
    try:
        return "ok", transform(_WORKER["source"], record, _WORKER["out_hw"], _WORKER["fit"])
    except SourceError as e:
        return "bad", (e.path or record.id, e.problem)
    except Exception as e:  # a decoder crash on one odd file is reported, not fatal to --skip-bad
        return "bad", (record.id, f"{type(e).__name__}: {e}")


def transform(source: Source, record: Record, out_hw: tuple[int, int], fit_mode: str
              ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """One sample in the store's frame: (image, {map: array}, boxes (k, 5) [cls, x1..y2])."""
    d: Decoded = source.decode(record)
    h, w = image_hw(d.image)  # its size on disk, even when decoded at reduced scale
    img = np.asarray(d.image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise SourceError(record.id, f"decoded image has shape {img.shape} {img.dtype}, not (h, w, 3) uint8")
    fit = plan_fit((h, w), out_hw, fit_mode)
    out_img = apply_image(img, fit)
    maps: dict[str, np.ndarray] = {}
    boxes_out = np.zeros((0, 5), dtype=np.float64)
    if d.boxes is not None and len(d.boxes):
        b = np.asarray(d.boxes, dtype=np.float64).reshape(-1, 5)
        for row in b:
            check_box(row[1:], (h, w), record.id)
        xy = apply_boxes(b[:, 1:], fit)
        keep = keep_boxes(xy)
        boxes_out = np.concatenate([b[keep, :1], xy[keep]], axis=1)
    for name, spec in source.maps.items():
        if spec.from_boxes:
            maps[name] = rasterize_boxes(boxes_out[:, 1:], out_hw)
        else:
            if name not in d.masks:
                raise SourceError(record.id, f"source gave no {name!r} map")
            m = d.masks[name]
            if m.shape[:2] != (h, w):
                raise SourceError(record.id, f"map {name!r} is {m.shape[1]}x{m.shape[0]}, image is {w}x{h}")
            maps[name] = apply_map(m, fit, spec.encoding)
    return out_img, maps, boxes_out


# --------------------------------------------------------------------------- output dir


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing --out unless --overwrite, and never replace a non-store."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise SatkitError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.is_dir() and (out / "zarr.json").is_file():
        try:
            import zarr

            read_info(zarr.open_group(str(out), mode="r"), str(out))
            return
        except Exception:
            pass
    raise SatkitError(f"{out}: exists and is not a satkit store; refusing to replace it")


def commit(tmp: Path, out: Path, before: Any = None) -> None:
    """Move a finished build onto out, which must still be what it was when the build began
    (``before``, from satdata.atomic.identity). An existing store is swapped out in one
    atomic step where the OS allows (so a kill at any moment leaves the old or the new
    store at out), then removed; a store another command is changing is not replaced."""

    def remove_old(p: Path) -> None:
        shutil.rmtree(p, ignore_errors=True)

    if before is not None and out.is_dir() and not out.is_symlink():
        with store_lock(out):
            commit_path(tmp, out, before, remove_old=remove_old)
    else:
        commit_path(tmp, out, before, remove_old=remove_old)


# --------------------------------------------------------------------------- build


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from satdata.clikit import progress_bar

    return progress_bar(total, desc, "img", enabled=enabled)


def build(cfg: BuildConfig) -> BuildResult:
    """Build a store as cfg says. Raises SatkitError (one line, names file or option)."""
    t0 = time.time()
    out = check_config(cfg)
    if cfg.dask and cfg.root:  # the workers read the records' files from wherever they run
        cfg = replace(cfg, root=str(Path(cfg.root).resolve()))
    made = make_parents(out.parent)
    try:
        probe_writable(out.parent)
        with output_lock(out):
            return _build_locked(cfg, out, t0)
    finally:
        remove_empty(made)  # only the directories made above, and only if still empty


def check_config(cfg: BuildConfig) -> Path:
    """The checks every build makes before any work; the output path (through a link
    with --overwrite: its target)."""
    from satdata.remote import refuse_remote_output

    refuse_remote_output(cfg.out, "--out")  # before Path() turns s3://x into a local s3:/x
    if cfg.fit not in FIT_MODES:
        raise SatkitError(f"--fit: unknown mode {cfg.fit!r} (one of {', '.join(FIT_MODES)})")
    if min(cfg.size) < 1:
        raise SatkitError(f"--size: must be positive, got {cfg.size}")
    if cfg.dask:
        from satdata.dask_build import check_address

        check_address(cfg.dask)
        if cfg.workers:
            raise SatkitError("--workers: not with --dask (the Dask workers decode; size the cluster instead)")
    out = resolve_out(Path(cfg.out), overwrite=cfg.overwrite)
    check_out(out, cfg.overwrite)
    return out


def open_source(cfg: BuildConfig, bad: BadSamples) -> tuple[Source, list[str], dict[str, list[Record]], dict[str, MapInfo]]:
    """The source, the splits to build, their records and the maps the store will hold."""
    source = make_source(cfg.source, cfg.root, cfg.options, bad, cfg.given_options)
    available = source.available_splits()
    splits = list(cfg.splits) if cfg.splits else available
    for s in splits:
        if s not in SPLITS:
            raise SatkitError(f"--splits: unknown split {s!r} (one of {', '.join(SPLITS)})")
        if splits.count(s) > 1:
            raise SatkitError(f"--splits: split {s!r} is given {splits.count(s)} times; give each split once")
        if s not in available:
            raise SatkitError(
                f"--splits: {cfg.source} under {cfg.root} has no split {s!r} (it has: {', '.join(available)})"
            )
    source.prepare(splits)  # every split's files are there (else an error naming them), classes settled
    records = {}
    for s in splits:
        records[s] = source.records(s)
        if not records[s]:
            raise SourceError(cfg.root, f"split {s!r} is empty")

    maps = {name: MapInfo(name=name, encoding=spec.encoding, kind=spec.kind, channels=spec.channels,
                          provenance={"source": cfg.source, "from": "boxes" if spec.from_boxes else "annotations",
                                      **({"imported": spec.provenance} if spec.provenance else {})})
            for name, spec in source.maps.items()}
    return source, splits, records, maps


def provenance(cfg: BuildConfig, source: Source, splits: list[str], bad: BadSamples, counts: dict[str, int],
               t0: float, **extra: Any) -> dict[str, Any]:
    """The store's provenance record (how it was built; not part of any array's digest)."""
    return {
        "source": cfg.source,
        "root": str(Path(cfg.root).resolve()) if cfg.root and getattr(source, "needs_root", True) else None,
        "size": list(cfg.size),
        "fit": cfg.fit,
        "splits": splits,
        "options": cfg.options.non_default(),
        "skip_bad": cfg.skip_bad,
        "reduced_decode": cfg.reduced_decode,
        "skipped": [list(b) for b in bad.items[:MAX_BAD_RECORDED]],
        "skipped_count": len(bad.items),
        "counts": dict(counts),
        "notes": {s: dict(v) for s, v in getattr(source, "notes", {}).items()},
        # --classes: how the class list was made (absent for a source's own list)
        **({"classes": dict(source.class_provenance)} if getattr(source, "class_provenance", None) else {}),
        **extra,
        "tool": f"satkit {__version__}",
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0, 3),
    }


def _build_locked(cfg: BuildConfig, out: Path, t0: float) -> BuildResult:
    """The build proper, with the output lock held: nothing else of satdata writes ``out``."""
    before = identity(out)  # the commit refuses if this changes while the build runs
    check_out(out, cfg.overwrite)
    bad = BadSamples(cfg.skip_bad)
    source, splits, records, maps = open_source(cfg, bad)
    remove_stale(out)
    tmp = partial_path(out)
    pool = None
    created = False
    try:
        with sigterm_as_interrupt():
            make_private_dir(tmp)
            created = True
            extra: dict[str, Any] = {}
            begun: dict[str, Any] = {}
            if cfg.dask:
                writer, extra, begun = _build_dask(cfg, tmp, source, records, maps, bad)
            else:
                pool = start_decoding(cfg, source)
                writer = ArrayWriter(tmp, dataset=source.dataset, classes=source.classes,
                                     image_size=cfg.size, label_kind=source.label_kind, maps=maps,
                                     hflip=bool(source.hflip))
                for s in splits:
                    _build_split(writer, source, s, records[s], pool, bad, cfg)
                if pool is not None:
                    pool.close()
                    pool = None
            info = writer.finish(provenance(cfg, source, splits, bad, dict(writer.counts), t0, **extra), digests=begun)
            commit(tmp, out, before)
    except BaseException:
        if pool is not None:
            pool.terminate()
        if created:  # only what this process made: never a planted path under that name
            remove_partial(tmp)
        raise
    return BuildResult(path=str(out), info=info, bad=list(bad.items), seconds=time.time() - t0,
                       notes=dict(info.provenance.get("notes", {})))


def _build_dask(cfg: BuildConfig, tmp: Path, source: Source, records: dict[str, list[Record]],
                maps: dict[str, MapInfo], bad: BadSamples) -> tuple[ArrayWriter, dict[str, Any], dict[str, Any]]:
    """Decode and write on Dask workers (satdata.dask_build), then close holes and boxes."""
    from satdata import ranges
    from satdata.dask_build import client_for, run_ranges, worker_threads

    args = ranges.writer_args(source, cfg.size, maps)
    writer = ranges.prepare(tmp, args, records)
    counts = {s: len(r) for s, r in records.items()}
    digests = ranges.Digests(writer, counts)
    with client_for(cfg.dask or "") as client:
        plan = ranges.plan_ranges(writer, counts, worker_threads(client))
        results = run_ranges(client, tmp, args, plan, records, source, size=cfg.size, fit=cfg.fit,
                             reduced_decode=cfg.reduced_decode, stop_at_bad=not cfg.skip_bad,
                             progress=lambda: _progress(sum(counts.values()), "build (dask)", cfg.progress),
                             on_result=digests.finished)
    if not cfg.skip_bad:
        for r in results:
            for path, problem in r.bad:
                bad(path, problem)  # raises: the first bad sample fails the build
    ranges.check_complete(results, plan)
    ranges.finish_splits(writer, counts, results, bad, cfg.root,
                         boxes_always=any(spec.from_boxes for spec in source.maps.values()))
    return writer, {"built_by": {"dask": cfg.dask, "tasks": len(plan)}}, digests.begun(results)


_WORKER_DIED = ("a build worker died ({how}): killed, out of memory, or a crash in an image decoder; "
                "run again with --workers 0 to find the file that causes it")


def start_decoding(cfg: BuildConfig, source: Source) -> DecodePool | None:
    """The pool of ``cfg.workers`` decoding processes, or None to decode in this process
    (then set up for it). The caller terminates the pool on failure."""
    if cfg.workers <= 0:
        _init_worker_inline(source, cfg.size, cfg.fit, cfg.reduced_decode)
        return None
    ctx = mp.get_context("forkserver" if sys.platform != "win32" else "spawn")
    # not multiprocessing.Pool: a worker that dies (a crash in a decoder, the OOM killer)
    # must end the build with a message, not hang it (satdata.workers)
    try:
        return DecodePool(cfg.workers, ctx, _process, initializer=_init_worker,
                          initargs=(source, cfg.size, cfg.fit, cfg.reduced_decode))
    except WorkerDied as e:
        raise SatkitError(_WORKER_DIED.format(how=e)) from None


def decoded(pool: DecodePool | None, records: list[Record], split: str, workers: int) -> Iterator[tuple[str, Any]]:
    """``_process`` of each record, in order: on the pool, or here."""
    if pool is None:
        return map(_process, records)
    return _pool_map(pool, records, max(1, min(64, len(records) // (8 * workers) or 1)), split)


def _pool_map(pool: DecodePool, records: list[Record], chunksize: int, split: str) -> Iterator[Any]:
    """The pool's results in order; a worker's death becomes a one-line error, not a hang."""
    try:
        yield from pool.imap(records, chunksize)
    except WorkerDied as e:
        raise SatkitError(f"split {split!r}: " + _WORKER_DIED.format(how=e)) from None


def _init_worker_inline(source: Source, out_hw: tuple[int, int], fit_mode: str,
                        reduced_decode: bool = True) -> None:
    _WORKER.update(source=source, out_hw=out_hw, fit=fit_mode)
    set_reduced_decode(out_hw if reduced_decode else None, fit_mode)


def _build_split(writer: ArrayWriter, source: Source, split: str, records: list[Record],
                 pool: Any, bad: BadSamples, cfg: BuildConfig) -> None:
    n_classes = len(source.classes)
    writer.create_split(split, len(records))
    chunk = writer.split_chunk[split]
    imgs: list[np.ndarray] = []
    labels: list[Any] = []
    ids: list[str] = []
    maps: dict[str, list[np.ndarray]] = {m: [] for m in source.maps}
    boxes: list[np.ndarray] = []
    written = 0

    def flush() -> None:
        nonlocal written
        if not imgs:
            return
        lab = np.asarray(labels, dtype=np.int64 if source.label_kind == "single" else np.uint8)
        writer.write(split, written, np.stack(imgs), lab, list(ids),
                     {m: np.stack(v) for m, v in maps.items()})
        written += len(imgs)
        imgs.clear(), labels.clear(), ids.clear()
        for v in maps.values():
            v.clear()

    results = decoded(pool, records, split, cfg.workers)
    with _progress(len(records), f"{split}", cfg.progress) as bar:
        for rec, (status, payload) in zip(records, results):
            bar.update(1)
            if status == "bad":
                path, problem = payload
                bad(path, problem)  # raises unless --skip-bad
                continue
            img, m, bx = payload
            idx = written + len(imgs)
            if len(bx):
                boxes.append(np.concatenate([np.full((len(bx), 1), idx, dtype=np.float64), bx], axis=1))
            imgs.append(img)
            labels.append(label_row(rec.label, n_classes, source.label_kind))
            ids.append(rec.id)
            for name, arr in m.items():
                maps[name].append(arr)
            if len(imgs) == chunk:
                flush()
        flush()
    if written == 0:
        raise SourceError(cfg.root, f"split {split!r} is empty (every sample was bad)")
    writer.close_split(split, written)
    if any(spec.from_boxes for spec in source.maps.values()) or boxes:
        writer.write_boxes(split, np.concatenate(boxes) if boxes else np.zeros((0, 6)))


def _versions() -> dict[str, str]:
    import zarr

    return {"python": platform.python_version(), "numpy": np.__version__, "zarr": zarr.__version__}


def config_json(cfg: BuildConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["options"] = cfg.options.non_default()
    return d


def resolve_splits(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    return parts or None


def parse_size(text: str) -> tuple[int, int]:
    """'32' -> (32, 32); '48x64' -> (H=48, W=64)."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x", 1)
            size = (int(h), int(w))
        else:
            size = (int(text), int(text))
    except ValueError:
        raise SatkitError(f"--size: expected N or HxW, got {text!r}") from None
    if min(size) < 1 or max(size) > 4096:
        raise SatkitError(f"--size: must be between 1 and 4096, got {text!r}")
    return size


__all__: Sequence[str] = ["BuildConfig", "BuildResult", "build", "transform", "parse_size", "resolve_splits"]
