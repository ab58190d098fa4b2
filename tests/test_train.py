"""`sattrain run`: every method trains and writes its run; the methods' losses; multi-label; bad inputs."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner, Result

from satdata.errors import SatkitError
from satdata.store import MapInfo, ArrayWriter, open_store, store_digest
from sattrain.attacks import pgd, trades_adv, trades_kl
from sattrain.checkpoint import load_checkpoint, load_model
from sattrain.cli import main
from sattrain.config import DEFAULT_BETA, TrainConfig, parse_eps
from sattrain.data import Batch
from sattrain.methods import StepContext, flip_coin, get_method, method_names
from sattrain.perturb import curriculum_p, sat_perturb, uniform_delta, uniform_noise
from sattrain.trainer import mean_average_precision, train

# --summary-samples 0: AutoAttack on a CPU is slow; the summary has its own tests below.
QUICK = ["--model", "small-cnn", "--batch-size", "64", "--train-samples", "128", "--eval-samples", "32",
         "--steps", "2", "--eval-steps", "1", "--summary-samples", "0", "-q"]
MONITOR = "pgd1_monitor"  # --eval-steps 1
EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["run", *args], catch_exceptions=False)


# --------------------------------------------------------------------------- every method, end to end


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_and_writes_its_run(method: str, digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # fgsm-rs takes its one step; free makes ceil(epochs / replays) passes: 4 / 2 = 2 epochs
    quick = [a for a in QUICK if a not in ("--steps", "2")] if method.startswith("fgsm-rs") else QUICK
    epochs = ["--epochs", "4", "--replays", "2"] if method == "free" else ["--epochs", "2"]
    res = run(str(digits_store), "--method", method, *epochs, "--out", str(out), "--seed", "3", *quick)
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt",
                                               "metrics.json"}

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    uses_map = get_method(method).needs_map
    for r in lines:
        for k in ("loss", "train_acc", "clean_acc", MONITOR, "lr", "lr_last", "seconds", "images_per_s"):
            assert math.isfinite(r[k]), (k, r)
        assert "pgd_acc" not in r  # the monitor is named as such, never as the robust accuracy
        assert 0 <= r["train_acc"] <= 1 and 0 <= r[MONITOR] <= r["clean_acc"] <= 1  # robust: also clean-correct
        assert r["samples"] == 128 and r["metric"] == "accuracy" and r["lr"] == r["lr_last"] == 1e-3
        assert r["monitor"] == {"key": MONITOR, "attack": "pgd", "eps": "8/255", "steps": 1, "step_size": "2/255",
                                "random_start": True, "restarts": 1, "loss": "ce", "split": "test", "samples": 32,
                                "subset_seed": 20200607}
        assert r["p_t"] == (curriculum_p(r["epoch"], 0.6) if uses_map else None)
        assert r["map"] == ("ink" if uses_map else None)
        share = r["attack_share"]
        if method in ("pgd", "trades", "fgsm-rs", "free"):
            assert share == 1.0
        elif "+" in method:
            assert 0.0 <= share <= 1.0
        else:
            assert share == 0.0

    final = json.loads((out / "metrics.json").read_text())
    assert "robust_acc" not in final and "clean_acc" not in final
    assert final["summary"] is None and final["summary_skipped"] == "--summary-samples 0"
    assert final["monitor"]["split"] == "test" and final["monitor"]["samples"] == 32 and final["metric"] == "accuracy"
    assert final["last"] == {"epoch": 1, MONITOR: lines[1][MONITOR], "clean_acc": lines[1]["clean_acc"],
                             "checkpoint": "checkpoint.pt"}
    best = max(lines, key=lambda r: (r[MONITOR], -r["epoch"]))  # ties: the earlier epoch
    assert final["best"] == {"epoch": best["epoch"], MONITOR: best[MONITOR], "clean_acc": best["clean_acc"],
                             "checkpoint": "best.pt"}

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["store"]["digest"] == store_digest(open_store(digits_store).info)
    assert cfg["options"]["method"] == method and cfg["options"]["maps"] == (["ink"] if uses_map else [])
    assert cfg["options"]["beta"] == DEFAULT_BETA.get(method)
    assert cfg["options"]["eps0"] == pytest.approx(8 / 255) and cfg["options"]["lr"] == 1e-3
    assert (cfg["options"]["recipe"], cfg["options"]["schedule"], cfg["options"]["attack_bn"]) == \
        ("paper", "constant", "train")
    assert cfg["options"]["augment"] == "crop"  # digits: a mirrored digit is not the digit
    assert cfg["environment"]["torch"] == torch.__version__
    assert "git" in cfg and cfg["data"]["placement"] == "device"

    ckpt = load_checkpoint(out)  # weights_only=True inside
    assert ckpt["epoch"] == 2 and ckpt["config"]["method"] == method
    assert ckpt["model_spec"] == {"name": "small-cnn", "num_classes": 10, "label_kind": "single",
                                  "image_size": [16, 16], "classes": [str(i) for i in range(10)]}
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    model, spec = load_model(out)
    assert not model.training and spec["name"] == "small-cnn"
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)


def test_map_ensemble_picks_one_map_per_epoch(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "ens"
    res = run(str(digits_store), "--method", "sat", "--map", "ink", "--map", "box", "--epochs", "6",
              "--out", str(out), *QUICK, "--train-samples", "64", "--eval-samples", "8")
    assert res.exit_code == 0, res.output
    picked = [json.loads(x)["map"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(picked) == {"ink", "box"}  # seeded: this seed picks both within six epochs
    assert json.loads((out / "config.json").read_text())["options"]["maps"] == ["ink", "box"]


def test_sat_learns_digits(digits_store: Path, tmp_path: Path) -> None:
    """Not only runs: SAT training reaches a useful clean accuracy on digits in a few epochs."""
    cfg = TrainConfig(store=str(digits_store), out=str(tmp_path / "r"), method="sat", epochs=4, batch_size=64,
                      train_samples=768, eval_samples=128, eval_steps=1, summary_samples=0, progress=False)
    out = train(cfg, log=lambda m: None)
    final = json.loads((out / "metrics.json").read_text())
    assert final["last"]["clean_acc"] > 0.6, final
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]


# --------------------------------------------------------------------------- the methods' losses


class Linear(nn.Module):
    """No batch norm, so train and eval mode compute the same function."""

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 4 * 4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * 20


def make_batch(multilabel: bool = False) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 4, 4, generator=g)
    y = (torch.rand(8, 5, generator=g) < 0.4).float() if multilabel else torch.randint(0, 5, (8,), generator=g)
    S = torch.randint(0, 2, (8, 1, 4, 4), generator=g).float() * 2 - 1
    return Batch(x, y, S)


def make_ctx(beta: float | None = None, multilabel: bool = False, seed: int = 0, epoch: int = 7) -> StepContext:
    return StepContext(epoch=epoch, p=curriculum_p(epoch, 0.6), eps0=6 / 255, eps=EPS, step_size=2 / 255, steps=3,
                       beta=beta, multilabel=multilabel, generator=torch.Generator().manual_seed(seed),
                       coin=torch.Generator().manual_seed(seed + 100))


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_standard_noise_sat_losses() -> None:
    model, b, ctx = Linear(), make_batch(), make_ctx()
    assert torch.allclose(get_method("standard").fn(model, b, ctx).loss, F.cross_entropy(model(b.x), b.y))
    res = get_method("noise").fn(model, b, make_ctx())
    assert torch.allclose(res.loss, F.cross_entropy(model(uniform_noise(b.x, eps=6 / 255, generator=g())), b.y))
    res = get_method("sat").fn(model, b, make_ctx())
    x_t = sat_perturb(b.x, b.S, eps=6 / 255, p=curriculum_p(7, 0.6), generator=g())
    assert torch.allclose(res.loss, F.cross_entropy(model(x_t), b.y))  # only the perturbed batch
    assert not res.attacked
    with pytest.raises(SatkitError, match="no saliency map"):
        get_method("sat").fn(model, Batch(b.x, b.y, None), make_ctx())


def test_pgd_and_trades_losses() -> None:
    model, b = Linear(), make_batch()
    res = get_method("pgd").fn(model, b, make_ctx())
    x_adv = pgd(model, b.x, b.y, eps=EPS, step_size=2 / 255, steps=3, generator=g())
    assert res.attacked and torch.allclose(res.loss, F.cross_entropy(model(x_adv), b.y))
    res = get_method("trades").fn(model, b, make_ctx(beta=6.0))
    x_adv = trades_adv(model, b.x, eps=EPS, step_size=2 / 255, steps=3, generator=g())
    expect = F.cross_entropy(model(b.x), b.y) + 6.0 * trades_kl(model(x_adv), model(b.x))
    assert torch.allclose(res.loss, expect)
    assert torch.allclose(res.logits, model(b.x))  # train accuracy is measured on clean logits
    assert (expect - F.cross_entropy(model(b.x), b.y)) > 0  # the KL term is really there


@pytest.mark.parametrize("method", ["pgd+sat", "trades+sat", "pgd+noise", "trades+noise"])
def test_mixed_methods_follow_the_coin(method: str) -> None:
    model, b = Linear(), make_batch()
    beta = 1.0 if method.startswith("trades") else None
    seen = set()
    for seed in range(12):
        ctx = make_ctx(beta=beta, seed=seed)
        res = get_method(method).fn(model, b, ctx)
        attacked = flip_coin(make_ctx(seed=seed))  # the same first coin
        assert res.attacked == attacked
        seen.add(attacked)
        gen = g(seed)
        if attacked:
            x_pick = (pgd(model, b.x, b.y, eps=EPS, step_size=2 / 255, steps=3, generator=gen)
                      if method.startswith("pgd") else
                      trades_adv(model, b.x, eps=EPS, step_size=2 / 255, steps=3, generator=gen))
        elif method == "pgd+sat":  # SAT from the uniform start x + U(-eps, eps), clamped once
            start = b.x + uniform_delta(b.x, eps=EPS, generator=gen)
            x_pick = sat_perturb(start, b.S, eps=6 / 255, p=ctx.p, generator=gen)
        elif method == "trades+sat":
            x_pick = sat_perturb(b.x, b.S, eps=6 / 255, p=ctx.p, generator=gen)
        else:
            x_pick = uniform_noise(b.x, eps=6 / 255, generator=gen)
        if method.startswith("pgd"):
            expect = F.cross_entropy(model(x_pick), b.y)
        else:
            expect = F.cross_entropy(model(b.x), b.y) + 1.0 * trades_kl(model(x_pick), model(b.x))
        assert torch.allclose(res.loss, expect), (method, seed, attacked)
    assert seen == {True, False}


def test_coin_is_fair_and_seeded() -> None:
    ctx = make_ctx(seed=5)
    flips = [flip_coin(ctx) for _ in range(2000)]
    assert abs(sum(flips) / 2000 - 0.5) < 0.05
    ctx2 = make_ctx(seed=5)
    assert [flip_coin(ctx2) for _ in range(2000)] == flips


@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_attacks_run_in_the_attack_bn_mode_and_training_in_train_mode(method: str, bn: str) -> None:
    modes: list[bool] = []

    class Spy(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            modes.append(self.training)
            return super().forward(x)

    model = Spy()
    model.train()
    ctx = make_ctx(beta=6.0 if method == "trades" else None)
    ctx.attack_bn = bn
    get_method(method).fn(model, make_batch(), ctx)
    # pgd: 3 attack forwards, then the training forward; trades: f(x) and 3 attack forwards, then f(x), f(x_adv)
    n_train = 1 if method == "pgd" else 2
    assert modes[-n_train:] == [True] * n_train and model.training
    assert modes[:-n_train] == [bn == "train"] * (len(modes) - n_train) and len(modes) > n_train


class BNNet(nn.Module):
    """A conv, batch norm and a linear head: running statistics to watch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_attack_bn_train_updates_running_stats_eval_keeps_them(bn: str) -> None:
    """--attack-bn train (the authors' scripts): the attack's forwards use batch statistics
    and update the running ones; eval (the TRADES reference): the attack changes no state."""
    from sattrain.methods import _pgd_example, _trades_example

    for craft in (_pgd_example, _trades_example):
        model = BNNet()
        model.train()
        before = {k: v.clone() for k, v in model.bn.state_dict().items()}
        ctx = make_ctx()
        ctx.attack_bn = bn
        x_adv = craft(model, make_batch(), ctx)
        after = model.bn.state_dict()
        assert model.training and x_adv.shape == (8, 3, 4, 4)
        if bn == "train":
            assert not torch.equal(after["running_mean"], before["running_mean"])
            assert not torch.equal(after["running_var"], before["running_var"])
            assert int(after["num_batches_tracked"]) == 3 + (1 if craft is _trades_example else 0)  # one per forward
        else:
            for k, v in before.items():
                assert torch.equal(after[k], v), k


def test_attack_bn_default_follows_the_recipe() -> None:
    assert TrainConfig(store="s", method="pgd").resolved().attack_bn == "train"  # paper, the default recipe
    assert TrainConfig(store="s", method="pgd+sat").resolved().attack_bn == "train"
    assert TrainConfig(store="s", method="pgd", recipe="madry").resolved().attack_bn == "eval"
    assert TrainConfig(store="s", method="trades", recipe="trades").resolved().attack_bn == "eval"
    assert TrainConfig(store="s", method="pgd", recipe="madry", attack_bn="train").resolved().attack_bn == "train"
    with pytest.raises(SatkitError, match="^--attack-bn: unknown mode 'batch'"):
        TrainConfig(store="s", attack_bn="batch").resolved()


def test_multilabel_uses_bce() -> None:
    model, b = Linear(), make_batch(multilabel=True)
    res = get_method("standard").fn(model, b, make_ctx(multilabel=True))
    assert torch.allclose(res.loss, F.binary_cross_entropy_with_logits(model(b.x), b.y))
    res = get_method("trades+sat").fn(model, b, make_ctx(beta=1.0, multilabel=True))
    assert torch.isfinite(res.loss)


def test_mean_average_precision_matches_sklearn() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 6))
    targets = (rng.random((200, 6)) < 0.3).astype(np.float32)
    targets[:, 5] = 0  # a class without positives is left out of the mean
    ours = mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    ref = np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in range(5)])
    assert ours == pytest.approx(ref, abs=1e-6)
    assert mean_average_precision(torch.tensor([[2.0], [1.0]]), torch.tensor([[1.0], [0.0]])) == 1.0


# --------------------------------------------------------------------------- multi-label stores


@pytest.fixture(scope="module")
def multilabel_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16x16 images with up to three coloured squares (red, green, blue at fixed places);
    multi-hot labels say which; the map 'objects' is the union of the squares."""
    path = tmp_path_factory.mktemp("ml") / "squares.zarr"
    w = ArrayWriter(path, dataset="squares", classes=["red", "green", "blue"], image_size=(16, 16),
                    label_kind="multi", maps={"objects": MapInfo(name="objects", encoding="binary", kind="mask")})
    rng = np.random.default_rng(0)
    places = [(1, 1), (1, 9), (9, 5)]
    for split, n in (("train", 160), ("val", 48)):
        labels = (rng.random((n, 3)) < 0.5).astype(np.uint8)
        images = rng.integers(0, 40, (n, 16, 16, 3)).astype(np.uint8)
        maps = np.zeros((n, 16, 16), np.uint8)
        for i in range(n):
            for k, (r, c) in enumerate(places):
                if labels[i, k]:
                    images[i, r : r + 6, c : c + 6, k] = 230
                    maps[i, r : r + 6, c : c + 6] = 1
        w.create_split(split, n)
        w.write(split, 0, images, labels, [f"{split}{i}" for i in range(n)], {"objects": maps})
        w.close_split(split, n)
    w.finish({"source": "test"})
    return path


@pytest.mark.parametrize("method", ["sat", "trades+sat"])
def test_multilabel_store_trains_and_reports_map(method: str, multilabel_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml"
    # sat also runs the end-of-run summary: PGD alone (AutoAttack is single-label), scored by mAP
    summary = ["--summary-samples", "8"] if method == "sat" else []
    res = run(str(multilabel_store), "--method", method, "--epochs", "2", "--out", str(out), *QUICK, *summary)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["metric"] == "mAP" and 0 < r["clean_acc"] <= 1 and 0 < r["train_acc"] <= 1 for r in lines)
    final = json.loads((out / "metrics.json").read_text())
    assert final["metric"] == "mAP" and final["monitor"]["split"] == "val" and final["monitor"]["loss"] == "bce"
    assert 0 < final["last"][MONITOR] <= 1 and 0 < final["best"][MONITOR] <= 1
    assert final["best"][MONITOR] == max(r[MONITOR] for r in lines)  # best.pt by the monitor's mAP
    if method == "sat":
        assert final["summary"]["headline"]["name"] == "pgd@8/255" and "autoattack@8/255" not in final["summary"]["robust"]
        assert final["summary"]["headline"]["metric"] == "mAP" and final["summary"]["samples"] == 8
    else:
        assert final["summary"] is None
    spec = load_checkpoint(out)["model_spec"]
    assert spec["label_kind"] == "multi" and spec["num_classes"] == 3
    # a store that does not say otherwise may be mirrored: auto is crop+flip
    assert json.loads((out / "config.json").read_text())["options"]["augment"] == "crop+flip"


# --------------------------------------------------------------------------- bad inputs


def test_unknown_method_and_model(digits_store: Path, tmp_path: Path) -> None:
    res = run(str(digits_store), "--method", "fgsm", "--out", str(tmp_path / "a"))
    assert res.exit_code == 2 and "'fgsm' is not one of" in res.output
    res = run(str(digits_store), *QUICK, "--epochs", "1", "--model", "vgg99", "--out", str(tmp_path / "b"))
    assert res.exit_code == 1 and "Error: --model: unknown model 'vgg99' (known:" in res.output
    assert not (tmp_path / "b").exists()  # nothing written for a run that cannot start


def test_missing_map_and_store_without_maps(digits_store: Path, tmp_path: Path) -> None:
    res = run(str(digits_store), "--method", "sat", "--map", "edges", "--out", str(tmp_path / "a"), *QUICK)
    assert res.exit_code == 1
    assert "--map: " in res.output and "has no map 'edges' (maps in the store: ink, box)" in res.output
    plain = tmp_path / "plain.zarr"
    w = ArrayWriter(plain, dataset="plain", classes=["a", "b"], image_size=(8, 8), label_kind="single", maps={})
    for split in ("train", "test"):
        w.create_split(split, 8)
        w.write(split, 0, np.zeros((8, 8, 8, 3), np.uint8), np.arange(8) % 2, [str(i) for i in range(8)], {})
        w.close_split(split, 8)
    w.finish({})
    res = run(str(plain), "--method", "sat", "--out", str(tmp_path / "b"), *QUICK)
    assert res.exit_code == 1 and "needs a saliency map" in res.output and "plain.zarr has none" in res.output
    res = run(str(plain), "--method", "pgd", "--epochs", "1", "--out", str(tmp_path / "c"), *QUICK)
    assert res.exit_code == 0, res.output  # standard, noise, pgd, trades need no map


def test_bad_epsilons_and_paths(digits_store: Path, tmp_path: Path) -> None:
    for bad, why in (("8", "above 1"), ("abc", "cannot read"), ("8/0", "divides by zero"), ("-1/255", "cannot read")):
        res = run(str(digits_store), "--eps0", bad, "--out", str(tmp_path / "x"))
        assert res.exit_code == 2 and why in res.output, res.output
    assert parse_eps("8/255") == 8 / 255 and parse_eps("0.5") == 0.5 and parse_eps(" 2 / 255 ") == 2 / 255
    res = run(str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "y"))
    assert res.exit_code == 1 and "nope.zarr: no such store" in res.output
    res = run(str(digits_store), "--eval-split", "val", "--out", str(tmp_path / "z"), *QUICK)
    assert res.exit_code == 1 and "--eval-split: " in res.output and "no split 'val'" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message without CUDA")
def test_cuda_without_cuda(digits_store: Path, tmp_path: Path) -> None:
    res = run(str(digits_store), "--device", "cuda", "--out", str(tmp_path / "a"), *QUICK)
    assert res.exit_code == 1 and "--device cuda: CUDA is not available" in res.output


def test_non_finite_loss_stops_with_epoch_and_step(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    res = run(str(digits_store), "--optimizer", "sgd", "--lr", "1e30", "--epochs", "2", "--out", str(out), *QUICK)
    assert res.exit_code == 1
    assert "Error: epoch 1 (t = 0), step 2 of 2: the training loss is not finite" in res.output, res.output
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()


def test_existing_run_needs_resume_with_the_same_options(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert run(str(digits_store), "--epochs", "1", "--out", str(out), *QUICK).exit_code == 0
    res = run(str(digits_store), "--epochs", "1", "--out", str(out), *QUICK)
    assert res.exit_code == 1 and "already holds a run; pass --resume" in res.output
    res = run(str(digits_store), "--epochs", "2", "--lr", "0.01", "--out", str(out), "--resume", *QUICK)
    assert res.exit_code == 1 and "lr: 0.001 -> 0.01" in res.output
    # a moved store is fine (its digest matches); more epochs extend the run
    moved = tmp_path / "moved.zarr"
    shutil.copytree(digits_store, moved)
    res = run(str(moved), "--epochs", "2", "--out", str(out), "--resume", *QUICK)
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert load_checkpoint(out)["epoch"] == 2
    res = run(str(digits_store), "--epochs", "1", "--out", str(out), "--resume", *QUICK)
    assert res.exit_code == 1 and "--epochs 1: the run in" in res.output and "has already done 2 epochs" in res.output


def test_help_teaches(digits_store: Path) -> None:
    res = CliRunner().invoke(main, ["run", "--help"])
    assert res.exit_code == 0
    for text in ("trades+sat", "p_t = 1 - alpha**(t/10)", "small-cnn", "Examples:", "--train-samples",
                 "--memory-budget", "--amp", "--recipe [paper|madry|trades|fast]",
                 "--schedule [constant|multistep|trades|cosine|onecycle|cyclic]", "--attack-bn [train|eval]",
                 "--augment [auto|crop+flip|crop|none]", "--summary-samples", "pgd5_monitor", "best.pt",
                 # the recipes' values, one line each
                 "madry   sgd lr 0.1, momentum 0.9, weight decay 0.0005, --schedule multistep, --attack-bn eval",
                 "trades  sgd lr 0.1, momentum 0.9, weight decay 0.0002, --schedule trades, --attack-bn eval",
                 "paper   adam lr 0.001, momentum 0.9, weight decay 0, --schedule constant, --attack-bn train",
                 "x0.1 at 50% and 75% of the epochs", "OneCycleLR"):
        assert text in " ".join(res.output.split()) or text in res.output, text


def test_config_defaults_are_pinned() -> None:
    """Changing a default changes what `sattrain run` computes: make it a reviewed act."""
    cfg = TrainConfig(store="s").resolved()
    assert (cfg.method, cfg.model, cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr) == \
        ("sat", "small-cnn", 100, 128, "adam", 1e-3)
    assert (cfg.recipe, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.attack_bn) == \
        ("paper", 0.9, 0.0, "constant", "train")
    assert (cfg.eps0, cfg.alpha, cfg.eps, cfg.steps, cfg.step_size, cfg.replays) == \
        (8 / 255, 0.6, 8 / 255, 5, 2 / 255, None)
    fgsm = TrainConfig(store="s", method="fgsm-rs").resolved()
    assert (fgsm.steps, fgsm.step_size) == (1, pytest.approx(10 / 255))
    free = TrainConfig(store="s", method="free", epochs=30).resolved()
    assert (free.replays, free.passes, free.step_size) == (8, 4, pytest.approx(8 / 255))
    assert (cfg.beta, cfg.augment, cfg.device, cfg.amp, cfg.seed, cfg.eval_samples, cfg.eval_steps) == \
        (None, "auto", "auto", False, 0, 256, 5)
    assert cfg.summary_samples == 500
    assert TrainConfig(store="s", method="trades").resolved().beta == 6.0
    assert TrainConfig(store="s", method="trades+sat").resolved().beta == 1.0
    assert TrainConfig(store="s", method="trades+noise").resolved().beta == 1.0
    assert TrainConfig(store="s", optimizer="sgd").resolved().lr == 0.1


def test_streaming_run_and_amp_note_on_cpu(digits_store: Path, tmp_path: Path) -> None:
    """A split over --memory-budget streams from the store (whole chunks, prefetched) and trains."""
    out = tmp_path / "stream"
    # 64k is less than one chunk of digits (1,024 samples of ~1 kB): blocks of one chunk each
    res = run(str(digits_store), *QUICK, "--method", "sat", "--epochs", "1", "--train-samples", "300",
              "--memory-budget", "64k", "--amp", "--device", "cpu", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "--amp has no effect on the CPU" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["placement"] == "stream" and cfg["amp_active"] is False
    rec = json.loads((out / "metrics.jsonl").read_text())
    assert rec["samples"] == 300 and math.isfinite(rec["loss"])


# --------------------------------------------------------------------------- best.pt


def test_best_pt_holds_the_weights_of_the_recorded_epoch(digits_store: Path, tmp_path: Path) -> None:
    """best.pt is the epoch with the highest monitor (ties: the earlier epoch). Under the
    constant schedule a shorter run is a prefix of a longer one, so the checkpoint of a
    run stopped at the best epoch must be best.pt, weight for weight."""
    args = ["--method", "pgd", "--batch-size", "32", "--train-samples", "128", "--eval-samples", "64", "--steps", "1",
            "--eval-steps", "1", "--optimizer", "sgd", "--lr", "0.2", "--summary-samples", "0", "--device", "cpu",
            "--seed", "2", "-q"]  # seed 2: on the CPU the best is epoch 4 of 5, after a tie at epochs 1 and 2
    long = tmp_path / "long"
    res = run(str(digits_store), *args, "--epochs", "5", "--out", str(long))
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (long / "metrics.jsonl").read_text().splitlines()]
    top = max(r[MONITOR] for r in recs)
    e = min(r["epoch"] for r in recs if r[MONITOR] == top)
    final = json.loads((long / "metrics.json").read_text())
    assert final["best"] == {"epoch": e, MONITOR: top, "clean_acc": recs[e]["clean_acc"], "checkpoint": "best.pt"}
    best = load_checkpoint(long / "best.pt")
    assert best["epoch"] == e + 1 and best["best"] == final["best"] and best["optimizer"] is None
    assert load_checkpoint(long)["best"] == final["best"]
    # the console marks each new best; a tie does not move it
    marked = [int(line.split("/")[0].split()[-1]) - 1 for line in res.output.splitlines()
              if line.startswith("epoch ") and "(best)" in line]
    running, expect = -1.0, []
    for r in recs:
        if r[MONITOR] > running:
            running = r[MONITOR]
            expect.append(r["epoch"])
    assert marked == expect and marked[-1] == e
    assert f"best epoch {e + 1}: monitor pgd1@8/255 {top:.4f}" in res.output

    short = tmp_path / "short"
    assert run(str(digits_store), *args, "--epochs", str(e + 1), "--out", str(short)).exit_code == 0
    at_e = load_checkpoint(short)
    assert at_e["epoch"] == e + 1
    for k, v in at_e["model"].items():
        assert torch.equal(best["model"][k], v), k
    model, _ = load_model(long / "best.pt")  # what `sattrain eval RUN_DIR/best.pt` loads
    assert not model.training


# --------------------------------------------------------------------------- the end-of-run summary


def test_summary_calls_the_strong_evaluation_and_states_its_headline(digits_store: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The plumbing, with sattrain.evaluation.evaluate replaced by a recorder: what the run
    asks for, what metrics.json keeps, and the console's last line."""
    import sattrain.evaluation as ev_mod

    calls: list[tuple[tuple, dict]] = []

    def fake(*args: object, **kw: object) -> dict:
        calls.append((args, kw))
        Path(str(kw["out"])).write_text("{}")
        if kw.get("progress"):
            kw["progress"]("autoattack eps=8/255: 0.0123")  # type: ignore[operator]
        return {"protocol": "strong", "samples": 24, "split_size": 355, "complete": False, "clean": 0.5,
                "robust": {"autoattack@8/255": 0.0123, "pgd@8/255": 0.02},
                "headline": {"name": "autoattack@8/255", "value": 0.0123}, "extra": "ignored"}

    monkeypatch.setattr(ev_mod, "evaluate", fake)
    out = tmp_path / "sum"
    args = [a for a in QUICK if a not in ("--summary-samples", "0")]
    res = run(str(digits_store), "--method", "standard", "--epochs", "1", "--out", str(out), *args,
              "--summary-samples", "24", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    (target, store), kw = calls[0]
    assert Path(str(target)) == out / "checkpoint.pt" and getattr(store, "path", store) is not None
    assert kw["split"] == "test" and kw["samples"] == 24 and kw["seed"] == 0 and kw["device"] == "cpu"
    assert tuple(kw["attacks"]) == ("autoattack", "pgd") and tuple(kw["eps"]) == (8 / 255,)
    assert Path(str(kw["out"])) == out / "summary.json"
    final = json.loads((out / "metrics.json").read_text())
    assert final["summary"] == {"protocol": "strong", "samples": 24, "split": "test", "split_size": 355,
                                "complete": False, "clean": 0.5,
                                "robust": {"autoattack@8/255": 0.0123, "pgd@8/255": 0.02},
                                "headline": {"name": "autoattack@8/255", "value": 0.0123}, "file": "summary.json"}
    assert "summary_pending" not in final and "summary_skipped" not in final
    assert "summary: autoattack eps=8/255: 0.0123" in res.output  # the evaluation's progress is logged
    assert res.output.strip().splitlines()[-1] == "robust (autoattack@8/255, 24 of 355 samples): 0.0123"


def test_summary_skipped_says_so(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "skip"
    res = run(str(digits_store), "--method", "standard", "--epochs", "1", "--out", str(out), *QUICK)
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    assert "robustness not measured (--summary-samples 0)" in last and "sattrain eval" in last
    assert not (out / "summary.json").exists()


def test_a_failed_summary_keeps_the_training_and_resume_redoes_only_the_summary(
        digits_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sattrain.evaluation as ev_mod

    def broken(*args: object, **kw: object) -> dict:
        raise SatkitError("autoattack: the attack package is not installed")

    monkeypatch.setattr(ev_mod, "evaluate", broken)
    out = tmp_path / "fail"
    args = [a for a in QUICK if a not in ("--summary-samples", "0")]
    res = run(str(digits_store), "--method", "standard", "--epochs", "1", "--out", str(out), *args,
              "--summary-samples", "16")
    assert res.exit_code == 1
    assert "the end-of-run summary failed (autoattack: the attack package is not installed)" in res.output
    final = json.loads((out / "metrics.json").read_text())
    assert final["summary"] is None and "not installed" in final["summary_error"] and final["best"]["epoch"] == 0
    trained = load_checkpoint(out)
    # --summary-samples may change on resume; nothing is trained again
    res = run(str(digits_store), "--method", "standard", "--epochs", "1", "--out", str(out), *QUICK, "--resume")
    assert res.exit_code == 0, res.output
    assert "epoch 1/1" not in res.output and json.loads((out / "metrics.json").read_text())["summary"] is None
    for k, v in trained["model"].items():
        assert torch.equal(load_checkpoint(out)["model"][k], v), k


def test_summary_with_the_real_strong_evaluation(digits_store: Path, tmp_path: Path) -> None:
    """End to end with sattrain.evaluation: summary.json is written, metrics.json holds its
    numbers apart from the monitor's, and the last line quotes the headline."""
    out = tmp_path / "real"
    args = [a for a in QUICK if a not in ("--summary-samples", "0")]
    res = run(str(digits_store), "--method", "standard", "--epochs", "1", "--out", str(out), *args,
              "--summary-samples", "12", "--device", "cpu")
    assert res.exit_code == 0, res.output
    written = json.loads((out / "summary.json").read_text())
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["protocol"] == "strong" and summary["samples"] == 12 and summary["split"] == "test"
    assert summary["complete"] is False and summary["split_size"] == 355 and summary["file"] == "summary.json"
    assert set(summary["robust"]) >= {"autoattack@8/255", "pgd@8/255"}
    assert summary["robust"] == written["robust"] and summary["clean"] == written["clean"]
    head = summary["headline"]  # per sample the worst case of AutoAttack and PGD at 8/255
    assert head["name"] == "autoattack+pgd@8/255" and head["value"] == summary["robust"]["autoattack+pgd@8/255"]
    assert head["value"] <= min(summary["robust"]["autoattack@8/255"], summary["robust"]["pgd@8/255"])
    assert all(0 <= v <= summary["clean"] <= 1 for v in summary["robust"].values())
    assert res.output.strip().splitlines()[-1] == f"robust (autoattack+pgd@8/255, 12 of 355 samples): {head['value']:.4f}"


def test_a_run_directory_in_use_is_refused(digits_store: Path, tmp_path: Path) -> None:
    """A second `sattrain run --resume` into a directory a run still trains in (a killed
    torchrun leaves its workers running) is refused while that run holds it."""
    from satdata.store import flock_dir

    cfg = TrainConfig(store=str(digits_store), out=str(tmp_path / "r"), method="standard", epochs=1, batch_size=64,
                      train_samples=128, eval_samples=32, summary_samples=0, progress=False)
    train(cfg)
    fd = flock_dir(tmp_path / "r", exclusive=True)  # as the run in progress holds it
    assert fd is not None
    try:
        with pytest.raises(SatkitError, match=r"--out: .* is in use by another run"):
            train(replace(cfg, epochs=2, resume=True))
    finally:
        os.close(fd)
    train(replace(cfg, epochs=2, resume=True))  # free again: it resumes
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2
