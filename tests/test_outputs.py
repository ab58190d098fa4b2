"""Nothing lost (issue 9, section 2): outputs claimed, checked and committed safely.

Builds and exports race with each other and with whatever else writes beside them;
disks fill up; links and planted names sit where the output goes. Each case runs the
real command and checks: the loser or the failure says so in one line, nobody else's
files are deleted or written through, no partial output is left, and an existing store
still verifies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

import satdata.build as build_mod
from satdata.build import BuildConfig, build
from satdata.cli import main as satdata_main
from satdata.errors import SatkitError
from satdata.atomic import identity, output_lock, store_lock
from satdata.store import open_store
from satdata.verify import verify_digests
from sattrain.cli import main as sattrain_main

DIGITS = ["build", "--source", "digits", "--size", "8", "--workers", "0", "-q"]


def run(cli: Any, args: list[Any]) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def one_error_line(res: Any) -> str:
    assert res.exit_code not in (0, None), res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def verifies(path: Path) -> bool:
    return verify_digests(open_store(path)).ok


@pytest.fixture(scope="module")
def digits8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("d8") / "d8.zarr"
    build(BuildConfig(source="digits", root="", out=str(out), size=(8, 8), workers=0, progress=False))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, digits8: Path) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    res = run(sattrain_main, ["run", digits8, "--epochs", "1", "--batch-size", "64", "--out", out,
                              "--summary-samples", "0", "--eval-samples", "0", "-q"])
    assert res.exit_code == 0, res.output
    return out


# --------------------------------------------------------------------------- two writers, one output


def test_a_second_build_while_the_first_holds_the_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    with output_lock(out):
        line = one_error_line(run(satdata_main, [*DIGITS, "--out", out]))
        assert str(out) in line and "another satdata command is writing it" in line
        assert f"process {os.getpid()}" in line
        assert not out.exists()
    assert leftovers(tmp_path, "o.zarr") == [], "the lock file outlived its holder"
    assert run(satdata_main, [*DIGITS, "--out", out]).exit_code == 0, "the lock was not released"


def test_two_real_builds_into_one_output_exactly_one_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    cmd = [sys.executable, "-m", "satdata.cli", "build", "--source", "digits", "--size", "16", "--workers", "0",
           "-q", "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for rc, err in results if rc != 0)
    assert "another satdata command is writing it" in loser or "already exists" in loser, loser
    assert "Traceback" not in loser
    assert verifies(out)
    assert leftovers(tmp_path, "o.zarr") == []


def test_an_output_that_appears_during_the_build_is_kept_and_the_build_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.zarr"
    real = build_mod._build_split

    def intruder(*a: Any, **k: Any) -> None:
        real(*a, **k)
        if not out.exists():  # someone else (not satdata) writes there meanwhile
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's\n")

    monkeypatch.setattr(build_mod, "_build_split", intruder)
    line = one_error_line(run(satdata_main, [*DIGITS, "--out", out]))
    assert "appeared while this command ran" in line
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert (out / "theirs.txt").read_text() == "someone else's\n"
    assert leftovers(tmp_path, "o.zarr") == []


def test_a_store_changed_during_an_overwrite_is_not_replaced(
        digits8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.zarr"
    shutil.copytree(digits8, out)
    real = build_mod._build_split
    changed: list[bool] = []

    def meanwhile(*a: Any, **k: Any) -> None:
        real(*a, **k)
        if not changed:  # e.g. satdata saliency committed a map into the old store
            new = out / ".zarr.json.new"
            new.write_text((out / "zarr.json").read_text())
            os.replace(new, out / "zarr.json")
            changed.append(True)

    monkeypatch.setattr(build_mod, "_build_split", meanwhile)
    line = one_error_line(run(satdata_main, [*DIGITS[:3], "--size", "12", "--workers", "0", "-q",
                                             "--out", out, "--overwrite"]))
    assert "changed while this command ran" in line
    assert open_store(out).info.image_size == (8, 8) and verifies(out)
    assert leftovers(tmp_path, "o.zarr") == []


def test_an_overwrite_never_swaps_out_a_store_being_changed(digits8: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    shutil.copytree(digits8, out)
    with store_lock(out):  # satdata saliency is adding a map to it right now
        line = one_error_line(run(satdata_main, [*DIGITS[:3], "--size", "12", "--workers", "0", "-q",
                                                 "--out", out, "--overwrite"]))
    assert "another satdata command is changing this store" in line
    assert open_store(out).info.image_size == (8, 8)
    assert leftovers(tmp_path, "o.zarr") == []


def test_identity_sees_a_replaced_store_attribute(digits8: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    assert identity(out) is None
    shutil.copytree(digits8, out)
    before = identity(out)
    assert identity(out) == before
    (out / "zarr.json").write_text((out / "zarr.json").read_text() + " ")
    assert identity(out) != before


# --------------------------------------------------------------------------- links and planted names


def test_overwrite_through_a_symlink_replaces_the_store_it_names(digits8: Path, tmp_path: Path) -> None:
    real = tmp_path / "shared" / "d.zarr"
    real.parent.mkdir()
    shutil.copytree(digits8, real)
    link = tmp_path / "mine.zarr"
    link.symlink_to(real)
    res = run(satdata_main, [*DIGITS[:3], "--size", "12", "--workers", "0", "-q", "--out", link, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and link.resolve() == real.resolve(), "the link itself was replaced"
    assert open_store(real).info.image_size == (12, 12) and verifies(real)
    assert sorted(p.name for p in real.parent.iterdir()) == ["d.zarr"], "something stale was left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.zarr", "shared"]


def test_overwrite_through_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "mine.zarr"
    link.symlink_to(tmp_path / "elsewhere" / "nothing.zarr")
    line = one_error_line(run(satdata_main, [*DIGITS, "--out", link, "--overwrite"]))
    assert "does not exist" in line and "mine.zarr" in line
    assert not (tmp_path / "elsewhere").exists()


def test_without_overwrite_a_symlink_is_an_existing_output(digits8: Path, tmp_path: Path) -> None:
    link = tmp_path / "mine.zarr"
    link.symlink_to(digits8)
    assert "already exists" in one_error_line(run(satdata_main, [*DIGITS, "--out", link]))


def test_a_planted_partial_name_is_never_written_through(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep\n")
    planted = tmp_path / f".o.zarr.partial-{os.getpid()}"  # this process's partial name
    planted.symlink_to(victim)
    line = one_error_line(run(satdata_main, [*DIGITS, "--out", out]))
    assert "is in the way" in line
    assert planted.is_symlink() and sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not out.exists()


def test_a_planted_lock_link_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    (tmp_path / ".o.zarr.lock").symlink_to(victim)
    line = one_error_line(run(satdata_main, [*DIGITS, "--out", out]))
    assert "symlink" in line
    assert victim.read_text() == "keep\n" and not out.exists()


def test_stale_partials_of_dead_builds_are_removed_but_links_and_live_ones_are_not(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.zarr.partial-{dead.pid}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep\n")
    link = tmp_path / f".o.zarr.partial-{dead.pid + 1_000_000}"
    link.symlink_to(victim)
    live = tmp_path / f".o.zarr.partial-{os.getppid()}"
    live.mkdir()
    res = run(satdata_main, [*DIGITS, "--out", out])
    assert res.exit_code == 0, res.output
    assert not stale.exists()
    assert link.is_symlink() and (victim / "keep.txt").exists()
    assert live.is_dir()


def test_a_failed_build_removes_the_directories_it_made_and_no_others(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "o.zarr"
    line = one_error_line(run(satdata_main, ["build", "--source", "folder-masks", "--root", tmp_path / "none", "-q",
                                             "--out", out]))
    assert "none" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_refuses_a_planted_partial_and_replaces_through_a_link(digits8: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.h5"
    victim.write_bytes(b"precious")
    out = tmp_path / "d.h5"
    planted = tmp_path / f".d.h5.partial-{os.getpid()}"
    planted.symlink_to(victim)
    line = one_error_line(run(satdata_main, ["export", digits8, "--out", out, "-q"]))
    assert "in the way" in line and victim.read_bytes() == b"precious" and not out.exists()
    planted.unlink()
    real = tmp_path / "real.h5"
    assert run(satdata_main, ["export", digits8, "--to", real, "-q"]).exit_code == 0
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    before = real.stat().st_ino
    res = run(satdata_main, ["export", digits8, "--out", link, "--overwrite", "-q"])
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and real.stat().st_ino != before, "the link's target was not replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.h5", "real.h5", "victim.h5"]


# --------------------------------------------------------------------------- worker deaths


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc (Linux)")
def test_a_dead_build_worker_ends_the_build_with_a_message_not_a_hang(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    cmd = [sys.executable, "-m", "satdata.cli", "build", "--source", "digits", "--size", "96", "--workers", "2",
           "-q", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        workers: list[int] = []
        while time.time() < deadline and proc.poll() is None:
            # the forkserver and its two decode workers, once the first images are written
            workers = _descendants(proc.pid)
            if len(workers) >= 3 and list(tmp_path.glob(".o.zarr.partial-*/train/images/c/*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before a worker could be killed"
        os.kill(workers[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.decode()
    assert proc.returncode not in (0, None), text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert "Traceback" not in text and lines[-1].startswith("Error: ") and "worker died" in lines[-1], text
    assert not out.exists() and leftovers(tmp_path, "o.zarr") == []


# --------------------------------------------------------------------------- disk full, unwritable


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root on Linux only: skipped elsewhere)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk: Path, digits8: Path) -> None:
    keep = small_disk / "keep.zarr"
    shutil.copytree(digits8, keep)  # an existing store on the same small disk
    out = small_disk / "big.zarr"
    line = one_error_line(run(satdata_main, ["build", "--source", "digits", "--size", "64", "--workers", "0", "-q",
                                             "--out", out]))
    assert "no space left on device" in line.lower(), line
    assert not out.exists() and leftovers(small_disk, "big.zarr") == []
    assert verifies(keep)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_eval_onto_a_full_disk_is_refused_before_attacking(small_disk: Path, run_dir: Path, digits8: Path) -> None:
    _fill(small_disk)
    t = time.time()
    line = one_error_line(run(sattrain_main, ["eval", run_dir, "--store", digits8, "--attacks", "pgd",
                                              "--eps", "8/255", "--steps", "200", "--restarts", "5",
                                              "-o", small_disk / "eval.json"]))
    assert str(small_disk) in line and "no space left on device" in line.lower(), line
    assert time.time() - t < 20, "the attacks ran before the output was checked"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"], "a temporary file was left"


def test_eval_results_survive_a_write_that_fails_at_the_end(tmp_path: Path, run_dir: Path, digits8: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import sattrain.evaluation as ev

    def full_disk(path: Any, obj: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ev, "write_json_atomic", full_disk)
    keep_dir = tmp_path / "tmp"
    keep_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(keep_dir))
    dest = tmp_path / "eval.json"
    line = one_error_line(run(sattrain_main, ["eval", run_dir, "--store", digits8, "--attacks", "pgd",
                                              "--eps", "8/255", "--steps", "3", "--restarts", "1", "-o", dest, "-q"]))
    assert "No space left on device" in line and "the results were saved to" in line
    kept = Path(line.rsplit("the results were saved to ", 1)[1].strip())
    assert kept.parent == keep_dir
    assert json.loads(kept.read_text())["pgd"]["results"][0]["eps_label"] == "8/255"
    assert not dest.exists()


def test_eval_refuses_an_output_that_is_a_directory_or_nowhere(tmp_path: Path, run_dir: Path, digits8: Path) -> None:
    from sattrain.evaluation import _check_dest

    (tmp_path / "d.json").mkdir()
    line = one_error_line(run(sattrain_main, ["eval", run_dir, "--store", digits8, "-o", tmp_path / "d.json"]))
    assert "d.json" in line and "not a regular file" in line
    with pytest.raises(SatkitError, match="does not exist"):
        _check_dest(tmp_path / "nowhere" / "eval.json")


def test_adding_a_map_never_cleans_up_through_a_link_out_of_the_store(digits8: Path, run_dir: Path,
                                                                      tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(digits8, store)
    outside = tmp_path / "outside"
    shutil.copytree(store / "train" / "saliency", outside)
    (outside / "keep.txt").write_text("keep\n")
    shutil.rmtree(store / "train" / "saliency")
    (store / "train" / "saliency").symlink_to(outside)
    res = run(satdata_main, ["saliency", store, "--teacher", run_dir, "--method", "gradcampp", "--name", "g",
                             "--device", "cpu", "-q"])
    line = one_error_line(res)
    assert "saliency" in line and ("link" in line or "outside" in line), line
    assert (outside / "keep.txt").read_text() == "keep\n"
    assert sorted(p.name for p in outside.iterdir()) == sorted(["keep.txt", *os.listdir(digits8 / "train" / "saliency")])


def test_report_strict_flag_stops_at_a_damaged_run(tmp_path: Path, run_dir: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "metrics.json").write_text("nope")
    line = one_error_line(run(sattrain_main, ["report", run_dir, bad, "-o", tmp_path / "r", "--strict"]))
    assert "bad/metrics.json" in line
    res = run(sattrain_main, ["report", run_dir, bad, "-o", tmp_path / "r"])
    assert res.exit_code == 0 and "warning" in res.stderr and "bad/metrics.json" in res.stderr
    assert "Skipped runs" in (tmp_path / "r" / "report.md").read_text()
