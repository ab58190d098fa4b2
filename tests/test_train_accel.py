"""`sattrain run --precision / --channels-last / --compile`: wired into the trainer, recorded
in config.json, refused with one line where impossible, and CPU results unchanged by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sattrain.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--method", "sat", "--epochs", "2", "--batch-size", "64", "--train-samples", "192", "--eval-samples", "64",
         "--eval-steps", "1", "--summary-samples", "0", "--device", "cpu", "-q", "--seed", "5"]


def _run(store: Path, out: Path, *extra: str) -> list[dict]:
    res = CliRunner().invoke(main, ["run", str(store), "--out", str(out), *QUICK, *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _strip(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in lines]


def test_cpu_defaults_are_fp32_nchw_and_match_explicit_fp32(digits_store: Path, tmp_path: Path) -> None:
    default = _run(digits_store, tmp_path / "a")
    explicit = _run(digits_store, tmp_path / "b", "--precision", "fp32", "--channels-last", "off")
    assert _strip(default) == _strip(explicit)  # bit for bit: auto on the CPU is exactly fp32, NCHW
    acc = json.loads((tmp_path / "a" / "config.json").read_text())["accel"]
    assert (acc["precision"], acc["channels_last"], acc["compile"], acc["grad_scaler"]) == ("fp32", False, "none", False)
    assert acc["requested"] == {"precision": "auto", "channels_last": "auto", "compile": "none"}


def test_channels_last_and_bf16_train_on_the_cpu(digits_store: Path, tmp_path: Path) -> None:
    # standard: no random perturbation, whose draws land on other elements in another memory order
    nchw = _run(digits_store, tmp_path / "nchw", "--method", "standard")
    nhwc = _run(digits_store, tmp_path / "nhwc", "--method", "standard", "--channels-last", "on")
    # the same arithmetic in another memory order: equal up to float summation order
    for a, b in zip(nchw, nhwc):
        assert abs(a["loss"] - b["loss"]) < 1e-3 and abs(a["clean_acc"] - b["clean_acc"]) <= 3 / 64
    cfg = json.loads((tmp_path / "nhwc" / "config.json").read_text())
    assert cfg["accel"]["channels_last"] is True
    bf16 = _run(digits_store, tmp_path / "bf16", "--method", "standard", "--precision", "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["accel"]["autocast_dtype"] == "bfloat16"
    assert abs(bf16[-1]["loss"] - nchw[-1]["loss"]) < 0.3  # bfloat16 autocast: close, not equal


def test_impossible_settings_are_one_line(digits_store: Path, tmp_path: Path) -> None:
    r = CliRunner()
    res = r.invoke(main, ["run", str(digits_store), "--out", str(tmp_path / "x"), *QUICK, "--precision", "fp16"])
    assert res.exit_code != 0 and "--precision fp16" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()
    res = r.invoke(main, ["run", str(digits_store), "--out", str(tmp_path / "y"), *QUICK, "--precision", "bf16", "--amp"])
    assert res.exit_code != 0 and "--amp is --precision fp16 and contradicts --precision bf16" in res.output
    res = r.invoke(main, ["run", str(digits_store), "--out", str(tmp_path / "z"), *QUICK, "--compile", "fast"])
    assert res.exit_code == 2 and "--compile" in res.output


def test_compile_wraps_the_training_module(digits_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile MODE hands the training module to torch.compile with that mode (recorded here;
    compiling for real on the CPU takes minutes of C++), and the run saves the plain weights."""
    import torch

    calls: list[dict] = []

    def fake_compile(model, **kw):
        calls.append({"type": type(model).__name__, **kw})
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr("sattrain.accel.check_compile", lambda *a, **k: None)  # no compiler needed for the fake
    _run(digits_store, tmp_path / "c", "--compile", "max-autotune")
    assert calls == [{"type": "SmallCNN", "mode": "max-autotune", "backend": "inductor"}]
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["accel"]["compile"] == "max-autotune"
