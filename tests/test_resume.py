"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run does (CPU, fixed seed)."""

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

from sattrain.checkpoint import load_checkpoint
from sattrain.config import TrainConfig
from sattrain.train import train

REPO = Path(__file__).resolve().parents[1]
# Timing fields differ between any two runs; everything else must match exactly.
TIMING = {"seconds", "images_per_s", "train_seconds"}


def command(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sattrain.cli", "run", str(store), "--out", str(out),
            # pgd+sat exercises every random stream: shuffle, augmentation, coin, SAT, PGD, evaluation
            "--method", "pgd+sat", "--epochs", "3", "--batch-size", "64", "--train-samples", "256",
            "--eval-samples", "32", "--steps", "2", "--eval-steps", "2", "--seed", "11",
            "--device", "cpu", "--threads", "1", "-q", *extra]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING}


def lines(run: Path) -> list[dict]:
    return [strip(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_equals_uninterrupted(digits_store: Path, tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    # the killed run starts first, so the uninterrupted one overlaps its wait
    proc = subprocess.Popen(command(digits_store, cut), env=env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = subprocess.Popen(command(digits_store, whole), env=env(), cwd=tmp_path,
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

    res = subprocess.run(command(digits_store, cut, "--resume"), env=env(), cwd=tmp_path,
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
    cfg = json.loads((cut / "config.json").read_text())
    assert cfg["resumed_after_epoch"] == done


def test_resume_without_checkpoint_starts_fresh(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    logged: list[str] = []
    before = torch.get_num_threads()
    try:
        train(TrainConfig(store=str(digits_store), out=str(out), method="sat", epochs=1, batch_size=64,
                          train_samples=128, eval_samples=16, eval_steps=1, resume=True, progress=False, threads=1),
              log=logged.append)
    finally:
        torch.set_num_threads(before)
    assert any("has no checkpoint yet; starting from scratch" in m for m in logged)
    assert load_checkpoint(out)["epoch"] == 1
