"""Builds on many workers: Dask (a LocalCluster on 127.0.0.1) and job-array shards + finalize.

Each way must write the store a one-process build writes: the same per-array digests
(which cover every chunk file's bytes), the same boxes, the same list of skipped samples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from satdata import ranges, store as store_mod
from satdata.build import BuildConfig, build
from satdata.errors import SatkitError
from satdata.shards import build_shard, finalize, shards_dir
from satdata.store import open_store

pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parents[1]


def _digests(path: Path) -> dict:
    return open_store(path).info.digests


def _satdata(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "satdata", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def _leftovers(d: Path, name: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(f".{name}") and not p.name.endswith(".lock"))


def test_digits_one_process_dask_and_shards_write_the_same_store(tmp_path: Path) -> None:
    one = build(BuildConfig(source="digits", root="", out=str(tmp_path / "one.zarr"), progress=False))
    environ = dict(os.environ)
    dask = build(BuildConfig(source="digits", root="", out=str(tmp_path / "dask.zarr"), progress=False,
                             dask="local:2"))
    # Dask's nannies set OMP_NUM_THREADS=1 (and more) in the process that starts a LocalCluster:
    # put back, so the caller's later subprocesses keep their threads
    assert dict(os.environ) == environ
    cfg = BuildConfig(source="digits", root="", out=str(tmp_path / "sharded.zarr"), progress=False)
    reports = [build_shard(cfg, (i, 3)) for i in (3, 1, 2)]  # any order
    assert [r.done for r in reports][-1] == [1, 2, 3]
    assert sum(r.samples for r in reports) == 1797
    sharded = finalize(tmp_path / "sharded.zarr", progress=False)

    want = one.info.digests
    assert len(want) >= 6
    assert dask.info.digests == want
    assert sharded.info.digests == want
    assert dask.info.provenance["built_by"]["dask"] == "local:2"
    assert dask.info.provenance["built_by"]["tasks"] >= 4  # train 1442 + test 355 in 512-sample units
    assert sharded.info.provenance["built_by"] == {"shards": 3}
    # nothing of the work is left beside the stores
    assert _leftovers(tmp_path, "sharded.zarr") == [] and _leftovers(tmp_path, "dask.zarr") == []
    st = open_store(tmp_path / "sharded.zarr")
    assert st.info.splits == {"train": 1442, "test": 355}
    np.testing.assert_array_equal(st.load("train", "images"), open_store(tmp_path / "one.zarr").load("train", "images"))


@pytest.fixture
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write units of 2 samples and one unit per range: many ranges from a tiny fixture."""
    monkeypatch.setattr(store_mod, "samples_per_chunk", lambda *a, **k: 2)
    monkeypatch.setattr(store_mod, "samples_per_shard", lambda *a, **k: 2)  # large images: shards of 2
    monkeypatch.setattr(ranges, "RANGE_MIN_SAMPLES", 1)


@pytest.mark.parametrize("size", [32, 224])  # chunked (format 1) and sharded (format 2) layouts
def test_skipped_samples_leave_no_hole_and_boxes_follow(tmp_path: Path, small_units: None, size: int) -> None:
    from tests.fixtures.voc import make_voc

    fx = make_voc(tmp_path / "data")
    ids = fx.main_splits["train"]
    assert len(ids) >= 5
    for victim in (ids[1], ids[-2]):  # holes in two different ranges, neither the last sample
        fx.jpg(victim).write_bytes(b"not a jpeg at all")
    root = str(fx.devkit)
    base = dict(source="voc-boxes", root=root, progress=False, skip_bad=True, size=(size, size))
    one = build(BuildConfig(out=str(tmp_path / "one.zarr"), **base))
    assert one.info.provenance["skipped_count"] == 2
    cfg = BuildConfig(out=str(tmp_path / "sh.zarr"), **base)
    for i in (1, 2, 3):
        build_shard(cfg, (i, 3))
    sh = finalize(tmp_path / "sh.zarr", progress=False)
    dk = build(BuildConfig(out=str(tmp_path / "dk.zarr"), dask="local:2", **base))
    for res in (sh, dk):
        assert res.info.digests == one.info.digests
        assert res.info.splits == one.info.splits
        assert sorted(res.bad) == sorted(one.bad)
    a, b = open_store(tmp_path / "one.zarr"), open_store(tmp_path / "sh.zarr")
    np.testing.assert_array_equal(a.load("train", "boxes"), b.load("train", "boxes"))
    assert list(a.load("train", "ids")) == list(b.load("train", "ids"))
    assert ids[1] not in list(b.load("train", "ids"))
    images = b.array("train", "images")
    assert (images.shards is not None) == (size == 224) and b.info.format_version == (2 if size == 224 else 1)
    assert len(list(store_mod.iter_chunks(images))) >= 2  # several files: samples moved across files


def test_a_bad_sample_without_skip_bad_fails_the_dask_build_cleanly(tmp_path: Path, small_units: None) -> None:
    from tests.fixtures.voc import make_voc

    fx = make_voc(tmp_path / "data")
    victim = fx.main_splits["train"][2]
    fx.jpg(victim).write_bytes(b"\xff\xd8 broken")
    with pytest.raises(SatkitError, match=victim):
        build(BuildConfig(source="voc-boxes", root=str(fx.devkit), out=str(tmp_path / "v.zarr"),
                          progress=False, dask="local:2"))
    assert not (tmp_path / "v.zarr").exists()
    assert _leftovers(tmp_path, "v.zarr") == []
    with pytest.raises(SatkitError, match=victim):
        build_shard(BuildConfig(source="voc-boxes", root=str(fx.devkit), out=str(tmp_path / "w.zarr"),
                                progress=False), (1, 1))
    with pytest.raises(SatkitError, match="1 of 1 shards have not finished"):
        finalize(tmp_path / "w.zarr")
    assert not (tmp_path / "w.zarr").exists()


def test_finalize_refuses_until_every_shard_is_done_and_shards_must_agree(tmp_path: Path) -> None:
    out = tmp_path / "d.zarr"
    cfg = BuildConfig(source="digits", root="", out=str(out), progress=False)
    build_shard(cfg, (2, 3))
    with pytest.raises(SatkitError, match=r"2 of 3 shards have not finished: 1/3, 3/3"):
        finalize(out)
    with pytest.raises(SatkitError, match="other settings"):
        build_shard(BuildConfig(source="digits", root="", out=str(out), progress=False, size=(16, 16)), (1, 3))
    with pytest.raises(SatkitError, match="other settings"):
        build_shard(cfg, (1, 2))
    assert not out.exists()
    with pytest.raises(SatkitError, match="not a satkit store|no satkit"):  # the shared directory is no store
        open_store(shards_dir(out))
    build_shard(cfg, (1, 3))
    build_shard(cfg, (3, 3))
    build_shard(cfg, (3, 3))  # a job run twice (a retried array member) redoes its part
    res = finalize(out, progress=False)
    assert res.info.splits == {"train": 1442, "test": 355}
    assert not shards_dir(out).exists()
    with pytest.raises(SatkitError, match="no sharded build to finalize"):
        finalize(out)


def test_cli_errors_are_one_line_and_name_the_option(tmp_path: Path) -> None:
    cases = [
        (["--shard", "4/3"], "--shard"),
        (["--shard", "x"], "--shard"),
        (["--dask", "local:0"], "--dask"),
        (["--dask", "local:2", "--workers", "2"], "--workers"),
        (["--dask", "local:2", "--shard", "1/2"], "--shard"),
    ]
    for extra, option in cases:
        r = _satdata("build", "--source", "digits", "--out", "x.zarr", "-q", *extra, cwd=tmp_path)
        assert r.returncode != 0, extra
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("Error:") and option in last, (extra, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "x.zarr").exists() and _leftovers(tmp_path, "x.zarr") == []


def test_cli_shards_then_finalize_with_a_manifest(tmp_path: Path) -> None:
    for i in (1, 2):
        r = _satdata("build", "--source", "digits", "--out", "d.zarr", "--shard", f"{i}/2", "-q", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"shard {i}/2" in r.stdout and "satdata finalize d.zarr" in r.stdout
    r = _satdata("finalize", "d.zarr", "--manifest", str(REPO / "manifests" / "digits.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote d.zarr: train 1,442, test 355" in r.stdout
    r = _satdata("verify", "d.zarr", "--manifest", str(REPO / "manifests" / "digits.json"), cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_finalize_waits_for_writing_shards_and_refuses_planted_or_damaged_state(tmp_path: Path) -> None:
    from satdata.store import flock_dir

    out = tmp_path / "d.zarr"
    cfg = BuildConfig(source="digits", root="", out=str(out), progress=False)
    build_shard(cfg, (1, 1))
    fd = flock_dir(shards_dir(out), exclusive=False)  # as a shard does while it writes
    assert fd is not None
    try:
        with pytest.raises(SatkitError, match="shards are still writing"):
            finalize(out)
    finally:
        os.close(fd)
    record = shards_dir(out) / ".satkit-shards" / "1-of-1.json"
    good = record.read_text()
    record.write_text(good[: len(good) // 2])  # a truncated record (a full disk, a crash)
    with pytest.raises(SatkitError, match="cannot be read"):
        finalize(out)
    record.write_text(good.replace('"bad_positions": []', '"bad_positions": [99999]', 1))
    with pytest.raises(SatkitError, match="outside"):
        finalize(out)
    record.write_text(good)
    assert finalize(out, progress=False).info.splits == {"train": 1442, "test": 355}

    other = tmp_path / "e.zarr"
    (tmp_path / "elsewhere").mkdir()
    shards_dir(other).symlink_to(tmp_path / "elsewhere")  # planted: never followed
    with pytest.raises(SatkitError, match="in the way"):
        build_shard(BuildConfig(source="digits", root="", out=str(other), progress=False), (1, 2))
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_worker_that_cannot_see_the_store_says_so(tmp_path: Path) -> None:
    """A scheduler's workers on another machine without --out's file system: the task's
    error names the cause instead of writing a fresh half store where it runs."""
    rng = ranges.Range("train", 0, 4)
    with pytest.raises(SatkitError, match="every worker mounts"):
        ranges.write_range(tmp_path / "not-here.zarr", {"maps": {}}, rng, [], iter(()), stop_at_bad=True)
    assert not (tmp_path / "not-here.zarr").exists()
