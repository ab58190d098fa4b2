"""A build written by many processes: each split cut into ranges of whole write units.

Dask tasks (``satdata build --dask``) and job-array members (``--shard i/n``) run the same
per-range writer, :func:`write_range`, into one prepared store:

* :func:`prepare` creates every split's arrays at their final shapes and writes the
  labels and ids, which the records give before any image is decoded;
* each range is a run of whole write units (``satdata.store.write_unit``: the chunk, or
  the shard of a sharded array), and a task writes only the images and maps of its own
  range, so no two tasks ever write one file (zarr does not make concurrent writes to
  one chunk or shard safe) and the bytes of every file are those a one-process build
  writes;
* a sample found bad under ``--skip-bad`` leaves a hole that :func:`close_holes` closes
  when every range is done, moving the later samples (and labels, ids, boxes) down, so
  the store equals a one-process build's, per-array digests included.

Nothing here commits a store: the caller writes the provenance and digests and renames
the directory into place (satdata.build).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from satdata.errors import SatkitError
from satdata.sources import Record, Source
from satdata.store import SPLIT_ORDER, ArrayDigest, ArrayWriter, MapInfo, array_path, write_rows, write_unit

# A range holds at least this many samples (whole write units): a task's fixed costs (a
# round trip to the scheduler, opening the store) stay small beside its decoding.
RANGE_MIN_SAMPLES = 256


@dataclass(frozen=True)
class Range:
    """Samples [start, stop) of one split: whole write units (the last may be short)."""

    split: str
    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.split} samples [{self.start}, {self.stop})"


@dataclass
class RangeResult:
    """What a task reports: the samples it skipped and the boxes of the ones it wrote."""

    range: Range
    bad_positions: list[int] = field(default_factory=list)  # split positions left as holes
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, problem), in record order
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))  # [position, class, x1, y1, x2, y2]


def writer_args(source: Source, size: tuple[int, int], maps: Mapping[str, MapInfo]) -> dict[str, Any]:
    """The ArrayWriter arguments of a build (passed to every task that reopens the store)."""
    return dict(dataset=source.dataset, classes=list(source.classes), image_size=tuple(size),
                label_kind=source.label_kind, maps=dict(maps), hflip=bool(source.hflip))


def label_row(label: Any, n_classes: int, kind: str) -> Any:
    """A record's label as stored: the class index, or a multi-hot row."""
    if kind == "single":
        return int(label)
    row = np.zeros(n_classes, dtype=np.uint8)
    row[list(label)] = 1
    return row


def prepare(path: str | Path, args: Mapping[str, Any], records: Mapping[str, Sequence[Record]]) -> ArrayWriter:
    """Create the store's arrays at full size and write every split's labels and ids."""
    writer = ArrayWriter(path, **args)
    n_classes = len(writer.classes)
    for split, recs in records.items():
        writer.create_split(split, len(recs))
        dtype = np.int64 if writer.label_kind == "single" else np.uint8
        labels = np.asarray([label_row(r.label, n_classes, writer.label_kind) for r in recs], dtype=dtype)
        g = writer.group
        g[array_path(split, "labels")][0:len(recs)] = labels
        g[array_path(split, "ids")][0:len(recs)] = np.asarray([r.id for r in recs], dtype=object).astype(str)
    return writer


def plan_ranges(writer: ArrayWriter, counts: Mapping[str, int], workers: int = 1) -> list[Range]:
    """Every split cut into ranges of whole write units, in split order: ranges of at
    least RANGE_MIN_SAMPLES, made shorter (down to one unit) until there are about four
    per worker, so that a slow range does not leave the others idle at the end."""
    out = []
    total = sum(counts.values())
    for split in sorted(counts, key=lambda s: SPLIT_ORDER.get(s, 99)):
        unit = writer.split_chunk[split]
        units = max(1, -(-RANGE_MIN_SAMPLES // unit))
        units = max(1, min(units, total // (4 * max(1, workers) * unit)))
        step = unit * units
        n = counts[split]
        out += [Range(split, a, min(n, a + step)) for a in range(0, n, step)]
    return out


def write_range(path: str | Path, args: Mapping[str, Any], rng: Range, records: Sequence[Record],
                results: Iterable[tuple[str, Any]], *, stop_at_bad: bool) -> RangeResult:
    """Write the images and maps of ``rng`` from ``results`` (``satdata.build._process``'s
    output for ``records``, in order), one whole write unit at a time.

    A bad sample leaves its rows as fill values and is reported; with ``stop_at_bad``
    (no --skip-bad) the first one ends the range at once: the build fails anyway.
    """
    import zarr

    if not Path(path, "zarr.json").is_file():
        raise SatkitError(f"{path}: the store being built is not here; a build over many machines "
                          "needs --out on a file system that every worker mounts at the same path")
    g = zarr.open_group(str(path), mode="r+")
    maps: Mapping[str, MapInfo] = args["maps"]
    images = g[array_path(rng.split, "images")]
    map_arrs = {name: g[array_path(rng.split, "saliency", m.array_name)] for name, m in maps.items()}
    unit = write_unit(images)  # type: ignore[arg-type]
    if rng.start % unit or len(records) != rng.stop - rng.start:
        raise ValueError(f"{rng}: not whole write units of {unit}, or {len(records)} records")
    out = RangeResult(rng)
    boxes: list[np.ndarray] = []
    a = rng.start
    buf: np.ndarray | None = None
    mbuf: dict[str, np.ndarray] = {}
    for k, (rec, (status, payload)) in enumerate(zip(records, results)):
        pos = rng.start + k
        if buf is None:
            b = min(a + unit, rng.stop)
            buf = np.zeros((b - a,) + tuple(images.shape[1:]), dtype=images.dtype)  # type: ignore[union-attr]
            mbuf = {n: np.zeros((b - a,) + tuple(arr.shape[1:]), dtype=arr.dtype) for n, arr in map_arrs.items()}  # type: ignore[union-attr]
        if status == "bad":
            out.bad_positions.append(pos)
            out.bad.append(tuple(payload))  # type: ignore[arg-type]
            if stop_at_bad:
                return out
        else:
            img, m, bx = payload
            buf[pos - a] = img
            for name, arr in m.items():
                mbuf[name][pos - a] = arr
            if len(bx):
                boxes.append(np.concatenate([np.full((len(bx), 1), pos, dtype=np.float64), bx], axis=1))
        if pos + 1 == a + len(buf):
            if not Path(path, "zarr.json").is_file():  # the build failed and is being removed
                raise SatkitError(f"{path}: the build was stopped")
            write_rows(images, a, buf)  # type: ignore[arg-type]
            for name, arr in map_arrs.items():
                write_rows(arr, a, mbuf[name])  # type: ignore[arg-type]
            a, buf = pos + 1, None
    if boxes:
        out.boxes = np.concatenate(boxes)
    return out


class Digests:
    """Digests of the images and maps, begun while the build runs: each time a range is
    done, every file before the first range still running is hashed (ArrayDigest), so the
    building process hashes while the workers decode instead of after them."""

    def __init__(self, writer: ArrayWriter, counts: Mapping[str, int]) -> None:
        self.counts = dict(counts)
        self.done: dict[str, list[tuple[int, int]]] = {s: [] for s in counts}
        self.arrays: dict[str, dict[str, ArrayDigest]] = {}
        for split in counts:
            paths = [array_path(split, "images")]
            paths += [array_path(split, "saliency", m.array_name) for m in writer.maps.values()]
            self.arrays[split] = {p: ArrayDigest(writer.group[p]) for p in paths}  # type: ignore[arg-type]

    def finished(self, result: RangeResult) -> None:
        r = result.range
        self.done[r.split].append((r.start, r.stop))
        upto = 0
        for a, b in sorted(self.done[r.split]):
            if a > upto:
                break
            upto = max(upto, b)
        for d in self.arrays[r.split].values():
            d.advance(upto)

    def begun(self, results: Sequence[RangeResult]) -> dict[str, ArrayDigest]:
        """The digests to finish, less those of splits with holes (moving samples changes them)."""
        holes = {r.range.split for r in results if r.bad_positions}
        return {p: d for split, ds in self.arrays.items() if split not in holes for p, d in ds.items()}


def close_holes(writer: ArrayWriter, split: str, n: int, bad_positions: Sequence[int]) -> int:
    """Move the samples after each hole down so the split is dense, then shrink it.

    Each array is rewritten from the write unit holding the first hole on, a unit at a
    time in increasing order (a sample only ever moves down, so none is overwritten
    before it is read); rows past the new end read as fill values, as a one-process
    build leaves them. Returns the number of samples kept."""
    bad = np.unique(np.asarray(bad_positions, dtype=np.int64))
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), bad)
    if len(bad):
        g = writer.group
        paths = [array_path(split, f) for f in ("images", "labels", "ids")]
        paths += [array_path(split, "saliency", m.array_name) for m in writer.maps.values()]
        for p in paths:
            arr = g[p]
            u = write_unit(arr)  # type: ignore[arg-type]
            for a in range((int(bad[0]) // u) * u, len(keep), u):
                b = min(a + u, n)
                src = keep[a:min(b, len(keep))]
                block = np.full((b - a,) + tuple(arr.shape[1:]), arr.fill_value, dtype=arr.dtype)  # type: ignore[union-attr]
                block[:len(src)] = arr.oindex[src]  # type: ignore[union-attr]
                arr[a:b] = block
    writer.close_split(split, len(keep))
    return len(keep)


def gather_boxes(results: Iterable[RangeResult], kept: np.ndarray | None = None) -> np.ndarray:
    """One split's boxes in sample order, positions renumbered past the holes (``kept``:
    the positions kept, in order; None when there were none)."""
    parts = [r.boxes for r in sorted(results, key=lambda r: r.range.start) if len(r.boxes)]
    boxes = np.concatenate(parts) if parts else np.zeros((0, 6))
    if kept is not None and len(boxes):
        boxes[:, 0] = np.searchsorted(kept, boxes[:, 0].astype(np.int64))
    return boxes


def finish_splits(writer: ArrayWriter, counts: Mapping[str, int], results: Sequence[RangeResult],
                  bad_call: Any, root: str, *, boxes_always: bool) -> None:
    """Every range written: report bad samples (``bad_call`` raises without --skip-bad),
    close the holes, write each split's boxes (always where a map is drawn from boxes,
    as a one-process build does). Raises if a split kept no sample."""
    from satdata.errors import SourceError

    by_split: dict[str, list[RangeResult]] = {}
    for r in sorted(results, key=lambda r: (SPLIT_ORDER.get(r.range.split, 99), r.range.start)):
        for path, problem in r.bad:
            bad_call(path, problem)
        by_split.setdefault(r.range.split, []).append(r)
    for split, n in counts.items():
        rs = by_split.get(split, [])
        bad = [p for r in rs for p in r.bad_positions]
        kept_n = close_holes(writer, split, n, bad)
        if kept_n == 0:
            raise SourceError(root, f"split {split!r} is empty (every sample was bad)")
        kept = np.setdiff1d(np.arange(n), np.asarray(bad, dtype=np.int64)) if bad else None
        boxes = gather_boxes(rs, kept)
        if boxes_always or len(boxes):
            writer.write_boxes(split, boxes)


def check_complete(results: Sequence[RangeResult], ranges: Sequence[Range]) -> None:
    """Every planned range reported exactly once (a lost or doubled task is a bug, not data)."""
    got = sorted((r.range.split, r.range.start, r.range.stop) for r in results)
    want = sorted((r.split, r.start, r.stop) for r in ranges)
    if got != want:
        raise SatkitError(f"the build's tasks reported {len(got)} ranges, {len(want)} were planned")


def iter_ranges(ranges: Sequence[Range], records: Mapping[str, Sequence[Record]]) -> Iterator[tuple[Range, list[Record]]]:
    for r in ranges:
        yield r, list(records[r.split][r.start:r.stop])


__all__ = ["RANGE_MIN_SAMPLES", "Digests", "Range", "RangeResult", "check_complete", "close_holes", "finish_splits",
           "gather_boxes", "iter_ranges", "label_row", "plan_ranges", "prepare", "write_range", "writer_args"]
