"""FGSM-RS, Free-AT and the `fast` recipe: cross-checked against the papers' algorithms
written out here from Wong et al. 2020 and Shafahi et al. 2019, plus the options' rules."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from satdata.errors import SatkitError
from sattrain.cli import main
from sattrain.config import TrainConfig
from sattrain.data import Batch
from sattrain.methods import FREE_DELTA, StepContext, get_method
from sattrain.schedule import make_scheduler
from sattrain.trainer import _collapsed, train_one_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255


def _ctx(*, steps: int = 1, step_size: float = 10 / 255, seed: int = 0, state: dict | None = None) -> StepContext:
    return StepContext(epoch=0, p=0.0, eps0=EPS, eps=EPS, step_size=step_size, steps=steps, beta=None,
                       multilabel=False, generator=torch.Generator().manual_seed(seed),
                       coin=torch.Generator().manual_seed(1), attack_bn="train", state={} if state is None else state)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _batch(seed: int = 0, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g), None)


# --------------------------------------------------------------------------- FGSM-RS


def fgsm_rs_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                      gen: torch.Generator) -> torch.Tensor:
    """Wong, Rice, Kolter (2020), Algorithm 3: delta ~ U(-eps, eps), kept a valid image;
    delta += alpha * sign(grad of the loss); delta clipped to [-eps, eps] and to the image."""
    delta = (2 * torch.rand(x.shape, generator=gen) - 1) * eps
    delta = torch.clamp(delta, -x, 1 - x).requires_grad_(True)
    loss = F.cross_entropy(model(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = torch.clamp(delta.detach() + alpha * grad.sign(), -eps, eps)
    delta = torch.clamp(delta, -x, 1 - x)
    return x + delta


def test_fgsm_rs_example_is_wong_et_al_algorithm() -> None:
    """One step whatever the context's steps (a library caller's StepContext may say 5)."""
    model, b = _net(), _batch()
    captured = {}

    def spy(x: torch.Tensor) -> torch.Tensor:
        captured["x"] = x
        return model(x)

    wrapped = nn.Module()
    wrapped.forward = spy  # type: ignore[method-assign]
    res = get_method("fgsm-rs").fn(wrapped, b, _ctx(seed=5, steps=5))
    ref = fgsm_rs_reference(model, b.x, b.y, EPS, 10 / 255, torch.Generator().manual_seed(5))
    assert res.attacked
    torch.testing.assert_close(captured["x"], ref, atol=1e-6, rtol=0)
    assert float((captured["x"] - b.x).abs().max()) <= EPS + 1e-6
    assert torch.allclose(res.loss, F.cross_entropy(model(ref), b.y), atol=1e-5)


def test_fgsm_rs_sat_is_a_coin_between_fgsm_rs_and_sat() -> None:
    model = _net()
    x = _batch().x
    S = torch.ones(8, 1, 6, 6)
    b = Batch(x, _batch().y, S)
    ctx = _ctx()
    shares = [get_method("fgsm-rs+sat").fn(model, b, ctx).attacked for _ in range(200)]
    assert 0.4 < np.mean(shares) < 0.6


def test_fgsm_rs_options() -> None:
    with pytest.raises(SatkitError, match=r"--steps: --method fgsm-rs takes exactly one FGSM step.*--method pgd"):
        TrainConfig(store="s", method="fgsm-rs", steps=3).resolved()
    assert TrainConfig(store="s", method="fgsm-rs", steps=1, step_size="8/255").resolved().step_size == \
        pytest.approx(8 / 255)
    assert TrainConfig(store="s", method="fgsm-rs", eps="4/255").resolved().step_size == pytest.approx(5 / 255)
    with pytest.raises(SatkitError, match="--step-size: must be > 0"):
        TrainConfig(store="s", method="free", step_size=0).resolved()
    with pytest.raises(SatkitError, match="--replays: only --method free"):
        TrainConfig(store="s", method="pgd", replays=4).resolved()
    with pytest.raises(SatkitError, match=r"--replays: must be in \[1, 1024\]"):
        TrainConfig(store="s", method="free", replays=0).resolved()


# --------------------------------------------------------------------------- Free-AT


class _Fixed:
    """A training split that yields the same batches in order (no shuffling)."""

    def __init__(self, batches: list[Batch]) -> None:
        self._batches = batches
        self.n = sum(b.x.shape[0] for b in batches)

    def batches(self, batch_size: int, gen: torch.Generator, map_name: str | None) -> Iterator[dict]:
        for b in self._batches:
            yield {"x": b.x, "y": b.y}


def free_reference(model: nn.Module, batches: list[Batch], *, m: int, eps: float, lr: float) -> torch.Tensor:
    """Shafahi et al. (2019), Algorithm 1 ("Free" adversarial training), plain SGD: a global
    perturbation delta (zero at first); each minibatch is replayed m times; each replay takes
    one gradient of the loss at clamp(x + delta) for both the weights (a step) and delta
    (delta <- clip(delta + eps * sign(g_delta), -eps, eps))."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    delta = torch.zeros_like(batches[0].x)
    for b in batches:
        for _ in range(m):
            d = delta[: b.x.shape[0]].clone().requires_grad_(True)
            loss = F.cross_entropy(model((b.x + d).clamp(0, 1)), b.y)
            opt.zero_grad()
            loss.backward()
            delta[: b.x.shape[0]] = (d.detach() + eps * d.grad.sign()).clamp(-eps, eps)
            opt.step()
    return delta


def test_free_at_matches_shafahi_et_al_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    import sattrain.trainer as tr

    batches = [_batch(seed=s) for s in range(3)] + [_batch(seed=9, n=5)]  # a short last batch
    ref_model = _net(seed=1)
    ref_delta = free_reference(ref_model, batches, m=3, eps=EPS, lr=0.05)

    # the trainer's batch preparation is the identity here (images already in [0, 1])
    monkeypatch.setattr(tr, "prepare_batch", lambda raw, codec, **kw: Batch(raw["x"], raw["y"], None))
    model = _net(seed=1)
    state: dict = {}
    ctx = _ctx(step_size=EPS, state=state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stats = train_one_epoch(model, _Fixed(batches), get_method("free"), ctx, opt, None, batch_size=8, codec=None,
                            map_name=None, augment="none", shuffle_gen=torch.Generator(), aug_gen=torch.Generator(),
                            autocast=lambda: torch.autocast("cpu", enabled=False), desc="", progress=False, replays=3)
    assert stats["steps"] == 12 and stats["samples"] == 29 and stats["attack_share"] == 1.0
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state[FREE_DELTA], ref_delta, atol=1e-6, rtol=0)
    assert float(state[FREE_DELTA].abs().max()) == pytest.approx(EPS)  # the sign steps reached the ball's edge


def test_free_epochs_are_divided_by_the_replays() -> None:
    cfg = TrainConfig(store="s", method="free", epochs=10, replays=4).resolved()
    assert (cfg.passes, cfg.replays_per_batch) == (3, 4)  # ceil(10 / 4): never fewer gradient steps
    assert TrainConfig(store="s", method="pgd", epochs=10).resolved().passes == 10


def test_costs_in_passes_per_example() -> None:
    assert [get_method(m).passes(5) for m in ("standard", "noise", "sat", "free", "pgd", "fgsm-rs")] == \
        [1.0, 1.0, 1.0, 1.0, 6.0, 2.0]  # fgsm-rs takes its one step whatever steps says
    assert get_method("fgsm-rs+sat").passes(5, 0.5) == 1.5
    assert get_method("pgd+sat").passes(5, 0.5) == 3.5
    assert get_method("trades").passes(5) == 7.0 and get_method("trades+sat").passes(5, 0.5) == 4.5


# --------------------------------------------------------------------------- the fast recipe


def test_cyclic_schedule_is_torch_cycliclr_triangle() -> None:
    """The closed form against torch's own CyclicLR(base_lr=0, max_lr, T/2 up, T/2 down), as Wong et al. use it."""
    total, lr = 40, 0.2
    p1, p2 = [nn.Parameter(torch.zeros(1))], [nn.Parameter(torch.zeros(1))]
    ours_opt = torch.optim.SGD(p1, lr=lr, momentum=0.9)
    sched = make_scheduler("cyclic", ours_opt, epochs=4, steps_per_epoch=10)
    torch_opt = torch.optim.SGD(p2, lr=lr, momentum=0.9)
    ref = torch.optim.lr_scheduler.CyclicLR(torch_opt, base_lr=0.0, max_lr=lr, step_size_up=total / 2,
                                            step_size_down=total / 2, cycle_momentum=False)
    got, want = [], []
    for _ in range(total):
        got.append(ours_opt.param_groups[0]["lr"])
        want.append(torch_opt.param_groups[0]["lr"])
        ours_opt.step(), torch_opt.step(), sched.step(), ref.step()
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert max(got) == pytest.approx(lr) and got[0] == 0.0


def test_fast_recipe_resolves_wong_et_al_settings() -> None:
    cfg = TrainConfig(store="s", method="fgsm-rs", recipe="fast").resolved()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.attack_bn) == \
        ("sgd", 0.2, 0.9, 5e-4, "cyclic", "train")
    assert TrainConfig(store="s", method="free", recipe="fast").resolved().lr == 0.04
    assert TrainConfig(store="s", method="free", recipe="fast", lr=0.1).resolved().lr == 0.1


# --------------------------------------------------------------------------- early stopping


def test_collapse_rule_is_a_drop_of_more_than_0_2() -> None:
    key = "pgd5_monitor"
    assert _collapsed([{"epoch": 0, key: 0.5}], key) is None
    assert _collapsed([{"epoch": 0, key: 0.5}, {"epoch": 1, key: 0.31}], key) is None
    hit = _collapsed([{"epoch": 0, key: 0.5}, {"epoch": 1, key: 0.29}], key)
    assert hit is not None and hit["epoch"] == 1 and hit["from"] == 0.5 and hit["to"] == 0.29
    assert _collapsed([{"epoch": 0, key: math.nan}, {"epoch": 1, key: 0.0}], key) is None


def test_early_stop_ends_the_run_at_the_collapse(digits_store: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sattrain.trainer as tr

    real = tr.evaluate_heldout
    scripted = iter([0.4, 0.5, 0.1, 0.6, 0.6])  # epoch 3 collapses: the run must stop there

    def fake(*args, **kwargs):  # the real evaluation, with a scripted monitor value
        ev = real(*args, **kwargs)
        return {k: (next(scripted) if k.startswith("pgd@") else v) for k, v in ev.items()}

    monkeypatch.setattr(tr, "evaluate_heldout", fake)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(digits_store), "--method", "fgsm-rs", "--epochs", "5", "--early-stop",
                                    "--train-samples", "128", "--eval-samples", "32", "--summary-samples", "0",
                                    "--batch-size", "64", "--out", str(out), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "early stop after epoch 3" in res.output and "best.pt keeps epoch 2" in res.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    final = json.loads((out / "metrics.json").read_text())
    assert final["stopped_early"]["epoch"] == 2 and final["stopped_early"]["summary_of"] == "best.pt"
    assert final["best"]["epoch"] == 1


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method,extra", [("fgsm-rs", []), ("free", ["--replays", "4"])])
def test_fast_methods_learn_digits(method: str, extra: list[str], digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    res = CliRunner().invoke(main, ["run", str(digits_store), "--method", method, "--epochs", "8", *extra,
                                    "--train-samples", "512", "--eval-samples", "128", "--summary-samples", "0",
                                    "--batch-size", "64", "--out", str(out), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads((out / "config.json").read_text())["options"]
    if method == "free":
        assert len(lines) == 2 and all(r["replays"] == 4 for r in lines) and cfg["replays"] == 4
    else:
        assert len(lines) == 8 and cfg["steps"] == 1 and cfg["step_size"] == pytest.approx(10 / 255)
    assert lines[-1]["clean_acc"] > 0.5  # ten classes: chance is 0.1
    assert lines[-1]["monitor"]["step_size"] == "2/255"  # the monitor's PGD step is eps/4, not the FGSM step


def test_free_resume_continues_the_perturbation_exactly(digits_store: Path, tmp_path: Path) -> None:
    """The persistent perturbation is checkpointed: 2 passes, then --resume to 3, equals 3 passes."""
    from sattrain.checkpoint import load_checkpoint
    from sattrain.trainer import train

    def cfg(out: Path, epochs: int, resume: bool = False) -> TrainConfig:
        return TrainConfig(store=str(digits_store), out=str(out), method="free", replays=2, epochs=epochs,
                           batch_size=64, train_samples=128, eval_samples=32, eval_steps=1, summary_samples=0,
                           device="cpu", progress=False, seed=4, resume=resume)

    quiet = lambda msg: None  # noqa: E731
    train(cfg(tmp_path / "whole", 6), log=quiet)
    train(cfg(tmp_path / "cut", 4), log=quiet)
    ckpt = load_checkpoint(tmp_path / "cut")
    delta = ckpt["method_state"][0][FREE_DELTA]
    assert delta.shape == (64, 3, 16, 16) and 0 < float(delta.abs().max()) <= EPS + 1e-6
    train(cfg(tmp_path / "cut", 6, resume=True), log=quiet)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}  # noqa: E731
    whole, cut = ((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("whole", "cut"))
    assert [strip(json.loads(x)) for x in cut] == [strip(json.loads(x)) for x in whole] and len(whole) == 3


def test_fgsm_rs_trains_what_one_step_pgd_trains(digits_store: Path, tmp_path: Path) -> None:
    """docs/method.md: `--method pgd --steps 1 --step-size 10/255` trains the same model as fgsm-rs."""
    from sattrain.checkpoint import load_checkpoint
    from sattrain.trainer import train

    common = dict(store=str(digits_store), epochs=2, batch_size=64, train_samples=128, eval_samples=32, eval_steps=1,
                  summary_samples=0, device="cpu", progress=False, seed=2)
    train(TrainConfig(out=str(tmp_path / "fgsm"), method="fgsm-rs", **common), log=lambda m: None)
    train(TrainConfig(out=str(tmp_path / "pgd"), method="pgd", steps=1, step_size="10/255", **common),
          log=lambda m: None)
    a, b = load_checkpoint(tmp_path / "fgsm")["model"], load_checkpoint(tmp_path / "pgd")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
