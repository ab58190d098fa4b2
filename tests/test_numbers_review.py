"""A review of the numbers satkit reports: places where robust accuracy could come out
higher than the attacks found, or a definition could drift from the paper or the
reference implementations. Each test fails without the fix it names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from sattrain.attacks import pgd_until_fooled
from sattrain.evaluation import _changed_is_fooled, _Data, _pgd_fn


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Jittery(nn.Module):
    """A linear classifier whose logits carry a small random error on every forward pass,
    as a GPU's per-shape kernels (cuDNN's algorithm choice, TF32) give the same image
    slightly different logits in another batch."""

    def __init__(self, d: float = 0.05, classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3 * 4 * 4, classes, generator=g))
        self.noise = torch.Generator().manual_seed(1)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w
        return z + self.d * torch.rand(z.shape, generator=self.noise)


def _jittery_data(n: int = 200) -> tuple[Jittery, _Data, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    model = Jittery().eval()
    xf = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        y = (xf.flatten(1) @ model.w).argmax(1).numpy().astype(np.int64)
    data = _Data(img, y, False, 1024, torch.device("cpu"))
    x, yt = data.batch(0)
    with torch.no_grad():
        data.clean_ok[0] = model(x).argmax(1) == yt
    return model, data, x, yt


def test_a_sample_pgd_fooled_stays_fooled_when_rescoring_rounds_it_back() -> None:
    """pgd_until_fooled returns the first iterate that fools, just across the boundary;
    the scoring pass (another batch, other kernels) could put it back and count the sample
    robust. The strong protocol's PGD must count every sample its attack fooled."""
    model, data, x, y = _jittery_data()
    eps = 0.1
    model.noise.manual_seed(5)
    value = data.score(model, _pgd_fn(model, eps, eps / 4, 50, 1, False, torch.Generator().manual_seed(3)))
    # the same attack again, with the same random numbers, and its verdict
    model.noise.manual_seed(5)
    x_adv, fooled = pgd_until_fooled(model, x, y, eps=eps, step_size=eps / 4, steps=50,
                                     generator=torch.Generator().manual_seed(3), return_fooled=True)
    with torch.no_grad():
        ok = model(x_adv).argmax(1) == y
    clean = data.clean_ok[0]
    assert int((clean & fooled & ok).sum()) > 0  # the scenario: rescoring puts fooled samples back
    n = len(y)
    assert round(value * n) == int((clean & ~fooled & ok).sum())
    assert round(value * n) <= int((clean & ~fooled).sum())


def test_pgd_until_fooled_verdict_marks_exactly_the_fooled_iterates() -> None:
    model, _data, x, y = _jittery_data()
    model.d = 0.0  # deterministic: the verdict and a rescoring agree
    y = y.clone()
    y[:5] = (y[:5] + 1) % 3  # five samples misclassified clean
    x_adv, fooled = pgd_until_fooled(model, x, y, eps=0.1, step_size=0.025, steps=50,
                                     generator=torch.Generator().manual_seed(3), return_fooled=True)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        ok = model(x_adv).argmax(1) == y
    assert fooled.dtype == torch.bool and fooled.shape == y.shape
    assert torch.equal(fooled, ~ok)  # a sample misclassified clean comes back as x, fooled
    assert bool(fooled[:5].all()) and torch.equal(x_adv[:5], x[:5]) and not bool(clean[:5].any())
    assert int((clean & fooled).sum()) > 0
    plain = pgd_until_fooled(model, x, y, eps=0.1, step_size=0.025, steps=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, x_adv)


def test_an_autoattack_result_counts_a_changed_image_as_fooled() -> None:
    """Both AutoAttack engines change an image only when one of their attacks' forward passes
    misclassified it; the scoring pass must not undo that verdict (Square and FAB stop just
    across the boundary)."""
    model, data, x, y = _jittery_data(40)
    model.d = 0.0
    # a stand-in engine: it reports samples 0..9 as fooled by returning them changed by one
    # grey level, which the (deterministic) model still classifies correctly
    changed = torch.zeros(len(y), dtype=torch.bool)
    changed[:10] = True

    def run(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = xb.clone()
        out[changed] = (out[changed] + 1 / 255).clamp(0, 1)
        out[changed & (xb == 1).flatten(1).all(1)] -= 1 / 255  # never unchanged
        return out

    clean = data.clean_ok[0]
    with torch.no_grad():
        still_ok = model(run(x, y)).argmax(1) == y
    assert bool((clean & changed & still_ok).any())  # rescoring alone would call them robust
    value = data.score(model, _changed_is_fooled(run), pooled=True)
    assert round(value * len(y)) == int((clean & ~changed & still_ok).sum())


class DtypeSpy(nn.Module):
    """small-cnn, recording the dtype of every forward pass's logits (bfloat16 under CPU
    autocast) and whether gradients were on."""

    def __init__(self) -> None:
        super().__init__()
        from sattrain.models import create_model

        torch.manual_seed(0)
        self.net = create_model("small-cnn", 10)
        self.seen: set[tuple[torch.dtype, bool]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.seen.add((out.dtype, torch.is_grad_enabled()))
        return out


class _Split:
    """The part of sattrain.data.EvalSplit that evaluate_heldout reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.n = x, y, len(y)

    def batches(self, batch_size: int, multilabel: bool):  # type: ignore[no-untyped-def]
        for a in range(0, self.n, batch_size):
            yield self.x[a:a + batch_size], self.y[a:a + batch_size]


def test_the_heldout_monitor_runs_in_float32_inside_a_callers_autocast() -> None:
    """Evaluation is float32: a caller's autocast must not run the attack in bfloat16."""
    from sattrain.evaluation import evaluate_heldout

    spy = DtypeSpy()
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    kw = dict(eps_list=(8 / 255,), steps=2, step_size=2 / 255, multilabel=False)
    plain = evaluate_heldout(spy, _Split(x, y), generator=torch.Generator().manual_seed(1), **kw)
    spy.seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = evaluate_heldout(spy, _Split(x, y), generator=torch.Generator().manual_seed(1), **kw)
    assert {dtype for dtype, _ in spy.seen} == {torch.float32}
    assert inside == plain


def test_evaluate_runs_in_float32_with_gradients_inside_autocast_and_no_grad(digits_store) -> None:
    """evaluate() on a module, called from inside torch.autocast and torch.no_grad: every
    forward pass in float32, and the gradient attacks (FGSM in the sanity checks too) run."""
    import warnings

    from sattrain.evaluation import evaluate

    spy = DtypeSpy()
    kw = dict(attacks=("pgd", "sanity"), eps=(8 / 255,), steps=2, samples=16, device="cpu", write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = evaluate(spy, digits_store, **kw)
        spy.seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            inside = evaluate(spy, digits_store, **kw)
    assert {dtype for dtype, _ in spy.seen} == {torch.float32}
    assert any(grad for _, grad in spy.seen)
    assert inside["robust"] == plain["robust"] and inside["clean"] == plain["clean"]
    assert inside["sanity"]["fgsm"] == plain["sanity"]["fgsm"]
