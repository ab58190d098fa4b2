"""Builds that are killed, interrupted or pointed at existing output never leave a bad store.

The build runs as the real command in a subprocess and is killed at moments recognised
from what it has written so far (its partial directory appears; chunks of the first split;
the last array of the last split, i.e. digests are being computed), so the test does not
depend on how fast this machine is.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from satdata.build import BuildConfig, build
from satdata.cli import main
from satdata.errors import SatkitError, StoreError
from satdata.store import open_store

SIZE = "128"  # big enough that each phase of the build lasts a while (90 MB of images)
TIMEOUT = 120.0


def partials(parent: Path, out: Path) -> list[Path]:
    return sorted(parent.glob(f".{out.name}.partial-*"))


def has_chunks(rel: str) -> Callable[[Path, Path], bool]:
    """A moment: the partial directory holds at least one file under rel."""
    def check(parent: Path, out: Path) -> bool:
        try:
            for p in partials(parent, out):
                d = p / rel
                if d.is_file() or (d.is_dir() and any(f.is_file() for f in d.rglob("*"))):
                    return True
        except OSError:  # the directory was renamed or removed while we looked
            pass
        return False
    return check


MOMENTS: dict[str, Callable[[Path, Path], bool]] = {
    "partial directory created": lambda parent, out: bool(partials(parent, out)),
    "writing train": has_chunks("train/images/c"),
    "computing digests": has_chunks("test/boxes/zarr.json"),
}


def start_build(out: Path, *extra: str, workers: int = 0) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "satdata.cli", "build", "--source", "digits", "--out", str(out),
           "--size", SIZE, "--workers", str(workers), "-q", *extra]
    # A session of its own, so the decode workers can be cleaned up with the group.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for(proc: subprocess.Popen[bytes], moment: str, parent: Path, out: Path) -> None:
    check = MOMENTS[moment]
    deadline = time.monotonic() + TIMEOUT
    while not check(parent, out):
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"the build ended (exit {proc.returncode}) before the moment {moment!r}: {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"the build never reached the moment {moment!r}")
        time.sleep(0.005)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever is left of the build's process group (orphaned workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=TIMEOUT)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def assert_nothing_opens(parent: Path, keep: Path | None = None) -> None:
    for p in parent.iterdir():
        if keep is not None and p == keep:
            continue
        with pytest.raises(StoreError):
            open_store(p)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "d8.zarr"
    build(BuildConfig(source="digits", root="", out=str(out), size=(8, 8), progress=False))
    return out


@pytest.mark.parametrize("moment,workers", [
    ("partial directory created", 0),
    ("writing train", 2),
    ("computing digests", 2),
])
def test_sigkill_leaves_nothing_that_opens(tmp_path: Path, moment: str, workers: int) -> None:
    out = tmp_path / "o.zarr"
    proc = start_build(out, workers=workers)
    try:
        wait_for(proc, moment, tmp_path, out)
        assert proc.poll() is None, f"the build finished before the kill at {moment!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), f"killed at {moment!r}, yet {out} exists"
    left = partials(tmp_path, out)
    assert left, "a SIGKILL cannot clean up: the partial directory should still be there"
    assert_nothing_opens(tmp_path)
    # the leftover does not get in the way of the next build
    build(BuildConfig(source="digits", root="", out=str(out), size=(8, 8), progress=False))
    assert open_store(out).info.image_size == (8, 8)


@pytest.mark.parametrize("moment", ["writing train", "computing digests"])
def test_sigkill_with_overwrite_keeps_the_existing_store(small_store: Path, tmp_path: Path, moment: str) -> None:
    out = tmp_path / "o.zarr"
    shutil.copytree(small_store, out)
    before = snapshot(out)
    proc = start_build(out, "--overwrite")
    try:
        wait_for(proc, moment, tmp_path, out)
        assert proc.poll() is None, f"the build finished before the kill at {moment!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        kill_group(proc)
    assert snapshot(out) == before, f"killed at {moment!r}: the existing store changed"
    assert open_store(out).info.image_size == (8, 8)
    assert_nothing_opens(tmp_path, keep=out)


def test_sigterm_removes_the_partial_directory(small_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    shutil.copytree(small_store, out)
    before = snapshot(out)
    proc = start_build(out, "--overwrite", workers=2)
    try:
        wait_for(proc, "writing train", tmp_path, out)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode()
    assert partials(tmp_path, out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"], "something besides the store was left"
    assert snapshot(out) == before


# --------------------------------------------------------------------------- --overwrite


def cfg(out: Path, **kw: object) -> BuildConfig:
    return BuildConfig(source="digits", root="", out=str(out), size=(8, 8), progress=False, **kw)  # type: ignore[arg-type]


def test_existing_output_is_refused_without_overwrite(small_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    shutil.copytree(small_store, out)
    before = snapshot(out)
    with pytest.raises(SatkitError, match="already exists.*--overwrite"):
        build(cfg(out))
    assert snapshot(out) == before
    (tmp_path / "file.zarr").write_text("not a store")
    with pytest.raises(SatkitError, match="already exists"):
        build(cfg(tmp_path / "file.zarr"))
    res = CliRunner().invoke(main, ["build", "--source", "digits", "--out", str(out), "--size", "8", "-q"])
    assert res.exit_code == 1
    assert "already exists (pass --overwrite to replace it)" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_overwrite_never_replaces_a_non_store(tmp_path: Path) -> None:
    import zarr

    victims = {
        "data": lambda p: (p.mkdir(), (p / "thesis.tex").write_text("precious")),
        "foreign.zarr": lambda p: zarr.open_group(str(p), mode="w").attrs.update({"other": 1}),
        "notes.txt": lambda p: p.write_text("precious"),
    }
    for name, make in victims.items():
        p = tmp_path / name
        make(p)
        before = snapshot(p) if p.is_dir() else p.read_bytes()
        with pytest.raises(SatkitError, match="refusing to replace it"):
            build(cfg(p, overwrite=True))
        assert (snapshot(p) if p.is_dir() else p.read_bytes()) == before, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(victims), "the refused builds left files"


def test_overwrite_replaces_a_store_and_leaves_nothing_else(small_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    shutil.copytree(small_store, out)
    old_digest = open_store(out).info.digests["train/images"]["sha256"]
    res = build(BuildConfig(source="digits", root="", out=str(out), size=(12, 10), overwrite=True,
                            progress=False))
    st = open_store(out)
    assert st.info.image_size == (12, 10) == res.info.image_size
    assert st.info.digests["train/images"]["sha256"] != old_digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"], "old or partial directories were left"
    # an empty directory counts as free space
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    build(cfg(empty, overwrite=True))
    assert open_store(empty).info.splits == {"train": 1442, "test": 355}
