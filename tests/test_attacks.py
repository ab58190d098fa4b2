"""sattrain.attacks: PGD against torchattacks, the eps-ball and [0, 1], no side effects,
restarts keep the worst case, TRADES KL, Carlini-Wagner L2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from satdata.errors import SatkitError
from satdata.store import open_store
from sattrain.attacks import cw_l2, per_sample_loss, pgd, trades_adv, trades_kl
from sattrain.models import create_model

torchattacks = pytest.importorskip("torchattacks")

EPS = 8 / 255
STEP = 2 / 255


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and extra threads only contend for the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# --------------------------------------------------------------------------- Carlini-Wagner L2


def test_cw_reduces_accuracy_with_finite_small_perturbations(trained) -> None:
    model, x, y = trained
    x, y = x[:64], y[:64]
    clean = _acc(model, x, y)
    adv = cw_l2(model, x, y, steps=20)
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
    one = cw_l2(model, x, y, steps=5, c=0.1)
    three = cw_l2(model, x, y, steps=5, c=0.1, search_steps=3)
    f1, f3 = ~_acc(model, one, y), ~_acc(model, three, y)
    assert bool((f3 | ~f1).all())
    n1 = (one - x).flatten(1).norm(dim=1)
    n3 = (three - x).flatten(1).norm(dim=1)
    assert bool((n3[f1] <= n1[f1] + 1e-5).all())
    assert f3.sum() >= f1.sum()


def test_cw_rejects_multilabel_targets() -> None:
    model = create_model("small-cnn", 3).eval()
    with pytest.raises(SatkitError, match="single-label"):
        cw_l2(model, torch.rand(2, 3, 8, 8), torch.zeros(2, 3))


def test_loss_helper_shapes() -> None:
    logits = torch.randn(5, 4)
    assert per_sample_loss(logits, torch.arange(5) % 4, "ce").shape == (5,)
    assert per_sample_loss(logits, torch.from_numpy(np.eye(4)[[0, 1, 2, 3, 0]]), "bce").shape == (5,)
