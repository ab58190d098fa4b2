"""Training methods by name: a batch in, the loss to minimise out (docs/method.md).

Each method is one function ``(model, batch, ctx) -> StepResult`` registered with
``@register_method``; the trainer calls it inside autocast (for --amp), then does one
backward pass. With ``eps0`` the SAT size, ``eps`` the PGD/TRADES ball, ``p_t`` the
curriculum probability and ``g`` the SAT direction (see sattrain.perturb):

============  =====================================================================
standard      CE(f(x), y)
noise         CE(f(clamp(x + U(-eps0, eps0))), y)                    the noise control
sat           CE(f(clamp(x - eps0 * g)), y)                          only the perturbed batch
pgd           CE(f(x_pgd), y)                                        PGD-AT (Madry et al.)
trades        CE(f(x), y) + beta * KL(f(x_trades) || f(x))          TRADES (beta 6)
pgd+sat       coin: CE(f(clamp(x + U(-eps, eps) - eps0 * g)), y)  or  CE(f(x_pgd), y)
trades+sat    CE(f(x), y) + beta * KL(f(x_pick) || f(x)),  x_pick = clamp(x - eps0 * g)
              or x_trades by a coin  (beta 1)
pgd+noise     coin: CE(f(clamp(x + U(-eps0, eps0))), y)  or  CE(f(x_pgd), y)
trades+noise  as trades+sat with x_pick = clamp(x + U(-eps0, eps0))  (beta 1)
fgsm-rs       CE(f(x_fgsm), y)                                       FGSM-RS (Wong et al.)
fgsm-rs+sat   coin: as pgd+sat with x_fgsm for x_pgd
free          m replays of each batch: CE(f(clamp(x + delta)), y), one backward pass
              giving both the weight step and delta <- clip(delta + step * sign(grad_delta),
              -eps, eps); delta persists across replays and batches (Shafahi et al.)
============  =====================================================================

x_pgd: PGD with random start, ``steps`` steps of ``step_size`` in the eps-ball;
x_trades: the TRADES KL maximisation (sattrain.attacks); x_fgsm: x_pgd with one step of
1.25 eps (uniform start in the eps-ball, one signed-gradient step, projection onto the
ball and [0, 1]). The coin is fair and drawn per batch from a CPU generator, so it costs
no device synchronisation; half the batches then need no attack.

Cost (``Method.passes``): forward-backward passes per training example per epoch of
budget, counting an attack step as one pass: 1 for standard, noise, sat and free (free
takes m optimizer steps per batch over epochs / m passes), steps + 1 for pgd and
fgsm-rs (2), steps + 2 for trades (the attack, then the clean and adversarial passes of
its loss), and for the coin methods the attack's share of that on top of the one pass.

Batch norm while an attack crafts its example (``ctx.attack_bn``, ``--attack-bn``):

- ``train``: the model stays in train mode, as in the SAT authors' scripts: batch norm
  normalises with the statistics of the batch being attacked, and every forward pass of
  the attack also updates the running statistics (so the running statistics the model
  is evaluated with have seen the adversarial batches). Dropout, where a model has it,
  stays active too.
- ``eval``: the model is put in eval mode for the attack, as the TRADES reference does:
  batch norm uses and keeps its running statistics; the attack changes no model state.

Either way the training forward pass runs in train mode. The default is the recipe's
(``sattrain.config.RECIPES``): ``train`` under ``--recipe paper`` (the default recipe,
for every method, the baselines included), ``eval`` under ``--recipe madry`` and
``--recipe trades``.

Multi-label stores train with BCE-with-logits instead of CE (and the multi-label KL of
``attacks.trades_kl``); the perturbations are the same.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from satdata.errors import SatkitError
from sattrain.data import Batch
from sattrain.perturb import sat_perturb, uniform_delta, uniform_noise

__all__ = ["Method", "StepContext", "StepResult", "get_method", "method_names", "register_method", "task_loss"]


@dataclass
class StepContext:
    """What a method needs besides the model and the batch (one per epoch)."""

    epoch: int
    p: float  # curriculum probability p_t of this epoch
    eps0: float  # SAT / noise size
    eps: float  # PGD / TRADES ball
    step_size: float
    steps: int
    beta: float | None
    multilabel: bool
    generator: torch.Generator | None  # on the batch's device: perturbations and attacks
    coin: torch.Generator  # on the CPU: per-batch choices, without a device sync
    attack_bn: str = "eval"  # batch norm mode while an attack crafts its example: "train" or "eval"
    # what a method keeps from step to step for the whole run (Free-AT's perturbation)
    state: dict[str, Any] = field(default_factory=dict)


class StepResult(NamedTuple):
    """The loss to minimise, the logits train accuracy is measured on, whether an attack ran,
    and what to do once the loss is backpropagated (before the optimizer step)."""

    loss: torch.Tensor
    logits: torch.Tensor
    attacked: bool
    after_backward: Callable[[], None] | None = None


MethodFn = Callable[[nn.Module, Batch, StepContext], StepResult]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    fn: MethodFn
    needs_map: bool  # uses the saliency map S
    uses_beta: bool  # has a TRADES KL term
    attacks: bool  # runs a gradient attack on (some) batches
    cost: Callable[[int, float], float]  # (steps, attack share) -> passes, see passes()

    def passes(self, steps: int, attack_share: float = 1.0) -> float:
        """Forward-backward passes per training example per epoch of budget (the module
        docstring): ``steps`` the training attack's steps, ``attack_share`` the share of
        batches attacked (metrics.jsonl's attack_share; 0.5 in expectation for the coin
        methods).

        >>> get_method("pgd").passes(5), get_method("fgsm-rs").passes(1), get_method("pgd+sat").passes(5, 0.5)
        (6.0, 2.0, 3.5)
        """
        return float(self.cost(steps, attack_share))


def _one_pass(steps: int, share: float) -> float:
    return 1.0


def _attack_then_pass(steps: int, share: float) -> float:
    return 1.0 + share * steps


def _trades_passes(steps: int, share: float) -> float:
    return 2.0 + share * steps


_METHODS: dict[str, Method] = {}


def register_method(name: str, summary: str, *, needs_map: bool = False, uses_beta: bool = False,
                    attacks: bool = False, cost: Callable[[int, float], float] | None = None) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as method ``name``; ``cost`` defaults to one pass, plus the attack's
    steps on attacked batches for attacking methods, plus one for a TRADES loss."""
    if cost is None:
        cost = _trades_passes if uses_beta else _attack_then_pass if attacks else _one_pass

    def deco(fn: MethodFn) -> MethodFn:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = Method(name, summary, fn, needs_map, uses_beta, attacks, cost)
        return fn

    return deco


def method_names() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> Method:
    """The registered method; SatkitError naming --method and listing the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise SatkitError(f"--method: unknown method {name!r} (known: {', '.join(_METHODS)})") from None


# --------------------------------------------------------------------------- helpers


def task_loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Cross-entropy (class indices) or BCE-with-logits (multi-hot floats), batch mean."""
    logits = logits.float()
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y)


def flip_coin(ctx: StepContext) -> bool:
    """A fair coin from the CPU generator: True picks the attack branch."""
    return bool(torch.rand((), generator=ctx.coin) < 0.5)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for attack generation; restores the model's previous mode."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextmanager
def attack_mode(model: nn.Module, bn: str) -> Iterator[None]:
    """The model's mode while an attack crafts its example: ``bn`` "eval" or "train".

    "train" leaves the model as the trainer has it (train mode: batch statistics, running
    statistics updated by each forward of the attack, as the SAT authors' scripts do);
    "eval" switches to eval mode and back (running statistics used and left unchanged).
    """
    if bn == "train":
        yield
    elif bn == "eval":
        with eval_mode(model):
            yield
    else:
        raise SatkitError(f"--attack-bn: unknown mode {bn!r} (known: train, eval)")


def _require_map(batch: Batch, method: str) -> torch.Tensor:
    if batch.S is None:
        raise SatkitError(f"--method {method}: the batch has no saliency map (pass --map)")
    return batch.S


def _pgd_example(model: nn.Module, batch: Batch, ctx: StepContext, steps: int | None = None) -> torch.Tensor:
    """PGD from a uniform start: ``steps`` (default ctx.steps) steps of ctx.step_size."""
    from sattrain.attacks import pgd

    with attack_mode(model, ctx.attack_bn):
        return pgd(model, batch.x, batch.y, eps=ctx.eps, step_size=ctx.step_size,
                   steps=ctx.steps if steps is None else steps,
                   random_start=True, loss="bce" if ctx.multilabel else "ce", generator=ctx.generator)


def _trades_example(model: nn.Module, batch: Batch, ctx: StepContext) -> torch.Tensor:
    from sattrain.attacks import trades_adv

    with attack_mode(model, ctx.attack_bn):
        return trades_adv(model, batch.x, eps=ctx.eps, step_size=ctx.step_size, steps=ctx.steps,
                          multilabel=ctx.multilabel, generator=ctx.generator)


def _trades_loss(model: nn.Module, batch: Batch, x_pick: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(f(x), y) + beta * KL(f(x_pick) || f(x)), f(x)): the TRADES objective and the clean logits."""
    from sattrain.attacks import trades_kl

    if ctx.beta is None:
        raise SatkitError("--beta: the TRADES methods need a beta")
    logits_clean = model(batch.x)
    logits_pick = model(x_pick)
    kl = trades_kl(logits_pick.float(), logits_clean.float(), multilabel=ctx.multilabel)
    return task_loss(logits_clean, batch.y, ctx.multilabel) + ctx.beta * kl, logits_clean


def _on(model: nn.Module, x: torch.Tensor, batch: Batch, ctx: StepContext, attacked: bool) -> StepResult:
    logits = model(x)
    return StepResult(task_loss(logits, batch.y, ctx.multilabel), logits.detach(), attacked)


def _sat_batch(batch: Batch, ctx: StepContext, start: torch.Tensor | None = None, method: str = "sat") -> torch.Tensor:
    S = _require_map(batch, method)
    x0 = batch.x if start is None else start
    return sat_perturb(x0, S, eps=ctx.eps0, p=ctx.p, generator=ctx.generator)


# --------------------------------------------------------------------------- methods


@register_method("standard", "cross-entropy on clean images (no perturbation)")
def standard(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    return _on(model, batch.x, batch, ctx, False)


@register_method("noise", "control: uniform noise U(-eps0, eps0) on every image")
def noise(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    return _on(model, uniform_noise(batch.x, eps=ctx.eps0, generator=ctx.generator), batch, ctx, False)


@register_method("sat", "SAT: x - eps0 * g, g from random signs to the saliency map by the curriculum p_t",
                 needs_map=True)
def sat(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    return _on(model, _sat_batch(batch, ctx), batch, ctx, False)


@register_method("pgd", "PGD adversarial training (random start, --steps of --step-size in the --eps ball)",
                 attacks=True)
def pgd_at(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    return _on(model, _pgd_example(model, batch, ctx), batch, ctx, True)


@register_method("trades", "TRADES: CE(f(x)) + beta * KL(f(x_adv) || f(x)), beta 6", uses_beta=True, attacks=True)
def trades(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    loss, logits = _trades_loss(model, batch, _trades_example(model, batch, ctx), ctx)
    return StepResult(loss, logits.detach(), True)


def _coin_sat(model: nn.Module, batch: Batch, ctx: StepContext, method: str, steps: int | None = None) -> StepResult:
    """pgd+sat and fgsm-rs+sat: the coin picks the attack's example (PGD with ctx.steps, one
    step for fgsm-rs) or SAT from the attack's uniform start."""
    if flip_coin(ctx):
        return _on(model, _pgd_example(model, batch, ctx, steps), batch, ctx, True)
    _require_map(batch, method)
    # The SAT branch starts from x + U(-eps, eps) (PGD's random start) and is clamped once, at the end.
    start = batch.x + uniform_delta(batch.x, eps=ctx.eps, generator=ctx.generator)
    return _on(model, _sat_batch(batch, ctx, start, method), batch, ctx, False)


@register_method("pgd+sat", "a coin per batch: SAT from a uniform-noise start, or a PGD example",
                 needs_map=True, attacks=True)
def pgd_sat(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    return _coin_sat(model, batch, ctx, "pgd+sat")


@register_method("trades+sat", "a coin per batch: x - eps0 * g or the TRADES example, in the TRADES loss (beta 1)",
                 needs_map=True, uses_beta=True, attacks=True)
def trades_sat(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    attacked = flip_coin(ctx)
    x_pick = _trades_example(model, batch, ctx) if attacked else _sat_batch(batch, ctx, method="trades+sat")
    loss, logits = _trades_loss(model, batch, x_pick, ctx)
    return StepResult(loss, logits.detach(), attacked)


@register_method("pgd+noise", "control: a coin per batch: uniform noise U(-eps0, eps0), or a PGD example",
                 attacks=True)
def pgd_noise(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    if flip_coin(ctx):
        return _on(model, _pgd_example(model, batch, ctx), batch, ctx, True)
    return _on(model, uniform_noise(batch.x, eps=ctx.eps0, generator=ctx.generator), batch, ctx, False)


@register_method("trades+noise", "control: a coin per batch: uniform noise or the TRADES example, TRADES loss (beta 1)",
                 uses_beta=True, attacks=True)
def trades_noise(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    attacked = flip_coin(ctx)
    x_pick = (_trades_example(model, batch, ctx) if attacked
              else uniform_noise(batch.x, eps=ctx.eps0, generator=ctx.generator))
    loss, logits = _trades_loss(model, batch, x_pick, ctx)
    return StepResult(loss, logits.detach(), attacked)


def _one_step(steps: int, share: float) -> float:
    return 1.0 + share


@register_method("fgsm-rs", "FGSM with a random start (Wong et al. 2020): uniform start in the --eps ball, one step "
                 "of --step-size (1.25 eps), projection", attacks=True, cost=_one_step)
def fgsm_rs(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    # PGD with one step from a uniform start is exactly FGSM-RS: one step whatever ctx.steps
    # says (sattrain.config refuses another --steps and resolves --step-size to 1.25 eps)
    return _on(model, _pgd_example(model, batch, ctx, steps=1), batch, ctx, True)


@register_method("fgsm-rs+sat", "a coin per batch: SAT from a uniform-noise start, or an FGSM-RS example",
                 needs_map=True, attacks=True, cost=_one_step)
def fgsm_rs_sat(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    return _coin_sat(model, batch, ctx, "fgsm-rs+sat", steps=1)


FREE_DELTA = "free_delta"


@register_method("free", "Free adversarial training (Shafahi et al. 2019): each batch replayed --replays times, one "
                 "backward pass updating both the weights and a persistent perturbation", attacks=True,
                 cost=_one_pass)
def free(model: nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    """One replay: the loss on clamp(x + delta, 0, 1) with delta a leaf that requires grad;
    after the trainer's backward pass, delta <- clip(delta + step_size * sign(grad), -eps, eps).

    delta is kept in ``ctx.state`` for the whole run, shaped as the largest batch so far
    (Shafahi et al.'s global noise): a batch uses its first rows, and the next batch starts
    from where this one left it. It starts at zero.
    """
    x = batch.x
    delta = ctx.state.get(FREE_DELTA)
    if delta is None or delta.shape[1:] != x.shape[1:] or delta.shape[0] < x.shape[0] or delta.device != x.device:
        grown = torch.zeros((x.shape[0], *x.shape[1:]), device=x.device, dtype=torch.float32)
        if delta is not None and delta.shape[1:] == x.shape[1:] and delta.device == x.device:
            grown[: delta.shape[0]] = delta
        delta = ctx.state[FREE_DELTA] = grown
    b = x.shape[0]
    d = delta[:b].clone().requires_grad_(True)
    logits = model((x + d.to(x.dtype)).clamp(0.0, 1.0))
    loss = task_loss(logits, batch.y, ctx.multilabel)

    def update() -> None:
        # a scaled gradient (--amp) has the same signs; a non-finite one moves nothing
        g = torch.nan_to_num(d.grad, nan=0.0, posinf=0.0, neginf=0.0) if d.grad is not None else torch.zeros_like(d)
        delta[:b] = (d.detach() + ctx.step_size * g.sign()).clamp_(-ctx.eps, ctx.eps)

    return StepResult(loss, logits.detach(), True, update)
