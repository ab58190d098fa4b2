"""Training configuration: one frozen dataclass of every option a run depends on.

``TrainConfig`` holds the options exactly as a user gave them (``None`` where a default
depends on another option, e.g. ``lr`` on ``optimizer`` or ``beta`` on ``method``);
``TrainConfig.resolved()`` fills those in, and the resolved config is what a run records
in ``config.json`` and its checkpoints. Epsilons are in pixel units of [0, 1] images and
may be written as fractions: ``parse_eps("8/255")``.

A *recipe* (``--recipe``) is a named set of optimisation settings from the literature:
the optimizer, learning rate, momentum, weight decay, learning-rate schedule and the batch
norm mode of attack generation (``RECIPES``). Options given explicitly override the
recipe's values; ``resolved()`` records both the recipe and every value it resolved to.

>>> cfg = TrainConfig(store="digits.zarr", method="sat", maps=("ink",)).resolved()
>>> round(cfg.eps0 * 255), cfg.beta, cfg.lr, cfg.schedule, cfg.attack_bn
(8, None, 0.001, 'constant', 'train')
>>> cfg = TrainConfig(store="cifar10.zarr", method="pgd", recipe="madry").resolved()
>>> cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.attack_bn
('sgd', 0.1, 0.9, 0.0005, 'multistep', 'eval')
>>> cfg = TrainConfig(store="cifar10.zarr", method="fgsm-rs", recipe="fast").resolved()
>>> cfg.steps, round(cfg.step_size * 255, 6), cfg.lr, cfg.schedule, cfg.attack_bn
(1, 10.0, 0.2, 'cyclic', 'train')
>>> cfg = TrainConfig(store="cifar10.zarr", method="free", recipe="fast", epochs=30).resolved()
>>> cfg.replays, cfg.passes, round(cfg.step_size * 255, 6), cfg.lr
(8, 4, 8.0, 0.04)
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any

from satdata.errors import SatkitError

OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
# Learning-rate schedules (sattrain.schedule has the formulas).
SCHEDULES = ("constant", "multistep", "trades", "cosine", "onecycle", "cyclic")
# Batch norm mode while training-time attacks (PGD, TRADES) craft their examples.
ATTACK_BN = ("train", "eval")
# --augment: "auto" is resolved against the store (crop+flip when its images may be
# mirrored, StoreInfo.hflip; crop alone otherwise, e.g. digits).
AUGMENTS = ("auto", "crop+flip", "crop", "none")

# Default learning rate per optimizer, used when --optimizer differs from the recipe's:
# Adam 1e-3 is the SAT authors' setting; SGD 0.1 is the usual CIFAR ResNet setting.
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1}


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of one published training setup (see ``RECIPES``)."""

    name: str
    summary: str  # one line for --help
    optimizer: str
    lr: float
    momentum: float  # SGD only (Adam ignores it)
    weight_decay: float
    schedule: str
    attack_bn: str
    # the learning rate of particular methods where the source's own script differs
    # (Wong et al. run Free-AT at 0.04 and FGSM-RS at 0.2 in the same recipe)
    lr_by_method: tuple[tuple[str, float], ...] = ()

    def lr_for(self, method: str) -> float:
        return dict(self.lr_by_method).get(method, self.lr)


# paper: the SAT authors' scripts (student*.py, teacher*.py): Adam with torch's defaults
#   (lr 1e-3, no weight decay), no schedule, and attacks crafted with the model left in
#   train mode (batch statistics; running statistics updated by the attack's forwards).
# madry: PGD adversarial training as Madry et al. and Rice et al. ("Overfitting in
#   adversarially robust deep learning", 2020) run it on CIFAR-10: SGD 0.1, momentum 0.9,
#   weight decay 5e-4, the piecewise schedule (x0.1 at 50% and 75% of the epochs).
# trades: the TRADES reference (yaodongyu/TRADES, train_trades_cifar10.py): SGD 0.1,
#   momentum 0.9, weight decay 2e-4, x0.1 at epochs 75, 90 and 100 of 100 (scaled to
#   --epochs). Both literature recipes craft attacks in eval mode, as the TRADES
#   reference does (its trades_loss calls model.eval() before the KL maximisation).
# fast: Wong, Rice and Kolter, "Fast is better than free" (2020; locuslab/fast_adversarial,
#   CIFAR10/train_fgsm.py and train_free.py): SGD, momentum 0.9, weight decay 5e-4, the
#   cyclic learning rate (per step, 0 up to the peak at half of the steps and back to 0),
#   peak 0.2 (0.04 for Free-AT, as their train_free.py), the model left in train mode
#   while the FGSM example is crafted.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("paper", "the SAT authors' scripts: Adam lr 1e-3, no weight decay, constant lr, attacks in BN train mode",
               "adam", 1e-3, 0.9, 0.0, "constant", "train"),
        Recipe("madry", "Madry / Rice et al. PGD-AT: SGD lr 0.1, momentum 0.9, weight decay 5e-4, "
               "x0.1 at 50% and 75% of the epochs, attacks in BN eval mode",
               "sgd", 0.1, 0.9, 5e-4, "multistep", "eval"),
        Recipe("trades", "the TRADES reference: SGD lr 0.1, momentum 0.9, weight decay 2e-4, "
               "x0.1 at 75%, 90% and 100% of the epochs, attacks in BN eval mode",
               "sgd", 0.1, 0.9, 2e-4, "trades", "eval"),
        Recipe("fast", "Wong et al.'s FGSM-RS / Free-AT: SGD peak lr 0.2 (0.04 for free), momentum 0.9, weight "
               "decay 5e-4, cyclic lr per step (0 -> peak at half the steps -> 0), attacks in BN train mode",
               "sgd", 0.2, 0.9, 5e-4, "cyclic", "train", (("free", 0.04),)),
    )
}

# Default TRADES beta per method (docs/method.md: beta = 6 for plain TRADES, beta = 1 when TRADES
# is mixed with SAT or with noise). Methods without a KL term have no beta.
DEFAULT_BETA = {"trades": 6.0, "trades+sat": 1.0, "trades+noise": 1.0}

# Attack steps and step size of training-time attacks when --steps / --step-size are not
# given: PGD-AT and TRADES 5 steps of eps/4 (2/255 at --eps 8/255, the SAT authors'
# setting; 5 x eps/4 reaches the edge of the ball at any --eps, where a fixed 2/255 would
# not beyond 10/255); FGSM with random start one step of 1.25 eps (Wong et al.); Free-AT
# steps of eps (Shafahi et al.).
DEFAULT_STEPS = 5
SINGLE_STEP_METHODS = frozenset({"fgsm-rs", "fgsm-rs+sat"})
FGSM_RS_STEP = Fraction(5, 4)  # x eps
PGD_STEP = Fraction(1, 4)  # x eps: the multi-step methods' default step
# The multi-step methods' default step before it became eps/4: a fixed 2/255 at any --eps.
# A run that recorded it is resumed with it (sattrain.trainer: a resume that does not
# give --step-size continues with the step the run started with).
LEGACY_STEP_SIZE = 2 / 255
# Free-AT: minibatch replays (Shafahi et al.: m = 8 at eps 8/255).
REPLAY_METHODS = frozenset({"free"})
DEFAULT_REPLAYS = 8
MAX_REPLAYS = 1024


def default_step_size(method: str, eps: float) -> float:
    """--step-size when not given: 1.25 eps for FGSM-RS, eps for Free-AT, eps/4 otherwise
    (exactly 2/255 at the default eps 8/255: a division by 4 is exact in floating point).

    >>> round(default_step_size("fgsm-rs", 8 / 255) * 255, 9), round(default_step_size("free", 4 / 255) * 255, 9)
    (10.0, 4.0)
    >>> default_step_size("pgd", 8 / 255) == 2 / 255, round(default_step_size("trades", 16 / 255) * 255, 9)
    (True, 4.0)
    """
    if method in SINGLE_STEP_METHODS:
        return float(FGSM_RS_STEP * Fraction(eps))
    if method in REPLAY_METHODS:
        return float(eps)
    return float(PGD_STEP * Fraction(eps))


def short_attack_warning(cfg: "TrainConfig") -> str | None:
    """A warning when an explicit --step-size (or --steps) leaves the training attack unable
    to reach the edge of the --eps ball (steps x step size < eps), else None.

    Only for the multi-step attack methods (PGD, TRADES and their mixes; steps >= 1), and
    only when the user gave --step-size or --steps: the defaults reach it (5 x eps/4). FGSM-RS
    and Free-AT take steps of 1.25 eps and eps. ``cfg`` is the user's config (before
    ``resolved()``), so that what was given can be told from what was defaulted.

    >>> short_attack_warning(TrainConfig(store="s", method="pgd", eps=16 / 255, step_size=2 / 255)) is not None
    True
    >>> short_attack_warning(TrainConfig(store="s", method="pgd", eps=16 / 255)) is None
    True
    """
    if cfg.step_size is None and cfg.steps is None:
        return None
    if not ("pgd" in cfg.method or "trades" in cfg.method) or cfg.method in SINGLE_STEP_METHODS:
        return None
    r = cfg.resolved()
    assert r.steps is not None and r.step_size is not None
    eps = parse_eps(r.eps, "--eps")
    if r.steps < 1 or Fraction(r.steps) * Fraction(r.step_size) >= Fraction(eps) * (1 - Fraction(1, 10**9)):
        return None
    return (f"warning: --steps {r.steps} x --step-size {format_eps(r.step_size)} = {format_eps(r.steps * r.step_size)} "
            f"is less than --eps {format_eps(eps)}: the training attack cannot reach the edge of the eps-ball, so "
            f"--method {cfg.method} trains against a weaker attack than its name says (the default step is "
            f"--eps/4, 5 steps reach it)")

# Default host-memory budget for a split held in memory (bytes). Larger splits are
# streamed from the store in shuffled blocks of whole chunks.
DEFAULT_MEMORY_BUDGET = 8 * 1024**3

# Upper bounds that only refuse absurd values (a typo, a crafted config): torch accepts a
# million threads and then crashes; a million epochs is years of training.
MAX_EPOCHS = 1_000_000
MAX_THREADS = 1024
MAX_WORLD_SIZE = 1 << 20

# What each TrainConfig field must be (TrainConfig._check_types).
_FIELD_KINDS = {
    "store": "str", "out": "str?", "method": "str", "maps": "maps", "model": "str", "epochs": "int",
    "batch_size": "int", "recipe": "str", "optimizer": "str?", "lr": "real?", "momentum": "real?",
    "weight_decay": "real?", "schedule": "str?", "attack_bn": "str?", "eps0": "eps", "alpha": "real", "eps": "eps",
    "steps": "int?", "step_size": "eps?", "replays": "int?", "beta": "real?", "augment": "augment", "device": "str", "amp": "bool",
    "seed": "int", "resume": "bool", "train_samples": "int?", "holdout": "int?", "eval_samples": "int", "eval_split": "str?",
    "eval_steps": "int", "summary_samples": "int", "memory_budget": "int", "threads": "int?", "progress": "bool",
    "world_size": "int", "early_stop": "bool", "precision": "str", "channels_last": "str", "compile": "str",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_real(option: str, value: Any, lo: float, hi: float | None, *, lo_open: bool = False,
                hi_open: bool = False) -> None:
    """Refuse anything but a finite number in the range (NaN and infinities included), naming the option.

    >>> _check_real("--lr", float("nan"), 0, None, lo_open=True)
    Traceback (most recent call last):
    ...
    satdata.errors.SatkitError: --lr: must be a finite number > 0, got nan
    """
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        if hi is None:
            want = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise SatkitError(f"{option}: must be {want}, got {repr(value)[:60] if not _is_real(value) else value}")


_EPS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+))?\s*$")


def parse_eps(text: str | float | int, option: str = "--eps") -> float:
    """An epsilon in [0, 1] pixel units from "8/255", "0.0314" or a number.

    Raises SatkitError naming ``option`` for anything else, for a negative value, or for
    a value above 1 (images are in [0, 1], so eps > 1 is always a slip, e.g. "8" for
    "8/255").

    >>> parse_eps("8/255") == 8 / 255
    True
    >>> parse_eps("0.5")
    0.5
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _EPS_RE.match(str(text)[:200])
        if not m:
            raise SatkitError(f"{option}: cannot read {str(text)[:60]!r} as an epsilon (write e.g. 8/255 or 0.0314)")
        num = Fraction(m.group(1))
        den = Fraction(m.group(2)) if m.group(2) is not None else Fraction(1)
        if den == 0:
            raise SatkitError(f"{option}: {text!r} divides by zero")
        if num / den > 1:  # before float(): 1e400 would overflow it
            raise SatkitError(f"{option}: {text!r} is above 1; images are in [0, 1] (did you mean {text}/255?)")
        value = float(num / den)
    if not (value >= 0 and math.isfinite(value)):
        raise SatkitError(f"{option}: must be >= 0 and at most 1 (a finite number), got {text!r}")
    if value > 1:
        raise SatkitError(f"{option}: {text!r} is above 1; images are in [0, 1] (did you mean {text}/255?)")
    return value


def parse_size_bytes(text: str | int, option: str = "--memory-budget") -> int:
    """Bytes from "512M", "8G", "1.5GiB", "100k" or a plain integer (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*$", str(text), re.IGNORECASE)
    if not m:
        raise SatkitError(f"{option}: cannot read {text!r} as a size (write e.g. 512M or 8G)")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2).lower()]
    value = Fraction(m.group(1)) * mult  # exact: a 400-digit number must not overflow a float
    if value > 1 << 62:
        raise SatkitError(f"{option}: {str(text)[:40]!r} is more memory than any machine has")
    return int(value)


def format_eps(value: float) -> str:
    """An epsilon as "k/255" when it is one (within float error), else as a decimal."""
    k = value * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{value:.6g}"


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``sattrain run``. See ``sattrain run --help`` for what each does."""

    store: str
    out: str | None = None  # run directory; None: runs/<dataset>-<method>-<model>-s<seed>
    method: str = "sat"
    maps: tuple[str, ...] = ()  # empty: the store's first map (if any)
    model: str = "small-cnn"
    epochs: int = 100
    batch_size: int = 128
    recipe: str = "paper"  # RECIPES: the defaults of the five options below and of attack_bn
    optimizer: str | None = None  # None: the recipe's
    lr: float | None = None  # None: the recipe's (DEFAULT_LR[optimizer] if optimizer is not the recipe's)
    momentum: float | None = None  # SGD only; None: the recipe's
    weight_decay: float | None = None  # None: the recipe's
    schedule: str | None = None  # SCHEDULES; None: the recipe's
    attack_bn: str | None = None  # ATTACK_BN; None: the recipe's (train for paper, eval for madry and trades)
    eps0: float = 8 / 255  # SAT perturbation size
    alpha: float = 0.6  # SAT curriculum: p_t = 1 - alpha ** (epoch / 10)
    eps: float = 8 / 255  # PGD / TRADES ball (and the PGD evaluation during training)
    steps: int | None = None  # None: 1 for fgsm-rs(+sat), DEFAULT_STEPS otherwise
    step_size: float | None = None  # None: default_step_size(method, eps): eps/4, 1.25 eps for fgsm-rs, eps for free
    replays: int | None = None  # Free-AT's minibatch replays m; None: DEFAULT_REPLAYS for free
    early_stop: bool = False  # stop when the held-out monitor collapses (Wong et al.'s remedy)
    beta: float | None = None  # None: DEFAULT_BETA[method] for TRADES methods
    # AUGMENTS: random crop (pad 4), with or without a horizontal flip, image and map
    # together. "auto" stays "auto" in resolved() (it needs the store; the trainer records
    # what it resolved to). For older callers True means "auto" and False "none".
    augment: str | bool = "auto"
    device: str = "auto"
    amp: bool = False  # older spelling of precision="fp16" (on CUDA; no effect on the CPU)
    # sattrain.accel: "auto" is bf16 on CUDA devices with native bfloat16 (fp16 on older
    # ones), fp32 on the CPU; channels_last "auto" is on for CUDA; compile "none" or a
    # torch.compile mode. config.json records what they resolved to ("accel").
    precision: str = "auto"
    channels_last: str = "auto"
    compile: str = "none"
    seed: int = 0
    resume: bool = False
    train_samples: int | None = None  # None: the whole train split (less --holdout's samples)
    # samples taken out of the train split (seeded, sattrain.trainer.HOLDOUT_SEED) as the
    # per-epoch monitor's split, so that best.pt is chosen without looking at val or test;
    # None: the monitor runs on --eval-split. --train-samples draws from the rest; the
    # end-of-run summary still evaluates --eval-split.
    holdout: int | None = None
    eval_samples: int = 256  # 0: the whole held-out split
    eval_split: str | None = None  # None: val if the store has it, else test
    eval_steps: int = 5  # PGD steps of the per-epoch held-out monitor (cheap, not the robustness)
    summary_samples: int = 500  # end-of-run strong evaluation (sattrain.evaluation); 0: skipped
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    threads: int | None = None  # torch CPU threads; None: torch's default
    progress: bool = True
    # Processes training together (torchrun: WORLD_SIZE), not an option: sattrain.trainer.train
    # sets it from the environment and records it; --batch-size is their global batch.
    world_size: int = 1

    def resolved(self) -> "TrainConfig":
        """Fill the option-dependent defaults and check every value; raises SatkitError.

        This is the one place options are validated (the CLI's callbacks only parse text;
        a config read back from a checkpoint on --resume goes through here too). Each
        refused value gives a one-line error naming the option, e.g. ``--lr: must be a
        finite number > 0, got nan``: types first (an integer option given 1.5 or true),
        then ranges, where NaN and infinities fail every check (click parses "nan" and
        "inf" as floats, so they reach this point).
        """
        self._check_types()
        if self.out is not None and not self.out.strip():
            raise SatkitError(f"--out: {self.out!r} is an empty path (a variable that expanded to nothing?); "
                              "name the run directory")
        if not self.store.strip():
            raise SatkitError("STORE: an empty path; name the store (a .zarr directory)")
        from sattrain.methods import method_names

        if self.method not in method_names():
            raise SatkitError(f"--method: unknown method {self.method!r} (known: {', '.join(method_names())})")
        if self.recipe not in RECIPES:
            raise SatkitError(f"--recipe: unknown recipe {self.recipe!r} (known: {', '.join(RECIPES)})")
        recipe = RECIPES[self.recipe]
        optimizer = self.optimizer if self.optimizer is not None else recipe.optimizer
        if optimizer not in OPTIMIZERS:
            raise SatkitError(f"--optimizer: unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")
        schedule = self.schedule if self.schedule is not None else recipe.schedule
        if schedule not in SCHEDULES:
            raise SatkitError(f"--schedule: unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
        attack_bn = self.attack_bn if self.attack_bn is not None else recipe.attack_bn
        if attack_bn not in ATTACK_BN:
            raise SatkitError(f"--attack-bn: unknown mode {attack_bn!r} (known: {', '.join(ATTACK_BN)})")
        augment = ("auto" if self.augment else "none") if isinstance(self.augment, bool) else self.augment
        if augment not in AUGMENTS:
            raise SatkitError(f"--augment: unknown augmentation {augment!r} (known: {', '.join(AUGMENTS)})")
        from sattrain.accel import CHANNELS_LAST, COMPILE_MODES, PRECISIONS

        for option, value, known in (("--precision", self.precision, PRECISIONS),
                                     ("--channels-last", self.channels_last, CHANNELS_LAST),
                                     ("--compile", self.compile, COMPILE_MODES)):
            if value not in known:
                raise SatkitError(f"{option}: unknown value {value!r} (known: {', '.join(known)})")
        if self.amp and self.precision not in ("auto", "fp16"):
            raise SatkitError(f"--amp is --precision fp16 and contradicts --precision {self.precision}; give one of them")
        if not isinstance(self.device, str) or (self.device not in DEVICES and not self.device.startswith("cuda:")):
            raise SatkitError(f"--device: unknown device {self.device!r} (known: auto, cpu, cuda, cuda:N)")
        checks = [
            ("--epochs", self.epochs, 1, MAX_EPOCHS, ""),
            ("--batch-size", self.batch_size, 2, None, " (batch norm needs two samples)"),
            ("--steps", self.steps, 0, None, ""),
            ("--eval-steps", self.eval_steps, 0, None, ""),
            ("--eval-samples", self.eval_samples, 0, None, " (0: the whole split)"),
            ("--summary-samples", self.summary_samples, 0, None, " (0: no end-of-run summary)"),
            ("--train-samples", self.train_samples, 2, None, ""),
            ("--holdout", self.holdout, 1, None, " (samples of the train split held out for the monitor)"),
            ("--memory-budget", self.memory_budget, 1, None, ""),
            ("--threads", self.threads, 1, MAX_THREADS, ""),
            ("world size", self.world_size, 1, MAX_WORLD_SIZE, " (processes: torchrun --nproc-per-node x --nnodes)"),
        ]
        for option, value, lo, hi, why in checks:
            if value is not None and not (value >= lo and (hi is None or value <= hi)):
                bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise SatkitError(f"{option}: must be {bound}{why}, got {value!r}")
        if self.world_size > 1:
            w, b = self.world_size, self.batch_size
            if b % w:
                raise SatkitError(f"--batch-size: {b} does not split evenly over the {w} training processes (torchrun "
                                  f"--nproc-per-node x --nnodes); give a multiple of {w}, e.g. {max(w, b - b % w)}")
            if b // w < 2:
                raise SatkitError(f"--batch-size: {b} over {w} processes is {b // w} sample(s) per process, and batch "
                                  f"norm needs two; give at least {2 * w}")
        _check_real("--alpha", self.alpha, 0, 1, lo_open=True)
        for name in ("eps0", "eps"):
            parse_eps(getattr(self, name), "--" + name.replace("_", "-"))
        steps, step_size, replays = self._attack_settings()
        if self.lr is not None:
            lr = self.lr
        elif optimizer == recipe.optimizer:
            lr = recipe.lr_for(self.method)
        else:
            lr = DEFAULT_LR[optimizer]
        _check_real("--lr", lr, 0, None, lo_open=True)
        momentum = self.momentum if self.momentum is not None else recipe.momentum
        _check_real("--momentum", momentum, 0, 1, hi_open=True)
        weight_decay = self.weight_decay if self.weight_decay is not None else recipe.weight_decay
        _check_real("--weight-decay", weight_decay, 0, None)
        beta = self.beta if self.beta is not None else DEFAULT_BETA.get(self.method)
        if beta is not None:
            _check_real("--beta", beta, 0, None)
        return replace(self, optimizer=optimizer, lr=float(lr), momentum=float(momentum),
                       weight_decay=float(weight_decay), schedule=schedule, attack_bn=attack_bn, augment=augment,
                       beta=None if beta is None else float(beta), maps=tuple(self.maps), steps=steps,
                       step_size=step_size, replays=replays)

    def _attack_settings(self) -> tuple[int, float, int | None]:
        """(steps, step size, replays) of the training-time attack, defaults filled per method."""
        single = self.method in SINGLE_STEP_METHODS
        if self.steps is None:
            steps = 1 if single else DEFAULT_STEPS
        else:
            steps = self.steps
            if single and steps != 1:
                raise SatkitError(f"--steps: --method {self.method} takes exactly one FGSM step, got {steps} "
                                  f"(for more steps use --method {self.method.replace('fgsm-rs', 'pgd')} --steps {steps})")
        if self.step_size is None:
            step_size = default_step_size(self.method, parse_eps(self.eps, "--eps"))
        else:
            step_size = parse_eps(self.step_size, "--step-size")
        if (("pgd" in self.method or "trades" in self.method or single or self.method in REPLAY_METHODS)
                and step_size == 0):
            raise SatkitError(f"--step-size: must be > 0 for --method {self.method} (an attack whose step is zero "
                              f"never leaves its start), got {self.step_size!r}")
        if self.method in REPLAY_METHODS:
            replays = DEFAULT_REPLAYS if self.replays is None else self.replays
            if not 1 <= replays <= MAX_REPLAYS:
                raise SatkitError(f"--replays: must be in [1, {MAX_REPLAYS}], got {replays!r}")
        elif self.replays is not None and self.replays != 1:
            raise SatkitError(f"--replays: only --method {', '.join(sorted(REPLAY_METHODS))} replays each minibatch "
                              f"(--method {self.method} takes one step per batch)")
        else:
            replays = None
        return steps, step_size, replays

    @property
    def passes(self) -> int:
        """Passes over the training data: --epochs, or for Free-AT ceil(epochs / replays), so
        that replaying each minibatch m times takes the gradient steps of --epochs epochs."""
        return -(-self.epochs // self.replays_per_batch)

    @property
    def replays_per_batch(self) -> int:
        return self.replays if self.replays and self.method in REPLAY_METHODS else 1

    @property
    def monitor_step_size(self) -> float:
        """Step of the per-epoch held-out PGD monitor: --step-size for the multi-step attack
        methods (and the methods without an attack, whose --step-size is the PGD default,
        eps/4), eps/4 for FGSM-RS and Free-AT, whose step is an FGSM step of about eps."""
        if self.method in SINGLE_STEP_METHODS or self.method in REPLAY_METHODS:
            return parse_eps(self.eps, "--eps") / 4
        assert self.step_size is not None, "resolved() first"
        return parse_eps(self.step_size, "--step-size")

    def _check_types(self) -> None:
        """Each option of the Python type it must have (a library caller, or a config read
        back from a checkpoint, can pass anything): SatkitError naming the option."""
        for f in fields(self):
            value = getattr(self, f.name)
            option = {"maps": "--map", "world_size": "world size"}.get(f.name, "--" + f.name.replace("_", "-"))
            kind = _FIELD_KINDS.get(f.name)
            if kind is None:
                continue
            ok = {
                "int": _is_int(value),
                "int?": value is None or _is_int(value),
                "real": _is_real(value),
                "real?": value is None or _is_real(value),
                "str": isinstance(value, str),
                "str?": value is None or isinstance(value, str),
                "bool": isinstance(value, bool),
                "eps": _is_real(value) or isinstance(value, str),
                "eps?": value is None or _is_real(value) or isinstance(value, str),
                "augment": isinstance(value, (str, bool)),
                "maps": isinstance(value, (tuple, list)) and all(isinstance(m, str) for m in value),
            }[kind]
            if not ok:
                want = {"int": "an integer", "int?": "an integer", "real": "a number", "real?": "a number",
                        "str": "a string", "str?": "a string", "bool": "true or false", "eps": "an epsilon",
                        "eps?": "an epsilon",
                        "augment": "a string", "maps": "a list of map names"}[kind]
                raise SatkitError(f"{option}: must be {want}, got {repr(value)[:60]}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists)."""
        d = asdict(self)
        d["maps"] = list(self.maps)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config of ``to_json()``'s dict (unknown keys ignored). Raises SatkitError for a
        dict that cannot be one (not a dict, no store, maps not a list); call ``resolved()``
        to check every value."""
        if not isinstance(d, dict):
            raise SatkitError(f"run options: expected an object, got {repr(d)[:60]}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if not isinstance(kw.get("store"), str):
            raise SatkitError(f"run options: store is {repr(kw.get('store'))[:60]}; expected a path")
        maps = kw.get("maps", ())
        if not isinstance(maps, (list, tuple)):
            raise SatkitError(f"--map: must be a list of map names, got {repr(maps)[:60]}")
        kw["maps"] = tuple(maps)
        return cls(**kw)


# Options that may change when a run is resumed: they do not change what is computed.
# epochs may grow only under the constant schedule (the trainer refuses it otherwise: the
# other schedules are scaled to the number of epochs, so more epochs would change the
# learning rates of epochs already done). summary_samples only sizes the end-of-run
# evaluation. The store may move: a resumed run checks the store's content digest
# instead of its path.
RESUMABLE_CHANGES = frozenset({"store", "out", "epochs", "resume", "device", "progress", "threads", "memory_budget",
                               "summary_samples", "early_stop"})


def resume_mismatches(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Options that differ between a saved run's config and this invocation's: "name: a -> b"."""
    out = []
    for k in sorted(set(saved) | set(now), key=str):
        if k in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(k), now.get(k)
        try:
            differ = bool(a != b) or type(a) is not type(b) and not (_is_real(a) and _is_real(b))
        except Exception:  # noqa: BLE001 - e.g. a tensor where a number was saved: they differ
            differ = True
        if differ:
            out.append(f"{str(k)[:40]}: {repr(a)[:60]} -> {repr(b)[:60]}")
    return out


def resolve_augment(augment: str, hflip: bool) -> str:
    """The augmentation a run uses: "auto" becomes "crop+flip" when the store's images may
    be mirrored (``StoreInfo.hflip``) and "crop" when not (a mirrored digit is another
    digit, or none); explicit values stay as given.

    >>> resolve_augment("auto", True), resolve_augment("auto", False), resolve_augment("none", True)
    ('crop+flip', 'crop', 'none')
    """
    if augment == "auto":
        return "crop+flip" if hflip else "crop"
    if augment not in AUGMENTS:
        raise SatkitError(f"--augment: unknown augmentation {augment!r} (known: {', '.join(AUGMENTS)})")
    return augment
