"""White-box attacks on [0, 1] NCHW image models: PGD (Linf), TRADES KL-PGD, CW-L2.

Every attack here

- returns a detached tensor on the input's device, inside [0, 1] (and, for the Linf
  attacks, inside the eps-ball around ``x``);
- leaves the model as it found it: ``model.training`` is never switched (the caller
  chooses eval or train mode; evaluation uses eval mode, a trainer may attack in either)
  and parameter ``.grad`` is never touched, because gradients are taken with
  ``torch.autograd.grad`` with respect to the input only;
- draws its randomness from ``generator`` when one is given, on the generator's device,
  so a seeded run gives the same examples on CPU and GPU.

>>> x_adv = pgd(model, x, y, eps=8/255, step_size=2/255, steps=5)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from satdata.errors import SatkitError

LossName = Literal["ce", "bce"]

__all__ = ["pgd", "trades_adv", "trades_kl", "cw_l2", "per_sample_loss"]


# --------------------------------------------------------------------------- helpers


def _rand_like(x: torch.Tensor, generator: torch.Generator | None, kind: str) -> torch.Tensor:
    """U[0,1) or N(0,1) noise shaped like x, drawn on the generator's device then moved to x's."""
    device = generator.device if generator is not None else x.device
    if kind == "uniform":
        r = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    else:
        r = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return r.to(x.device)


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, loss: LossName) -> torch.Tensor:
    """Loss per sample, shape (N,): cross-entropy (int labels) or BCE summed over classes (multi-hot)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none").sum(dim=1)
    raise SatkitError(f"attack loss: unknown loss {loss!r} (known: ce, bce)")


def _check_linf(x: torch.Tensor, eps: float, step_size: float, steps: int) -> None:
    if eps < 0:
        raise SatkitError(f"--eps: must be >= 0, got {eps}")
    if step_size < 0:
        raise SatkitError(f"--step-size: must be >= 0, got {step_size}")
    if steps < 0:
        raise SatkitError(f"--steps: must be >= 0, got {steps}")
    if x.dim() != 4:
        raise SatkitError(f"attack input: expected NCHW images, got shape {tuple(x.shape)}")


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the Linf eps-ball around x, then onto [0, 1] (the ball's corner stays inside)."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- PGD


def _pgd_once(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool,
    loss: LossName,
    generator: torch.Generator | None,
) -> torch.Tensor:
    x_adv = x.clone()
    if random_start and eps > 0:
        x_adv = (x_adv + (2 * _rand_like(x, generator, "uniform") - 1) * eps).clamp_(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        # Summed, not averaged: each sample's gradient is then independent of the batch
        # size (the sign step is the same either way, but a mean can underflow).
        cost = per_sample_loss(model(x_adv), y, loss).sum()
        (grad,) = torch.autograd.grad(cost, x_adv)
        x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


@torch.no_grad()
def _attack_score(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: LossName) -> tuple[torch.Tensor, torch.Tensor]:
    """(fooled, loss) per sample: how good an adversarial example is, to keep the worst case."""
    logits = model(x_adv)
    lv = per_sample_loss(logits, y, loss)
    if loss == "ce":
        fooled = logits.argmax(dim=1) != y
    else:  # multi-label: any class decision flipped counts as fooled
        fooled = ((logits > 0) != (y > 0.5)).any(dim=1)
    return fooled, lv


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    loss: LossName = "ce",
    generator: torch.Generator | None = None,
    restarts: int = 1,
) -> torch.Tensor:
    """Linf projected gradient descent (Madry et al. 2018): maximise the loss in the eps-ball.

    Start at ``x`` (or ``x + U(-eps, eps)`` clamped to [0, 1] when ``random_start``), then
    ``steps`` times: ``x_adv += step_size * sign(grad loss)``, project to the eps-ball and
    to [0, 1]. This is exactly torchattacks' ``PGD`` (the tests check it). ``loss="ce"``
    takes int class labels; ``loss="bce"`` takes multi-hot labels (multi-label models).

    With ``restarts > 1`` (needs ``random_start``) the attack runs from several random
    starts and keeps, per sample, the worst case: a start that fools the model beats one
    that does not, and among equals the higher loss wins.

    Returns a detached tensor like ``x``. The model's mode and parameter grads are untouched.
    """
    _check_linf(x, eps, step_size, steps)
    if restarts < 1:
        raise SatkitError(f"--restarts: must be >= 1, got {restarts}")
    x = x.detach()
    best = _pgd_once(model, x, y, eps, step_size, steps, random_start, loss, generator)
    if restarts == 1 or not random_start:
        return best
    best_fooled, best_loss = _attack_score(model, best, y, loss)
    for _ in range(restarts - 1):
        cand = _pgd_once(model, x, y, eps, step_size, steps, True, loss, generator)
        fooled, lv = _attack_score(model, cand, y, loss)
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (lv > best_loss))
        best = torch.where(better.view(-1, 1, 1, 1), cand, best)
        best_fooled = best_fooled | fooled
        best_loss = torch.where(better, lv, best_loss)
    return best


# --------------------------------------------------------------------------- TRADES


def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """The TRADES robustness term between the predictions on x_adv and on x, batch mean.

    Computed as the TRADES reference implementation does (Zhang et al. 2019,
    ``KLDivLoss(log_softmax(f(x_adv)), softmax(f(x)))``), i.e. per sample
    ``sum_k p_k log(p_k / q_k)`` with ``p = softmax(logits_clean)`` and
    ``q = softmax(logits_adv)``, summed over classes and averaged over the batch
    ("batchmean"). Papers write this term as KL(f(x) || f(x_adv)) or, loosely, with the
    arguments swapped; this is the one trained models in the literature used.

    For multi-label models (``multilabel=True``) each class is an independent Bernoulli:
    the sum over classes of ``KL(Bern(p_k) || Bern(q_k))`` with sigmoid probabilities,
    computed from log-sigmoids so it stays finite for large logits.

    Gradients flow into both arguments; detach ``logits_clean`` yourself if you want the
    clean branch held fixed (the TRADES inner maximisation does).
    """
    if logits_adv.shape != logits_clean.shape:
        raise SatkitError(f"trades_kl: logits shapes differ: {tuple(logits_adv.shape)} vs {tuple(logits_clean.shape)}")
    n = logits_adv.shape[0]
    if multilabel:
        lp, lnp = F.logsigmoid(logits_clean), F.logsigmoid(-logits_clean)  # log p, log(1-p)
        lq, lnq = F.logsigmoid(logits_adv), F.logsigmoid(-logits_adv)
        kl = lp.exp() * (lp - lq) + lnp.exp() * (lnp - lnq)
        return kl.sum() / n
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1), reduction="sum", log_target=True) / n


def trades_adv(
    model: nn.Module,
    x: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    multilabel: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TRADES inner maximisation: the point of the eps-ball whose prediction differs most from x's.

    Start at ``x + 0.001 * N(0, 1)`` (as the TRADES reference does), then ``steps`` times
    ascend ``trades_kl(f(x_adv), f(x))`` by signed gradient steps of ``step_size`` and
    project to the Linf eps-ball and [0, 1]. ``f(x)`` is computed once, without gradient.
    No labels are needed. The reference switches the model to eval mode for this loop;
    here the caller decides (the mode is not changed).
    """
    _check_linf(x, eps, step_size, steps)
    x = x.detach()
    with torch.no_grad():
        logits_clean = model(x)
    x_adv = _project(x + 0.001 * _rand_like(x, generator, "normal"), x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        # Summed over the batch (times n undoes trades_kl's batch mean) so per-sample
        # gradients do not depend on the batch size.
        cost = trades_kl(model(x_adv), logits_clean, multilabel) * x.shape[0]
        (grad,) = torch.autograd.grad(cost, x_adv)
        x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


# --------------------------------------------------------------------------- Carlini-Wagner L2


def _cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """CW objective f = max(Z_y - max_{i != y} Z_i, -kappa), per sample (untargeted)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return torch.clamp(true - other, min=-kappa)


def cw_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 20,
    c: float = 1.0,
    lr: float = 0.01,
    kappa: float = 0.0,
    search_steps: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted Carlini–Wagner L2 attack (Carlini & Wagner 2017), single-label models.

    The image is reparametrised as ``x_adv = (tanh(w) + 1) / 2`` (the "tanh box", so
    x_adv is always in [0, 1]), ``w`` starts at ``atanh(2x - 1)`` and Adam (``lr``)
    minimises, per sample, ``||x_adv - x||_2^2 + c * max(Z_y - max_{i!=y} Z_i, -kappa)``
    for ``steps`` iterations. The result per sample is the smallest-L2 iterate that was
    misclassified; samples never misclassified come back unchanged (equal to ``x``).

    ``search_steps = 1`` (the default, as in the SAT evaluation: 20 iterations with a
    fixed ``c``) runs once with ``c``. With ``search_steps > 1`` a per-sample binary
    search on c follows the paper: after a run, a sample that was fooled halves its
    interval from above (``c = (lo + hi) / 2`` with ``hi = c``), one that was not raises
    ``lo = c`` and multiplies c by 10 until an upper bound is known. Total cost is
    ``search_steps * steps`` backward and ``search_steps * (steps + 1)`` forward passes.

    ``generator`` is accepted for a uniform attack signature; CW is deterministic.
    """
    del generator
    if steps < 0 or search_steps < 1:
        raise SatkitError(f"cw: need steps >= 0 and search_steps >= 1, got {steps}, {search_steps}")
    if c <= 0:
        raise SatkitError(f"cw: c must be > 0, got {c}")
    if y.dim() != 1:
        raise SatkitError("cw: needs int class labels (single-label model)")
    x = x.detach()
    n = x.shape[0]
    # Clamp before atanh: x = 0 or 1 would give +-inf. 1 - 1e-6 maps back within 1e-6 of x.
    w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    best_adv = x.clone()
    best_l2 = torch.full((n,), float("inf"), device=x.device)
    cs = torch.full((n,), float(c), device=x.device)
    lo = torch.zeros(n, device=x.device)
    hi = torch.full((n,), float("inf"), device=x.device)
    for _ in range(search_steps):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        fooled_this_c = torch.zeros(n, dtype=torch.bool, device=x.device)
        # steps + 1 evaluations: the start and the iterate after each of the `steps` updates.
        for i in range(steps + 1):
            x_adv = (torch.tanh(w) + 1) / 2
            l2sq = (x_adv - x).flatten(1).pow(2).sum(dim=1)
            logits = model(x_adv)
            with torch.no_grad():
                fooled = logits.argmax(dim=1) != y
                improve = fooled & (l2sq < best_l2)
                best_l2 = torch.where(improve, l2sq, best_l2)
                best_adv = torch.where(improve.view(-1, 1, 1, 1), x_adv, best_adv)
                fooled_this_c |= fooled
            if i == steps:
                break
            cost = (l2sq + cs * _cw_margin(logits, y, kappa)).sum()
            (grad,) = torch.autograd.grad(cost, w)
            w.grad = grad
            opt.step()
        if search_steps > 1:
            hi = torch.where(fooled_this_c, torch.minimum(hi, cs), hi)
            lo = torch.where(fooled_this_c, lo, torch.maximum(lo, cs))
            cs = torch.where(torch.isinf(hi), cs * 10, (lo + hi) / 2)
    return best_adv.detach().clamp_(0.0, 1.0)
