"""Robustness evaluation of a trained model on one split of a store -> eval.json.

Two protocols, chosen with ``protocol=`` (``sattrain eval --protocol``); docs/evaluation.md
says why each number is there and what was measured to choose the defaults.

``strong`` (the default; RobustBench's sense of a strong evaluation)
    - **autoattack**: the standard AutoAttack ensemble of Croce & Hein (APGD-CE, APGD-T,
      FAB-T, Square; Linf, 8/255), by default the authors' own package (``pyautoattack``,
      a dependency; ``autoattack_engine="torchattacks"`` runs satkit's assembly of
      torchattacks' attacks with the same settings, for cross-checking).
    - **headline** (``autoattack+pgd@8/255``, ``"worst_case"`` in eval.json): per sample the
      worst case of AutoAttack and the PGD below at AutoAttack's radius, so that a sample
      either attack fools counts as fooled (a number a stronger attack would not raise).
      AutoAttack alone stays in ``"robust"`` (``autoattack@8/255``); without PGD at its
      radius the headline is AutoAttack alone.
    - **pgd**: Linf PGD with random start over eps = 1/255 ... 8/255, step size eps/4,
      ``STRONG_STEPS`` steps and ``STRONG_RESTARTS`` restarts (per sample, the worst case
      is kept): enough that doubling steps and restarts no longer lowers accuracy on the
      test models (docs/evaluation.md has the measurement).
    - **cw** (on request, ``attacks=(..., "cw")``: an L2 threat model, not part of the Linf
      headline): Carlini–Wagner L2 with advertorch's binary search over c (initial c 1e-3,
      20 iterations, 9 search steps, as the authors ran it on adversarially trained models).
    - **distortions**: the SAT authors' contrast, low-pass and high-pass sweeps.
    - **sanity**: checks against gradient masking (below).

``paper`` (the SAT authors' evaluation, exactly; every number is labelled "paper protocol")
    PGD with random start, 5 steps of 2/255, 1 restart, eps = 1/255 ... 8/255, as their
    scripts run it: the start ``x + U(-eps, eps)`` is not clamped to [0, 1] and the last
    iterate is scored; CW-L2 as they ran it (advertorch, initial c 1e-3, 20 iterations, 3
    binary-search steps); their distortions; and the same sanity checks. The headline is
    PGD at the largest eps. Their scripts count a sample correct under attack whether or
    not it was correct clean; satkit's ``value`` also requires the clean prediction to be
    right (as everywhere), and each PGD row carries ``adv_accuracy``, the authors' number.

Sanity checks (``"sanity"`` in eval.json, a section of the table, a
:class:`GradientMaskingWarning` per violation): robust accuracy does not rise with eps
(beyond one sample, or 0.5%); PGD is at least as strong as FGSM at every eps; AutoAttack is
at least as strong as PGD at its eps; accuracy under PGD at a large radius (64/255, step
eps/4) is near zero (at most :data:`LARGE_EPS_MAX`); and ``steps x step size >= eps`` for
every PGD radius (a PGD that cannot reach the edge of its ball understates the attack).

A sample counts as robust only if it is classified correctly both clean *and* under
attack, so robust accuracy never exceeds clean accuracy. Multi-label models
(``label_kind == "multi"``) are attacked with the BCE loss and scored by mAP; CW and
AutoAttack are single-label only and are skipped for them (the headline is then PGD).
Numbers are fractions in [0, 1]. ``samples=N`` evaluates a fixed, seeded subset and warns
(as torchvision's reference scripts do) that the numbers cover part of the split.

Speed: every measurement runs over the samples in batches of ``batch_size``. AutoAttack
is given many batches at once (up to 256 MiB of images: all of CIFAR-10's test split) and,
as its authors' package does, runs each of its four attacks only on the points that are
still robust, in batches of ``batch_size``: the few survivors of the first attack fill
whole batches instead of one short batch per ``batch_size`` samples (on the digits test
split, one Square run of 5,000 queries instead of two). Left unset,
``batch_size`` is 256 on the CPU (as before) and, on a CUDA device with
at least 40 GiB of memory, 1024 (:func:`default_batch_size`): at 256 a 32x32 ResNet's
attack steps leave most of a large GPU idle. A smaller GPU keeps 256; pass a batch size to
choose. eval.json records the batch size used (``config.batch_size``), the wall seconds
of each measurement (``seconds``) and its throughput (``samples_per_s``): samples
attacked or scored per second, where a sweep counts each of its settings once (PGD: per
eps, so a sweep's point is comparable across sweeps of different lengths; distortions:
per level; sanity: per FGSM eps plus the large-radius PGD).

>>> result = evaluate("runs/sat-r10", "cifar10.zarr", samples=1000)            # doctest: +SKIP
>>> result["headline"]                                                         # doctest: +SKIP
{'name': 'autoattack+pgd@8/255', 'value': 0.41, 'protocol': 'strong', ...}
>>> paper = evaluate("runs/sat-r10", "cifar10.zarr", protocol="paper")         # doctest: +SKIP
>>> print(format_table(paper))                                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import platform
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from sattrain import __version__ as SATTRAIN_VERSION
from satdata.atomic import write_json_atomic
from satdata.errors import SatkitError
from satdata.store import Store, open_store, store_digest
from sattrain.attacks import autoattack_reference, autoattack_torchattacks, cw_l2, pgd, pgd_until_fooled
from sattrain.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from sattrain.rundir import CHECKPOINT_NAME, EVAL_JSON, PAPER_EVAL_JSON
from sattrain.config import format_eps
from sattrain.device import resolve_device
from sattrain.distortions import DEFAULT_DISTORTIONS, DISTORTIONS, default_levels
from sattrain.metrics import average_precision, mean_average_precision

__all__ = [
    "evaluate",
    "format_table",
    "format_eps",
    "average_precision",
    "mean_average_precision",
    "EvalConfig",
    "Protocol",
    "PROTOCOLS",
    "ATTACKS",
    "DEFAULT_EPS",
    "paper_out",
    "resolve_config",
    "default_batch_size",
    "PartialEvaluationWarning",
    "GradientMaskingWarning",
    "SelectionBiasWarning",
]

EVAL_FORMAT = "satkit-eval"
# eval.json versions: 1 before protocols; 2 protocols and a headline; 3 the strong headline is
# the per-sample worst case of AutoAttack and PGD ("worst_case"), where version 2 had
# AutoAttack alone (a reader of version 2 reads it as it was: sattrain.report does)
EVAL_VERSION = 3
ATTACKS = ("autoattack", "pgd", "cw", "distortions", "sanity")
AUTOATTACK_ENGINES = ("reference", "torchattacks")
DEFAULT_EPS: tuple[float, ...] = tuple(k / 255 for k in range(1, 9))  # the paper's sweep
STRONG_EPS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
# The strong PGD: step eps/4, 50 steps, 2 restarts. Chosen by measurement (docs/evaluation.md):
# on the README's models, 100 steps x 4 restarts changes no robust accuracy by more than one
# sample in 355 relative to this.
STRONG_STEPS = 50
STRONG_RESTARTS = 2
STRONG_STEP_FRACTION = 0.25
# The strong headline's name: a sample is robust only if AutoAttack and the strong PGD at
# AutoAttack's radius both fail on it (the per-sample worst case), "autoattack+pgd@8/255".
WORST_CASE = "autoattack+pgd"
# The large-radius check: PGD at 64/255 (step eps/4, at least 20 steps) should leave
# (almost) nothing; more than this fraction correct suggests masked gradients.
LARGE_EPS = 64 / 255
LARGE_EPS_MAX = 0.05
# Batch sizes when none is given (default_batch_size): the CPU keeps 256; a CUDA device with
# at least CUDA_BATCH_MIN_MEMORY bytes attacks 1024 samples at a time.
DEFAULT_BATCH_SIZE = 256
CUDA_BATCH_SIZE = 1024
CUDA_BATCH_MIN_MEMORY = 40 * 2**30
# AutoAttack is given up to this many bytes of float32 images at once (whole batches, at
# least one), on the evaluation's device: it attacks only the points that survive each of its
# attacks, in batches of batch_size, so the survivors of many batches share full batches.
POOL_BYTES = 256 * 2**20


# Batch of the per-epoch held-out monitor (evaluate_heldout).
MONITOR_BATCH = 256


class PartialEvaluationWarning(UserWarning):
    """Fewer samples were evaluated than the split holds: the numbers are estimates."""


class SelectionBiasWarning(UserWarning):
    """The evaluated samples are those the checkpoint was chosen on (a best.pt selected on
    test): the numbers are optimistic."""


class GradientMaskingWarning(UserWarning):
    """A sanity check failed: the attack may be too weak or the gradients masked; distrust the numbers."""


@dataclass(frozen=True)
class Protocol:
    """The defaults one protocol fixes; explicit options override them (and are recorded)."""

    name: str
    label: str  # how results are labelled in tables, reports and plots
    description: str
    attacks: tuple[str, ...]
    eps: tuple[float, ...]
    steps: int
    restarts: int
    step_size: float | None  # absolute PGD step, or None: step_fraction * eps
    step_fraction: float | None
    cw_search_steps: int


PROTOCOLS: dict[str, Protocol] = {
    "strong": Protocol(
        name="strong", label="strong protocol",
        description=(f"AutoAttack (standard, Linf 8/255); PGD {STRONG_STEPS} steps of eps/4, {STRONG_RESTARTS} "
                     "random starts; headline: per sample the worst case of AutoAttack and PGD at 8/255; "
                     "the authors' distortions; sanity checks"),
        attacks=("autoattack", "pgd", "distortions", "sanity"),
        eps=STRONG_EPS, steps=STRONG_STEPS, restarts=STRONG_RESTARTS, step_size=None,
        step_fraction=STRONG_STEP_FRACTION, cw_search_steps=9,
    ),
    "paper": Protocol(
        name="paper", label="paper protocol",
        description=("the SAT authors' evaluation: PGD 5 steps of 2/255, 1 random start; CW-L2 (advertorch, "
                     "c0 1e-3, 20 iterations, 3 search steps); their distortions; plus sanity checks"),
        attacks=("pgd", "cw", "distortions", "sanity"),
        eps=DEFAULT_EPS, steps=5, restarts=1, step_size=2 / 255, step_fraction=None, cw_search_steps=3,
    ),
}


@dataclass(frozen=True)
class EvalConfig:
    """Every option of one evaluation, resolved against its protocol, recorded in eval.json."""

    protocol: str = "strong"
    split: str | None = None
    eps: tuple[float, ...] = STRONG_EPS
    steps: int = STRONG_STEPS
    step_size: float | None = None
    step_fraction: float | None = STRONG_STEP_FRACTION
    restarts: int = STRONG_RESTARTS
    attacks: tuple[str, ...] = ("autoattack", "pgd", "distortions", "sanity")
    samples: int | None = None
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"
    cw_steps: int = 20
    cw_c: float = 1e-3
    cw_lr: float = 0.01
    cw_search_steps: int = 9
    autoattack_eps: float = 8 / 255
    autoattack_engine: str = "reference"

    def step_for(self, eps: float) -> float:
        """The PGD step size at radius ``eps``."""
        return self.step_size if self.step_size is not None else float(self.step_fraction or 0.0) * eps

    def step_label(self) -> str:
        if self.step_size is not None:
            return format_eps(self.step_size)
        return f"eps/{1 / self.step_fraction:g}" if self.step_fraction else "?"

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise SatkitError(f"--protocol: unknown protocol {self.protocol!r} (known: {', '.join(PROTOCOLS)})")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise SatkitError(f"--attacks: unknown attack {unknown[0]!r} (known: {', '.join(ATTACKS)})")
        if not self.attacks:
            raise SatkitError("--attacks: give at least one attack (clean accuracy is always measured)")
        if ("pgd" in self.attacks or "sanity" in self.attacks) and not self.eps:
            raise SatkitError("--eps: give at least one value")
        for e in (*self.eps, self.autoattack_eps):
            if not (0 <= e <= 1) or math.isnan(e):
                raise SatkitError(f"--eps: {e} is outside [0, 1] (images are in [0, 1]; write 8/255, not 8)")
        if self.steps < 1:
            raise SatkitError(f"--steps: must be >= 1, got {self.steps}")
        if self.step_size is None and self.step_fraction is None:
            raise SatkitError("--step-size: give an absolute step (2/255) or a fraction of eps (eps/4)")
        if self.step_size is not None and not self.step_size > 0:
            raise SatkitError(f"--step-size: must be > 0, got {self.step_size}")
        if self.step_fraction is not None and not (0 < self.step_fraction <= 2):
            raise SatkitError(f"--step-size: the fraction of eps must be in (0, 2], got {self.step_fraction}")
        if self.restarts < 1:
            raise SatkitError(f"--restarts: must be >= 1, got {self.restarts}")
        if self.samples is not None and self.samples < 1:
            raise SatkitError(f"--samples: must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise SatkitError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2 ** 64:  # what numpy's and torch's generators take
            raise SatkitError(f"--seed: must be in [0, 2**64), got {self.seed}")
        if self.cw_steps < 1:
            raise SatkitError(f"cw steps: must be >= 1, got {self.cw_steps}")
        if self.cw_search_steps < 1:
            raise SatkitError(f"--cw-search-steps: must be >= 1, got {self.cw_search_steps}")
        if not (self.cw_c > 0 and self.cw_lr > 0) or math.isinf(self.cw_c) or math.isinf(self.cw_lr):
            raise SatkitError(f"cw: c and lr must be finite and > 0, got c={self.cw_c}, lr={self.cw_lr}")
        if self.autoattack_engine not in AUTOATTACK_ENGINES:
            raise SatkitError(f"--autoattack-engine: unknown engine {self.autoattack_engine!r} "
                              f"(known: {', '.join(AUTOATTACK_ENGINES)})")


def resolve_config(protocol: str = "strong", **given: Any) -> EvalConfig:
    """An EvalConfig from a protocol's defaults and the options given (None: the protocol's).

    ``step_size`` may be a float (absolute) or a string ``"eps/K"`` (a fraction of each eps).
    """
    if protocol not in PROTOCOLS:
        raise SatkitError(f"--protocol: unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    p = PROTOCOLS[protocol]
    cfg = EvalConfig(protocol=protocol, eps=p.eps, steps=p.steps, restarts=p.restarts, step_size=p.step_size,
                     step_fraction=p.step_fraction, attacks=p.attacks, cw_search_steps=p.cw_search_steps)
    kw = {k: v for k, v in given.items() if v is not None}
    if "step_size" in kw:
        step = kw.pop("step_size")
        if isinstance(step, str):
            kw["step_size"], kw["step_fraction"] = None, parse_step_fraction(step)
        else:
            kw["step_size"], kw["step_fraction"] = float(step), None
    if "eps" in kw:
        kw["eps"] = tuple(sorted(float(e) for e in set(kw["eps"])))
    if "attacks" in kw:
        kw["attacks"] = tuple(dict.fromkeys(kw["attacks"]))
    for name in ("steps", "restarts", "seed", "batch_size", "cw_steps", "cw_search_steps"):
        if name in kw:
            kw[name] = int(kw[name])
    for name in ("cw_c", "cw_lr", "autoattack_eps"):
        if name in kw:
            kw[name] = float(kw[name])
    cfg = replace(cfg, **kw)
    cfg.check()
    return cfg


def default_batch_size(device: torch.device) -> int:
    """The evaluation batch size when none is given: CUDA_BATCH_SIZE (1024) on a CUDA device
    with at least 40 GiB of memory, DEFAULT_BATCH_SIZE (256) everywhere else (the CPU included)."""
    if device.type == "cuda":
        try:
            memory = torch.cuda.get_device_properties(device).total_memory
        except (RuntimeError, AssertionError, AttributeError):
            return DEFAULT_BATCH_SIZE
        if memory >= CUDA_BATCH_MIN_MEMORY:
            return CUDA_BATCH_SIZE
    return DEFAULT_BATCH_SIZE


def parse_step_fraction(text: str) -> float:
    """'eps/4' -> 0.25, '0.25eps' -> 0.25; SatkitError naming --step-size otherwise."""
    t = text.strip().lower().replace(" ", "")
    try:
        if t.startswith("eps/"):
            return 1.0 / float(t[4:])
        if t.endswith("*eps"):
            return float(t[:-4])
        if t.endswith("eps"):
            return float(t[:-3])
    except (ValueError, ZeroDivisionError):
        pass
    raise SatkitError(f"--step-size: cannot read {text!r} (write an absolute step such as 2/255, or eps/4)")


# --------------------------------------------------------------------------- small helpers


def _default_out(target: str | Path, name: str = EVAL_JSON) -> Path:
    """RUN_DIR/eval.json for a run dir or its checkpoint.pt; NAME.eval.json beside any other checkpoint."""
    p = Path(target)
    if p.is_dir():
        return p / name
    if p.name == CHECKPOINT_NAME:
        return p.parent / name
    return p.with_name(f"{p.stem}.{name}")


def paper_out(target: str | Path) -> Path:
    """Where ``sattrain eval --protocol paper`` writes: RUN_DIR/eval-paper.json (eval.json stays the strong one)."""
    return _default_out(target, PAPER_EVAL_JSON)


# --------------------------------------------------------------------------- evaluation


class _Scorer:
    """Accumulates per-sample results of one measurement across batches."""

    def __init__(self, multi: bool) -> None:
        self.multi = multi
        self.parts: list[torch.Tensor] = []
        self.plain: list[torch.Tensor] = []  # correct on the attacked image, clean or not

    def add(self, logits: torch.Tensor, y: torch.Tensor, clean_ok: torch.Tensor | None,
            fooled: torch.Tensor | None = None) -> None:
        """``fooled``: the attack's own verdict per sample (its forward pass misclassified the
        image it returned); such a sample counts as misclassified whatever ``logits`` say."""
        if self.multi:
            self.parts.append(torch.sigmoid(logits.float()).cpu())
        else:
            ok = logits.argmax(1) == y
            if fooled is not None:
                ok = ok & ~fooled
            self.plain.append(ok.cpu())
            if clean_ok is not None:
                ok = ok & clean_ok
            self.parts.append(ok.cpu())

    def plain_accuracy(self) -> float | None:
        """Accuracy on the attacked images alone (the SAT authors' scoring); None for mAP."""
        if self.multi:
            return None
        cat = torch.cat(self.plain)
        return int(cat.sum()) / cat.numel()

    def robust_mask(self) -> torch.Tensor:
        """Per sample (single-label), in evaluation order: counted correct (and, when scored
        against the clean mask, correct clean too)."""
        assert not self.multi, "mAP has no per-sample verdict"
        return torch.cat(self.parts)

    def value(self, labels: np.ndarray) -> float | None:
        """Accuracy as a float64 fraction, or mAP (None when no class has a positive sample)."""
        cat = torch.cat(self.parts)
        if self.multi:
            v = mean_average_precision(cat.numpy(), labels)
            return None if math.isnan(v) else v
        return int(cat.sum()) / cat.numel()


@contextmanager
def _float32_with_grad() -> Iterator[None]:
    """What every measurement here runs under, whatever its caller's context: autocast off
    (a caller's ``torch.autocast`` would otherwise run the attacks' forward and backward
    passes in bfloat16/float16, whose coarser gradients and logits weaken the attacks and
    move the scores), and gradients on (a caller's ``torch.no_grad()`` or
    ``torch.inference_mode()`` would otherwise break the gradient attacks)."""
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


@_float32_with_grad()
def evaluate_heldout(
    model: nn.Module,
    data: Any,
    *,
    eps_list: tuple[float, ...],
    steps: int,
    step_size: float,
    multilabel: bool,
    generator: torch.Generator,
    batch_size: int = MONITOR_BATCH,
) -> dict[str, float]:
    """The per-epoch held-out monitor of ``sattrain run``: clean and PGD scores on a fixed
    subset (``data``: a sattrain.data.EvalSplit), {"clean": s, "pgd@8/255": s, ...}.

    Scored as every evaluation here is (_Scorer): single-label accuracy, where a sample is
    robust only if it is classified correctly both clean and under attack; multi-label mAP
    on the clean and on the attacked images. Runs in eval mode and float32 (autocast is
    switched off here, whatever the caller's context: the numbers should not depend on
    --precision), and restores the model's mode.
    """
    was = model.training
    model.eval()
    keys = [f"pgd@{format_eps(e)}" for e in eps_list]
    clean = _Scorer(multilabel)
    attacked = {k: _Scorer(multilabel) for k in keys}
    ys = []
    try:
        for x, y in data.batches(batch_size, multilabel):
            ys.append(y.cpu())
            with torch.no_grad():
                logits = model(x).float()
            ok = None if multilabel else logits.argmax(1) == y
            clean.add(logits, y, None)
            for e, k in zip(eps_list, keys):
                x_adv = pgd(model, x, y, eps=e, step_size=step_size, steps=steps, random_start=True,
                            loss="bce" if multilabel else "ce", generator=generator)
                with torch.no_grad():
                    attacked[k].add(model(x_adv).float(), y, ok)
    finally:
        model.train(was)
    labels = torch.cat(ys).numpy()
    nan = float("nan")
    out = {"clean": clean.value(labels)}
    out.update({k: sc.value(labels) for k, sc in attacked.items()})
    return {k: (nan if v is None else float(v)) for k, v in out.items()}


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + batch_size)) for a in range(0, n, batch_size)]


class _Data:
    """The evaluated samples, batched onto the device, with the clean-correct mask per batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, multi: bool, batch_size: int, dev: torch.device) -> None:
        self.images, self.labels, self.multi, self.dev = images, labels, multi, dev
        self.n = int(images.shape[0])
        self.spans = _batches(self.n, batch_size)
        self.clean_ok: list[torch.Tensor | None] = [None] * len(self.spans)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.spans[i]
        x = torch.from_numpy(np.ascontiguousarray(self.images[a:b])).to(self.dev)
        x = x.permute(0, 3, 1, 2).float().div_(255).contiguous()
        y = torch.from_numpy(self.labels[a:b]).to(self.dev)
        return x, (y.float() if self.multi else y)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i in range(len(self.spans)):
            x, y = self.batch(i)
            yield i, x, y

    def score(self, model: nn.Module, make: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              robust: bool = True, pooled: bool = False) -> float | None:
        """Accuracy (or mAP) of ``model`` on ``make(x, y)`` over all batches; robust: also clean-correct."""
        return self.scorer(model, make, robust, pooled).value(self.labels)

    def scorer(self, model: nn.Module, make: Callable[[torch.Tensor, torch.Tensor], Any],
               robust: bool = True, pooled: bool = False) -> _Scorer:
        """``pooled``: ``make`` sees as many whole batches at once as POOL_BYTES of images
        allow (an attack that batches the points still robust itself, AutoAttack, then fills
        its batches across ours); otherwise one batch at a time.

        ``make`` returns the images to score, or ``(images, fooled)`` with the attack's own
        verdict per sample (:meth:`_Scorer.add`): a sample an attack's forward pass found
        misclassified stays fooled even when the scoring pass, in another batch, rounds it
        back across the boundary (the per-sample worst case)."""
        per_call = 1
        if pooled:
            sample_bytes = 4 * int(np.prod(self.images.shape[1:]))
            per_call = max(1, POOL_BYTES // (sample_bytes * (self.spans[0][1] - self.spans[0][0])))
        sc = _Scorer(self.multi)
        for first in range(0, len(self.spans), per_call):
            group = range(first, min(first + per_call, len(self.spans)))
            xs, ys = zip(*(self.batch(i) for i in group))
            made = make(torch.cat(xs), torch.cat(ys)) if len(xs) > 1 else make(xs[0], ys[0])
            x_in, fooled = made if isinstance(made, tuple) else (made, None)
            sizes = [len(x) for x in xs]
            fooled_b = fooled.split(sizes) if fooled is not None else [None] * len(sizes)
            with torch.no_grad():
                for i, x_b, y, f_b in zip(group, x_in.split(sizes), ys, fooled_b):
                    sc.add(model(x_b), y, self.clean_ok[i] if robust else None, f_b)
        return sc


def _pgd_fn(model: nn.Module, eps: float, step: float, steps: int, restarts: int, multi: bool,
            gen: torch.Generator, paper: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """PGD with random starts as a measurement: single-label keeps the first fooling iterate
    (attacks.pgd_until_fooled); multi-label (scored by mAP) runs plain BCE PGD. ``paper``:
    the SAT authors' PGD exactly (the last iterate, from an unclamped random start)."""
    if paper:
        return lambda x, y: pgd(model, x, y, eps=eps, step_size=step, steps=steps, random_start=True,
                                loss="bce" if multi else "ce", generator=gen, restarts=restarts, clamp_start=False)
    if multi:
        return lambda x, y: pgd(model, x, y, eps=eps, step_size=step, steps=steps, random_start=True,
                                loss="bce", generator=gen, restarts=restarts)
    return lambda x, y: pgd_until_fooled(model, x, y, eps=eps, step_size=step, steps=steps, restarts=restarts,
                                         generator=gen, return_fooled=True)


def _changed_is_fooled(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                       ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """An AutoAttack engine's result with its verdict: both engines return a changed image
    only for a sample one of their attacks' forward passes misclassified (the others come
    back equal to x), so a changed image marks a fooled sample (:meth:`_Data.scorer`)."""
    def make(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = run(x, y)
        return x_adv, (x_adv != x).flatten(1).any(dim=1)
    return make


def _fgsm_fn(model: nn.Module, eps: float, multi: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps from x, no random start."""
    return lambda x, y: pgd(model, x, y, eps=eps, step_size=eps, steps=1, random_start=False,
                            loss="bce" if multi else "ce")


def _sanity(cfg: EvalConfig, model: nn.Module, data: _Data, gen: torch.Generator, pgd_rows: list[dict[str, Any]],
            aa: dict[str, Any] | None, clean: float | None, say: Callable[[str], None]) -> dict[str, Any]:
    """The gradient-masking checks; each violation is also a GradientMaskingWarning."""
    multi = data.multi
    tol = max(1.0 / data.n, 0.005)
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, detail: str) -> None:
        checks.append({"name": name, "passed": bool(passed), "detail": detail})
        if not passed:
            warnings.warn(f"sanity check {name} failed: {detail}", GradientMaskingWarning, stacklevel=4)

    # 1. reach: a PGD whose steps cannot reach the edge of its ball understates the attack
    short = [e for e in cfg.eps if cfg.steps * cfg.step_for(e) < e - 1e-12]
    check("pgd-reaches-eps", not short,
          "steps x step size >= eps at every radius" if not short else
          f"{cfg.steps} steps x {cfg.step_label()} < eps at {', '.join(format_eps(e) for e in short)}: "
          "PGD cannot reach the edge of the ball; use more steps or a larger step")
    # 2. monotone in eps
    rows = pgd_rows
    rises = [(a, b) for a, b in zip(rows, rows[1:])
             if a["value"] is not None and b["value"] is not None and b["value"] > a["value"] + tol]
    check("monotone-in-eps", not rises,
          "robust accuracy does not rise with eps" if not rises else
          "; ".join(f"{b['value']:.4f} at {b['eps_label']} > {a['value']:.4f} at {a['eps_label']}" for a, b in rises))
    # 3. PGD at least as strong as FGSM (one step of size eps, no random start)
    fgsm_rows = []
    weaker = []
    for row in rows:
        e = row["eps"]
        v = data.score(model, _fgsm_fn(model, e, multi))
        fgsm_rows.append({"eps": e, "eps_label": format_eps(e), "value": v})
        if v is not None and row["value"] is not None and row["value"] > v + tol:
            weaker.append(f"pgd {row['value']:.4f} > fgsm {v:.4f} at {row['eps_label']}")
    say(f"fgsm: {len(fgsm_rows)} eps done")
    check("pgd-beats-fgsm", not weaker, "PGD is at least as strong as FGSM at every eps" if not weaker else "; ".join(weaker))
    # 4. AutoAttack at least as strong as PGD at its radius
    if aa is not None:
        same = [r for r in rows if abs(r["eps"] - aa["eps"]) < 1e-9 and r["value"] is not None]
        if same:
            ok = aa["value"] <= same[0]["value"] + tol
            check("autoattack-beats-pgd", ok,
                  f"autoattack {aa['value']:.4f} <= pgd {same[0]['value']:.4f} at {aa['eps_label']}" if ok else
                  f"autoattack {aa['value']:.4f} > pgd {same[0]['value']:.4f} at {aa['eps_label']}")
    # 5. a large radius leaves (almost) nothing
    big_steps = max(cfg.steps, 20)
    big = data.score(model, _pgd_fn(model, LARGE_EPS, LARGE_EPS / 4, big_steps, 1, multi, gen))
    big_row = {"eps": LARGE_EPS, "eps_label": format_eps(LARGE_EPS), "steps": big_steps, "step_size": "eps/4",
               "value": big, "max": LARGE_EPS_MAX}
    say(f"pgd at {format_eps(LARGE_EPS)} ({big_steps} x eps/4): done")
    if multi:
        # mAP has a floor set by the class frequencies, not zero: report, do not judge.
        checks.append({"name": "large-eps-near-zero", "passed": True,
                       "detail": "not judged for mAP (its chance level is the positive rate, not 0)"})
    else:
        check("large-eps-near-zero", big is not None and big <= LARGE_EPS_MAX,
              f"accuracy {big:.4f} at {format_eps(LARGE_EPS)} (must be <= {LARGE_EPS_MAX})")
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "fgsm": fgsm_rows, "large_eps": big_row,
            "tolerance": tol}


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a model trained on normalised inputs, as a model of [0, 1]
    images (what every attack here perturbs). ``mean`` and ``std`` per channel."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m, s = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if m.dim() != 1 or m.shape != s.shape or not bool(torch.isfinite(m).all()) or not bool((s > 0).all()):
            raise SatkitError(f"normalize: expected (mean, std) with one finite mean and one std > 0 per channel, "
                              f"got {repr(mean)[:40]}, {repr(std)[:40]}")
        self.model = model
        self.register_buffer("mean", m.view(1, -1, 1, 1))
        self.register_buffer("std", s.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def _data_source(store: Any, split: str | None) -> tuple[Any, str | None]:
    """A store (path, URL or Store), or a StoreDataset / StoreLoader: the store and its split."""
    from sattrain.loader import StoreDataset, StoreLoader

    if isinstance(store, StoreLoader):
        return store.store, split or store.split
    if isinstance(store, StoreDataset):
        return store.store_path, split or store.split
    return store, split


def _own_model(model: nn.Module, normalize: tuple[Sequence[float], Sequence[float]] | None,
               dev: torch.device) -> nn.Module:
    net = Normalized(model, *normalize) if normalize is not None else model
    return net.to(dev)


def evaluate(
    target: str | Path | nn.Module,
    store: str | Path | Store | Any,
    *,
    protocol: str = "strong",
    split: str | None = None,
    eps: Sequence[float] | None = None,
    steps: int | None = None,
    step_size: float | str | None = None,
    restarts: int | None = None,
    attacks: Sequence[str] | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "auto",
    cw_steps: int = 20,
    cw_c: float = 1e-3,
    cw_lr: float = 0.01,
    cw_search_steps: int | None = None,
    autoattack_eps: float = 8 / 255,
    autoattack_engine: str = "reference",
    out: str | Path | None = None,
    write: bool = True,
    progress: Callable[[str], None] | None = None,
    storage_options: dict[str, Any] | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on a store split; write and return the eval.json dict.

    ``target``: a run directory (its checkpoint.pt), a checkpoint file, or any
    ``nn.Module`` that maps [0, 1] images (N, 3, H, W) to logits (a torchvision, timm or
    RobustBench model; ``normalize=(mean, std)`` puts a per-channel normalisation in front
    of it). A module is evaluated in eval mode on ``device`` and given back in its own
    mode, with its parameters' requires_grad as they were; nothing is written unless
    ``out`` is given. ``store``: a store path or URL, an open :class:`Store`, or a
    ``sattrain.StoreDataset`` / ``sattrain.StoreLoader`` (its store, and its split unless
    ``split`` is given). ``protocol``: "strong" (default) or "paper";
    options left as None take the protocol's values (see the module docstring), options
    given override them and are recorded. ``step_size`` is absolute (2/255) or a string
    fraction of each eps ("eps/4"). The result is written to ``out`` (default
    ``RUN_DIR/eval.json``, or ``NAME.eval.json`` beside a checkpoint not named
    checkpoint.pt) unless ``write=False``; it is written only when complete, atomically.
    ``batch_size``: samples per attacked batch; None: :func:`default_batch_size` for the
    device (256 on the CPU). ``progress`` receives one line per finished measurement.
    """
    cfg = resolve_config(
        protocol, split=split, eps=eps, steps=steps, step_size=step_size, restarts=restarts, attacks=attacks,
        samples=samples, seed=seed, batch_size=batch_size, device=device, cw_steps=cw_steps, cw_c=cw_c, cw_lr=cw_lr,
        cw_search_steps=cw_search_steps, autoattack_eps=autoattack_eps, autoattack_engine=autoattack_engine,
    )
    proto = PROTOCOLS[cfg.protocol]
    say = progress or (lambda _line: None)
    dev = resolve_device(cfg.device)
    if batch_size is None:
        cfg = replace(cfg, batch_size=default_batch_size(dev))
    own = isinstance(target, nn.Module)
    store, split_arg = _data_source(store, cfg.split)
    cfg = replace(cfg, split=split_arg)
    if own:
        write = write and out is not None
        ckpt_path = None
        dest = Path(out) if out is not None else Path(EVAL_JSON)
    else:
        ckpt_path = resolve_checkpoint(target)
        dest = Path(out) if out is not None else _default_out(target)
    if write:
        _check_dest(dest)  # before minutes of attacks, not after
    st = store if isinstance(store, Store) else open_store(store, storage_options=storage_options)
    info = st.info
    if own:
        assert isinstance(target, nn.Module)
        was_training = target.training
        grads = [(p, p.requires_grad) for p in target.parameters()]
        try:
            return _evaluate(cfg, proto, say, dev, None, _own_model(target, normalize, dev),
                             {"name": type(target).__name__, "num_classes": len(info.classes),
                              "label_kind": info.label_kind, "image_size": list(info.image_size),
                              "normalize": None if normalize is None else [list(map(float, v)) for v in normalize]},
                             st, dest if write else None)
        finally:
            target.train(was_training)
            for p, g in grads:
                p.requires_grad_(g)
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    model, spec = model_from_checkpoint(ckpt, ckpt_path, dev)
    if normalize is not None:
        raise SatkitError("normalize: a satkit checkpoint's model already takes [0, 1] images")
    chosen_on = _chosen_on(ckpt)
    del ckpt
    return _evaluate(cfg, proto, say, dev, ckpt_path, model, spec, st, dest if write else None, chosen_on)


def _chosen_on(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """For a best.pt (an epoch chosen by the per-epoch monitor of ``sattrain run``) trained
    without --holdout: the run, the split the monitor scored and that split's images digest,
    to tell whether an evaluation scores the very samples the epoch was chosen on."""
    extra = ckpt.get("extra")
    config = ckpt.get("config")
    if not isinstance(extra, dict) or not extra.get("best_of") or not isinstance(ckpt.get("best"), dict):
        return None
    if isinstance(config, dict) and config.get("holdout"):
        return None  # chosen on samples held out of training: no test sample was looked at
    split, arrays = extra.get("eval_split"), extra.get("arrays")
    if not isinstance(split, str) or not isinstance(arrays, dict):
        return None
    return {"run": str(extra["best_of"]), "split": split, "images": arrays.get(f"{split}/images")}


def _selection_note(chosen_on: dict[str, Any] | None, st: Store, split: str, ckpt_path: Path | None) -> str | None:
    """The eval.json "selection" note when the evaluated samples are those best.pt was chosen on."""
    if chosen_on is None or chosen_on["split"] != split or chosen_on["images"] is None:
        return None
    now = (st.info.digests.get(st.array_key(split, "images")) or {}).get("sha256")
    if now != chosen_on["images"]:
        return None  # another store, or other images under that split's name
    return (f"{ckpt_path} is the epoch of {chosen_on['run']} that the per-epoch monitor chose on split {split!r}, the "
            "split evaluated here: these numbers are selection-biased (optimistic). Evaluate checkpoint.pt (the last "
            "epoch), or train with --holdout N so that best.pt is chosen on samples held out of training")


@_float32_with_grad()
def _evaluate(cfg: EvalConfig, proto: Protocol, say: Callable[[str], None], dev: torch.device,
              ckpt_path: Path | None, model: nn.Module, spec: dict[str, Any], st: Store,
              dest: Path | None, chosen_on: dict[str, Any] | None = None) -> dict[str, Any]:
    """evaluate() once the model and the store are open (``dest`` None: nothing written;
    ``chosen_on``: :func:`_chosen_on` of a best.pt)."""
    info = st.info
    what = ckpt_path if ckpt_path is not None else f"model {spec['name']}"

    if cfg.split is not None:
        if cfg.split not in info.splits:
            raise SatkitError(f"--split: store {st.path} has no split {cfg.split!r} (it has: {', '.join(info.splits)})")
        split_name = cfg.split
    elif "test" in info.splits:
        split_name = "test"
    elif "val" in info.splits:
        split_name = "val"
    else:
        raise SatkitError(f"{st.path}: no test or val split to evaluate on (it has: {', '.join(info.splits)}); pass --split")

    model.eval()
    for p in model.parameters():  # no weight gradients needed anywhere below (a caller's own are restored)
        p.requires_grad_(False)
    multi = spec.get("label_kind", "single") == "multi"
    num_classes = int(spec["num_classes"])
    if spec.get("label_kind", "single") != info.label_kind:
        raise SatkitError(f"{what}: model is {spec.get('label_kind')}-label but store {st.path} is {info.label_kind}-label")
    if num_classes != len(info.classes):
        raise SatkitError(f"{what}: model has {num_classes} classes but store {st.path} has {len(info.classes)}")
    if spec.get("classes") and list(spec["classes"]) != list(info.classes):
        raise SatkitError(f"{what}: model was trained on classes {spec['classes'][:5]}... which differ from store {st.path}'s")
    if spec.get("image_size") and tuple(spec["image_size"]) != tuple(info.image_size):
        warnings.warn(
            f"model was trained at {tuple(spec['image_size'])} but store {st.path} is {tuple(info.image_size)}",
            stacklevel=3,
        )

    selection = _selection_note(chosen_on, st, split_name, ckpt_path)
    if selection is not None:
        warnings.warn(selection, SelectionBiasWarning, stacklevel=3)

    images_np = st.load(split_name, "images")
    labels_np = st.load(split_name, "labels")
    # A store rebuilt or replaced while it was read: never score a mix of two versions.
    st.check_unchanged([st.array_key(split_name, "images"), st.array_key(split_name, "labels")])
    total = int(images_np.shape[0])
    if cfg.samples is not None and cfg.samples < total:
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.choice(total, size=cfg.samples, replace=False))
        images_np, labels_np = images_np[idx], labels_np[idx]
    n = int(images_np.shape[0])
    if n == 0:
        raise SatkitError(f"{st.path}: split {split_name!r} is empty")
    if n < total:
        warnings.warn(
            f"evaluated {n} of the {total} samples of split {split_name!r} (a seeded subset): "
            "the numbers are estimates for the split",
            PartialEvaluationWarning,
            stacklevel=3,
        )
    labels_eval = labels_np.astype(np.int64) if not multi else (labels_np > 0).astype(np.uint8)
    data = _Data(images_np, labels_eval, multi, cfg.batch_size, dev)

    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    seconds: dict[str, float] = {}
    evaluated: dict[str, int] = {}  # samples attacked or scored per measurement (a sweep: per setting)
    skipped: dict[str, str] = {}
    result: dict[str, Any] = {}
    robust: dict[str, float] = {}
    say(f"{proto.label}: {n} samples of {split_name}")

    # -- clean
    t0 = time.perf_counter()
    clean = _Scorer(multi)
    with torch.no_grad():
        for i, x, y in data:
            logits = model(x)
            if logits.dim() != 2 or logits.shape[1] != num_classes:
                raise SatkitError(f"{what}: gives outputs of shape {tuple(logits.shape)} for a batch of "
                                  f"{x.shape[0]}; expected logits ({x.shape[0]}, {num_classes}), one per class of "
                                  f"store {st.path}")
            clean.add(logits, y, None)
            if not multi:
                data.clean_ok[i] = logits.argmax(1) == y
    clean_value = clean.value(labels_eval)
    seconds["clean"] = time.perf_counter() - t0
    evaluated["clean"] = n
    say(f"clean: done in {seconds['clean']:.1f} s")

    # -- AutoAttack
    aa_record: dict[str, Any] | None = None
    aa_mask: torch.Tensor | None = None  # per sample: robust to AutoAttack
    pgd_mask: torch.Tensor | None = None  # per sample: robust to the strong PGD at AutoAttack's radius
    if "autoattack" in cfg.attacks:
        if multi:
            skipped["autoattack"] = "AutoAttack is defined for single-label models only"
        else:
            t0 = time.perf_counter()
            if cfg.autoattack_engine == "reference":
                run_aa, aa_info = autoattack_reference(model, num_classes, cfg.autoattack_eps, cfg.seed, dev,
                                                       cfg.batch_size)
            else:
                run_aa, aa_info = autoattack_torchattacks(model, num_classes, cfg.autoattack_eps, cfg.seed,
                                                          cfg.batch_size)
            # Both packages reseed the global RNGs; keep the caller's streams intact.
            cuda_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda_ids), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the package's own advice, reported by our checks
                aa_scorer = data.scorer(model, _changed_is_fooled(run_aa), pooled=True)
            v = aa_scorer.value(labels_eval)
            aa_mask = aa_scorer.robust_mask()
            label = format_eps(cfg.autoattack_eps)
            aa_record = {"eps": cfg.autoattack_eps, "eps_label": label, "norm": "Linf", **aa_info, "value": v}
            result["autoattack"] = aa_record
            robust[f"autoattack@{label}"] = v  # type: ignore[assignment]
            seconds["autoattack"] = time.perf_counter() - t0
            evaluated["autoattack"] = n
            say(f"autoattack eps={label} ({aa_info['engine']}): done in {seconds['autoattack']:.1f} s")

    # -- PGD sweep
    pgd_rows: list[dict[str, Any]] = []
    if "pgd" in cfg.attacks or "sanity" in cfg.attacks:
        t0 = time.perf_counter()
        paper = cfg.protocol == "paper"
        for e in cfg.eps:
            sc = data.scorer(model, _pgd_fn(model, e, cfg.step_for(e), cfg.steps, cfg.restarts, multi, gen, paper))
            v = sc.value(labels_eval)
            if aa_mask is not None and not paper and format_eps(e) == format_eps(cfg.autoattack_eps):
                pgd_mask = sc.robust_mask()
            pgd_rows.append({"eps": e, "eps_label": format_eps(e), "step_size": cfg.step_for(e), "value": v,
                             "adv_accuracy": sc.plain_accuracy()})
            say(f"pgd eps={format_eps(e)} ({cfg.steps} x {cfg.step_label()}, {cfg.restarts} start"
                f"{'s' if cfg.restarts > 1 else ''}): done in {time.perf_counter() - t0:.1f} s")
        if "pgd" in cfg.attacks:
            result["pgd"] = {
                "steps": cfg.steps, "step_size": cfg.step_size, "step_fraction": cfg.step_fraction,
                "step_label": cfg.step_label(), "restarts": cfg.restarts, "random_start": True,
                "clamped_start": not paper, "iterate": "last" if paper or multi else "first that fools",
                "loss": "bce" if multi else "ce", "results": pgd_rows,
                "scoring": ("value: correct clean and under attack (RobustBench); adv_accuracy: correct under "
                            "attack alone (the SAT authors' scripts)"),
            }
            for row in pgd_rows:
                robust[f"pgd@{row['eps_label']}"] = row["value"]
        seconds["pgd"] = time.perf_counter() - t0
        evaluated["pgd"] = n * len(cfg.eps)

    # -- the per-sample worst case of AutoAttack and PGD at AutoAttack's radius (the headline)
    if aa_record is not None and aa_mask is not None and pgd_mask is not None and "pgd" in cfg.attacks:
        label = aa_record["eps_label"]
        both = aa_mask & pgd_mask
        result["worst_case"] = {
            "eps": cfg.autoattack_eps, "eps_label": label, "attacks": ["autoattack", f"pgd@{label}"],
            "value": int(both.sum()) / n,
            "fooled_by_pgd_only": int((aa_mask & ~pgd_mask).sum()),
            "fooled_by_autoattack_only": int((pgd_mask & ~aa_mask).sum()),
            "scoring": "robust only if correct clean, under AutoAttack and under PGD (per sample)",
        }
        robust[f"{WORST_CASE}@{label}"] = result["worst_case"]["value"]
        if result["worst_case"]["fooled_by_pgd_only"]:
            say(f"worst case: PGD fooled {result['worst_case']['fooled_by_pgd_only']} sample(s) that AutoAttack "
                "did not; the headline counts them")

    # -- Carlini-Wagner L2
    if "cw" in cfg.attacks:
        if multi:
            skipped["cw"] = "CW-L2 is defined for single-label models only"
        else:
            t0 = time.perf_counter()
            sc = _Scorer(False)
            norms: list[torch.Tensor] = []
            for i, x, y in data:
                x_adv = cw_l2(model, x, y, steps=cfg.cw_steps, c=cfg.cw_c, lr=cfg.cw_lr,
                              search_steps=cfg.cw_search_steps)
                with torch.no_grad():
                    logits = model(x_adv)
                ok = data.clean_ok[i]
                assert ok is not None
                success = ok & (logits.argmax(1) != y)
                sc.add(logits, y, ok)
                norms.append((x_adv - x).flatten(1).norm(dim=1)[success].cpu())
            l2 = torch.cat(norms)
            v = sc.value(labels_eval)
            result["cw"] = {
                "steps": cfg.cw_steps, "initial_c": cfg.cw_c, "lr": cfg.cw_lr, "search_steps": cfg.cw_search_steps,
                "kappa": 0.0, "abort_early": True, "value": v, "successes": int(l2.numel()),
                "median_l2": float(l2.median()) if l2.numel() else None,
                "mean_l2": float(l2.mean()) if l2.numel() else None,
            }
            robust["cw-l2"] = v  # type: ignore[assignment]
            seconds["cw"] = time.perf_counter() - t0
            evaluated["cw"] = n
            say(f"cw-l2: done in {seconds['cw']:.1f} s ({l2.numel()} successes)")

    # -- distortions
    if "distortions" in cfg.attacks:
        t0 = time.perf_counter()
        dist: dict[str, list[dict[str, Any]]] = {}
        for name, sweep in default_levels(tuple(info.image_size), DEFAULT_DISTORTIONS).items():
            fn = DISTORTIONS[name]
            rows = []
            for entry in sweep:
                level = float(entry["level"])
                v = data.score(model, lambda x, _y, fn=fn, level=level: fn(x, level), robust=False)
                rows.append({**entry, "value": v})
            dist[name] = rows
            say(f"{name}: {len(rows)} levels done")
        result["distortions"] = dist
        seconds["distortions"] = time.perf_counter() - t0
        evaluated["distortions"] = n * sum(len(rows) for rows in dist.values())

    # -- sanity checks
    if "sanity" in cfg.attacks:
        t0 = time.perf_counter()
        result["sanity"] = _sanity(cfg, model, data, gen, pgd_rows, aa_record, clean_value, say)
        seconds["sanity"] = time.perf_counter() - t0
        evaluated["sanity"] = n * (len(result["sanity"]["fgsm"]) + 1)  # FGSM per eps + the large-radius PGD
        failed = [c["name"] for c in result["sanity"]["checks"] if not c["passed"]]
        say("sanity: " + ("all checks passed" if not failed else f"FAILED {', '.join(failed)}"))

    full = {
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "protocol": cfg.protocol,
        "protocol_label": proto.label,
        "protocol_description": proto.description,
        "checkpoint": None if ckpt_path is None else str(ckpt_path),
        "model": {k: spec.get(k) for k in ("name", "num_classes", "label_kind", "image_size")},
        **({"normalize": spec["normalize"]} if spec.get("normalize") else {}),
        "store": {"path": str(st.path), "dataset": info.dataset, "digest": store_digest(info)},
        "split": split_name,
        "samples": n,
        "split_size": total,
        "complete": n == total,
        "metric": "mAP" if multi else "accuracy",
        **({"selection": selection} if selection is not None else {}),
        "clean": clean_value,
        "robust": robust,
        "headline": None,
        **result,
        "skipped": skipped,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "samples_per_s": _throughput(evaluated, seconds),
        "config": {**asdict(cfg), "eps": list(cfg.eps), "attacks": list(cfg.attacks), "device": str(dev)},
        "versions": {
            "sattrain": SATTRAIN_VERSION, "torch": torch.__version__, "python": platform.python_version(),
        },
    }
    full["headline"] = _headline(full)
    _check_result(full)
    if dest is not None:
        _write_result(dest, full)
        say(f"wrote {dest}")
    return full


def _throughput(evaluated: dict[str, int], seconds: dict[str, float]) -> dict[str, float]:
    """Samples per second of each measurement (each setting of a sweep counted once)."""
    return {k: round(evaluated[k] / max(seconds[k], 1e-9), 2) for k in seconds if k in evaluated}


def _format_throughput(r: dict[str, Any]) -> str:
    """'clean 3,550 samples/s, pgd 120 samples/s per eps, ...' from an eval.json dict."""
    per = {"pgd": " per eps", "distortions": " per level", "sanity": " per check"}
    parts = []
    for k, v in r.get("samples_per_s", {}).items():
        shown = f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
        parts.append(f"{k} {shown} samples/s{per.get(k, '')}")
    batch = r.get("config", {}).get("batch_size")
    return ", ".join(parts) + (f" (batches of {batch})" if batch else "")


def _check_dest(dest: Path) -> None:
    """Refuse an eval output that cannot be written, before any attack runs."""
    from satdata.atomic import probe_writable

    if dest.is_symlink() or (dest.exists() and not dest.is_file()):
        raise SatkitError(f"{dest}: exists and is not a regular file; refusing to write the results there")
    if dest.is_file() and not _is_eval_result(dest):
        raise SatkitError(f"--out: {dest} exists and is not the result of an evaluation; refusing to replace it "
                          "(remove it, or choose another --out)")
    if not dest.parent.is_dir():
        raise SatkitError(f"--out: the directory {dest.parent} does not exist")
    probe_writable(dest.parent)


# An eval.json is a few KiB; a larger file at --out is something else.
EVAL_RESULT_MAX_BYTES = 16 * 1024 * 1024


def _is_eval_result(path: Path) -> bool:
    """Whether ``path`` holds what an evaluation writes (a JSON object with a clean score, of
    any eval.json version), or nothing: an earlier result or an empty file is replaced, a
    store's zarr.json, a checkpoint or any other file never is."""
    import json

    try:
        size = path.stat().st_size
        if size == 0:
            return True
        if size > EVAL_RESULT_MAX_BYTES:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "clean" in data



def _write_result(dest: Path, full: dict[str, Any]) -> None:
    """Write eval.json atomically; if that fails (disk full, directory gone), keep the
    results in a file under the system's temporary directory and say where."""
    try:
        write_json_atomic(dest, full, allow_nan=False)
    except OSError as e:
        import json
        import tempfile

        try:
            fd, keep = tempfile.mkstemp(prefix="satkit-eval-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(full, indent=2, allow_nan=False) + "\n")
            kept = f"; the results were saved to {keep}"
        except OSError:
            kept = "; the results could not be saved anywhere else either"
        raise SatkitError(f"{dest}: could not write the results ({e.strerror or type(e).__name__}){kept}") from None


def _headline(r: dict[str, Any]) -> dict[str, Any] | None:
    """The one robust number to quote: the per-sample worst case of AutoAttack and PGD at
    AutoAttack's radius when both ran, else AutoAttack alone, else PGD at the largest eps."""
    base = {"protocol": r["protocol"], "protocol_label": r["protocol_label"], "samples": r["samples"],
            "complete": r["complete"], "metric": r["metric"]}
    if "worst_case" in r:
        w = r["worst_case"]
        return {"name": f"{WORST_CASE}@{w['eps_label']}", "value": w["value"], **base}
    if "autoattack" in r:
        a = r["autoattack"]
        return {"name": f"autoattack@{a['eps_label']}", "value": a["value"], **base}
    if "pgd" in r and r["pgd"]["results"]:
        row = r["pgd"]["results"][-1]
        return {"name": f"pgd@{row['eps_label']}", "value": row["value"], **base}
    return None


def _check_result(r: dict[str, Any]) -> None:
    """Every reported number must be a probability; robust accuracy never above clean.

    A failure here is a bug in this module, not a user error, hence RuntimeError.
    """
    values: list[tuple[str, float]] = [("clean", r["clean"])]
    values += [(k, v) for k, v in r["robust"].items()]
    for name, rows in r.get("distortions", {}).items():
        values += [(f"{name}[{i}]", row["value"]) for i, row in enumerate(rows)]
    for name, v in values:
        if v is None and r["metric"] == "mAP":
            continue  # no class has a positive sample: mAP is undefined, reported as null
        if v is None or not (0.0 <= v <= 1.0):  # NaN fails the comparison too
            raise RuntimeError(f"evaluation produced an invalid value for {name}: {v}")
    if r["metric"] == "accuracy":
        for k, v in r["robust"].items():
            if v > r["clean"] + 1e-12:
                raise RuntimeError(f"robust accuracy {k} = {v} exceeds clean accuracy {r['clean']}")


# --------------------------------------------------------------------------- table


def format_table(r: dict[str, Any]) -> str:
    """A readable, aligned text rendering of an eval.json dict."""
    metric = r["metric"]
    m = r["model"]
    label = r.get("protocol_label", "paper protocol")
    lines = [
        f"model {m.get('name')} ({m.get('label_kind')}-label, {m.get('num_classes')} classes) "
        + (f"from {r['checkpoint']}" if r.get("checkpoint") else "(a module given to evaluate)"),
        f"store {r['store']['path']} ({r['store']['dataset']}), split {r['split']}: "
        f"{r['samples']} of {r['split_size']} samples" + ("" if r["complete"] else " (seeded subset)"),
        f"protocol: {label} ({r.get('protocol_description', '')})",
        "",
        f"{'measurement (' + label + ')':<44} {metric:>9}",
        f"{'-' * 44} {'-' * 9}",
    ]

    def row(name: str, v: float | None, extra: str = "") -> None:
        shown = "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
        lines.append(f"{name:<44} {shown:>9}" + (f"  {extra}" if extra else ""))

    row("clean", r["clean"])
    if "autoattack" in r:
        a = r["autoattack"]
        row(f"autoattack eps={a['eps_label']} ({a.get('version', 'standard')})", a["value"],
            f"{a.get('engine', '')}: {', '.join(a.get('attacks', []))}")
    if "pgd" in r:
        p = r["pgd"]
        step = p.get("step_label") or format_eps(p["step_size"])
        how = f"{p['steps']} x {step}" + (f", {p['restarts']} starts" if p["restarts"] > 1 else "")
        paper = r.get("protocol") == "paper"
        for res in p["results"]:
            adv = res.get("adv_accuracy")
            row(f"pgd eps={res['eps_label']} ({how})", res["value"],
                f"authors' scoring (attacked images alone) {adv:.4f}" if paper and adv is not None else "")
    if "worst_case" in r:
        w = r["worst_case"]
        row(f"worst case of {' and '.join(w['attacks'])} (per sample)", w["value"],
            f"PGD alone fooled {w['fooled_by_pgd_only']}, AutoAttack alone {w['fooled_by_autoattack_only']}")
    if "cw" in r:
        c = r["cw"]
        med = "n/a" if c["median_l2"] is None else f"{c['median_l2']:.4f}"
        search = c.get("search_steps", 1)
        row(f"cw-l2 ({c['steps']} it, {search} search steps)", c["value"], f"median L2 {med} over {c['successes']} successes")
    for name, rows in r.get("distortions", {}).items():
        for res in rows:
            if "sigma" in res:
                row(f"{name} sigma={res['sigma']:g}", res["value"])
            elif "radius" in res:
                row(f"{name} r={res['radius']:g}", res["value"])
            else:
                row(f"{name} c={res['level']:g}" + (" (unchanged)" if res.get("identity") else ""), res["value"])
    if "sanity" in r:
        s = r["sanity"]
        for res in s.get("fgsm", []):
            row(f"fgsm eps={res['eps_label']} (sanity)", res["value"])
        big = s.get("large_eps")
        if big:
            row(f"pgd eps={big['eps_label']} (sanity, must be <= {big['max']:g})", big["value"])
        lines.append("")
        lines.append("sanity checks: " + ("all passed" if s["passed"] else "FAILED: distrust the robust numbers"))
        for c in s["checks"]:
            lines.append(f"  [{'ok' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}")
    for name, why in r.get("skipped", {}).items():
        lines.append(f"{name}: skipped ({why})")
    h = r.get("headline")
    if h:
        lines += ["", f"headline ({label}): {h['name']} = {h['value']:.4f} on {h['samples']} samples"
                  + ("" if h["complete"] else " (seeded subset)")]
    if r.get("selection"):
        lines.append(f"note: {r['selection']}")
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in r.get("seconds", {}).items())
    lines += ["", f"time: {secs}"]
    if r.get("samples_per_s"):
        lines.append(f"throughput: {_format_throughput(r)}")
    return "\n".join(lines)
