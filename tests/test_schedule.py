"""Learning-rate schedules and recipes: the formulas, what a run records (lr per epoch in
metrics.jsonl, the resolved recipe in config.json, the scheduler in checkpoint.pt), and the
validation of the optimisation options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from satdata.errors import SatkitError
from sattrain.checkpoint import load_checkpoint
from sattrain.cli import main
from sattrain.config import RECIPES, TrainConfig
from sattrain.schedule import lr_factor, make_scheduler
from sattrain.trainer import train

# 64 samples in batches of 32: two optimizer steps per epoch; no attack, no summary
TINY = dict(method="standard", batch_size=32, train_samples=64, eval_samples=8, eval_steps=0, summary_samples=0,
            progress=False, threads=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the formulas


def test_multistep_decays_at_half_and_three_quarters() -> None:
    # Rice et al.'s piecewise over 200 epochs: lr until epoch 100, /10 until 150, /100 after
    f = [lr_factor("multistep", t, 200) for t in range(200)]
    assert f[:100] == [1.0] * 100 and f[100:150] == [0.1] * 50 and f[150:] == [0.01] * 50
    # scaled: t >= E/2 and t >= 3E/4, exactly (3 epochs: the second milestone, 2.25, is never reached)
    assert [lr_factor("multistep", t, 3) for t in range(3)] == [1.0, 1.0, 0.1]
    assert [lr_factor("multistep", t, 4) for t in range(4)] == [1.0, 1.0, 0.1, 0.01]


def test_trades_schedule_is_the_references() -> None:
    """The TRADES reference counts epochs from 1 and sets lr * 0.1 from epoch 75, * 0.01
    from 90 and * 0.001 from 100 (of 100): in satkit's t from 0, at t = 74, 89 and 99."""
    f = [lr_factor("trades", t, 100) for t in range(100)]
    assert f[:74] == [1.0] * 74 and f[74:89] == [0.1] * 15 and f[89:99] == [0.01] * 10 and f[99] == 0.001
    # 9/10 of 100 is 90 exactly (fractions, not 0.9 * 100 = 90.00000000000001)
    assert lr_factor("trades", 88, 100) == 0.1 and lr_factor("trades", 89, 100) == 0.01
    # scaled to 20 epochs: from epoch 15, 18 and 20 (1-based)
    assert [t for t in range(1, 20) if lr_factor("trades", t, 20) < lr_factor("trades", t - 1, 20)] == [14, 17, 19]


def test_cosine_anneals_towards_zero() -> None:
    f = [lr_factor("cosine", t, 10) for t in range(10)]
    assert f[0] == 1.0 and f[5] == pytest.approx(0.5) and 0 < f[9] < 0.03
    assert all(a > b for a, b in zip(f, f[1:]))
    assert f == [0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]


def test_constant_and_unknown() -> None:
    assert {lr_factor("constant", t, 7) for t in range(7)} == {1.0}
    with pytest.raises(SatkitError, match="per step"):
        lr_factor("onecycle", 0, 10)
    with pytest.raises(SatkitError, match="unknown schedule 'linear'"):
        make_scheduler("linear", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), epochs=3,
                       steps_per_epoch=2)


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize("recipe, schedule, expect", [
    ("paper", "constant", [1e-3] * 4),
    ("madry", None, [0.1, 0.1, 0.01, 0.001]),  # multistep: /10 at epochs 2 and 3 (50%, 75% of 4)
    ("trades", None, [0.1, 0.1, 0.01, 0.0001]),  # 1-based epochs 3 (75%) and 4 (90%, 100%)
    ("paper", "cosine", [1e-3 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]),
])
def test_lr_per_epoch_in_metrics_follows_the_schedule(recipe: str, schedule: str | None, expect: list[float],
                                                     digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(TrainConfig(store=str(digits_store), out=str(out), epochs=4, recipe=recipe, schedule=schedule, **TINY),
          log=lambda m: None)
    recs = lines(out)
    assert [r["lr"] for r in recs] == pytest.approx(expect, rel=1e-12)
    assert [r["lr_last"] for r in recs] == [r["lr"] for r in recs]  # per-epoch schedules: flat within an epoch
    r = RECIPES[recipe]
    opts = json.loads((out / "config.json").read_text())["options"]
    assert (opts["recipe"], opts["optimizer"], opts["lr"], opts["momentum"], opts["weight_decay"],
            opts["schedule"], opts["attack_bn"]) == \
        (recipe, r.optimizer, r.lr, r.momentum, r.weight_decay, schedule or r.schedule, r.attack_bn)
    ckpt = load_checkpoint(out)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == r.weight_decay and ("momentum" not in group or group["momentum"] == 0.9)
    assert ckpt["scheduler"]["last_epoch"] == 4  # stepped once per epoch, checkpointed with the model
    final = json.loads((out / "metrics.json").read_text())
    assert (final["recipe"], final["schedule"]) == (recipe, schedule or r.schedule)


def test_onecycle_is_torchs_one_cycle_per_step(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "oc"
    train(TrainConfig(store=str(digits_store), out=str(out), epochs=3, schedule="onecycle", **TINY),
          log=lambda m: None)
    ref_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=1e-3, total_steps=6, cycle_momentum=False)
    per_step = []
    for _ in range(6):
        per_step.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert [(r["lr"], r["lr_last"]) for r in lines(out)] == [(per_step[0], per_step[1]), (per_step[2], per_step[3]),
                                                            (per_step[4], per_step[5])]
    assert per_step[0] == pytest.approx(1e-3 / 25) and max(per_step) == pytest.approx(1e-3, rel=0.2)
    assert load_checkpoint(out)["scheduler"]["last_epoch"] == 6


# --------------------------------------------------------------------------- recipes and validation


def test_recipes_resolve_and_explicit_options_win() -> None:
    madry = TrainConfig(store="s", method="pgd", recipe="madry").resolved()
    assert (madry.optimizer, madry.lr, madry.momentum, madry.weight_decay, madry.schedule, madry.attack_bn) == \
        ("sgd", 0.1, 0.9, 5e-4, "multistep", "eval")
    trades = TrainConfig(store="s", method="trades", recipe="trades").resolved()
    assert (trades.optimizer, trades.lr, trades.weight_decay, trades.schedule, trades.beta) == \
        ("sgd", 0.1, 2e-4, "trades", 6.0)
    mine = TrainConfig(store="s", recipe="madry", lr=0.05, weight_decay=0.0, schedule="cosine", momentum=0.5).resolved()
    assert (mine.optimizer, mine.lr, mine.momentum, mine.weight_decay, mine.schedule) == \
        ("sgd", 0.05, 0.5, 0.0, "cosine")
    # an optimizer other than the recipe's gets that optimizer's usual lr, not the recipe's
    assert TrainConfig(store="s", recipe="madry", optimizer="adam").resolved().lr == 1e-3
    assert TrainConfig(store="s", optimizer="sgd").resolved().lr == 0.1
    with pytest.raises(SatkitError, match="^--recipe: unknown recipe 'rice'"):
        TrainConfig(store="s", recipe="rice").resolved()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, message", [
    ("lr", NAN, "--lr: must be a finite number > 0"),
    ("lr", -0.1, "--lr: must be a finite number > 0"),
    ("lr", 0.0, "--lr: must be a finite number > 0"),
    ("lr", INF, "--lr: must be a finite number > 0"),
    ("momentum", NAN, "--momentum: must be in [0, 1)"),
    ("momentum", -0.5, "--momentum: must be in [0, 1)"),
    ("momentum", 1.0, "--momentum: must be in [0, 1)"),
    ("weight_decay", NAN, "--weight-decay: must be a finite number >= 0"),
    ("weight_decay", -1e-4, "--weight-decay: must be a finite number >= 0"),
    ("beta", NAN, "--beta: must be a finite number >= 0"),
    ("beta", -1.0, "--beta: must be a finite number >= 0"),
    ("beta", INF, "--beta: must be a finite number >= 0"),
    ("eps", NAN, "--eps: must be >= 0"),
    ("eps0", -1 / 255, "--eps0: must be >= 0"),
    ("step_size", NAN, "--step-size: must be >= 0"),
    ("alpha", NAN, "--alpha: must be in (0, 1]"),
    ("summary_samples", -1, "--summary-samples: must be >= 0"),
    ("augment", "flip", "--augment: unknown augmentation 'flip'"),
    ("schedule", "linear", "--schedule: unknown schedule 'linear'"),
])
def test_bad_values_are_refused_naming_the_option(field: str, value: object, message: str) -> None:
    with pytest.raises(SatkitError) as e:
        TrainConfig(store="s", method="trades", **{field: value}).resolved()  # type: ignore[arg-type]
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "Error: --lr: must be a finite number > 0, got nan"),
    (["--momentum", "nan"], "Error: --momentum: must be in [0, 1), got nan"),
    (["--weight-decay", "-1"], "Error: --weight-decay: must be a finite number >= 0, got -1.0"),
    (["--method", "trades", "--beta", "nan"], "Error: --beta: must be a finite number >= 0, got nan"),
])
def test_cli_refuses_bad_values_on_one_line(args: list[str], message: str, digits_store: Path,
                                            tmp_path: Path) -> None:
    out = tmp_path / "x"
    res = CliRunner().invoke(main, ["run", str(digits_store), "--out", str(out), "-q", *args])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [message], res.output
    assert not out.exists()


def test_cli_recipe_and_overrides_reach_config_json(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    res = CliRunner().invoke(main, ["run", str(digits_store), "--out", str(out), "--recipe", "trades",
                                    "--method", "standard", "--lr", "0.02", "--epochs", "2", "--batch-size", "32",
                                    "--train-samples", "64", "--eval-samples", "8", "--eval-steps", "0",
                                    "--summary-samples", "0", "--augment", "crop+flip", "-q"])
    assert res.exit_code == 0, res.output
    opts = json.loads((out / "config.json").read_text())["options"]
    assert (opts["recipe"], opts["optimizer"], opts["lr"], opts["weight_decay"], opts["schedule"],
            opts["attack_bn"], opts["augment"]) == ("trades", "sgd", 0.02, 2e-4, "trades", "eval", "crop+flip")
    # 2 epochs of the TRADES schedule: epoch 2 (1-based) is past 75%, 90% and 100% of the run
    assert [r["lr"] for r in lines(out)] == pytest.approx([0.02, 0.02 * 0.001], rel=1e-12)
    res = CliRunner().invoke(main, ["run", str(digits_store), "--out", str(tmp_path / "n"), "--augment", "crop",
                                    "--no-augment"])
    assert res.exit_code == 1 and "--no-augment contradicts --augment crop" in res.output
