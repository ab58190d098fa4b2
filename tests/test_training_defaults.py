"""Definitions of training: the default attack step (eps/4, so 5 steps reach the edge of the
ball at any --eps)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sattrain.checkpoint import load_checkpoint
from sattrain.cli import main
from sattrain.config import (
    LEGACY_STEP_SIZE,
    TrainConfig,
    default_step_size,
    parse_eps,
    resume_mismatches,
    short_attack_warning,
)

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--model", "small-cnn", "--batch-size", "64", "--train-samples", "128", "--eval-samples", "32",
         "--eval-steps", "1", "--summary-samples", "0", "--device", "cpu", "-q"]
MULTI_STEP = ("pgd", "trades", "pgd+sat", "trades+sat", "pgd+noise", "trades+noise")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["run", *args], catch_exceptions=False)


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- 1. the default step


@pytest.mark.parametrize("method", MULTI_STEP + ("sat", "standard", "noise"))
def test_default_step_is_eps_over_4_and_exactly_2_255_at_8_255(method: str) -> None:
    for eps in (8 / 255, parse_eps("8/255"), "8/255"):
        cfg = TrainConfig(store="s", method=method, eps=eps).resolved()
        # bit for bit what the default was (a fixed 2/255): default runs compute what they did
        assert cfg.step_size == 2 / 255 == LEGACY_STEP_SIZE and cfg.step_size.hex() == (2 / 255).hex()
        assert cfg.monitor_step_size == 2 / 255
    for k in (1, 4, 12, 16, 32):
        cfg = TrainConfig(store="s", method=method, eps=f"{k}/255").resolved()
        assert cfg.step_size == (k / 255) / 4 and cfg.monitor_step_size == cfg.step_size
        # the default attack reaches the edge of the ball (5 x eps/4 >= eps); 2/255 did not past 10/255
        assert Fraction(cfg.steps) * Fraction(cfg.step_size) >= Fraction(parse_eps(f"{k}/255"))
    assert TrainConfig(store="s", method=method, eps="16/255", step_size="3/255").resolved().step_size == 3 / 255


def test_fgsm_rs_and_free_keep_their_steps_and_the_monitor_its_eps_over_4() -> None:
    for eps in (8, 16):
        fgsm = TrainConfig(store="s", method="fgsm-rs", eps=f"{eps}/255").resolved()
        free = TrainConfig(store="s", method="free", eps=f"{eps}/255").resolved()
        assert fgsm.step_size == pytest.approx(1.25 * eps / 255) and free.step_size == pytest.approx(eps / 255)
        assert fgsm.monitor_step_size == free.monitor_step_size == pytest.approx(eps / 255 / 4)
    assert default_step_size("fgsm-rs+sat", 8 / 255) == pytest.approx(10 / 255)


def test_an_explicit_short_attack_warns_naming_the_options() -> None:
    warn = short_attack_warning(TrainConfig(store="s", method="pgd", eps="16/255", step_size="2/255"))
    assert warn is not None and warn.startswith("warning: ")
    for text in ("--steps 5", "--step-size 2/255", "10/255", "--eps 16/255", "--method pgd"):
        assert text in warn, text
    assert short_attack_warning(TrainConfig(store="s", method="trades", steps=2)) is not None  # 2 x eps/4 < eps
    # the defaults reach the edge; so do 4 x 2/255 at 8/255 and FGSM-RS / Free-AT steps; 0 steps is noise
    for cfg in (TrainConfig(store="s", method="pgd", eps="16/255"),
                TrainConfig(store="s", method="pgd", steps=4, step_size="2/255"),
                TrainConfig(store="s", method="pgd+sat", steps=3, step_size="8/765"),
                TrainConfig(store="s", method="fgsm-rs", eps="16/255", step_size="2/255"),
                TrainConfig(store="s", method="free", step_size="1/255"),
                TrainConfig(store="s", method="sat", step_size="1/255"),
                TrainConfig(store="s", method="pgd", steps=0)):
        assert short_attack_warning(cfg) is None, cfg


def test_resume_compares_the_resolved_step() -> None:
    """What a run records and a resume compares is the resolved step: a run started with the
    old default (2/255 at 16/255) differs from a new default's (4/255) unless the trainer
    takes the run's step (tests below)."""
    old = TrainConfig(store="s", method="pgd", eps="16/255", step_size="2/255").resolved().to_json()
    new = TrainConfig(store="s", method="pgd", eps="16/255").resolved().to_json()
    assert resume_mismatches(old, new) == ["step_size: 0.00784313725490196 -> 0.01568627450980392"]
    at8 = TrainConfig(store="s", method="pgd").resolved().to_json()
    assert resume_mismatches({**at8, "step_size": LEGACY_STEP_SIZE}, at8) == []


def test_a_run_started_with_the_old_default_step_resumes_with_it(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    base = [str(digits_store), "--method", "pgd", "--eps", "16/255", "--out", str(out), *QUICK]
    # a run as the old default started it: config.json and the checkpoint record the resolved
    # step alone, so giving 2/255 records what the old default did
    res = run(*base, "--epochs", "1", "--step-size", "2/255")
    assert res.exit_code == 0, res.output
    assert "warning: --steps 5 x --step-size 2/255 = 10/255 is less than --eps 16/255" in res.output
    res = run(*base, "--epochs", "2", "--resume")  # the old command line: no --step-size
    assert res.exit_code == 0, res.output
    assert "it continues with 2/255" in res.output and "4/255 at --eps 16/255" in res.output
    assert load_checkpoint(out)["config"]["step_size"] == LEGACY_STEP_SIZE
    assert json.loads((out / "config.json").read_text())["options"]["step_size"] == LEGACY_STEP_SIZE
    assert [r["monitor"]["step_size"] for r in lines(out)] == ["2/255", "2/255"]
    # another explicit step is still another option
    res = run(*base, "--epochs", "3", "--resume", "--step-size", "3/255")
    assert res.exit_code == 1 and "step_size: 0.00784313725490196 -> 0.011764705882352941" in res.output


def test_a_new_run_at_16_255_trains_and_resumes_with_eps_over_4(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    base = [str(digits_store), "--method", "pgd", "--eps", "16/255", "--out", str(out), *QUICK]
    res = run(*base, "--epochs", "1")
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output
    assert load_checkpoint(out)["config"]["step_size"] == 4 / 255
    res = run(*base, "--epochs", "2", "--resume")
    assert res.exit_code == 0, res.output
    assert "continues with" not in res.output
    assert [r["monitor"]["step_size"] for r in lines(out)] == ["4/255", "4/255"]
