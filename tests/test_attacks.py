"""sattrain.attacks: PGD against torchattacks, the eps-ball and [0, 1], no side effects,
restarts keep the worst case, TRADES KL and its unclamped start, Carlini-Wagner L2 against
advertorch (a loop-by-loop reference, and advertorch itself when its source is available)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from satdata.errors import SatkitError
from satdata.store import open_store
from sattrain.attacks import cw_l2, per_sample_loss, pgd, pgd_until_fooled, trades_adv, trades_kl
from sattrain.models import create_model

torchattacks = pytest.importorskip("torchattacks")

EPS = 8 / 255
STEP = 2 / 255


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: more threads only contend


def _load(store_path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    st = open_store(store_path)
    x = torch.from_numpy(st.load(split, "images")).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(st.load(split, "labels")).long()
    return x, y


@pytest.fixture(scope="module")
def trained(digits_store: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small-cnn trained for 3 epochs on the 16x16 digits (about 80% test accuracy), eval mode,
    and 128 test images with labels."""
    torch.manual_seed(0)
    x, y = _load(digits_store, "train")
    model = create_model("small-cnn", 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = _load(digits_store, "test")
    return model, xt[:128], yt[:128]


def _acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def test_model_is_meaningful(trained) -> None:
    model, x, y = trained
    assert _acc(model, x, y).float().mean() > 0.6


# --------------------------------------------------------------------------- PGD


def test_pgd_matches_torchattacks_without_random_start(trained) -> None:
    model, x, y = trained
    ours = pgd(model, x, y, eps=EPS, step_size=STEP, steps=5, random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=5, random_start=False)(x, y)
    assert (ours - theirs).abs().max().item() < 1e-6


def test_pgd_matches_torchattacks_from_the_same_random_start(trained) -> None:
    model, x, y = trained
    torch.manual_seed(123)  # torchattacks draws its start from the global CPU stream
    theirs = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=5, random_start=True)(x, y)
    ours = pgd(model, x, y, eps=EPS, step_size=STEP, steps=5, generator=torch.Generator().manual_seed(123))
    assert (ours - theirs).abs().max().item() < 1e-6


def test_pgd_robust_accuracy_close_to_torchattacks_with_other_starts(trained) -> None:
    model, x, y = trained
    torch.manual_seed(1)
    theirs = _acc(model, torchattacks.PGD(model, eps=4 / 255, alpha=STEP, steps=5)(x, y), y).float().mean()
    ours = _acc(model, pgd(model, x, y, eps=4 / 255, step_size=STEP, steps=5,
                           generator=torch.Generator().manual_seed(2)), y).float().mean()
    assert abs(ours.item() - theirs.item()) <= 0.06


@pytest.mark.parametrize("eps", [0.0, 1 / 255, 8 / 255, 0.3])
@pytest.mark.parametrize("restarts", [1, 3])
def test_pgd_stays_in_the_ball_and_the_box(trained, eps: float, restarts: int) -> None:
    model, x, y = trained
    x = x[:32].clone()
    x[:, :, :2] = 0.0  # exercise both box edges
    x[:, :, -2:] = 1.0
    adv = pgd(model, x, y[:32], eps=eps, step_size=STEP, steps=3, restarts=restarts,
              generator=torch.Generator().manual_seed(0))
    assert not adv.requires_grad and adv.shape == x.shape
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max().item() <= eps + 1e-7
    if eps == 0:
        assert torch.equal(adv, x)


def test_attacks_leave_mode_and_parameter_grads_alone(trained, digits_store: Path) -> None:
    model, x, y = trained
    x, y = x[:16], y[:16]
    for mode in (False, True):
        m = create_model("small-cnn", 10)
        m.load_state_dict(model.state_dict())
        m.train(mode)
        marker = {n: torch.full_like(p, 0.5) for n, p in m.named_parameters()}
        for n, p in m.named_parameters():
            p.grad = marker[n].clone()
        pgd(m, x, y, eps=EPS, step_size=STEP, steps=2, restarts=2)
        trades_adv(m, x, eps=EPS, step_size=STEP, steps=2)
        cw_l2(m, x, y, steps=2)
        assert m.training is mode
        for n, p in m.named_parameters():
            assert torch.equal(p.grad, marker[n]), n
            assert p.requires_grad


def test_pgd_never_beats_clean_accuracy_and_hurts_at_8_255(trained) -> None:
    model, x, y = trained
    clean = _acc(model, x, y)
    adv = pgd(model, x, y, eps=EPS, step_size=STEP, steps=5, generator=torch.Generator().manual_seed(0))
    robust = _acc(model, adv, y)
    assert robust.float().mean() <= clean.float().mean()
    assert (robust & clean).float().mean() < clean.float().mean() - 0.1


def test_restarts_keep_the_worst_case_per_sample(trained) -> None:
    model, x, y = trained
    x, y = x[:32], y[:32]
    kw = dict(eps=3 / 255, step_size=1 / 255, steps=2)
    one = pgd(model, x, y, **kw, generator=torch.Generator().manual_seed(5))
    many = pgd(model, x, y, **kw, restarts=4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        lo1, lo4 = model(one), model(many)
    fooled1, fooled4 = lo1.argmax(1) != y, lo4.argmax(1) != y
    loss1, loss4 = per_sample_loss(lo1, y, "ce"), per_sample_loss(lo4, y, "ce")
    assert bool((fooled4 | ~fooled1).all()), "a restart lost a successful example"
    same = fooled1 == fooled4
    assert bool((loss4[same] >= loss1[same] - 1e-5).all())
    assert (fooled4.sum() > fooled1.sum()) or bool((loss4 > loss1 + 1e-6).any())


def test_pgd_is_reproducible_with_a_generator(trained) -> None:
    model, x, y = trained
    a = pgd(model, x[:8], y[:8], eps=EPS, step_size=STEP, steps=2, generator=torch.Generator().manual_seed(9))
    b = pgd(model, x[:8], y[:8], eps=EPS, step_size=STEP, steps=2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def _authors_pgd(model, x, y, u, eps, step, steps):
    """The SAT authors' AttackPGD.attack, written from their code: an unclamped random start
    ``x + U(-eps, eps)`` (here from the given uniforms ``u``), signed steps on the summed
    cross-entropy, projection to the ball and to [0, 1] after each step; the last iterate."""
    adv = x + (2 * u - 1) * eps
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, [adv])
        adv = adv.detach() + step * g.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv


def test_paper_pgd_is_the_authors_attack_with_an_unclamped_start(trained) -> None:
    model, x, y = trained
    x, y = x[:32], y[:32]
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    ours = pgd(model, x, y, eps=EPS, step_size=STEP, steps=5, clamp_start=False,
               generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ours, _authors_pgd(model, x, y, u, EPS, STEP, 5), atol=1e-6)
    # the first forward pass sees the raw start, outside [0, 1] where the image is black or white
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    try:
        pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, clamp_start=False, generator=torch.Generator().manual_seed(5))
    finally:
        hook.remove()
    assert seen[0].min() < 0 or seen[0].max() > 1


def test_pgd_until_fooled_is_at_least_as_strong_and_stays_in_the_ball(trained) -> None:
    model, x, y = trained
    kw = dict(eps=EPS, step_size=EPS / 4, steps=10, restarts=2)
    first = pgd_until_fooled(model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    last = pgd(model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    clean = _acc(model, x, y)
    robust_first = (_acc(model, first, y) & clean).sum()
    robust_last = (_acc(model, last, y) & clean).sum()
    assert robust_first <= robust_last + 1  # any fooling iterate counts (other random draws: one sample slack)
    assert (first - x).abs().max() <= EPS + 1e-6 and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first[~clean], x[~clean])  # already wrong: left alone, never attacked
    again = pgd_until_fooled(model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(first, again)


def test_pgd_bce_for_multilabel_raises_the_loss(trained) -> None:
    model, x, _ = trained
    x = x[:32]
    with torch.no_grad():
        y = (torch.sigmoid(model(x)) > 0.5).float()  # multi-hot targets the model agrees with
    adv = pgd(model, x, y, eps=EPS, step_size=STEP, steps=5, loss="bce", generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= EPS + 1e-7
    with torch.no_grad():
        before = per_sample_loss(model(x), y, "bce").mean()
        after = per_sample_loss(model(adv), y, "bce").mean()
    assert after > before


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(eps=-0.1, step_size=STEP, steps=1), (2, 3, 8, 8), "--eps"),
        (dict(eps=EPS, step_size=STEP, steps=-1), (2, 3, 8, 8), "--steps"),
        (dict(eps=EPS, step_size=STEP, steps=1, restarts=0), (2, 3, 8, 8), "--restarts"),
        (dict(eps=EPS, step_size=STEP, steps=1), (3, 8, 8), "NCHW"),
        (dict(eps=EPS, step_size=STEP, steps=1, loss="hinge"), (2, 3, 8, 8), "unknown loss"),
    ],
)
def test_pgd_rejects_bad_arguments(kwargs, shape, match) -> None:
    model = create_model("small-cnn", 10).eval()
    with pytest.raises(SatkitError, match=match):
        pgd(model, torch.rand(shape), torch.zeros(2, dtype=torch.long), **kwargs)


# --------------------------------------------------------------------------- TRADES


def test_trades_kl_matches_the_reference_definition() -> None:
    torch.manual_seed(0)
    adv, clean = torch.randn(6, 5), torch.randn(6, 5)
    p, q = F.softmax(clean, 1), F.softmax(adv, 1)
    expected = (p * (p.log() - q.log())).sum() / 6
    assert torch.allclose(trades_kl(adv, clean), expected, atol=1e-6)
    # the TRADES code's form: KLDivLoss(size_average=False)(log_softmax(adv), softmax(clean)) / batch
    ref = torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(adv, 1), F.softmax(clean, 1)) / 6
    assert torch.allclose(trades_kl(adv, clean), ref, atol=1e-6)
    assert trades_kl(clean, clean).abs() < 1e-6
    # batch mean: repeating the batch does not change it
    assert torch.allclose(trades_kl(adv.repeat(3, 1), clean.repeat(3, 1)), expected, atol=1e-6)


def test_trades_kl_multilabel_is_a_sum_of_bernoulli_kls() -> None:
    torch.manual_seed(0)
    adv, clean = torch.randn(4, 3) * 3, torch.randn(4, 3) * 3
    p, q = torch.sigmoid(clean).double(), torch.sigmoid(adv).double()
    expected = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum() / 4
    assert torch.allclose(trades_kl(adv, clean, multilabel=True).double(), expected, atol=1e-5)
    assert trades_kl(clean, clean, multilabel=True).abs() < 1e-6
    big = torch.tensor([[80.0, -80.0]])
    assert torch.isfinite(trades_kl(-big, big, multilabel=True))  # no log(0) for saturated logits


def test_trades_adv_stays_in_the_ball_and_raises_the_kl(trained) -> None:
    model, x, _ = trained
    x = x[:32]
    adv = trades_adv(model, x, eps=EPS, step_size=STEP, steps=5, generator=torch.Generator().manual_seed(0))
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max().item() <= EPS + 1e-7
    with torch.no_grad():
        kl = trades_kl(model(adv), model(x))
    assert kl > 0.01


def test_trades_starts_unclamped_like_the_reference(trained) -> None:
    """The first forward pass on x_adv sees x + 0.001 * N(0, 1), not clamped: pixels at 0
    and 1 go outside [0, 1]; every later iterate is projected to the ball and the box."""
    model, x, _ = trained
    x = x[:8].clone()
    x[:, :, :3] = 0.0
    x[:, :, -3:] = 1.0
    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    try:
        adv = trades_adv(model, x, eps=EPS, step_size=STEP, steps=3, generator=torch.Generator().manual_seed(4))
    finally:
        handle.remove()
    assert len(seen) == 1 + 3 and torch.equal(seen[0], x)  # f(x) once, then one pass per step
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(seen[1], x + 0.001 * noise)
    assert seen[1].min() < 0 and seen[1].max() > 1
    for later in seen[2:] + [adv]:
        assert later.min() >= 0 and later.max() <= 1 and (later - x).abs().max() <= EPS + 1e-7


# --------------------------------------------------------------------------- Carlini-Wagner L2


def _reference_cw(model, x, y, num_classes, *, search_steps, steps, lr=0.01, c=1e-3, kappa=0.0, abort_early=True):
    """advertorch 0.2.3's ``CarliniWagnerL2Attack.perturb`` (untargeted, clip [0, 1]) rewritten
    from its source with plain loops and advertorch's per-sample Python bookkeeping.
    (Gradients by autograd.grad instead of loss.backward: the same numbers, no param grads.)"""
    n = len(x)
    t = (x.clamp(0.0, 1.0) * 2 - 1) * 0.999999
    x_atanh = torch.log((1 + t) / (1 - t)) * 0.5
    x_r = torch.tanh(x_atanh) * 0.5 + 0.5
    onehot = F.one_hot(y, num_classes).float()
    lower = x.new_zeros(n)
    upper = x.new_ones(n) * 1e10
    coeffs = torch.ones_like(y).float() * c
    final_l2 = torch.FloatTensor([1e10] * n)
    final_adv = x.clone()
    for outer in range(search_steps):
        delta = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        cur_l2 = torch.FloatTensor([1e10] * n)
        cur_labels = [-1] * n
        prev = 1e6
        if search_steps >= 10 and outer == search_steps - 1:
            coeffs = upper
        for ii in range(steps):
            adv = torch.tanh(delta + x_atanh) * 0.5 * (1.0 - 0.0) + (1.0 + 0.0) * 0.5
            out = model(adv)
            l2 = ((adv - x_r) ** 2).view(n, -1).sum(dim=1)
            real = (onehot * out).sum(dim=1)
            other = ((1.0 - onehot) * out - onehot * 10000.0).max(1)[0]
            loss = torch.sum(coeffs * torch.clamp(real - other + kappa, min=0.0)) + l2.sum()
            delta.grad = torch.autograd.grad(loss, [delta])[0]
            opt.step()
            loss = loss.item()
            if abort_early and ii % (steps // 10 or 1) == 0:
                if loss > prev * 0.999999:
                    break
                prev = loss
            out, l2, adv = out.detach(), l2.detach(), adv.detach()
            for i in range(n):
                z = out[i].clone()
                z[y[i]] += kappa
                success = int(z.argmax()) != int(y[i])
                if success and l2[i] < cur_l2[i]:
                    cur_l2[i] = l2[i]
                    cur_labels[i] = int(out[i].argmax())
                if success and l2[i] < final_l2[i]:
                    final_l2[i] = l2[i]
                    final_adv[i] = adv[i]
        for i in range(n):
            if cur_labels[i] != -1 and cur_labels[i] != int(y[i]):
                upper[i] = min(upper[i], coeffs[i])
                if upper[i] < 1e9:
                    coeffs[i] = (lower[i] + upper[i]) / 2
            else:
                lower[i] = max(lower[i], coeffs[i])
                if upper[i] < 1e9:
                    coeffs[i] = (lower[i] + upper[i]) / 2
                else:
                    coeffs[i] *= 10
    return final_adv


def _random_cnn(num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """A random conv net on 8x8 images; logits scaled x10 so margins are what c ~ 1e-2 can overcome."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, num_classes),
    ).eval()
    with torch.no_grad():
        model[3].weight.mul_(10.0)
        model[3].bias.mul_(10.0)
    return model


def _random_batch(model: torch.nn.Module, n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 8x8 images (some pixels exactly 0 and 1), labelled with the model's own
    prediction except the last one (already misclassified)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, -1] = 1.0
    with torch.no_grad():
        y = model(x).argmax(1)
    y[-1] = (y[-1] + 1) % 5
    return x, y


CW_SETTINGS = [
    dict(search_steps=3, steps=20),  # the authors' setting for standard models
    dict(search_steps=9, steps=20),  # ... and for adversarially trained ones
    dict(search_steps=3, steps=10, lr=0.05, c=0.1),  # here an aborted iterate would have been a success
    dict(search_steps=4, steps=7, abort_early=False, kappa=0.5, c=0.05, lr=0.05),
    dict(search_steps=10, steps=20),  # advertorch's "repeat": the last step runs at the upper bound
]


@pytest.mark.parametrize("kw", CW_SETTINGS)
def test_cw_matches_a_loop_by_loop_advertorch_reference(kw: dict) -> None:
    model = _random_cnn()
    x, y = _random_batch(model)
    ours = cw_l2(model, x, y, **kw)
    ref = _reference_cw(model, x, y, 5, **kw)
    assert torch.equal(ours, ref)
    fooled = ~_acc(model, ours, y)
    assert 0 < int(fooled[:-1].sum()) and bool(fooled[-1])  # the comparison is not vacuous


def test_cw_matches_the_reference_on_the_trained_model(trained) -> None:
    model, x, y = trained
    x, y = x[:24], y[:24]
    ours = cw_l2(model, x, y, search_steps=3, steps=20)
    assert torch.equal(ours, _reference_cw(model, x, y, 10, search_steps=3, steps=20))
    assert (~_acc(model, ours, y)).any()


def _load_advertorch_cw(monkeypatch: pytest.MonkeyPatch):
    """advertorch's CarliniWagnerL2Attack, or skip.

    advertorch (LGPL, not a dependency) cannot be imported as a package with current torch
    (its FAB attack needs a removed torch API), so only the modules the CW attack needs are
    loaded, from an installed advertorch or from an unpacked source tree named by
    SATKIT_ADVERTORCH_SRC (the directory holding ``advertorch/``, e.g. from
    ``pip download advertorch==0.2.3 --no-deps``)."""
    import importlib
    import importlib.util
    import os
    import sys
    import types

    src = os.environ.get("SATKIT_ADVERTORCH_SRC")
    if src:
        root = Path(src) / "advertorch"
    else:
        spec = importlib.util.find_spec("advertorch")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("advertorch not available (set SATKIT_ADVERTORCH_SRC to an unpacked advertorch 0.2.3)")
        root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "attacks" / "carlini_wagner.py").is_file():
        pytest.skip(f"no advertorch CW source under {root}")
    for name in [m for m in sys.modules if m == "advertorch" or m.startswith("advertorch.")]:
        monkeypatch.delitem(sys.modules, name)
    pkg = types.ModuleType("advertorch")
    pkg.__path__ = [str(root)]
    attacks = types.ModuleType("advertorch.attacks")
    attacks.__path__ = [str(root / "attacks")]
    monkeypatch.setitem(sys.modules, "advertorch", pkg)
    monkeypatch.setitem(sys.modules, "advertorch.attacks", attacks)
    before = set(sys.modules)
    try:
        base = importlib.import_module("advertorch.attacks.base")
        attacks.Attack, attacks.LabelMixin = base.Attack, base.LabelMixin
        cw = importlib.import_module("advertorch.attacks.carlini_wagner")
    except Exception as e:  # pragma: no cover - depends on the advertorch copy
        pytest.skip(f"advertorch's CW does not import here: {e!r}")
    finally:
        for name in set(sys.modules) - before:  # re-added through monkeypatch: removed at teardown
            monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))
    return cw.CarliniWagnerL2Attack


@pytest.mark.parametrize("kw", CW_SETTINGS)
def test_cw_matches_advertorch_itself(kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    attack_cls = _load_advertorch_cw(monkeypatch)
    model = _random_cnn()
    x, y = _random_batch(model)
    theirs = attack_cls(model, 5, confidence=kw.get("kappa", 0.0), learning_rate=kw.get("lr", 0.01),
                        binary_search_steps=kw["search_steps"], max_iterations=kw["steps"],
                        abort_early=kw.get("abort_early", True), initial_const=kw.get("c", 1e-3)).perturb(x, y)
    assert torch.equal(cw_l2(model, x, y, **kw), theirs)


def test_cw_binary_search_raises_c_when_not_fooled_and_lowers_it_when_fooled(trained, monkeypatch) -> None:
    import sattrain.attacks as attacks

    model, x, y = trained
    x, y = x[:32], y[:32]
    steps, search = 6, 5
    seen_c: list[torch.Tensor] = []
    seen_fooled: list[torch.Tensor] = []
    objective, fooled_fn = attacks._cw_objective, attacks._cw_fooled

    def record_objective(l2sq, logits, y_, cs, kappa):
        seen_c.append(cs.clone())
        return objective(l2sq, logits, y_, cs, kappa)

    def record_fooled(logits, y_, kappa):
        seen_fooled.append(fooled_fn(logits, y_, kappa))
        return seen_fooled[-1]

    monkeypatch.setattr(attacks, "_cw_objective", record_objective)
    monkeypatch.setattr(attacks, "_cw_fooled", record_fooled)
    cw_l2(model, x, y, steps=steps, search_steps=search, c=0.01, lr=0.05, abort_early=False)
    assert len(seen_c) == len(seen_fooled) == steps * search  # no abort: every iteration runs and records
    c = [seen_c[k * steps] for k in range(search)]  # c of each outer step
    fooled = [torch.stack(seen_fooled[k * steps:(k + 1) * steps]).any(0) for k in range(search)]
    assert torch.equal(c[0], torch.full((32,), 0.01))
    lo, hi = torch.zeros(32), torch.full((32,), 1e10)
    for k in range(search - 1):
        assert bool((c[k + 1][fooled[k]] < c[k][fooled[k]]).all()), "a fooled sample must lower c"
        assert bool((c[k + 1][~fooled[k]] > c[k][~fooled[k]]).all()), "an unfooled sample must raise c"
        hi = torch.where(fooled[k], torch.minimum(hi, c[k]), hi)
        lo = torch.where(fooled[k], lo, torch.maximum(lo, c[k]))
        expect = torch.where(hi < 1e9, (lo + hi) / 2, c[k] * 10)
        assert torch.allclose(c[k + 1], expect, rtol=1e-6)
    # the search really went both ways
    ups = torch.stack([~f for f in fooled[:-1]]).any(0)
    downs = torch.stack(fooled[:-1]).any(0)
    assert ups.any() and downs.any()


def test_cw_with_one_search_step_is_a_plain_fixed_c_run(trained) -> None:
    model, x, y = trained
    x, y = x[:32], y[:32]
    c, steps, lr = 0.5, 8, 0.02
    ours = cw_l2(model, x, y, steps=steps, c=c, lr=lr, search_steps=1, abort_early=False)
    # plain Adam at fixed c on tanh-box coordinates; keep each sample's smallest-L2
    # misclassified pre-step iterate, else x
    t = (2 * x - 1) * 0.999999
    w0 = torch.log((1 + t) / (1 - t)) * 0.5
    x_r = torch.tanh(w0) * 0.5 + 0.5
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    best, best_l2 = x.clone(), torch.full((32,), float("inf"))
    for _ in range(steps):
        adv = torch.tanh(w0 + delta) * 0.5 + 0.5
        logits = model(adv)
        l2 = (adv - x_r).pow(2).flatten(1).sum(1)
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        loss = (l2 + c * (true - other).clamp(min=0)).sum()
        delta.grad = torch.autograd.grad(loss, delta)[0]
        opt.step()
        with torch.no_grad():
            better = (logits.argmax(1) != y) & (l2 < best_l2)
            best_l2 = torch.where(better, l2, best_l2)
            best = torch.where(better.view(-1, 1, 1, 1), adv, best)
    assert (ours - best).abs().max().item() < 1e-6
    assert (~_acc(model, ours, y)).sum() > (~_acc(model, x, y)).sum()


def test_cw_reduces_accuracy_with_finite_small_perturbations(trained) -> None:
    model, x, y = trained
    x, y = x[:64], y[:64]
    clean = _acc(model, x, y)
    adv = cw_l2(model, x, y)  # advertorch defaults: 9 search steps from c = 1e-3, 20 iterations
    assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1
    under = _acc(model, adv, y)
    assert (under & clean).float().mean() < clean.float().mean() - 0.2
    norms = (adv - x).flatten(1).norm(dim=1)
    success = clean & ~under
    assert torch.isfinite(norms).all()
    assert (norms[success] > 0).all() and norms[success].median() < 3.0
    # samples it never fooled come back exactly unchanged
    assert torch.equal(adv[under], x[under])


def test_cw_binary_search_keeps_every_success(trained) -> None:
    model, x, y = trained
    x, y = x[:32], y[:32]
    one = cw_l2(model, x, y, steps=5, c=0.1, search_steps=1)
    three = cw_l2(model, x, y, steps=5, c=0.1, search_steps=3)
    f1, f3 = ~_acc(model, one, y), ~_acc(model, three, y)
    assert bool((f3 | ~f1).all())
    n1 = (one - x).flatten(1).norm(dim=1)
    n3 = (three - x).flatten(1).norm(dim=1)
    assert bool((n3[f1] <= n1[f1] + 1e-5).all())
    assert f3.sum() >= f1.sum()


def test_cw_rejects_bad_arguments() -> None:
    model = create_model("small-cnn", 3).eval()
    with pytest.raises(SatkitError, match="single-label"):
        cw_l2(model, torch.rand(2, 3, 8, 8), torch.zeros(2, 3))
    with pytest.raises(SatkitError, match="c > 0"):
        cw_l2(model, torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), c=0.0)
    with pytest.raises(SatkitError, match="search_steps"):
        cw_l2(model, torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), search_steps=0)


def test_loss_helper_shapes() -> None:
    logits = torch.randn(5, 4)
    assert per_sample_loss(logits, torch.arange(5) % 4, "ce").shape == (5,)
    assert per_sample_loss(logits, torch.from_numpy(np.eye(4)[[0, 1, 2, 3, 0]]), "bce").shape == (5,)
