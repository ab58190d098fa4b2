"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run does (CPU, fixed seed):
weights, metrics, the learning-rate schedule and best.pt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from satdata.errors import SatkitError
from sattrain.checkpoint import load_checkpoint, save_checkpoint
from sattrain.config import TrainConfig
from sattrain.schedule import lr_factor
from sattrain.trainer import _sync_best, train

REPO = Path(__file__).resolve().parents[1]
# Timing fields differ between any two runs; everything else must match exactly.
TIMING = {"seconds", "images_per_s", "train_seconds"}


def command(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sattrain.cli", "run", str(store), "--out", str(out),
            # pgd+sat exercises every random stream: shuffle, augmentation, coin, SAT, PGD, evaluation
            "--method", "pgd+sat", "--epochs", "3", "--batch-size", "64", "--train-samples", "256",
            "--eval-samples", "32", "--steps", "2", "--eval-steps", "2", "--seed", "11",
            "--device", "cpu", "--threads", "1", "--summary-samples", "0", "-q", *extra]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING}


def lines(run: Path) -> list[dict]:
    return [strip(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])  # per epoch and per step
def test_sigkill_then_resume_equals_uninterrupted(schedule: str, digits_store: Path, tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    sched = ("--schedule", schedule)
    # the killed run starts first, so the uninterrupted one overlaps its wait
    proc = subprocess.Popen(command(digits_store, cut, *sched), env=env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = subprocess.Popen(command(digits_store, whole, *sched), env=env(), cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # Kill as soon as the first epoch's checkpoint is in place: mid-way through epoch 2.
    while not (cut / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run wrote no checkpoint in time"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode() if ref.stderr else ""

    # the kill really interrupted the run
    assert not (cut / "metrics.json").exists()
    done = load_checkpoint(cut)["epoch"]
    assert 1 <= done < 3

    res = subprocess.run(command(digits_store, cut, *sched, "--resume"), env=env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming {cut} after epoch {done} of 3" in res.stderr

    assert lines(cut) == lines(whole)
    assert [r["epoch"] for r in lines(cut)] == [0, 1, 2]
    final_cut = strip(json.loads((cut / "metrics.json").read_text()))
    final_whole = strip(json.loads((whole / "metrics.json").read_text()))
    assert final_cut == final_whole
    a, b = load_checkpoint(cut), load_checkpoint(whole)
    assert a["epoch"] == b["epoch"] == 3
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert a["scheduler"] == b["scheduler"] and a["best"] == b["best"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    ba, bb = load_checkpoint(cut / "best.pt"), load_checkpoint(whole / "best.pt")
    assert ba["best"] == bb["best"] == final_whole["best"] and ba["epoch"] == bb["epoch"]
    for k, v in bb["model"].items():
        assert torch.equal(ba["model"][k], v), k
    cfg = json.loads((cut / "config.json").read_text())
    assert cfg["resumed_after_epoch"] == done and cfg["options"]["schedule"] == schedule
    lrs = [r["lr"] for r in lines(whole)]
    if schedule == "cosine":  # the lr really followed the schedule (and the resumed run matched it)
        assert lrs == pytest.approx([1e-3 * lr_factor("cosine", t, 3) for t in range(3)], rel=1e-12)
    else:
        assert lrs[0] == pytest.approx(1e-3 / 25) and len(set(lrs)) == 3


def test_resume_cannot_rescale_a_schedule(digits_store: Path, tmp_path: Path) -> None:
    """Other schedules than constant are scaled to --epochs: changing it on resume would
    change the learning rates of the epochs already done, so it is refused."""
    out = tmp_path / "cos"
    base = dict(store=str(digits_store), out=str(out), method="standard", batch_size=64, train_samples=64,
                eval_samples=8, eval_steps=0, summary_samples=0, progress=False, threads=1, schedule="cosine")
    before = torch.get_num_threads()
    try:
        train(TrainConfig(epochs=1, **base), log=lambda m: None)
        with pytest.raises(SatkitError, match=r"^--epochs 2: the run in .* has a cosine schedule over 1 epochs"):
            train(TrainConfig(epochs=2, resume=True, **base), log=lambda m: None)
        # with its own epochs it resumes (a finished run: only the end-of-run files are rewritten)
        train(TrainConfig(epochs=1, resume=True, **base), log=lambda m: None)
        assert load_checkpoint(out)["epoch"] == 1
    finally:
        torch.set_num_threads(before)


def test_resume_repairs_best_pt_after_a_kill_between_the_two_writes(digits_store: Path, tmp_path: Path) -> None:
    """best.pt is written right after checkpoint.pt; a kill between them leaves the older
    best.pt, and the resumed run rewrites it from checkpoint.pt (whose epoch is the best)."""
    out = tmp_path / "r"
    before = torch.get_num_threads()
    try:
        train(TrainConfig(store=str(digits_store), out=str(out), method="standard", epochs=1, batch_size=64,
                          train_samples=64, eval_samples=8, eval_steps=0, summary_samples=0, progress=False,
                          threads=1), log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    ckpt = load_checkpoint(out)
    assert ckpt["best"]["epoch"] == 0  # the only epoch is the best
    good = load_checkpoint(out / "best.pt")
    # the state a kill before best.pt's write leaves: no best.pt, or one of an older record
    for stale in (None, {**good, "best": {**good["best"], "epoch": -5}}):
        (out / "best.pt").unlink()
        if stale is not None:
            save_checkpoint(out / "best.pt", {k: v for k, v in stale.items() if k not in ("format", "version")})
        notes: list[str] = []
        _sync_best(out, ckpt, notes.append)
        fixed = load_checkpoint(out / "best.pt")
        assert fixed["best"] == ckpt["best"] and fixed["epoch"] == 1 and any("rewrote" in n for n in notes)
        for k, v in ckpt["model"].items():
            assert torch.equal(fixed["model"][k], v), k
    # a best epoch older than the checkpoint cannot be rebuilt: said, not faked
    notes = []
    _sync_best(out, {**ckpt, "epoch": 3}, notes.append)  # pretend two more epochs were done since
    assert load_checkpoint(out / "best.pt")["best"] == ckpt["best"] and not notes  # consistent: nothing to do
    (out / "best.pt").unlink()
    _sync_best(out, {**ckpt, "epoch": 3}, notes.append)
    assert not (out / "best.pt").exists() and "does not hold the run's best epoch" in notes[0]


def test_resume_without_checkpoint_starts_fresh(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    logged: list[str] = []
    before = torch.get_num_threads()
    try:
        train(TrainConfig(store=str(digits_store), out=str(out), method="sat", epochs=1, batch_size=64,
                          train_samples=128, eval_samples=16, eval_steps=1, resume=True, progress=False, threads=1,
                          summary_samples=0),
              log=logged.append)
    finally:
        torch.set_num_threads(before)
    assert any("has no checkpoint yet; starting from scratch" in m for m in logged)
    assert load_checkpoint(out)["epoch"] == 1
