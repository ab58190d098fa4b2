"""Job arrays without a scheduler: ``satdata build ... --shard I/N`` and ``satdata finalize``.

Each of N processes (a SLURM array, N machines sharing a file system, N shells) runs
the same build command with its own ``--shard I/N``. They share one prepared store, the
hidden directory ``.NAME.shards`` beside --out:

* the first to arrive prepares it (arrays at full size, labels and ids; satdata.ranges)
  in a private directory and renames it into place; one that loses the race uses the
  winner's, after checking that it is the same build (a fingerprint of the settings and
  of every record's id and label);
* shard I writes ranges I-1, I-1+N, I-1+2N, ... (whole write units: no file is written by
  two shards), then records what it did in ``.satkit-shards/I-of-N.json`` (and its boxes
  in ``I-of-N.boxes.npz``), written aside and renamed; running a shard again redoes it;
* ``satdata finalize NAME`` checks that all N have reported, closes the holes of samples
  skipped with --skip-bad, writes boxes, provenance and digests, and renames the store
  onto NAME under the same output lock and replace rules as a one-process build.

The shared directory never opens as a store (it has no 'satkit' attribute until
finalize). A failed finalize leaves it for another try; a finalize interrupted while
it moved samples down is refused afterwards, since the shards would have to run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from satdata import ranges
from satdata.atomic import (atomic_write, identity, make_parents, make_private_dir, output_lock, probe_writable,
                            remove_stale, sigterm_as_interrupt, write_bytes_atomic)
from satdata.build import (MAX_BAD_RECORDED, BuildConfig, BuildResult, _progress, check_config, check_out, commit,
                           config_json, decoded, open_source, provenance, start_decoding)
from satdata.errors import SatkitError
from satdata.sources import BadSamples
from satdata.store import LockBusy, MapInfo, ArrayWriter, describe_holders, flock_dir

PLAN = ".satkit-plan.json"
DONE = ".satkit-shards"
CLOSING = ".satkit-closing-holes"


def shards_dir(out: Path) -> Path:
    """The prepared store that the shards of a build of ``out`` share."""
    return out.parent / f".{out.name}.shards"


def parse_shard(text: str) -> tuple[int, int]:
    """'2/3' -> (2, 3): this is shard 2 of 3 (counted from 1, like SLURM_ARRAY_TASK_ID with --array=1-N)."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise SatkitError(f"--shard: expected I/N (e.g. 2/3), got {text!r}") from None
    if not 1 <= i <= n or n > 100_000:
        raise SatkitError(f"--shard: {text!r}: I must be between 1 and N (counted from 1)")
    return i, n


@dataclass
class ShardResult:
    path: str  # the shared prepared store
    out: str
    shard: int
    shards: int
    ranges: int
    samples: int
    bad: list[tuple[str, str]]
    done: list[int]  # the shards that have reported so far
    seconds: float


def _fingerprint(cfg: BuildConfig, records: dict[str, list[Any]], n: int) -> str:
    what = {k: v for k, v in config_json(cfg).items() if k not in ("workers", "progress", "dask", "out")}
    h = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    h.update(str(n).encode())
    for split in sorted(records):
        for r in records[split]:
            h.update(f"\0{split}\0{r.id}\0{r.label}".encode())
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1, default=str).encode())


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise SatkitError(f"{path}: the {what} of a sharded build cannot be read ({type(e).__name__}: {e}); "
                          f"remove {path.parent} and run the shards again") from None


def _args_json(args: dict[str, Any]) -> dict[str, Any]:
    return {**args, "maps": {k: asdict(m) for k, m in args["maps"].items()}, "image_size": list(args["image_size"])}


def _args_from_json(d: dict[str, Any], where: Path) -> dict[str, Any]:
    try:
        return {**d, "maps": {k: MapInfo(**m) for k, m in d["maps"].items()}, "image_size": tuple(d["image_size"])}
    except (KeyError, TypeError, AttributeError) as e:
        raise SatkitError(f"{where}: the plan of a sharded build is damaged ({type(e).__name__}: {e}); "
                          f"remove {where.parent} and run the shards again") from None


def _prepared(cfg: BuildConfig, out: Path, source: Any, splits: list[str], records: dict[str, list[Any]],
              maps: dict[str, MapInfo], n: int, t0: float) -> tuple[Path, dict[str, Any]]:
    """The shared prepared store and its plan, made now if no shard made it yet."""
    d = shards_dir(out)
    fp = _fingerprint(cfg, records, n)
    args = ranges.writer_args(source, cfg.size, maps)
    if not d.exists():
        remove_stale(out, kinds=("shards-new",))  # a first shard killed while preparing
        tmp = out.parent / f".{out.name}.shards-new-{os.getpid()}"
        make_private_dir(tmp)
        try:
            writer = ranges.prepare(tmp, args, records)
            counts = {s: len(r) for s, r in records.items()}
            plan = {"fingerprint": fp, "shards": n, "args": _args_json(args), "counts": counts,
                    "ranges": [[r.split, r.start, r.stop] for r in ranges.plan_ranges(writer, counts, n)],
                    "boxes_always": any(spec.from_boxes for spec in source.maps.values()),
                    "overwrite": cfg.overwrite, "root": cfg.root, "started": t0,
                    "provenance": provenance(cfg, source, splits, BadSamples(True), counts, t0,
                                             built_by={"shards": n})}
            _write_json(tmp / PLAN, plan)
            (tmp / DONE).mkdir()
            try:
                os.rename(tmp, d)  # fails when another shard's is already there (not empty)
            except OSError as e:
                if not d.is_dir() or d.is_symlink():
                    raise SatkitError(f"{d}: is in the way of the sharded build ({e.strerror}); remove it") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if d.is_symlink() or not d.is_dir():
        raise SatkitError(f"{d}: is in the way of the sharded build (not a directory satdata made); remove it")
    try:
        plan = _read_json(d / PLAN, "plan")
    except FileNotFoundError:
        raise SatkitError(f"{d}: has no plan (not a sharded build satdata made, or a finalize is committing "
                          "it); remove it and run the shards again") from None
    if plan.get("fingerprint") != fp:
        raise SatkitError(f"{d}: holds a sharded build of {out} with other settings, another --shard N or other "
                          f"records; finish it with `satdata finalize {out}` or remove {d}")
    return d, plan


def build_shard(cfg: BuildConfig, shard: tuple[int, int]) -> ShardResult:
    """Write shard ``I`` of ``N`` of the build ``cfg`` into the shared prepared store."""
    t0 = time.time()
    i, n = shard
    if cfg.dask:
        raise SatkitError("--shard: not with --dask (the scheduler already spreads the work)")
    out = check_config(cfg)
    make_parents(out.parent)
    probe_writable(out.parent)
    bad = BadSamples(cfg.skip_bad)
    source, splits, records, maps = open_source(cfg, bad)
    d, plan = _prepared(cfg, out, source, splits, records, maps, n, t0)
    try:  # shared: shards write side by side; finalize waits for all of them to let go
        lock = flock_dir(d, exclusive=False)
    except LockBusy:
        raise SatkitError(f"{d}: `satdata finalize` is committing this build now; run the shard again "
                          "only if finalize fails") from None
    try:
        return _write_shard(cfg, out, d, plan, records, source, bad, (i, n), t0)
    finally:
        if lock is not None:
            os.close(lock)


def _write_shard(cfg: BuildConfig, out: Path, d: Path, plan: dict[str, Any], records: dict[str, list[Any]],
                 source: Any, bad: BadSamples, shard: tuple[int, int], t0: float) -> ShardResult:
    i, n = shard
    args = _args_from_json(plan["args"], d / PLAN)
    mine = [ranges.Range(s, a, b) for s, a, b in plan["ranges"]][i - 1::n]
    results: list[ranges.RangeResult] = []
    pool = None
    try:
        with sigterm_as_interrupt():
            pool = start_decoding(cfg, source)
            with _progress(sum(r.stop - r.start for r in mine), f"shard {i}/{n}", cfg.progress) as bar:
                for rng, recs in ranges.iter_ranges(mine, records):
                    r = ranges.write_range(d, args, rng, recs, decoded(pool, recs, rng.split, cfg.workers),
                                           stop_at_bad=not cfg.skip_bad)
                    for path, problem in r.bad:
                        bad(path, problem)  # raises without --skip-bad
                    results.append(r)
                    bar.update(rng.stop - rng.start)
            if pool is not None:
                pool.close()
                pool = None
    finally:
        if pool is not None:
            pool.terminate()
    boxes = {f"{r.range.split}-{r.range.start}": r.boxes.astype(np.float64) for r in results if len(r.boxes)}
    box_file = d / DONE / f"{i}-of-{n}.boxes.npz"
    atomic_write(box_file, lambda f: np.savez(f, **boxes))
    _write_json(d / DONE / f"{i}-of-{n}.json", {
        "fingerprint": plan["fingerprint"], "shard": i, "shards": n,
        "ranges": [{"split": r.range.split, "start": r.range.start, "stop": r.range.stop,
                    "bad_positions": r.bad_positions, "bad": r.bad} for r in results]})
    done = sorted(k for k in range(1, n + 1) if (d / DONE / f"{k}-of-{n}.json").is_file())
    return ShardResult(path=str(d), out=str(out), shard=i, shards=n, ranges=len(mine),
                       samples=sum(r.stop - r.start for r in mine), bad=list(bad.items), done=done,
                       seconds=time.time() - t0)


def _gather(d: Path, plan: dict[str, Any]) -> list[ranges.RangeResult]:
    n = int(plan["shards"])
    missing = [k for k in range(1, n + 1) if not (d / DONE / f"{k}-of-{n}.json").is_file()]
    if missing:
        shown = ", ".join(f"{k}/{n}" for k in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise SatkitError(f"{d}: {len(missing)} of {n} shards have not finished: {shown} "
                          "(run `satdata build ... --shard I/N` for each, then finalize again)")
    results = []
    for k in range(1, n + 1):
        rec = _read_json(d / DONE / f"{k}-of-{n}.json", f"record of shard {k}/{n}")
        if rec.get("fingerprint") != plan["fingerprint"]:
            raise SatkitError(f"{d}: shard {k}/{n} reported for another build; run it again")
        try:
            with np.load(d / DONE / f"{k}-of-{n}.boxes.npz", allow_pickle=False) as z:
                boxes = {name: z[name] for name in z.files}
        except (OSError, ValueError) as e:
            raise SatkitError(f"{d}: the boxes of shard {k}/{n} cannot be read ({type(e).__name__}); "
                              "run that shard again") from None
        for r in rec["ranges"]:
            rng = ranges.Range(r["split"], int(r["start"]), int(r["stop"]))
            if not all(rng.start <= int(p) < rng.stop for p in r["bad_positions"]):
                raise SatkitError(f"{d}: shard {k}/{n} reports skipped samples outside {rng}; run it again")
            results.append(ranges.RangeResult(rng, [int(p) for p in r["bad_positions"]],
                                              [(str(a), str(b)) for a, b in r["bad"]],
                                              boxes.get(f"{rng.split}-{rng.start}", np.zeros((0, 6)))))
    return results


def finalize(out_text: str | Path, *, progress: bool = True) -> BuildResult:
    """Commit the sharded build of ``out`` once every shard has reported."""
    from datetime import datetime, timezone

    from satdata.atomic import resolve_out

    t0 = time.time()
    out = Path(out_text)
    d = shards_dir(out)
    if not d.is_dir() or d.is_symlink():
        raise SatkitError(f"{out}: no sharded build to finalize (expected {d}, which "
                          "`satdata build ... --shard I/N` makes)")
    with output_lock(out), sigterm_as_interrupt():
        try:  # no shard may still be writing (and none starts) while the store is finished
            lock = flock_dir(d, exclusive=True)
        except LockBusy as e:
            raise SatkitError(f"{d}: shards are still writing ({describe_holders(e.holders)}); "
                              "finalize when they have finished") from None
        try:
            if not d.is_dir():  # another finalize committed it while this one waited
                raise SatkitError(f"{out}: no sharded build to finalize (another finalize just committed it)")
            try:
                plan = _read_json(d / PLAN, "plan")
            except FileNotFoundError:
                raise SatkitError(f"{d}: has no plan; it is not a sharded build satdata made") from None
            overwrite = bool(plan.get("overwrite"))
            out = resolve_out(out, overwrite=overwrite)
            args = _args_from_json(plan["args"], d / PLAN)
            results = _gather(d, plan)
            planned = [ranges.Range(s, a, b) for s, a, b in plan["ranges"]]
            ranges.check_complete(results, planned)
            if (d / CLOSING).exists():
                raise SatkitError(f"{d}: an earlier finalize was interrupted while it moved samples; "
                                  f"remove {d} and run the shards again")
            before = identity(out)
            check_out(out, overwrite)
            bad = BadSamples(True)
            writer = ArrayWriter.reopen(d, **args)
            counts = {s: int(c) for s, c in plan["counts"].items()}
            holes = any(r.bad_positions for r in results)
            if holes:
                (d / CLOSING).touch()
            ranges.finish_splits(writer, counts, results, bad, str(plan.get("root", "")),
                                 boxes_always=bool(plan.get("boxes_always")))
            prov = dict(plan["provenance"])
            prov.update(skipped=[list(b) for b in bad.items[:MAX_BAD_RECORDED]], skipped_count=len(bad.items),
                        counts=dict(writer.counts), seconds=round(time.time() - float(plan.get("started", t0)), 3),
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            info = writer.finish(prov)
            shutil.rmtree(d / DONE)  # the store is complete: the build's own records go
            (d / PLAN).unlink()
            if holes:
                (d / CLOSING).unlink()
            commit(d, out, before)
        finally:
            if lock is not None:
                os.close(lock)
    return BuildResult(path=str(out), info=info, bad=list(bad.items), seconds=time.time() - t0,
                       notes=dict(info.provenance.get("notes", {})))


__all__ = ["ShardResult", "build_shard", "finalize", "parse_shard", "shards_dir"]
