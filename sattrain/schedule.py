"""Learning-rate schedules of ``sattrain run --schedule`` (and of the ``--recipe`` presets).

With ``lr`` the base learning rate, ``E`` the number of epochs (``--epochs``) and ``t``
the epoch counted from 0, the per-epoch schedules set the learning rate of epoch ``t`` to
``lr * factor(t)``:

=========  ===========================================================================
constant   1: the SAT authors' setting (Adam, no schedule)
multistep  0.1 ** #{f in (1/2, 3/4) : t >= f * E}: the piecewise schedule of Madry et
           al. and Rice et al. (x0.1 at 50% and at 75% of the epochs)
trades     0.1 ** #{f in (3/4, 9/10, 1) : t + 1 >= f * E}: the TRADES reference, which
           counts epochs from 1 and decays at epochs 75, 90 and 100 of 100 (so the last
           epoch runs at 0.001 lr); scaled to E
cosine     (1 + cos(pi * t / E)) / 2: cosine annealing towards 0, as
           ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=E, eta_min=0)`` stepped
           once per epoch (epoch 0 at lr; 0 would be reached at t = E, after the run)
=========  ===========================================================================

``cyclic`` changes the learning rate every optimizer step: with ``T`` the run's optimizer
steps, step ``s`` (from 0) runs at ``lr * min(s, T - s) / (T / 2)``, a triangle from 0 up
to lr at half of the steps and back down to 0 at the end: Wong et al.'s cyclic schedule
("Fast is better than free", their ``CyclicLR(base_lr=0, max_lr=lr, step_size_up=T/2,
step_size_down=T/2)``), as a closed form.

``onecycle`` changes the learning rate every optimizer step: it *is*
``torch.optim.lr_scheduler.OneCycleLR(max_lr=lr, total_steps=E * steps_per_epoch)``
with its defaults (warm-up over the first 30% of the steps from lr/25, cosine annealing
to lr/25e4) except ``cycle_momentum=False``, so --momentum (and Adam's betas) stay as
given rather than cycling between 0.85 and 0.95.

Milestones are exact fractions, so e.g. 9/10 of 100 epochs is epoch 90, not 90.000001.
The per-epoch schedules are ``LambdaLR`` over this closed form (no accumulated float
error) and every scheduler's ``state_dict()`` holds plain numbers, so it is checkpointed
and loaded with ``weights_only=True`` and a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from satdata.errors import SatkitError

# Each milestone divides the lr by 10 (computed as 10.0 ** -k: exactly 0.01, not 0.1 * 0.1).
DECAY_EXPONENT_BASE = 10.0
MULTISTEP_MILESTONES = (Fraction(1, 2), Fraction(3, 4))
TRADES_MILESTONES = (Fraction(3, 4), Fraction(9, 10), Fraction(1))
# Schedules stepped after every optimizer step rather than after every epoch.
PER_STEP = frozenset({"onecycle", "cyclic"})

SCHEDULE_HELP = {
    "constant": "the same lr every epoch (the SAT authors')",
    "multistep": "x0.1 at 50% and 75% of the epochs (Madry et al., Rice et al.'s piecewise)",
    "trades": "x0.1 at 75%, 90% and 100% of the epochs (the TRADES reference: epochs 75, 90, 100 of 100)",
    "cosine": "cosine annealing from lr towards 0 over the epochs, per epoch",
    "cyclic": "per step, 0 -> lr at half of the steps -> 0 (Wong et al.'s cyclic schedule)",
    "onecycle": "torch's OneCycleLR, per step: warm-up to lr over 30% of the steps, then cosine down "
                "(momentum not cycled)",
}


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier of the base lr for epoch ``epoch`` (from 0) of ``epochs``, per-epoch schedules.

    >>> [lr_factor("multistep", t, 8) for t in range(8)]
    [1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    >>> [lr_factor("trades", t, 100) for t in (73, 74, 88, 89, 98, 99)]
    [1.0, 0.1, 0.1, 0.01, 0.01, 0.001]
    >>> lr_factor("cosine", 0, 10), round(lr_factor("cosine", 5, 10), 12)
    (1.0, 0.5)
    """
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return DECAY_EXPONENT_BASE ** -sum(1 for f in MULTISTEP_MILESTONES if epoch >= f * epochs)
    if schedule == "trades":
        return DECAY_EXPONENT_BASE ** -sum(1 for f in TRADES_MILESTONES if epoch + 1 >= f * epochs)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule in PER_STEP:
        raise SatkitError(f"--schedule {schedule}: changes per step, not per epoch")
    raise SatkitError(f"--schedule: unknown schedule {schedule!r}")


def cyclic_factor(step: int, total: int) -> float:
    """The triangle of ``cyclic``: 0 at step 0, 1 at total / 2, 0 at ``total``.

    >>> [cyclic_factor(s, 8) for s in range(9)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    half = total / 2
    return max(0.0, min(step, total - step) / half) if half > 0 else 1.0


def make_scheduler(schedule: str, optimizer: torch.optim.Optimizer, *, epochs: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler for ``schedule``; build it before loading a checkpoint's optimizer state.

    Step it with :func:`step_per_step` after every optimizer step when that is True,
    otherwise once after every epoch. The optimizer's lr is set for epoch 0 (step 0).
    """
    if schedule == "onecycle":
        lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=epochs * max(1, steps_per_epoch),
                                                   cycle_momentum=False)
    if schedule == "cyclic":
        total = epochs * max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cyclic_factor(step, total))
    lr_factor(schedule, 0, epochs)  # refuses an unknown name here, not at the first step

    def factor(epoch: int) -> float:
        return lr_factor(schedule, epoch, epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_per_step(schedule: str) -> bool:
    """Whether ``schedule`` is stepped after every optimizer step (else after every epoch)."""
    return schedule in PER_STEP
