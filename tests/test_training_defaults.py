"""Two definitions of training: the default attack step (eps/4, so 5 steps reach the edge of
the ball at any --eps) and what best.pt is chosen on (--holdout N; a note when it is the test
split)."""

from __future__ import annotations

import json
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from satdata.errors import SatkitError
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
from sattrain.data import split_holdout

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
    # a run from before --holdout records no such key: it is None now, no mismatch
    assert resume_mismatches({k: v for k, v in at8.items() if k != "holdout"}, at8) == []


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


# --------------------------------------------------------------------------- 2. what best.pt is chosen on


def test_split_holdout_is_seeded_disjoint_and_refuses_too_many() -> None:
    pool, held = split_holdout(1442, 100, seed=5)
    again = split_holdout(1442, 100, seed=5)
    assert np.array_equal(pool, again[0]) and np.array_equal(held, again[1])
    assert len(held) == 100 and len(pool) == 1342 and not set(pool.tolist()) & set(held.tolist())
    assert not np.array_equal(held, split_holdout(1442, 100, seed=6)[1])
    assert split_holdout(10, 8, seed=0)[0].size == 2
    for n in (9, 10, 11):
        with pytest.raises(SatkitError, match=rf"--holdout {n}: the train split has 10 samples.*give a smaller"):
            split_holdout(10, n, seed=0)
    with pytest.raises(SatkitError, match=r"--holdout: must be >= 1"):
        TrainConfig(store="s", holdout=0).resolved()
    with pytest.raises(SatkitError, match=r"--holdout: must be an integer"):
        TrainConfig(store="s", holdout=2.5).resolved()  # type: ignore[arg-type]


def test_without_holdout_on_test_the_log_and_metrics_say_so(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    res = run(str(digits_store), "--method", "standard", "--epochs", "1", "--out", str(out), *QUICK)
    assert res.exit_code == 0, res.output
    assert res.output.count("note: best.pt is chosen on the test split (the store has no val split)") == 1
    assert "pass --holdout N" in res.output
    final = json.loads((out / "metrics.json").read_text())
    assert final["monitor"]["split"] == "test" and "selection-biased" in final["monitor"]["selection"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["options"]["holdout"] is None and cfg["data"]["holdout"] is None
    assert cfg["data"]["monitor_split"] == "test"
    # `sattrain eval` of that best.pt on test scores the samples it was chosen on: it says so
    # (a warning, eval.json "selection", the table, the report); checkpoint.pt was not chosen
    from sattrain.evaluation import SelectionBiasWarning, evaluate, format_table
    from sattrain.report import load_run

    kw = dict(attacks=("pgd",), eps=(8 / 255,), samples=8, device="cpu")
    with pytest.warns(SelectionBiasWarning, match=r"best\.pt is the epoch of .* chose on split 'test'"):
        r = evaluate(out / "best.pt", digits_store, out=out / "eval.json", **kw)
    assert "selection-biased" in r["selection"] and "--holdout N" in r["selection"]
    assert f"note: {r['selection']}" in format_table(r)
    assert "selection-biased" in load_run(out).measurements["strong"].note
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionBiasWarning)
        assert "selection" not in evaluate(out, digits_store, write=False, **kw)


def test_holdout_monitors_on_training_samples_held_out(digits_store: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import sattrain.trainer as tr

    seen: dict[str, np.ndarray] = {}
    real_open, real_load = tr.open_train_split, tr.load_split

    def open_train(store, split, maps, indices, *a, **kw):  # type: ignore[no-untyped-def]
        seen["train"] = np.asarray(indices)
        return real_open(store, split, maps, indices, *a, **kw)

    def load(store, split, maps, indices, **kw):  # type: ignore[no-untyped-def]
        seen[f"monitor:{split}"] = np.asarray(indices)
        return real_load(store, split, maps, indices, **kw)

    monkeypatch.setattr(tr, "open_train_split", open_train)
    monkeypatch.setattr(tr, "load_split", load)
    out = tmp_path / "r"
    base = [str(digits_store), "--method", "standard", "--out", str(out), *QUICK, "--holdout", "48"]
    res = run(*base, "--epochs", "1")
    assert res.exit_code == 0, res.output
    assert "best.pt is chosen on the test split" not in res.output
    assert "monitor on 32 of 48 held out of train (--holdout), summary on test" in res.output
    # the monitor reads 32 of the 48 held-out train samples, none of which is trained on
    train_idx, mon_idx = seen["train"], seen["monitor:train"]
    assert len(train_idx) == 128 and len(mon_idx) == 32 and "monitor:test" not in seen
    _, held = split_holdout(1442, 48, tr.HOLDOUT_SEED)
    assert set(mon_idx.tolist()) <= set(held.tolist()) and not set(train_idx.tolist()) & set(held.tolist())
    monitor = lines(out)[0]["monitor"]
    assert monitor["split"] == "holdout" and monitor["samples"] == 32
    assert monitor["holdout"] == {"of": "train", "samples": 48, "seed": tr.HOLDOUT_SEED}
    final = json.loads((out / "metrics.json").read_text())
    assert "held out of the train split (--holdout)" in final["monitor"]["selection"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["options"]["holdout"] == 48 and cfg["data"]["holdout"]["samples"] == 48
    assert cfg["data"]["monitor_split"] == "holdout" and cfg["data"]["eval_split"] == "test"
    # its best.pt was chosen without looking at test: evaluating it there is not selection-biased
    from sattrain.evaluation import SelectionBiasWarning, evaluate

    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionBiasWarning)
        assert "selection" not in evaluate(out / "best.pt", digits_store, attacks=("pgd",), eps=(8 / 255,), samples=8,
                                           device="cpu", write=False)

    # --resume: the same samples again; without --holdout it is another run
    first = dict(seen)
    res = run(*base, "--epochs", "2", "--resume")
    assert res.exit_code == 0, res.output
    assert np.array_equal(seen["train"], first["train"]) and np.array_equal(seen["monitor:train"], mon_idx)
    assert [r["epoch"] for r in lines(out)] == [0, 1]
    res = run(*[a for a in base if a not in ("--holdout", "48")], "--epochs", "3", "--resume")
    assert res.exit_code == 1 and "holdout: 48 -> None" in res.output
    res = run(str(digits_store), "--out", str(tmp_path / "big"), *QUICK, "--holdout", "1441")
    assert res.exit_code == 1
    assert "--holdout 1441: the train split has 1,442 samples" in res.output and "leaves 1 to train on" in res.output


@pytest.mark.parametrize("holdout", [False, True])
def test_early_stop_summary_says_when_best_pt_was_chosen_on_its_split(holdout: bool, digits_store: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sattrain.evaluation as ev_mod
    import sattrain.trainer as tr

    scripted = iter([0.5, 0.1])  # epoch 2 collapses
    real = tr.evaluate_heldout
    monkeypatch.setattr(tr, "evaluate_heldout", lambda *a, **kw: {
        k: (next(scripted) if k.startswith("pgd@") else v) for k, v in real(*a, **kw).items()})
    evaluated: list[Path] = []

    def fake(target, store, **kw):  # type: ignore[no-untyped-def]
        evaluated.append(Path(str(target)))
        Path(str(kw["out"])).write_text("{}")
        return {"protocol": "strong", "samples": 8, "complete": True, "clean": 0.5, "robust": {"pgd@8/255": 0.1},
                "headline": {"name": "pgd@8/255", "value": 0.1}}

    monkeypatch.setattr(ev_mod, "evaluate", fake)
    out = tmp_path / "r"
    args = [a for a in QUICK if a not in ("--summary-samples", "0")]
    res = run(str(digits_store), "--method", "standard", "--epochs", "3", "--early-stop", "--out", str(out), *args,
              "--summary-samples", "8", *(["--holdout", "40"] if holdout else []))
    assert res.exit_code == 0, res.output
    assert evaluated == [out / "best.pt"] and f"summary: evaluating {out / 'best.pt'}" in res.output
    final = json.loads((out / "metrics.json").read_text())
    assert final["stopped_early"]["summary_of"] == "best.pt" and final["summary"]["split"] == "test"
    if holdout:
        assert "selection" not in final["summary"] and "selection" not in final["stopped_early"]
        assert "an optimistic number" not in res.output
    else:
        for note in (final["summary"]["selection"], final["stopped_early"]["selection"]):
            assert "best.pt, which the monitor chose on this same test split" in note
        assert "the one the summary evaluates it on: an optimistic number" in res.output
    assert torch.load(out / "best.pt", weights_only=True)["best"]["epoch"] == 0


def test_torchrun_holds_out_the_same_samples_and_resumes_the_old_step(digits_store: Path, tmp_path: Path) -> None:
    """Two processes (gloo on the CPU): every process takes the same --holdout out of training
    (they compare a digest of their training indices and their options, else the run stops),
    and a run of the old default step resumed without --step-size keeps it in both (rank 0
    decides, the others take its step: their options would differ otherwise)."""
    import subprocess

    from tests.test_distributed import env, torchrun

    out = tmp_path / "ddp"
    opts = ["--method", "pgd", "--eps", "16/255", "--steps", "2", "--batch-size", "32", "--train-samples", "256",
            "--holdout", "64", "--eval-samples", "0", "--eval-steps", "1", "--summary-samples", "0"]
    first = subprocess.run(torchrun(digits_store, out, *opts, "--epochs", "1", "--step-size", "2/255"), env=env(),
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["holdout"]["samples"] == 64 and cfg["data"]["train_samples"] == 256
    assert sum(p["samples"] for p in cfg["processes"]["parts"]) == 256
    assert lines(out)[0]["monitor"]["samples"] == 64 and lines(out)[0]["monitor"]["split"] == "holdout"
    again = subprocess.run(torchrun(digits_store, out, *opts, "--epochs", "2", "--resume"), env=env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "it continues with 2/255" in again.stderr
    assert load_checkpoint(out)["config"]["step_size"] == LEGACY_STEP_SIZE
    assert [r["monitor"]["step_size"] for r in lines(out)] == ["2/255", "2/255"]
