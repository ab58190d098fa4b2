"""Compare training runs: ``write_report(run_dirs, out)`` -> out/report.md plus PNG plots.

Reads from each run directory (the files ``sattrain run`` and ``sattrain eval`` write):

    config.json       {"options": {"method", "model", "maps", "seed", ...}, "store": {...}}
    metrics.jsonl     one JSON object per epoch: epoch, loss, train_acc, clean_acc and the
                      held-out monitor ``pgd<N>_monitor`` (old runs: ``pgd_acc``), seconds, ...
    metrics.json      "summary" (the end-of-run strong evaluation on a subset, its full
                      record in summary.json), "best", "last", "monitor"; old runs:
                      clean_acc and robust_acc {"pgd@1/255": ...} on a held-out subset
    eval.json         ``sattrain eval`` (strong protocol by default; version 1 files, which
                      have no "protocol" key, were the paper protocol)
    eval-paper.json   ``sattrain eval --protocol paper``

and writes into ``out``:

    report.md                 one table per protocol, then the plots, the protocols and the
                              per-run details
    accuracy_per_epoch.png    train / held-out clean / held-out monitor per epoch
    robust_vs_eps.png         PGD robust accuracy against eps, one panel per protocol
    distortions.png           contrast, low-pass, high-pass sweeps (when an eval has them)
    frontier.png              robust accuracy against training cost (when runs have a strong
                              evaluation with AutoAttack and metrics.jsonl has images_per_s;
                              ``frontier=True`` asks for it, ``False`` leaves it out)

The frontier (``cost_frontier(runs)``, also drawn by bench/frontier.py): per configuration, the
strong headline (AutoAttack, with PGD per sample) and the strong PGD sweep against two
costs: forward-backward passes per training example per epoch of budget
(``sattrain.methods.Method.passes`` with the run's own attack share from metrics.jsonl) and
the measured training images per second (metrics.jsonl ``samples`` x ``replays`` /
``images_per_s``, summed over epochs), clean accuracy beside, mean ± std over seeds, and
which points are Pareto-optimal on each cost axis.

Why it is laid out this way (the issue "Robustness numbers a reviewer would trust"):

- Every robustness number carries its protocol (``strong``: AutoAttack and a
  strong PGD, headline their per-sample worst case; ``paper``: the SAT authors' PGD-5, which overstates robustness) and its
  source (split and samples: ``test 355/355`` vs ``test subset 256/355``). Numbers of two
  protocols are never in the same table or plot panel.
- Runs that differ only in their seed (config.json options minus :data:`NON_SEMANTIC`) are
  one configuration; a table row gives mean ± sample standard deviation over the seeds
  and n. Runs of one configuration whose sources differ (protocol, split, samples or
  attack settings) are never averaged together: each source gets its own row and a note.
- The per-epoch held-out number is a cheap monitor (a few PGD steps on a small subset,
  used to choose best.pt). It appears only in the training table and the per-epoch plot,
  titled as monitoring, never as robustness.
- A failed gradient-masking sanity check marks the row (``⚠``) and names the checks.

Plots are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas), never through
pyplot's global state, so writing a report from a long-lived process leaks nothing.
report.md and the plots are written aside and renamed into place (a link planted at
their names is replaced, not followed).

Malformed run directories (decided for the hostile-input issue). Every file a run is
read from is checked before any number reaches a table: at most MAX_FILE_BYTES, UTF-8,
valid JSON (a truncated file, an integer of thousands of digits, nesting deeper than
MAX_DEPTH levels such as ``"[" * 100000`` are refused), an object (one per line in
metrics.jsonl), and every field the report reads of the type it must be: scores are
numbers in [0, 1] (NaN or infinities only where a run legitimately writes them: a
per-epoch mAP in metrics.jsonl may be NaN), counts are integers >= 0, names are strings,
lists are lists (``_check_config``, ``_check_metrics``, ``_check_epoch_record``,
``_check_eval``). A run that fails any check is **skipped**: ``write_report`` warns in one
line naming the file and the reason (``warning: runs/x/eval.json: not a sattrain
evaluation ('clean' is nan; expected a score in [0, 1] or null); run skipped, the other
runs are reported``), lists it under "Skipped runs" in report.md, and reports the others;
`sattrain report` then exits 0. When no run can be read it fails with one ``Error:`` line
(the file and reason itself when only one run was given), exit 1. ``strict=True`` makes
the first malformed run an error instead. Missing files are not errors: a run may lack
eval.json or metrics.jsonl, as long as it has at least one of the run files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from satdata.errors import SatkitError
from sattrain.rundir import (
    CONFIG_JSON,
    EVAL_JSON,
    METRICS_JSON,
    METRICS_JSONL,
    PAPER_EVAL_JSON,
    SUMMARY_JSON,
    parse_json,
    read_json,
    read_text,
    short_repr,
)

__all__ = [
    "write_report",
    "RunSummary",
    "Measurement",
    "Configuration",
    "load_run",
    "group_runs",
    "config_key",
    "mean_std",
    "NON_SEMANTIC",
    "PROTOCOL_LABELS",
    "cost_frontier",
    "Frontier",
    "FrontierRow",
    "run_cost",
    "RunCost",
]

REPORT_NAME = "report.md"
PLOT_EPOCHS = "accuracy_per_epoch.png"
PLOT_EPS = "robust_vs_eps.png"
PLOT_DISTORTIONS = "distortions.png"
PLOT_FRONTIER = "frontier.png"
PROTOCOLS = ("strong", "paper")
PROTOCOL_LABELS = {"strong": "strong protocol", "paper": "paper protocol"}
# Descriptions for files that do not carry their own (eval.json version 1, old metrics.json).
_PAPER_DESCRIPTION = ("the SAT authors' evaluation: PGD 5 steps of 2/255, 1 random start; overstates robustness, "
                      "quote it only to compare with the paper")
# config.json options that do not change what a run computes (where it writes, how it
# shows progress, on which device or how many processes, how large the end-of-run summary
# is) and the seed: runs differing only in these are seeds of one configuration. The store
# path is replaced by the store's content digest (or dataset), so a store that moved still
# matches.
NON_SEMANTIC = frozenset({"seed", "out", "resume", "device", "progress", "threads", "memory_budget",
                          "summary_samples", "store", "world_size"})
_EPS_KEY = re.compile(r"^pgd@(\d+(?:\.\d+)?)/255$")


def _is_autoattack_headline(name: str | None) -> bool:
    """A strong headline that includes AutoAttack: ``autoattack@E`` (AutoAttack alone, eval.json
    before the worst case) or ``autoattack+pgd@E`` (per sample the worst of AutoAttack and PGD)."""
    return (name or "").split("@")[0] in ("autoattack", "autoattack+pgd")
_MONITOR_KEY = re.compile(r"^pgd(\d+)_monitor$")
_SEED_SUFFIX = re.compile(r"[-_.]?(?:seed|s)[-_]?\d+$")
_FILE_RANK = {EVAL_JSON: 0, PAPER_EVAL_JSON: 0, SUMMARY_JSON: 1, METRICS_JSON: 2}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Measurement:
    """One robustness evaluation of one run, normalised across file formats.

    ``pgd`` maps eps in /255 units to the robust value; all values are fractions in [0, 1]
    (or None: not measured). ``settings`` describes the attacks; together with protocol,
    file, split and samples it forms :attr:`key`: two measurements are averaged over
    seeds only when their keys are equal.
    """

    protocol: str
    file: str
    split: str | None
    samples: int | None
    split_size: int | None
    complete: bool | None
    metric: str
    clean: float | None
    pgd: dict[float, float | None]
    settings: str
    description: str
    pgd_settings: str | None = None
    headline_name: str | None = None
    headline: float | None = None
    cw: float | None = None
    cw_median_l2: float | None = None
    cw_settings: str | None = None
    autoattack_settings: str | None = None
    distortions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sanity_passed: bool | None = None
    sanity_failed: tuple[str, ...] = ()
    sanity_details: tuple[str, ...] = ()
    note: str = ""

    @property
    def protocol_label(self) -> str:
        return PROTOCOL_LABELS.get(self.protocol, f"{self.protocol} protocol")

    @property
    def source(self) -> str:
        """Where the numbers come from: split and samples, e.g. ``test subset 256/355``."""
        split = self.split or "?"
        if self.samples is None:
            where = f"{split}, samples unknown"
        elif self.split_size is None:
            where = f"{split} subset of {self.samples}" if not self.complete else f"{split} {self.samples}"
        elif self.complete or self.samples >= self.split_size:
            where = f"{split} {self.samples}/{self.split_size}"
        else:
            where = f"{split} subset {self.samples}/{self.split_size}"
        return f"{where} ({self.file})"

    @property
    def key(self) -> tuple[Any, ...]:
        """What must agree for two seeds' numbers to be averaged."""
        return (self.protocol, self.file, self.split, self.samples, self.split_size, self.settings,
                self.headline_name, self.metric)

    @property
    def rank(self) -> tuple[int, int, int]:
        """Preference among measurements of one protocol: a full split, then more samples, then eval files."""
        return (0 if self.complete else 1, -(self.samples or 0), _FILE_RANK.get(self.file, 3))


@dataclass
class RunSummary:
    """What the report needs from one run directory."""

    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    measurements: dict[str, Measurement] = field(default_factory=dict)  # by protocol

    @property
    def options(self) -> dict[str, Any]:
        opts = self.config.get("options", {})
        return dict(opts) if isinstance(opts, dict) else {}

    @property
    def seed(self) -> Any:
        return self.options.get("seed")

    @property
    def method(self) -> str:
        return str(self.options.get("method") or (self.metrics or {}).get("method") or "?")

    @property
    def model(self) -> str:
        return str(self.options.get("model") or (self.metrics or {}).get("model") or "?")

    @property
    def maps(self) -> str:
        maps = self.options.get("maps") or (self.metrics or {}).get("maps") or []
        if not maps:
            maps = sorted({str(e["map"]) for e in self.epochs if e.get("map")})
        return ", ".join(str(m) for m in maps) if maps else "-"

    @property
    def metric(self) -> str:
        for m in self.measurements.values():
            if m.metric:
                return m.metric
        for src in (self.metrics, self.epochs[-1] if self.epochs else None):
            if src and src.get("metric"):
                return str(src["metric"])
        return "accuracy"

    @property
    def n_epochs(self) -> int | None:
        if self.epochs:
            return len(self.epochs)
        if self.metrics and self.metrics.get("epochs") is not None:
            return int(self.metrics["epochs"])
        return None

    @property
    def seconds_per_epoch(self) -> float | None:
        secs = [float(e["seconds"]) for e in self.epochs if _finite(e.get("seconds"))]
        return sum(secs) / len(secs) if secs else None

    @property
    def monitor_key(self) -> str | None:
        """The per-epoch held-out monitor's key: ``pgd<N>_monitor``, or ``pgd_acc`` in old runs."""
        for e in self.epochs:
            for k in e:
                if _MONITOR_KEY.match(k):
                    return k
        if any("pgd_acc" in e for e in self.epochs):
            return "pgd_acc"
        return None

    @property
    def monitor_label(self) -> str:
        """``PGD-5 @ 8/255, val 256``: what the monitor measured (old runs: PGD-5, the only setting then)."""
        key = self.monitor_key
        info = next((e["monitor"] for e in self.epochs if isinstance(e.get("monitor"), dict)), None)
        info = info or (self.metrics or {}).get("monitor") or {}
        m = _MONITOR_KEY.match(key or "")
        steps = info.get("steps") or (int(m.group(1)) if m else 5)
        eps = info.get("eps") or next((str(e["pgd_eps"]) for e in self.epochs if e.get("pgd_eps")), None)
        text = f"PGD-{steps}" + (f" @ {eps}" if eps else "")
        if info.get("split") or info.get("samples"):
            text += f", {info.get('split', '?')} {info.get('samples', '?')}"
        return text

    @property
    def best_epoch(self) -> int | None:
        best = (self.metrics or {}).get("best")
        if isinstance(best, dict) and best.get("epoch") is not None:
            return int(best["epoch"]) + 1
        return None

    def series(self, key: str) -> dict[int, float]:
        """Per-epoch values of ``key`` (1-based epoch -> value), non-finite values left out."""
        return {int(e["epoch"]) + 1: float(e[key]) for e in self.epochs
                if "epoch" in e and _finite(e.get(key))}


@dataclass
class Configuration:
    """Runs that differ only in their seed (and non-semantic options): one table row."""

    name: str
    runs: list[RunSummary]
    options: dict[str, Any]

    @property
    def seeds(self) -> str:
        return ", ".join(str(r.seed) if r.seed is not None else "?" for r in self.runs)


@dataclass
class Row:
    """One table row: a configuration's runs that share one measurement source."""

    name: str
    config: Configuration
    runs: list[RunSummary]
    measurements: list[Measurement]
    note: int | None = None  # footnote number, when the configuration's sources differ

    @property
    def first(self) -> Measurement:
        return self.measurements[0]


# --------------------------------------------------------------------------- reading


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    text = read_text(path)
    if text is None:
        return []
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = parse_json(line, f"{path}:{i}")
        if not isinstance(rec, dict):
            raise SatkitError(f"{path}:{i}: expected a JSON object per line, got {short_repr(rec)}")
        try:
            _check_epoch_record(rec)
        except ValueError as e:
            raise SatkitError(f"{path}:{i}: not a sattrain epoch record ({e})") from None
        rows.append(rec)
    return rows


# --------------------------------------------------------------------------- shapes of the files

# What each kind of value must be (None is always accepted: not recorded / not measured).
_KINDS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**12, "an integer >= 0"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "num": (lambda v: _finite(v), "a finite number"),
    "num+": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "eps": (lambda v: _finite(v) and 0 <= v <= 1, "a finite number in [0, 1]"),
    # a score: accuracy or mAP, a fraction
    "score": (lambda v: _finite(v) and 0 <= v <= 1, "a score in [0, 1]"),
    # a per-epoch score may be NaN (mAP with no positive sample in the monitor's subset)
    "score~": (lambda v: _is_number(v) and (math.isnan(v) or 0 <= v <= 1), "a score in [0, 1] or NaN"),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _want(d: dict[str, Any], key: str, kind: str, where: str = "") -> None:
    """Raise ValueError unless ``d[key]`` is absent, None or of ``kind`` (see _KINDS)."""
    v = d.get(key)
    if v is None:
        return
    ok, text = _KINDS[kind]
    if not ok(v):
        raise ValueError(f"{where}{key!r} is {short_repr(v)}; expected {text} or null")


def _want_rows(d: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    """``d[key]`` as a list of objects (absent or None: [])."""
    _want(d, key, "list", where)
    rows = d.get(key) or []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}{key}[{i}] is {short_repr(row)}; expected an object")
    return rows


def _check_epoch_record(rec: dict[str, Any]) -> None:
    """A metrics.jsonl line: what the report reads of it, typed (ValueError otherwise)."""
    if "epoch" not in rec:
        raise ValueError("no 'epoch'")
    _want(rec, "epoch", "int")
    if rec["epoch"] is None:
        raise ValueError("'epoch' is null")
    for key in rec:
        if key in ("train_acc", "clean_acc", "pgd_acc") or _MONITOR_KEY.match(key):
            _want(rec, key, "score~")
    _want(rec, "seconds", "num+")
    _want(rec, "images_per_s", "num+")
    _want(rec, "samples", "int")
    _want(rec, "replays", "int")
    _want(rec, "attack_share", "score")
    _want(rec, "monitor", "dict")
    _want(rec, "metric", "str")


def _check_config(data: dict[str, Any]) -> None:
    """config.json: the options the report groups and labels runs by (ValueError otherwise)."""
    _want(data, "options", "dict")
    _want(data, "store", "dict")
    opts = data.get("options") or {}
    for key in ("method", "model"):
        _want(opts, key, "str", "options: ")
    _want(opts, "maps", "strs", "options: ")
    for key in ("epochs", "steps", "replays"):
        _want(opts, key, "int", "options: ")
    if opts.get("seed") is not None and not (isinstance(opts["seed"], int) and not isinstance(opts["seed"], bool)
                                             and abs(opts["seed"]) < 2**64):
        raise ValueError(f"options: 'seed' is {short_repr(opts['seed'])}; expected an integer or null")


def _check_metrics(data: dict[str, Any]) -> None:
    """metrics.json (today's and the old format): what the report reads of it (ValueError otherwise)."""
    for key in ("method", "model", "metric", "eval_split"):
        _want(data, key, "str")
    _want(data, "maps", "strs")
    _want(data, "epochs", "int")
    _want(data, "eval_samples", "int")
    for key in ("best", "last", "monitor", "summary", "robust_acc", "attack"):
        _want(data, key, "dict")
    _want(data.get("best") or {}, "epoch", "int", "best: ")
    _want(data, "clean_acc", "score")
    for key in (data.get("robust_acc") or {}):
        _want(data["robust_acc"], key, "score", "robust_acc: ")


def _check_eval(data: dict[str, Any]) -> None:
    """An eval.json / eval-paper.json / summary.json (or metrics.json's summary): every field the
    report reads, typed, so that no malformed file reaches the tables (ValueError otherwise)."""
    for key in ("protocol", "split", "metric", "protocol_description"):
        _want(data, key, "str")
    _want(data, "version", "int")
    _want(data, "samples", "int")
    _want(data, "split_size", "int")
    _want(data, "complete", "bool")
    _want(data, "clean", "score")
    _want(data, "robust", "dict")
    for key in (data.get("robust") or {}):
        _want(data["robust"], key, "score", "robust: ")
        m = _EPS_KEY.match(key)
        if m and not float(m.group(1)) <= 255:
            raise ValueError(f"robust: key {key[:40]!r} is not an eps in [0, 255]/255")
    if "pgd" in data:
        _want(data, "pgd", "dict")
        p = data.get("pgd") or {}
        if "results" not in p:
            raise KeyError("results")
        for row in _want_rows(p, "results", "pgd: "):
            if row.get("eps") is None:
                raise ValueError("pgd: a result has no 'eps'")
            _want(row, "eps", "eps", "pgd: results: ")
            _want(row, "value", "score", "pgd: results: ")
        _want(p, "steps", "int", "pgd: ")
        _want(p, "restarts", "int", "pgd: ")
        _want(p, "step_fraction", "num+", "pgd: ")
        if p.get("step_fraction") == 0:
            raise ValueError("pgd: 'step_fraction' is 0")
        _want(p, "step_size", "eps", "pgd: ")
        for key in ("step_label", "loss"):
            _want(p, key, "str", "pgd: ")
    if "autoattack" in data:
        _want(data, "autoattack", "dict")
        a = data.get("autoattack") or {}
        if not isinstance(a.get("eps_label"), str):
            raise ValueError(f"autoattack: 'eps_label' is {short_repr(a.get('eps_label'))}; expected a string")
        _want(a, "value", "score", "autoattack: ")
        for key in ("package", "version", "norm"):
            _want(a, key, "str", "autoattack: ")
        _want(a, "attacks", "strs", "autoattack: ")
    if "cw" in data:
        _want(data, "cw", "dict")
        c = data.get("cw") or {}
        _want(c, "value", "score", "cw: ")
        _want(c, "median_l2", "num+", "cw: ")
    _want(data, "headline", "dict")
    h = data.get("headline") or {}
    _want(h, "value", "score", "headline: ")
    _want(h, "name", "str", "headline: ")
    _want(data, "sanity", "dict")
    sanity = data.get("sanity") or {}
    _want(sanity, "passed", "bool", "sanity: ")
    _want_rows(sanity, "checks", "sanity: ")
    _want(data, "distortions", "dict")
    for name in (data.get("distortions") or {}):
        for row in _want_rows(data["distortions"], name, "distortions: "):
            _want(row, "value", "score", f"distortions: {name}: ")
            for key in ("level", "sigma", "radius", "fraction"):
                _want(row, key, "num", f"distortions: {name}: ")


def _value(d: dict[str, Any], key: str) -> float | None:
    """A score or None; anything else is a malformed file (TypeError, caught by the caller)."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{key!r} is {v!r}, not a number")
    return float(v)


def _eps_label(e: float) -> str:
    return f"{e:g}/255"


def _pgd_settings(p: dict[str, Any]) -> str:
    if p.get("step_label"):
        step = str(p["step_label"])
    elif p.get("step_fraction"):
        step = f"eps/{1 / float(p['step_fraction']):g}"
    elif p.get("step_size") is not None:
        step = _eps_label(round(float(p["step_size"]) * 255, 4))
    else:
        step = "?"
    restarts = int(p.get("restarts", 1))
    return f"PGD {p['steps']} steps of {step}, {restarts} random start{'s' if restarts != 1 else ''}, " \
           f"{p.get('loss', 'ce')} loss"


def _measurement_from_eval(data: dict[str, Any], file: str) -> Measurement:
    """An eval.json / eval-paper.json / summary.json dict (version 1, 2 or 3) as a Measurement."""
    _check_eval(data)
    version = data.get("version", 1)
    protocol = str(data.get("protocol") or "paper")  # version 1 predates protocols: it was the paper's
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    pgd: dict[float, float | None] = {}
    settings = []
    pgd_settings = None
    if "pgd" in data:
        p = data["pgd"]
        for row in p["results"]:
            pgd[round(float(row["eps"]) * 255, 6)] = _value(row, "value")
        pgd_settings = _pgd_settings(p)
        settings.append(pgd_settings)
    else:
        for key, v in (data.get("robust") or {}).items():
            m = _EPS_KEY.match(key)
            if m:
                pgd[float(m.group(1))] = None if v is None else float(v)
    aa_settings = None
    if "autoattack" in data:
        a = data["autoattack"]
        _value(a, "value")
        pkg = " ".join(str(x) for x in (a.get("package"), a.get("version")) if x)
        attacks = ", ".join(a.get("attacks") or [])
        aa_settings = (f"AutoAttack {a.get('norm', 'Linf')} {a['eps_label']}"
                       + (f" ({pkg}{'; ' + attacks if attacks else ''})" if pkg or attacks else ""))
        settings.append(f"AutoAttack {a['eps_label']} {a.get('version', '')}".strip())
    cw = cw_med = None
    cw_settings = None
    if "cw" in data:
        c = data["cw"]
        cw, cw_med = _value(c, "value"), _value(c, "median_l2")
        c0, lr = c.get("initial_c", c.get("c")), c.get("lr")
        cw_settings = (f"CW-L2 {c.get('steps', '?')} Adam steps x {c.get('search_steps', 1)} binary-search step(s)"
                       + (f", initial c {c0:g}" if _finite(c0) else "") + (f", lr {lr:g}" if _finite(lr) else ""))
    headline = data.get("headline")
    h_name = h_value = None
    if isinstance(headline, dict):
        h_name, h_value = str(headline.get("name")), _value(headline, "value")
    elif pgd:  # version 1 and old summaries: the paper's headline, PGD at the largest eps
        top = max(pgd)
        h_name, h_value = f"pgd@{_eps_label(top)}", pgd[top]
    sanity = data.get("sanity")
    passed: bool | None = None
    failed: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    if isinstance(sanity, dict):
        checks = [c for c in sanity.get("checks", []) if isinstance(c, dict)]
        failed = tuple(str(c.get("name")) for c in checks if not c.get("passed"))
        details = tuple(f"{c.get('name')}: {c.get('detail', '')}" for c in checks if not c.get("passed"))
        passed = bool(sanity.get("passed", not failed)) and not failed
    dist = data.get("distortions") or {}
    if not isinstance(dist, dict):
        raise TypeError("'distortions' is not an object")
    for name, rows in dist.items():
        for row in rows:
            _value(row, "value")
    samples = data.get("samples")
    return Measurement(
        protocol=protocol, file=file, split=data.get("split"),
        samples=None if samples is None else int(samples),
        split_size=None if data.get("split_size") is None else int(data["split_size"]),
        complete=data.get("complete"), metric=str(data.get("metric") or "accuracy"),
        clean=_value(data, "clean"), pgd=pgd, settings="; ".join(settings),
        description=str(data.get("protocol_description") or ""), pgd_settings=pgd_settings,
        headline_name=h_name, headline=h_value, cw=cw, cw_median_l2=cw_med, cw_settings=cw_settings,
        autoattack_settings=aa_settings, distortions=dist, sanity_passed=passed, sanity_failed=failed,
        sanity_details=details,
        note="; ".join(n for n in (
            "eval.json version 1 (written before protocols were named; it was the paper protocol)"
            if version == 1 and "protocol" not in data and file != METRICS_JSON else "",
            "selection-biased: best.pt, chosen on the split evaluated" if data.get("selection") else "") if n),
    )


def _parse_eval(path: Path, data: dict[str, Any], file: str) -> Measurement:
    try:
        return _measurement_from_eval(data, file)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise SatkitError(f"{path}: not a sattrain evaluation ({what})") from None


def _summary_measurement(run_dir: Path, metrics: dict[str, Any]) -> Measurement | None:
    """The end-of-run strong summary: summary.json when present, else metrics.json's "summary" entry."""
    summary = metrics.get("summary")
    if not isinstance(summary, dict):
        return None
    full = read_json(run_dir / SUMMARY_JSON)
    if full is not None:
        return _parse_eval(run_dir / SUMMARY_JSON, full, SUMMARY_JSON)
    data = {**summary, "version": 2, "protocol": summary.get("protocol") or "strong",
            "split_size": summary.get("split_size")}  # recorded by runs of today on
    data.setdefault("metric", metrics.get("metric"))
    m = _parse_eval(run_dir / METRICS_JSON, data, SUMMARY_JSON)
    return replace(m, note="end-of-run summary as metrics.json records it (summary.json is missing: "
                           "attack settings unknown)")


def _old_metrics_measurement(path: Path, metrics: dict[str, Any]) -> Measurement | None:
    """Old metrics.json (``robust_acc``): the paper's PGD-5 on a held-out subset at the end of training."""
    robust = metrics.get("robust_acc")
    if not isinstance(robust, dict) or not robust:
        return None
    att = metrics.get("attack") or {}
    settings = f"PGD {att.get('steps', 5)} steps of {att.get('step_size', '2/255')}, 1 random start, " \
               f"{att.get('loss', 'ce')} loss"
    data = {"protocol": "paper", "split": metrics.get("eval_split"), "samples": metrics.get("eval_samples"),
            "split_size": None, "complete": False, "metric": metrics.get("metric"), "clean": metrics.get("clean_acc"),
            "robust": robust}
    m = _parse_eval(path, data, METRICS_JSON)
    return replace(m, settings=settings, pgd_settings=settings,
                   note="old metrics.json: end-of-training PGD on a held-out subset (paper protocol)")


def load_run(path: str | Path, label: str | None = None) -> RunSummary:
    """Read one run directory; raises SatkitError if it holds none of the run files.

    Collects at most one :class:`Measurement` per protocol: eval.json (strong, or paper
    for version 1), eval-paper.json, the end-of-run summary (strong, a subset) and old
    metrics.json robust numbers (paper, a subset); of several for one protocol the full
    split, then the most samples, then an eval file wins.
    """
    p = Path(path)
    if not p.is_dir():
        raise SatkitError(f"{p}: not a run directory")
    config = read_json(p / CONFIG_JSON) or {}
    _checked(p / CONFIG_JSON, _check_config, config)
    epochs = _read_jsonl(p / METRICS_JSONL)
    metrics = read_json(p / METRICS_JSON)
    if metrics is not None:
        _checked(p / METRICS_JSON, _check_metrics, metrics)
    found: list[Measurement] = []
    for name in (EVAL_JSON, PAPER_EVAL_JSON):
        data = read_json(p / name)
        if data is not None:
            m = _parse_eval(p / name, data, name)
            if name == PAPER_EVAL_JSON and m.protocol != "paper":
                raise SatkitError(f"{p / name}: protocol is {m.protocol!r}, but this file name is for the paper protocol")
            found.append(m)
    if metrics is not None:
        for m in (_summary_measurement(p, metrics), _old_metrics_measurement(p / METRICS_JSON, metrics)):
            if m is not None:
                found.append(m)
    by_protocol: dict[str, Measurement] = {}
    for m in sorted(found, key=lambda m: m.rank):
        by_protocol.setdefault(m.protocol, m)
    run = RunSummary(path=p, label=label or p.name, config=config, epochs=epochs, metrics=metrics,
                     measurements={k: by_protocol[k] for k in PROTOCOLS if k in by_protocol})
    if not config and not epochs and metrics is None and not found:
        raise SatkitError(f"{p}: no config.json, metrics.jsonl, metrics.json or eval.json: not a sattrain run directory")
    return run


def _checked(path: Path, check: Any, data: dict[str, Any]) -> None:
    """``check(data)``, its ValueError as SatkitError naming the file."""
    try:
        check(data)
    except (ValueError, TypeError, KeyError) as e:
        raise SatkitError(f"{path}: not a sattrain run file ({e})") from None


def _labels(paths: list[Path]) -> list[str]:
    """Run names for the legend: the directory name, with parents added until they are unique."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > 8:
            return names
        depth += 1


# --------------------------------------------------------------------------- configurations


def config_key(run: RunSummary) -> str:
    """The run's configuration as canonical JSON: options minus :data:`NON_SEMANTIC`, plus the store's identity.

    A run without options (no config.json) is a configuration of its own.
    """
    opts = run.options
    if not opts:
        return json.dumps({"run": str(run.path.resolve())})
    semantic = {k: v for k, v in opts.items() if k not in NON_SEMANTIC}
    store = run.config.get("store") if isinstance(run.config.get("store"), dict) else {}
    semantic["store"] = store.get("digest") or store.get("dataset") or opts.get("store")
    return json.dumps(semantic, sort_keys=True, default=str)


def _config_name(runs: list[RunSummary]) -> str:
    if len(runs) == 1:
        return runs[0].label
    stripped = {_SEED_SUFFIX.sub("", r.label) for r in runs}
    if len(stripped) == 1 and next(iter(stripped)):
        return next(iter(stripped))
    return f"{runs[0].label} +{len(runs) - 1}"


def group_runs(runs: list[RunSummary], aggregate: bool = True) -> list[Configuration]:
    """Configurations in order of first appearance; without ``aggregate``, one per run."""
    groups: dict[str, list[RunSummary]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(config_key(r) if aggregate else str(i), []).append(r)
    configs = []
    names: set[str] = set()
    for key, members in groups.items():
        name = _config_name(members)
        base, k = name, 2
        while name in names:
            name, k = f"{base} #{k}", k + 1
        names.add(name)
        opts = json.loads(key) if aggregate else json.loads(config_key(members[0]))
        configs.append(Configuration(name=name, runs=members, options=opts))
    return configs


def _differing_options(configs: list[Configuration]) -> dict[str, str]:
    """Per configuration name, the options whose values differ between configurations (``lr=0.1, method=sat``)."""
    keys = sorted({k for c in configs for k in c.options if k != "run"})
    varying = [k for k in keys if len({json.dumps(c.options.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    out = {}
    for c in configs:
        if "run" in c.options:  # no config.json: nothing known to compare
            out[c.name] = "unknown (no config.json)"
            continue
        parts = [f"{k}={_short(c.options.get(k))}" for k in varying]
        out[c.name] = ", ".join(parts) if parts else "-"
    return out


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "[" + ",".join(_short(x) for x in v) + "]"
    if isinstance(v, str) and len(v) > 16:
        return v[:12] + "..."
    return str(v)


def _rows(configs: list[Configuration], protocol: str, notes: list[str]) -> list[Row]:
    """Table rows of one protocol: per configuration, one row per distinct measurement source.

    Sources that differ within a configuration (split, samples, attack settings) are never
    averaged: each gets a row, and a footnote (appended to ``notes``) says why.
    """
    rows = []
    for c in configs:
        parts: dict[tuple[Any, ...], list[RunSummary]] = {}
        for r in c.runs:
            m = r.measurements.get(protocol)
            if m is not None:
                parts.setdefault(m.key, []).append(r)
        note = None
        if len(parts) > 1:
            notes.append(f"`{c.name}`: its seeds were evaluated on different sources ("
                         + "; ".join(f"{', '.join(f'`{r.label}`' for r in rs)}: {rs[0].measurements[protocol].source}"
                                     for rs in parts.values())
                         + "), shown as separate rows, not averaged.")
            note = len(notes)
        for members in parts.values():
            rows.append(Row(name=c.name, config=c, runs=members,
                            measurements=[r.measurements[protocol] for r in members], note=note))
    return rows


# --------------------------------------------------------------------------- statistics and formatting


def mean_std(values: Iterable[float | None]) -> tuple[float, float | None, int] | None:
    """(mean, sample standard deviation (n - 1; None for one value), n) of the finite values; None if none."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, None, 1
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var), len(vals)


def _pct(v: float | None) -> str:
    return "-" if not _finite(v) else f"{100 * float(v):.2f}"  # type: ignore[arg-type]


def _cell(values: Sequence[float | None], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` (one value: the value); ``(n=k)`` when only k of the runs have the number."""
    st = mean_std(values)
    if st is None:
        return "-"
    mean, std, n = st
    text = f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")
    return text + (f" (n={n})" if n < len(values) else "")


def _escape(text: str) -> str:
    """A table cell: pipes escaped, line breaks as spaces (a name must not break the table)."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _sanity_cell(row: Row) -> str:
    known = [m for m in row.measurements if m.sanity_passed is not None]
    if not known:
        return "not run"
    failed: dict[str, list[str]] = {}
    for r, m in zip(row.runs, row.measurements):
        for name in m.sanity_failed:
            failed.setdefault(name, []).append(f"seed {r.seed}" if r.seed is not None else r.label)
    if not failed and all(m.sanity_passed for m in known):
        return "ok" + ("" if len(known) == len(row.measurements) else f" ({len(known)} of {len(row.measurements)} checked)")
    if not failed:
        return "FAILED"
    if len(row.runs) == 1:
        return f"FAILED ({', '.join(failed)})"
    return "FAILED (" + "; ".join(f"{n}: {', '.join(who)}" for n, who in failed.items()) + ")"


def _headline_name(name: str | None) -> str:
    if not name:
        return "-"
    return (name.replace("autoattack+pgd@", "AutoAttack+PGD ").replace("autoattack@", "AutoAttack ")
            .replace("pgd@", "PGD "))


def _table(rows: list[Row], per_run: bool) -> list[str]:
    """A markdown table of one protocol's rows (configurations, or runs with ``per_run``)."""
    eps_all = sorted({e for row in rows for m in row.measurements for e in m.pgd})
    has_cw = any(m.cw is not None for row in rows for m in row.measurements)
    head = ["run" if per_run else "configuration", "method", "model", "map", "epochs", "seed" if per_run else "n",
            "metric", "protocol", "source", "clean", "headline"]
    head += [f"PGD {_eps_label(e)}" for e in eps_all]
    if has_cw:
        head += ["CW-L2", "CW median L2"]
    head += ["sanity"]
    align = ["---"] * 9 + ["---:"] * (2 + len(eps_all) + (2 if has_cw else 0)) + ["---"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        r0, m0, ms = row.runs[0], row.first, row.measurements
        failed = any(m.sanity_failed or m.sanity_passed is False for m in ms)
        name = ("⚠ " if failed else "") + f"`{row.name}`" + (f" [{row.note}]" if row.note else "")
        head_names = {m.headline_name for m in ms}
        headline = (f"{_cell([m.headline for m in ms])} ({_headline_name(m0.headline_name)})"
                    if len(head_names) == 1 and m0.headline_name else "-")
        cells = [name, r0.method, r0.model, r0.maps, str(r0.n_epochs or "-"),
                 str(r0.seed if r0.seed is not None else "-") if per_run else str(len(row.runs)),
                 m0.metric, m0.protocol_label, m0.source, _cell([m.clean for m in ms]), headline]
        cells += [_cell([m.pgd.get(e) for m in ms]) for e in eps_all]
        if has_cw:
            cells += [_cell([m.cw for m in ms]), _cell([m.cw_median_l2 for m in ms], scale=1.0, digits=3)]
        cells.append(_sanity_cell(row))
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines


def _training_table(runs: list[RunSummary]) -> list[str]:
    """Per run: epochs, speed and the held-out monitor (labelled as monitoring, never as robustness)."""
    lines = ["| run | seed | epochs | s/epoch | monitor (not robustness) | last clean (monitor) | "
             "last monitor | best epoch (by monitor) |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in runs:
        key = r.monitor_key
        clean = r.series("clean_acc")
        mon = r.series(key) if key else {}
        last_clean = clean[max(clean)] if clean else None
        last_mon = mon[max(mon)] if mon else None
        spe = r.seconds_per_epoch
        cells = [f"`{r.label}`", "-" if r.seed is None else str(r.seed), str(r.n_epochs or "-"),
                 "-" if spe is None else f"{spe:.1f}", f"{r.monitor_label} (`{key}`)" if key else "-",
                 _pct(last_clean), _pct(last_mon), "-" if r.best_epoch is None else str(r.best_epoch)]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines


def _protocol_section(runs: list[RunSummary], protocols: list[str]) -> list[str]:
    """What each protocol measured: its description, then per source and attack settings the runs
    evaluated that way (one bullet for the seeds of a study, not one per run), then sanity failures."""
    lines: list[str] = []
    for proto in protocols:
        with_p = [r for r in runs if proto in r.measurements]
        descriptions = list(dict.fromkeys(r.measurements[proto].description for r in with_p
                                          if r.measurements[proto].description))
        if not descriptions and proto == "paper":
            descriptions = [_PAPER_DESCRIPTION]
        lines += [f"### {PROTOCOL_LABELS[proto].capitalize()}", ""]
        lines += [f"{d[0].upper()}{d[1:]}." for d in descriptions] + ([""] if descriptions else [])
        groups: dict[str, list[str]] = {}
        for r in with_p:
            m = r.measurements[proto]
            parts = [m.source] + [s for s in (m.autoattack_settings, m.pgd_settings, m.cw_settings, m.note) if s]
            groups.setdefault("; ".join(parts), []).append(f"`{r.label}`")
        lines += [f"- {', '.join(who)} ({PROTOCOL_LABELS[proto]}): {text}." for text, who in groups.items()]
        for r in with_p:
            for d in r.measurements[proto].sanity_details:
                lines.append(f"- `{r.label}`: sanity check FAILED: {d}")
        lines.append("")
    lines += ["### Held-out monitor", "",
              "The per-epoch held-out number (`pgd<N>_monitor`; `pgd_acc` in old runs) is a few weak PGD steps on a "
              "small held-out subset, for watching a run and choosing best.pt. It overstates robustness and is not "
              "a robustness measure: it appears only in the training table and the per-epoch plot.", ""]
    return lines


# --------------------------------------------------------------------------- plots


def _new_figure(ncols: int, width_per: float = 4.6, height: float = 3.8) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_per * ncols, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save_figure(fig: Any, dest: Path) -> None:
    """A PNG written aside and renamed into place (never through a link planted at its name)."""
    from satdata.atomic import atomic_write

    atomic_write(dest, lambda f: fig.savefig(f, format="png"))


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)


def _colors(configs: list[Configuration]) -> dict[str, Any]:
    """One colour per configuration, the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(configs) <= 10 else "tab20"]
    return {c.name: cmap(i % cmap.N) for i, c in enumerate(configs)}


def _legend(fig: Any, axes: Any) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8, frameon=False)


def _metric_name(runs: Iterable[RunSummary]) -> str:
    return "mAP" if all(r.metric == "mAP" for r in runs) else "accuracy"


def _curve(ax: Any, points: dict[float, list[float | None]], color: Any, label: str, **kw: Any) -> bool:
    """Mean (and ± std error bars when there are several values) of each x; False when nothing to draw."""
    xs, ys, es = [], [], []
    for x in sorted(points):
        st = mean_std(points[x])
        if st is not None:
            xs.append(x)
            ys.append(100 * st[0])
            es.append(100 * (st[1] or 0.0))
    if not xs:
        return False
    if any(es):
        ax.errorbar(xs, ys, yerr=es, color=color, marker="o", ms=4, lw=1.6, capsize=3, label=label, **kw)
    else:
        ax.plot(xs, ys, color=color, marker="o", ms=4, lw=1.6, label=label, **kw)
    return True


def _plot_epochs(configs: list[Configuration], dest: Path) -> bool:
    """Train / held-out clean / held-out monitor per epoch; a configuration's mean with a ± std band."""
    from matplotlib.ticker import MaxNLocator

    runs = [r for c in configs for r in c.runs if r.epochs]
    if not runs:
        return False
    steps = sorted({r.monitor_label.split(" ")[0] for r in runs if r.monitor_key})
    fig, axes = _new_figure(3, height=4.2)
    colors = _colors(configs)
    metric = _metric_name(runs)
    panels = [("train_acc", "train (perturbed batches)"), ("clean_acc", "held-out clean (monitor subset)"),
              (None, f"held-out monitor ({'/'.join(steps) or 'PGD'}, not a robustness measure)")]
    for ax, (key, title) in zip(axes, panels):
        for c in configs:
            members = [r for r in c.runs if r.epochs]
            series = [r.series(key or r.monitor_key or "") for r in members]
            common = set.intersection(*(set(s) for s in series)) if series else set()
            if not common:
                continue
            xs = sorted(common)
            stats = [mean_std([s[x] for s in series]) for x in xs]
            ys = [100 * st[0] for st in stats if st]
            lab = c.name + (f" (n={len(members)})" if len(members) > 1 else "")
            ax.plot(xs, ys, color=colors[c.name], marker="o" if len(xs) <= 30 else None, ms=3, lw=1.6, label=lab)
            if len(members) > 1:
                sd = [100 * (st[1] or 0.0) for st in stats if st]
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                color=colors[c.name], alpha=0.2, lw=0)
        _style(ax, title, "epoch", f"{metric} (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, axes)
    fig.suptitle(f"{metric} per epoch (mean ± std over seeds where n > 1)", fontsize=12)
    _save_figure(fig, dest)
    return True


def _plot_eps(configs: list[Configuration], protocols: list[str], dest: Path) -> bool:
    """PGD robust accuracy against eps: one panel per protocol (never mixed), error bars over seeds."""
    from matplotlib.lines import Line2D

    panels = []
    for proto in protocols:
        rows = [row for row in _rows(configs, proto, []) if any(m.pgd for m in row.measurements)]
        if rows:
            panels.append((proto, rows))
    if not panels:
        return False
    fig, axes = _new_figure(len(panels), width_per=6.0, height=5.0)
    colors = _colors(configs)
    for ax, (proto, rows) in zip(axes, panels):
        metric = _metric_name(r for row in rows for r in row.runs)
        drew_aa: set[str] = set()  # the kinds of headline drawn as stars
        for i, row in enumerate(rows):
            ms = row.measurements
            points: dict[float, list[float | None]] = {0.0: [m.clean for m in ms]}
            for e in sorted({e for m in ms for e in m.pgd}):
                points[e] = [m.pgd.get(e) for m in ms]
            n = f"n={len(ms)}, " if len(ms) > 1 else ""
            same = [r for r in rows if r.name == row.name]
            style = {"ls": "--"} if len(same) > 1 and same.index(row) > 0 else {}
            _curve(ax, points, colors[row.name], f"{row.name} ({n}{row.first.source})", **style)
            name = row.first.headline_name or ""
            if _is_autoattack_headline(name):
                m = _EPS_KEY.match("pgd@" + name.partition("@")[2])
                st = mean_std([m_.headline for m_ in ms])
                if m and st is not None:
                    ax.errorbar([float(m.group(1))], [100 * st[0]], yerr=[100 * (st[1] or 0.0)], color=colors[row.name],
                                marker="*", ms=11, ls="none", capsize=3)
                    drew_aa.add(name.partition("@")[0])
        _style(ax, f"PGD robust {metric} ({PROTOCOL_LABELS[proto]})", "eps (Linf, x/255; 0 = clean)", f"{metric} (%)")
        handles, labels = ax.get_legend_handles_labels()
        if drew_aa:
            handles.append(Line2D([], [], color="0.3", marker="*", ms=10, ls="none"))
            labels.append(" / ".join({"autoattack": "AutoAttack", "autoattack+pgd": "AutoAttack+PGD worst case"}[k]
                                     for k in sorted(drew_aa)) + " (headline)")
        ax.legend(handles, labels, fontsize=7, loc="upper right")
    fig.suptitle("Robust accuracy against eps: one panel per protocol, mean ± std over seeds", fontsize=11)
    _save_figure(fig, dest)
    return True


def _plot_distortions(configs: list[Configuration], dest: Path) -> tuple[bool, list[str]]:
    """Contrast vs c, low-pass vs sigma, high-pass vs sigma; returns (drawn, runs with old FFT-radius sweeps)."""
    panels = [("contrast", "level", "contrast c (1 = original; 0 = flat grey)", "contrast"),
              ("lowpass", "sigma", "Gaussian sigma, px (larger = more blur)", "low-pass (Gaussian blur)"),
              ("highpass", "sigma", "Gaussian sigma, px (sweep 2.82 ... 0.5;\nsmaller keeps only finer detail)",
               "high-pass (grey minus blur)")]
    if not any(m.distortions for c in configs for r in c.runs for m in r.measurements.values()):
        return False, []  # nothing to draw: no figure (matplotlib is slow to start)
    fig, axes = _new_figure(3, height=4.4)
    colors = _colors(configs)
    old: list[str] = []
    drawn = False
    used: list[RunSummary] = []
    for c in configs:
        for proto in PROTOCOLS:  # the strong protocol's sweep when a configuration has one, else the paper's
            rows = [row for row in _rows([c], proto, []) if any(m.distortions for m in row.measurements)]
            if rows:
                break
        for row in rows:
            ms = [m for m in row.measurements if m.distortions]
            for r, m in zip(row.runs, row.measurements):
                if m.distortions and any("radius" in x and "sigma" not in x
                                         for k in ("lowpass", "highpass") for x in m.distortions.get(k, [])):
                    old.append(r.label)
            used += row.runs
            n = f"n={len(ms)}, " if len(ms) > 1 else ""
            label = f"{row.name} ({n}{ms[0].protocol_label}, {ms[0].source})"
            for ax, (name, key, _xl, _t) in zip(axes, panels):
                points: dict[float, list[float | None]] = {}
                for m in ms:
                    for x in m.distortions.get(name, []):
                        if key in x and _finite(x.get(key)):
                            points.setdefault(float(x[key]), []).append(x.get("value"))
                drawn |= _curve(ax, points, colors[row.name], label)
    if not drawn:
        return False, old
    metric = _metric_name(used)
    for ax, (_n, _k, xlabel, title) in zip(axes, panels):
        _style(ax, title, xlabel, f"{metric} (%)")
    axes[2].invert_xaxis()  # the sweep's order, 2.82 first
    _legend(fig, axes)
    fig.suptitle(f"{metric} under distortions (mean ± std over seeds)", fontsize=12)
    _save_figure(fig, dest)
    return True, old


# --------------------------------------------------------------------------- the cost frontier


@dataclass(frozen=True)
class RunCost:
    """What one run's training cost, from its metrics.jsonl and config.json.

    ``images_per_s``: training images per second of training time (the held-out check
    excluded), a Free-AT replay counted as one more image, as the trainer counts them;
    ``budget_epochs``: epochs of budget trained (epochs run x replays: a Free-AT run of
    --epochs 8 with 8 replays runs 1 pass over the data, 8 epochs of budget);
    ``passes``: forward-backward passes per training example per epoch of budget,
    ``sattrain.methods.Method.passes(steps, attack_share)`` with the run's own attack
    share (None when the method is not one this sattrain knows).
    """

    images_per_s: float | None
    train_seconds: float | None
    epochs_run: int
    budget_epochs: float | None
    replays: int
    attack_share: float | None
    passes: float | None

    @property
    def total_passes(self) -> float | None:
        """Forward-backward passes per training example over the whole run."""
        if self.passes is None or self.budget_epochs is None:
            return None
        return self.passes * self.budget_epochs


def run_cost(run: RunSummary) -> RunCost:
    """The training cost of ``run`` (see :class:`RunCost`); fields the run did not record are None."""
    imgs = secs = budget = share_w = share_n = 0.0
    replays = 1
    complete = bool(run.epochs)
    for e in run.epochs:
        n, ips = e.get("samples"), e.get("images_per_s")
        rep = e.get("replays") or 1
        replays = max(replays, int(rep))
        if not (isinstance(n, int) and n > 0 and _finite(ips) and ips > 0):
            complete = False
            continue
        imgs += n * rep
        secs += n * rep / float(ips)
        budget += rep
        if _finite(e.get("attack_share")):
            share_w += n * float(e["attack_share"])
            share_n += n
    share = share_w / share_n if share_n else None
    passes = None
    opts = run.options
    try:
        from sattrain.methods import get_method

        method = get_method(run.method)
    except SatkitError:
        method = None
    steps = opts.get("steps")
    if method is not None and (isinstance(steps, int) or not method.attacks):
        passes = method.passes(int(steps or 0), 1.0 if share is None else share)
    return RunCost(images_per_s=imgs / secs if complete and secs > 0 else None,
                   train_seconds=secs if complete else None, epochs_run=len(run.epochs),
                   budget_epochs=budget if complete else None, replays=replays, attack_share=share, passes=passes)


@dataclass
class FrontierRow:
    """One point of the frontier: a configuration's runs (one measurement source), their costs."""

    name: str
    runs: list[RunSummary]
    measurements: list[Measurement]
    costs: list[RunCost]
    pareto: tuple[str, ...] = ()  # the cost axes on whose frontier the point lies: "passes", "images/s"

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def model(self) -> str:
        return self.runs[0].model

    @property
    def headline_name(self) -> str:
        return self.measurements[0].headline_name or ""

    def stat(self, what: str) -> tuple[float, float | None, int] | None:
        """mean_std of a per-run number: clean, autoattack, pgd@E, passes, total_passes, images_per_s, train_seconds."""
        if what == "clean":
            vals = [m.clean for m in self.measurements]
        elif what == "autoattack":
            vals = [m.headline for m in self.measurements]
        elif what.startswith("pgd@"):
            e = float(what[4:])
            vals = [m.pgd.get(e) for m in self.measurements]
        elif what == "total_passes":
            vals = [c.total_passes for c in self.costs]
        else:
            vals = [getattr(c, what) for c in self.costs]
        return mean_std(vals)

    def mean(self, what: str) -> float | None:
        st = self.stat(what)
        return None if st is None else st[0]

    @property
    def budget(self) -> str:
        """Epochs of budget, and how a replaying method ran them (``8 (1 pass x 8 replays)``)."""
        c = self.costs[0]
        epochs = self.runs[0].options.get("epochs")
        text = str(epochs) if isinstance(epochs, int) else ("-" if c.budget_epochs is None else f"{c.budget_epochs:g}")
        if c.replays > 1:
            text += f" ({c.epochs_run} pass{'es' if c.epochs_run != 1 else ''} x {c.replays} replays)"
        elif isinstance(epochs, int) and c.epochs_run != epochs:
            text += f" ({c.epochs_run} run)"
        return text


@dataclass
class Frontier:
    """Robust accuracy against training cost, one point per configuration (``cost_frontier(runs)``)."""

    rows: list[FrontierRow]
    excluded: list[tuple[str, str]]  # (run label, why it is not on the frontier)
    eps: list[float]  # the PGD sweep's radii (x/255) shared by the rows

    @property
    def source(self) -> str:
        sources = list(dict.fromkeys(m.source for r in self.rows for m in r.measurements))
        return sources[0] if len(sources) == 1 else "several (see the source column)"

    def markdown(self, plot: str | None = PLOT_FRONTIER) -> list[str]:
        """The frontier's section of a report: what is plotted, the table, the per-run costs."""
        if not self.rows:
            return []
        aa = _headline_name(self.rows[0].headline_name)
        lines = [f"Robust accuracy ({aa}, strong protocol; the PGD sweep beside) against what training cost: "
                 "forward-backward passes per training example per epoch of budget (`Method.passes`: 1 for "
                 "standard, noise, sat and free, steps + 1 for pgd and fgsm-rs, steps + 2 for trades, the attack's "
                 "share of that on top of one pass for the coin methods, with the run's own attack share) and the "
                 "measured training images per second (a Free-AT replay counts as an image; the held-out check "
                 "excluded). Free-AT runs --epochs / replays passes over the data, so every method trains the same "
                 "number of images. Pareto: the point is on the frontier of that cost axis (no other point is at "
                 "least as cheap and more robust). Percentages; mean ± sample std over seeds, n seeds.", ""]
        if plot:
            lines += [f"![Robust accuracy against training cost]({plot})", ""]
        std = {r.model: r for r in self.rows if r.method == "standard"}
        pgd_cols = [f"PGD {_eps_label(e)}" for e in self.eps]
        head = ["configuration", "method", "model", "n", "epochs (budget)", "passes / example / epoch",
                "train img/s", "train s", "time vs standard", "source", "clean", aa, *pgd_cols, "sanity", "Pareto"]
        lines += ["| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] * 5 + ["---:"] * 4 + ["---"] + ["---:"] * (2 + len(pgd_cols)) + ["---", "---"]) + "|"]
        for r in self.rows:
            base = std.get(r.model)
            t, t0 = r.mean("train_seconds"), base.mean("train_seconds") if base else None
            sanity = _sanity_cell(Row(r.name, Configuration(r.name, r.runs, {}), r.runs, r.measurements))
            cells = [("⚠ " if sanity.startswith("FAILED") else "") + f"`{r.name}`", r.method, r.model, str(len(r.runs)),
                     r.budget, _cell([c.passes for c in r.costs], scale=1.0),
                     _cell([c.images_per_s for c in r.costs], scale=1.0, digits=0),
                     _cell([c.train_seconds for c in r.costs], scale=1.0, digits=1),
                     f"{t / t0:.2f}x" if t and t0 else "-", r.measurements[0].source,
                     _cell([m.clean for m in r.measurements]), _cell([m.headline for m in r.measurements])]
            cells += [_cell([m.pgd.get(e) for m in r.measurements]) for e in self.eps]
            cells += [sanity, ", ".join(r.pareto) or "-"]
            lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
        lines += ["", "### Frontier, per run", "",
                  "| run | method | seed | passes / example / epoch | attack share | epochs run | train img/s | "
                  f"train s | clean | {aa} |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            for run, m, c in zip(r.runs, r.measurements, r.costs):
                cells = [f"`{run.label}`", run.method, "-" if run.seed is None else str(run.seed),
                         "-" if c.passes is None else f"{c.passes:.2f}",
                         "-" if c.attack_share is None else f"{c.attack_share:.2f}", str(c.epochs_run),
                         "-" if c.images_per_s is None else f"{c.images_per_s:.0f}",
                         "-" if c.train_seconds is None else f"{c.train_seconds:.1f}", _pct(m.clean), _pct(m.headline)]
                lines.append("| " + " | ".join(_escape(x) for x in cells) + " |")
        if self.excluded:
            lines += ["", "Not on the frontier: " + "; ".join(f"`{_escape(lab)}` ({why})" for lab, why in self.excluded)
                      + "."]
        return lines + [""]

    def to_json(self) -> list[dict[str, Any]]:
        """The rows as plain data (mean, std, n per number; the runs and their costs)."""
        def st(r: FrontierRow, what: str) -> dict[str, Any] | None:
            s = r.stat(what)
            return None if s is None else {"mean": s[0], "std": s[1], "n": s[2]}

        return [{
            "configuration": r.name, "method": r.method, "model": r.model, "n": len(r.runs), "budget": r.budget,
            "source": r.measurements[0].source, "headline": r.headline_name, "pareto": list(r.pareto),
            **{k: st(r, k) for k in ("passes", "total_passes", "images_per_s", "train_seconds", "clean", "autoattack")},
            "pgd": {_eps_label(e): st(r, f"pgd@{e}") for e in self.eps},
            "sanity_failed": sorted({n for m in r.measurements for n in m.sanity_failed}),
            "runs": [{"run": run.label, "path": str(run.path), "seed": run.seed, "passes": c.passes,
                      "attack_share": c.attack_share, "epochs_run": c.epochs_run, "budget_epochs": c.budget_epochs,
                      "images_per_s": c.images_per_s, "train_seconds": c.train_seconds, "clean": m.clean,
                      "autoattack": m.headline} for run, m, c in zip(r.runs, r.measurements, r.costs)],
        } for r in self.rows]

    def plot(self, dest: Path, title: str | None = None) -> bool:
        """frontier.png: the headline against passes and against images/s (clean beside, the Pareto
        frontier as a grey step line), and the PGD sweep against passes; False when nothing to draw."""
        return _plot_frontier(self, dest, title)


def _pareto(points: list[tuple[float | None, float | None]], cheaper_is_lower: bool) -> set[int]:
    """Indices of the points (cost, accuracy) no other point dominates (at most as costly and
    more accurate, or cheaper and as accurate)."""
    out = set()
    for i, (c, a) in enumerate(points):
        if c is None or a is None:
            continue
        dominated = False
        for j, (c2, a2) in enumerate(points):
            if j == i or c2 is None or a2 is None:
                continue
            cheaper_or_same = c2 <= c if cheaper_is_lower else c2 >= c
            strictly = (c2 < c if cheaper_is_lower else c2 > c) or a2 > a
            if cheaper_or_same and a2 >= a and strictly:
                dominated = True
                break
        if not dominated:
            out.add(i)
    return out


def cost_frontier(runs: Sequence[RunSummary], aggregate: bool = True) -> Frontier:
    """The frontier of ``runs``: the runs with a strong-protocol AutoAttack headline and a measured
    training speed, one point per configuration and measurement source (seeds averaged when
    ``aggregate``); the others listed in ``excluded`` with the reason."""
    excluded: list[tuple[str, str]] = []
    ok: list[RunSummary] = []
    costs: dict[int, RunCost] = {}
    for r in runs:
        m = r.measurements.get("strong")
        cost = run_cost(r)
        if m is None:
            excluded.append((r.label, "no strong-protocol evaluation: run `sattrain eval`"))
        elif not _is_autoattack_headline(m.headline_name) or m.headline is None:
            excluded.append((r.label, f"its strong evaluation ({m.file}) has no AutoAttack"))
        elif cost.images_per_s is None:
            excluded.append((r.label, "no training speed (images_per_s, samples) in metrics.jsonl"))
        else:
            ok.append(r)
            costs[id(r)] = cost
    heads = [r.measurements["strong"].headline_name for r in ok]
    if len(set(heads)) > 1:  # one headline (radius, and AutoAttack alone or with PGD) per frontier: the most common
        keep = max(set(heads), key=heads.count)
        excluded += [(r.label, f"another headline ({_headline_name(h)}, not {_headline_name(keep)}): "
                      "evaluate it again with `sattrain eval`") for r, h in zip(ok, heads) if h != keep]
        ok = [r for r, h in zip(ok, heads) if h == keep]
    rows: list[FrontierRow] = []
    for row in _rows(group_runs(ok, aggregate=aggregate), "strong", []):
        rows.append(FrontierRow(row.name if not any(x.name == row.name for x in rows) else f"{row.name} ({row.first.source})",
                                row.runs, row.measurements, [costs[id(r)] for r in row.runs]))
    rows.sort(key=lambda r: (r.mean("passes") if r.mean("passes") is not None else math.inf,
                             -(r.mean("autoattack") or 0.0), r.name))
    for axis, key, lower in (("passes", "passes", True), ("images/s", "images_per_s", False)):
        front = _pareto([(r.mean(key), r.mean("autoattack")) for r in rows], cheaper_is_lower=lower)
        for i in front:
            rows[i].pareto += (axis,)
    eps = sorted(set.intersection(*(set(e for e, v in m.pgd.items() if v is not None)
                                    for r in rows for m in r.measurements))) if rows else []
    return Frontier(rows=rows, excluded=excluded, eps=eps)


def _plot_frontier(fr: Frontier, dest: Path, title: str | None = None) -> bool:
    from matplotlib.lines import Line2D

    rows = [r for r in fr.rows if r.mean("autoattack") is not None]
    if not rows:
        return False
    fig, axes = _new_figure(3, width_per=5.4, height=4.8)
    cmap_configs = [Configuration(r.name, r.runs, {}) for r in rows]
    colors = _colors(cmap_configs)
    aa = _headline_name(rows[0].headline_name)
    panels = [(axes[0], "passes", "forward-backward passes per example per epoch of budget", False),
              (axes[1], "images_per_s", "measured training images/s (log; right = cheaper)", True)]
    for ax, key, xlabel, log in panels:
        pts = []
        for r in rows:
            x, xs = r.stat(key), r.stat("autoattack")
            c = r.stat("clean")
            if x is None or xs is None:
                continue
            px, py = x[0], 100 * xs[0]
            pts.append((px, py))
            ax.errorbar([px], [py], xerr=[x[1] or 0.0], yerr=[100 * (xs[1] or 0.0)], color=colors[r.name], marker="o",
                        ms=6, capsize=3, ls="none", label=f"{r.name} (n={len(r.runs)})")
            if c is not None:  # clean accuracy beside: a hollow marker above, joined by a dotted line
                ax.plot([px, px], [py, 100 * c[0]], color=colors[r.name], ls=":", lw=1)
                ax.plot([px], [100 * c[0]], color=colors[r.name], marker="o", mfc="none", ms=6, ls="none")
            ax.annotate(r.name, (px, py), textcoords="offset points", xytext=(4, -10), fontsize=6.5,
                        color=colors[r.name])
        front = sorted((p for r, p in zip(rows, pts) if ("passes" if key == "passes" else "images/s") in r.pareto),
                       key=lambda p: p[0], reverse=log)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.5", ls="--", lw=1, zorder=0)
        if log:
            ax.set_xscale("log")
        _style(ax, f"{aa} (strong protocol) against cost", xlabel, "accuracy (%)")
    ax = axes[2]
    markers = ["v", "s", "D", "^", "P", "X", "h", "*"]
    for r in rows:
        x = r.mean("passes")
        if x is None:
            continue
        ys = [(e, r.mean(f"pgd@{e}")) for e in fr.eps]
        ys = [(e, y) for e, y in ys if y is not None]
        ax.plot([x] * len(ys), [100 * y for _e, y in ys], color=colors[r.name], lw=0.8, alpha=0.6)
        for i, (e, y) in enumerate(ys):
            ax.plot([x], [100 * y], color=colors[r.name], marker=markers[i % len(markers)], ms=5, ls="none")
    _style(ax, "PGD sweep (strong: 50 x eps/4, 2 starts) against passes",
           "forward-backward passes per example per epoch of budget", "accuracy (%)")
    ax.legend([Line2D([], [], color="0.3", marker=markers[i % len(markers)], ls="none") for i in range(len(fr.eps))],
              [f"PGD {_eps_label(e)}" for e in fr.eps], fontsize=7, loc="lower right")
    handles = [Line2D([], [], color="0.3", marker="o", ls="none"), Line2D([], [], color="0.3", marker="o", mfc="none",
                                                                          ls="none"),
               Line2D([], [], color="0.5", ls="--")]
    axes[0].legend(handles, [aa, "clean", "Pareto frontier"], fontsize=7, loc="lower right")
    _legend(fig, axes[:2])
    fig.suptitle(title or f"Robust accuracy against training cost ({fr.source}; mean ± std over seeds)", fontsize=11)
    _save_figure(fig, dest)
    return True


# --------------------------------------------------------------------------- report


def _warn_stderr(message: str) -> None:
    """The default ``warn`` of write_report: one ``warning:`` line on stderr."""
    import click

    from satdata.clikit import one_line

    click.echo(f"warning: {one_line(message)}", err=True)


def _probe(run: RunSummary) -> None:
    """Compute everything the report shows of ``run`` alone, so that a run whose files are
    well-formed JSON of the wrong shape fails here (and is skipped) rather than in the tables."""
    for prop in ("method", "model", "maps", "metric", "n_epochs", "seconds_per_epoch", "monitor_key",
                 "monitor_label", "best_epoch"):
        getattr(run, prop)
    for key in ("train_acc", "clean_acc", run.monitor_key or "clean_acc"):
        run.series(key)
    configs = group_runs([run], aggregate=True)
    _differing_options(configs)
    protocols = [p for p in PROTOCOLS if p in run.measurements]
    for proto in protocols:
        _table(_rows(configs, proto, []), per_run=False)
        _table(_rows(group_runs([run], aggregate=False), proto, []), per_run=True)
    _training_table([run])
    _protocol_section([run], protocols)
    cost_frontier([run]).markdown()


def _load_checked(path: Path, label: str) -> RunSummary:
    """load_run and _probe; any failure as SatkitError naming the run's file (or directory)."""
    try:
        run = load_run(path, label)
        _probe(run)
        return run
    except SatkitError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError,
            ZeroDivisionError) as e:
        from satdata.clikit import debug_requested

        if debug_requested():
            raise
        raise SatkitError(f"{path}: run files of an unexpected shape ({type(e).__name__}: {str(e)[:100]})") from None


def write_report(run_dirs: Sequence[str | Path], out: str | Path, aggregate: bool | None = None, *,
                 strict: bool = False, warn: Callable[[str], None] | None = None,
                 frontier: bool | None = None) -> Path:
    """Read the runs, write ``out/report.md`` and its PNGs; return the report's path.

    ``aggregate``: one row per configuration (mean ± std over seeds) when True, one per run
    when False; None (the default) aggregates when some configuration has several seeds.

    ``frontier``: the section "Robust accuracy against training cost" and frontier.png
    (:func:`cost_frontier`). None (the default): when some run has a strong evaluation with
    AutoAttack and a measured training speed; True: always, SatkitError when no run has
    both; False: never.

    A run directory whose files cannot be read or are malformed (see the module docstring)
    is skipped: ``warn`` gets one line naming the file and the reason (default: a
    ``warning:`` line on stderr), report.md lists it under "Skipped runs", and the other
    runs are reported. With ``strict`` the first such run raises SatkitError instead. When
    no run can be read, SatkitError: that run's reason (one run), or a count (several, each
    warned about first).

    >>> write_report(["runs/sat-s0", "runs/sat-s1", "runs/std"], "reports/cifar10")   # doctest: +SKIP
    PosixPath('reports/cifar10/report.md')
    """
    if not run_dirs:
        raise SatkitError("report: give at least one run directory")
    warn = warn or _warn_stderr
    paths = [Path(p) for p in run_dirs]
    seen: dict[Path, Path] = {}
    for p in paths:  # one run counted twice would be two seeds of its configuration
        key = p.resolve()
        if key in seen:
            raise SatkitError(f"RUN_DIRS: {p} is given twice" + (f" (also as {seen[key]})" if seen[key] != p else "")
                              + "; give each run directory once")
        seen[key] = p
    labels = _labels(paths)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SatkitError(f"--out: {out} exists and is not a directory")
    runs: list[RunSummary] = []
    skipped: list[tuple[str, str]] = []
    for p, lab in zip(paths, labels):
        try:
            runs.append(_load_checked(p, lab))
        except SatkitError as e:
            if strict or len(paths) == 1:
                raise
            skipped.append((lab, str(e)))
    if not runs:
        for _lab, why in skipped:
            warn(f"{why}; run skipped")
        raise SatkitError(f"report: none of the {len(paths)} run directories could be read (see the warnings above)")
    for lab, why in skipped:
        warn(f"{why}; run skipped, the other runs are reported")
    out.mkdir(parents=True, exist_ok=True)

    by_config = group_runs(runs, aggregate=True)
    if aggregate is None:
        aggregate = any(len(c.runs) > 1 for c in by_config)
    configs = by_config if aggregate else group_runs(runs, aggregate=False)
    per_run = group_runs(runs, aggregate=False)
    protocols = [p for p in PROTOCOLS if any(p in r.measurements for r in runs)]
    fr = cost_frontier(runs, aggregate=aggregate) if frontier is not False else None
    if frontier and not (fr and fr.rows):
        raise SatkitError("--frontier: no run has both a strong evaluation with AutoAttack (`sattrain eval RUN_DIR "
                          "--store STORE`) and a training speed (images_per_s in metrics.jsonl)"
                          + (" (" + "; ".join(f"{lab}: {why}" for lab, why in fr.excluded[:3]) + ")" if fr else ""))

    lines = ["# satkit report", "",
             f"{len(runs)} run(s)" + (f" in {len(configs)} configuration(s)" if aggregate else "")
             + ". Numbers are percentages"
             + ("; a configuration's cell is the mean ± sample standard deviation (n - 1) over its seeds, "
                "n the number of seeds" if aggregate else "")
             + ". Every number is labelled with its protocol and its source (split, samples evaluated / "
               "split size, file): numbers of different protocols or sources are never averaged together. "
               "⚠ marks a failed gradient-masking sanity check: distrust that row's robust numbers.", ""]
    for proto in protocols:
        notes: list[str] = []
        rows = _rows(configs, proto, notes)
        lines += [f"## {PROTOCOL_LABELS[proto].capitalize()}", ""]
        if proto == "paper":
            lines += ["The SAT authors' PGD-5 evaluation: it overstates robustness; compare it only with the paper.", ""]
        lines += _table(rows, per_run=not aggregate) + [""]
        lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)] + ([""] if notes else [])
    unmeasured = [r for r in runs if not r.measurements]
    if unmeasured:
        lines += ["No robustness measurement (no eval.json, eval-paper.json or end-of-run summary; the held-out "
                  "monitor is not one): " + ", ".join(f"`{r.label}`" for r in unmeasured)
                  + ". Measure with `sattrain eval RUN_DIR --store STORE`.", ""]

    old_radius: list[str] = []
    plot_specs: list[tuple[str, str, Any]] = [
        (PLOT_EPOCHS, "Accuracy per epoch (held-out monitor, not a robustness measure)",
         lambda d: _plot_epochs(configs, d)),
        (PLOT_EPS, "Robust accuracy against eps, per protocol", lambda d: _plot_eps(configs, protocols, d)),
        (PLOT_DISTORTIONS, "Common distortions", None),
    ]
    for name, title, fn in plot_specs:
        if fn is None:
            drawn, old_radius = _plot_distortions(configs, out / name)
        else:
            drawn = fn(out / name)
        if drawn:
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
            if name == PLOT_DISTORTIONS and old_radius:
                lines += ["Low- and high-pass sweeps of old evaluations (FFT cut-off radii, not Gaussian sigmas) are "
                          "not plotted: " + ", ".join(f"`{x}`" for x in old_radius) + ".", ""]
        elif (out / name).exists():
            (out / name).unlink()  # a stale plot from an earlier report of other runs

    if protocols:
        lines += ["## Evaluation protocols", ""] + _protocol_section(runs, protocols)
    if aggregate:
        diff = _differing_options(configs)
        lines += ["## Configurations", "",
                  "Runs whose config.json options agree except for " + ", ".join(f"`{k}`" for k in sorted(NON_SEMANTIC))
                  + " (the store compared by content digest) form one configuration.", ""]
        lines += [f"- `{c.name}`: {len(c.runs)} run(s), seed(s) {c.seeds}: "
                  + ", ".join(f"`{r.label}`" for r in c.runs) + f"; differs in: {diff[c.name]}" for c in configs]
        lines.append("")
        if protocols:
            lines += ["## Per-run numbers", ""]
            for proto in protocols:
                lines += [f"### {PROTOCOL_LABELS[proto].capitalize()}, per run", ""]
                lines += _table(_rows(per_run, proto, []), per_run=True) + [""]
    if fr and fr.rows and fr.plot(out / PLOT_FRONTIER):
        lines += ["## Robust accuracy against training cost (the frontier)", ""] + fr.markdown(PLOT_FRONTIER)
    elif (out / PLOT_FRONTIER).exists():
        (out / PLOT_FRONTIER).unlink()  # a stale plot from an earlier report of other runs
    lines += ["## Training (held-out monitor, not a robustness measure)", ""] + _training_table(runs) + [""]
    lines += ["## Runs", ""] + [f"- `{r.label}`: `{r.path}`" for r in runs] + [""]
    if skipped:
        lines += ["## Skipped runs", "", "These run directories could not be read and are not in any table or plot:",
                  ""] + [f"- `{_escape(lab)}`: {_escape(why)}" for lab, why in skipped] + [""]
    from satdata.atomic import write_text_atomic

    dest = out / REPORT_NAME
    write_text_atomic(dest, "\n".join(lines))
    return dest
