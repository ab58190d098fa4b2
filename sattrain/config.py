"""Training configuration: one frozen dataclass of every option a run depends on.

``TrainConfig`` holds the options exactly as a user gave them (``None`` where a default
depends on another option, e.g. ``lr`` on ``optimizer`` or ``beta`` on ``method``);
``TrainConfig.resolved()`` fills those in, and the resolved config is what a run records
in ``config.json`` and its checkpoints. Epsilons are in pixel units of [0, 1] images and
may be written as fractions: ``parse_eps("8/255")``.

>>> cfg = TrainConfig(store="digits.zarr", method="sat", maps=("ink",)).resolved()
>>> round(cfg.eps0 * 255), cfg.beta, cfg.lr
(8, None, 0.001)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any

from satdata.errors import SatkitError

OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")

# Default learning rate per optimizer: Adam 1e-3 is the SAT authors' setting; SGD 0.1 is
# the usual CIFAR ResNet setting (momentum 0.9).
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1}

# Default TRADES beta per method (SAT.md: beta = 6 for plain TRADES, beta = 1 when TRADES
# is mixed with SAT or with noise). Methods without a KL term have no beta.
DEFAULT_BETA = {"trades": 6.0, "trades+sat": 1.0, "trades+noise": 1.0}

# Default host-memory budget for a split held in memory (bytes). Larger splits are
# streamed from the store in shuffled blocks of whole chunks.
DEFAULT_MEMORY_BUDGET = 8 * 1024**3

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
        m = _EPS_RE.match(str(text))
        if not m:
            raise SatkitError(f"{option}: cannot read {text!r} as an epsilon (write e.g. 8/255 or 0.0314)")
        num = Fraction(m.group(1))
        den = Fraction(m.group(2)) if m.group(2) is not None else Fraction(1)
        if den == 0:
            raise SatkitError(f"{option}: {text!r} divides by zero")
        value = float(num / den)
    if not value >= 0:  # also catches NaN
        raise SatkitError(f"{option}: must be >= 0, got {text!r}")
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
    return int(float(m.group(1)) * mult)


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
    optimizer: str = "adam"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    eps0: float = 8 / 255  # SAT perturbation size
    alpha: float = 0.6  # SAT curriculum: p_t = 1 - alpha ** (epoch / 10)
    eps: float = 8 / 255  # PGD / TRADES ball (and the PGD evaluation during training)
    steps: int = 5
    step_size: float = 2 / 255
    beta: float | None = None  # None: DEFAULT_BETA[method] for TRADES methods
    augment: bool = True  # random crop (pad 4) + horizontal flip, image and map together
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    resume: bool = False
    train_samples: int | None = None  # None: the whole train split
    eval_samples: int = 256  # 0: the whole held-out split
    eval_split: str | None = None  # None: val if the store has it, else test
    eval_steps: int = 5  # PGD steps of the held-out evaluation (SAT.md protocol)
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    threads: int | None = None  # torch CPU threads; None: torch's default
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """Fill the option-dependent defaults and check every value; raises SatkitError."""
        if self.optimizer not in OPTIMIZERS:
            raise SatkitError(f"--optimizer: unknown optimizer {self.optimizer!r} (known: {', '.join(OPTIMIZERS)})")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise SatkitError(f"--device: unknown device {self.device!r} (known: auto, cpu, cuda, cuda:N)")
        checks = [
            (self.epochs >= 1, "--epochs: must be >= 1"),
            (self.batch_size >= 2, "--batch-size: must be >= 2 (batch norm needs two samples)"),
            (self.steps >= 0, "--steps: must be >= 0"),
            (self.eval_steps >= 0, "--eval-steps: must be >= 0"),
            (0 < self.alpha <= 1, "--alpha: must be in (0, 1]"),
            (self.eval_samples >= 0, "--eval-samples: must be >= 0 (0: the whole split)"),
            (self.train_samples is None or self.train_samples >= 2, "--train-samples: must be >= 2"),
            (self.memory_budget > 0, "--memory-budget: must be > 0"),
            (self.threads is None or self.threads >= 1, "--threads: must be >= 1"),
            (self.weight_decay >= 0, "--weight-decay: must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SatkitError(msg)
        for name in ("eps0", "eps", "step_size"):
            parse_eps(getattr(self, name), "--" + name.replace("_", "-"))
        lr = self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
        if not lr > 0:
            raise SatkitError(f"--lr: must be > 0, got {lr}")
        beta = self.beta if self.beta is not None else DEFAULT_BETA.get(self.method)
        if beta is not None and beta < 0:
            raise SatkitError(f"--beta: must be >= 0, got {beta}")
        return replace(self, lr=float(lr), beta=beta, maps=tuple(self.maps))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists)."""
        d = asdict(self)
        d["maps"] = list(self.maps)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["maps"] = tuple(kw.get("maps", ()))
        return cls(**kw)


# Options that may change when a run is resumed: they do not change what is computed
# (epochs only extends the schedule, which depends on the epoch number alone). The store
# may move: a resumed run checks the store's content digest instead of its path.
RESUMABLE_CHANGES = frozenset({"store", "out", "epochs", "resume", "device", "progress", "threads", "memory_budget"})


def resume_mismatches(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Options that differ between a saved run's config and this invocation's: "name: a -> b"."""
    out = []
    for k in sorted(set(saved) | set(now)):
        if k in RESUMABLE_CHANGES:
            continue
        if saved.get(k) != now.get(k):
            out.append(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}")
    return out
