"""Compare training runs: ``write_report(run_dirs, out)`` -> out/report.md plus PNG plots.

Reads from each run directory (the files ``sattrain run`` and ``sattrain eval`` write):

    config.json     {"options": {"method", "model", "maps", "epochs", ...}, ...}
    metrics.jsonl   one JSON object per epoch: epoch, loss, train_acc, clean_acc, pgd_acc,
                    pgd_eps, metric, seconds, ...
    metrics.json    clean_acc, robust_acc {"pgd@1/255": ..., ...}, metric, train_seconds, ...
    eval.json       (optional) the fuller evaluation of ``sattrain eval``

and writes into ``out``:

    report.md                 one table row per run, then the plots and the protocol
    accuracy_per_epoch.png    train / held-out clean / held-out PGD accuracy per epoch
    robust_vs_eps.png         robust accuracy against eps, one curve per run
    distortions.png           contrast, low-pass, high-pass sweeps (when an eval.json has them)

When a run has an eval.json its numbers (the full test split, the paper's protocol) are
the ones in the table and the eps plot; otherwise the end-of-training numbers of
metrics.json (a held-out subset) are used, and the table says which.

Plots are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas), never through
pyplot's global state, so writing a report from a long-lived process leaks nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from satdata.errors import SatkitError

__all__ = ["write_report", "RunSummary", "load_run"]

REPORT_NAME = "report.md"
PLOT_EPOCHS = "accuracy_per_epoch.png"
PLOT_EPS = "robust_vs_eps.png"
PLOT_DISTORTIONS = "distortions.png"
_EPS_KEY = re.compile(r"^pgd@(\d+(?:\.\d+)?)/255$")


@dataclass
class RunSummary:
    """What the report needs from one run directory."""

    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.config.get("options", {}))

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
            used = sorted({str(e["map"]) for e in self.epochs if e.get("map")})
            maps = used
        return ", ".join(maps) if maps else "-"

    @property
    def metric(self) -> str:
        for src in (self.eval, self.metrics, self.epochs[-1] if self.epochs else None):
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
        secs = [float(e["seconds"]) for e in self.epochs if e.get("seconds") is not None]
        return sum(secs) / len(secs) if secs else None

    @property
    def source(self) -> str:
        if self.eval is not None:
            e = self.eval
            part = "" if e.get("complete", True) else f" (subset {e.get('samples')}/{e.get('split_size')})"
            return f"eval.json: {e.get('split')}{part}"
        if self.metrics is not None:
            m = self.metrics
            return f"metrics.json: {m.get('eval_split', '?')} subset of {m.get('eval_samples', '?')}"
        return "-"

    @property
    def clean(self) -> float | None:
        if self.eval is not None:
            return self.eval.get("clean")
        if self.metrics is not None:
            return self.metrics.get("clean_acc")
        return None

    def robust_by_eps(self) -> dict[float, float]:
        """PGD robust accuracy keyed by eps (in /255 units), from eval.json or metrics.json."""
        out: dict[float, float] = {}
        if self.eval is not None and "pgd" in self.eval:
            for row in self.eval["pgd"]["results"]:
                if row.get("value") is not None:
                    out[round(float(row["eps"]) * 255, 6)] = float(row["value"])
            return out
        robust = (self.eval or {}).get("robust") or (self.metrics or {}).get("robust_acc") or {}
        for key, value in robust.items():
            m = _EPS_KEY.match(key)
            if m and value is not None:
                out[float(m.group(1))] = float(value)
        return out


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SatkitError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise SatkitError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SatkitError(f"{path}:{i}: not a JSON line ({e.msg})") from None
        if not isinstance(rec, dict):
            raise SatkitError(f"{path}:{i}: expected a JSON object per line")
        rows.append(rec)
    return rows


def load_run(path: str | Path, label: str | None = None) -> RunSummary:
    """Read one run directory; raises SatkitError if it holds none of the run files."""
    p = Path(path)
    if not p.is_dir():
        raise SatkitError(f"{p}: not a run directory")
    run = RunSummary(
        path=p,
        label=label or p.name,
        config=_read_json(p / "config.json") or {},
        epochs=_read_jsonl(p / "metrics.jsonl"),
        metrics=_read_json(p / "metrics.json"),
        eval=_read_json(p / "eval.json"),
    )
    if not run.config and not run.epochs and run.metrics is None and run.eval is None:
        raise SatkitError(f"{p}: no config.json, metrics.jsonl, metrics.json or eval.json: not a sattrain run directory")
    return run


def _labels(paths: list[Path]) -> list[str]:
    """Run names for the legend: the directory name, with parents added until they are unique."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > 8:
            return names
        depth += 1


# --------------------------------------------------------------------------- formatting


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _eps_label(e: float) -> str:
    return f"{e:g}/255"


def _table(runs: list[RunSummary]) -> list[str]:
    eps_all = sorted({e for r in runs for e in r.robust_by_eps()})
    has_cw = any(r.eval and "cw" in r.eval for r in runs)
    aa_labels = sorted({r.eval["autoattack"]["eps_label"] for r in runs if r.eval and "autoattack" in r.eval})
    head = ["run", "method", "model", "map", "epochs", "metric", "clean"]
    head += [f"PGD {_eps_label(e)}" for e in eps_all]
    if has_cw:
        head += ["CW-L2", "CW median L2"]
    head += [f"AA {lab}" for lab in aa_labels]
    head += ["s/epoch", "numbers from"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 6 + ["---:"] * (len(head) - 7) + ["---"]) + "|"]
    for r in runs:
        rob = r.robust_by_eps()
        cells = [f"`{r.label}`", r.method, r.model, r.maps, str(r.n_epochs or "-"), r.metric, _pct(r.clean)]
        cells += [_pct(rob.get(e)) for e in eps_all]
        if has_cw:
            cw = (r.eval or {}).get("cw")
            cells += [_pct(cw["value"]) if cw else "-",
                      f"{cw['median_l2']:.3f}" if cw and cw.get("median_l2") is not None else "-"]
        for lab in aa_labels:
            aa = (r.eval or {}).get("autoattack")
            cells.append(_pct(aa["value"]) if aa and aa.get("eps_label") == lab else "-")
        spe = r.seconds_per_epoch
        cells += ["-" if spe is None else f"{spe:.1f}", r.source]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _protocol(runs: list[RunSummary]) -> list[str]:
    lines = []
    for r in runs:
        if r.eval is not None:
            e = r.eval
            parts = [f"split `{e.get('split')}`, {e.get('samples')} of {e.get('split_size')} samples"]
            if "pgd" in e:
                p = e["pgd"]
                parts.append(f"PGD {p['steps']} steps of {p['step_size'] * 255:g}/255, random start, "
                             f"{p['restarts']} restart(s), {p['loss']} loss")
            if "cw" in e:
                c = e["cw"]
                parts.append(f"CW-L2 {c['steps']} Adam steps, c={c['c']:g}, lr={c['lr']:g}")
            if "autoattack" in e:
                a = e["autoattack"]
                parts.append(f"AutoAttack {a['version']} {a['norm']} {a['eps_label']} ({a.get('package', '?')})")
            lines.append(f"- `{r.label}`: " + "; ".join(parts) + ".")
        elif r.metrics is not None:
            m = r.metrics
            att = m.get("attack", {})
            how = f", PGD {att['steps']} steps of {att['step_size']}" if "steps" in att and "step_size" in att else ""
            lines.append(f"- `{r.label}`: end-of-training evaluation on {m.get('eval_samples', '?')} samples of "
                         f"`{m.get('eval_split', '?')}`{how} (run `sattrain eval` for the full test split).")
    return lines


# --------------------------------------------------------------------------- plots


def _new_figure(ncols: int, width_per: float = 4.6, height: float = 3.8) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_per * ncols, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(fig: Any, axes: Any) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=9, frameon=False)


def _plot_epochs(runs: list[RunSummary], dest: Path) -> bool:
    from matplotlib.ticker import MaxNLocator

    with_epochs = [r for r in runs if r.epochs]
    if not with_epochs:
        return False
    fig, axes = _new_figure(3)
    colors = _colors(len(runs))
    pgd_eps = sorted({str(e.get("pgd_eps")) for r in with_epochs for e in r.epochs if e.get("pgd_eps")})
    metric = "mAP" if all(r.metric == "mAP" for r in with_epochs) else "accuracy"
    unit = f"{metric} (%)"
    titles = [("train_acc", "train (perturbed batches)"), ("clean_acc", "held-out clean"),
              ("pgd_acc", "held-out PGD" + (f" @ {', '.join(pgd_eps)}" if pgd_eps else ""))]
    for ax, (key, title) in zip(axes, titles):
        for r, c in zip(runs, colors):
            pts = [(int(e["epoch"]) + 1, 100 * float(e[key])) for e in r.epochs if e.get(key) is not None and "epoch" in e]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=c, marker="o" if len(xs) <= 30 else None, ms=3, lw=1.6, label=r.label)
        _style(ax, title, "epoch", unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, axes)
    fig.suptitle(f"{metric} per epoch", fontsize=12)
    fig.savefig(dest)
    return True


def _plot_eps(runs: list[RunSummary], dest: Path) -> bool:
    curves = [(r, r.robust_by_eps()) for r in runs]
    if not any(c for _, c in curves):
        return False
    fig, axes = _new_figure(1, width_per=6.4, height=4.6)
    ax = axes[0]
    for (r, rob), c in zip(curves, _colors(len(runs))):
        if not rob:
            continue
        pts = sorted(rob.items())
        if r.clean is not None:
            pts = [(0.0, r.clean)] + pts
        xs = [e for e, _ in pts]
        ys = [100 * v for _, v in pts]
        ax.plot(xs, ys, color=c, marker="o", ms=4, lw=1.8, label=r.label)
    metric = "mAP" if all(r.metric == "mAP" for r in runs) else "accuracy"
    _style(ax, f"PGD robust {metric} (eps 0 = clean)", "eps (Linf, x/255)", f"{metric} (%)")
    ax.legend(fontsize=9, loc="best")
    fig.savefig(dest)
    return True


def _plot_distortions(runs: list[RunSummary], dest: Path) -> bool:
    with_d = [(r, c) for r, c in zip(runs, _colors(len(runs))) if r.eval and r.eval.get("distortions")]
    if not with_d:
        return False
    panels = [("contrast", "level", "contrast factor c (1 = original)", "contrast"),
              ("lowpass", "radius", "cut-off radius (cycles/image; larger keeps more)", "low-pass filtering"),
              ("highpass", "radius", "cut-off radius (cycles/image; 0 = original)", "high-pass filtering")]
    fig, axes = _new_figure(3)
    metric = "mAP" if all(r.metric == "mAP" for r, _ in with_d) else "accuracy"
    for ax, (name, key, xlabel, title) in zip(axes, panels):
        for r, c in with_d:
            rows = r.eval["distortions"].get(name, [])
            pts = sorted((float(row[key]), 100 * float(row["value"])) for row in rows if row.get("value") is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=c, marker="o", ms=4, lw=1.6, label=r.label)
        _style(ax, title, xlabel, f"{metric} (%)")
    _legend(fig, axes)
    fig.suptitle(f"{metric} under distortions", fontsize=12)
    fig.savefig(dest)
    return True


# --------------------------------------------------------------------------- report


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Read the runs, write ``out/report.md`` and its PNGs; return the report's path.

    >>> write_report(["runs/std", "runs/sat"], "reports/cifar10")     # doctest: +SKIP
    PosixPath('reports/cifar10/report.md')
    """
    if not run_dirs:
        raise SatkitError("report: give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    labels = _labels(paths)
    runs = [load_run(p, lab) for p, lab in zip(paths, labels)]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SatkitError(f"--out: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    lines = ["# satkit report", "", f"{len(runs)} run(s). Numbers are percentages.", ""]
    lines += _table(runs)
    lines.append("")
    plots = [
        (PLOT_EPOCHS, _plot_epochs, "Accuracy per epoch"),
        (PLOT_EPS, _plot_eps, "Robust accuracy against eps"),
        (PLOT_DISTORTIONS, _plot_distortions, "Common distortions"),
    ]
    for name, fn, title in plots:
        if fn(runs, out / name):
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
        elif (out / name).exists():
            (out / name).unlink()  # a stale plot from an earlier report of other runs
    protocol = _protocol(runs)
    if protocol:
        lines += ["## Evaluation protocol", ""] + protocol + [""]
    lines += ["## Runs", ""] + [f"- `{r.label}`: `{r.path}`" for r in runs] + [""]
    dest = out / REPORT_NAME
    dest.write_text("\n".join(lines))
    return dest
