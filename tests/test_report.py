"""sattrain.report: report.md and PNG plots from run directories written directly as JSON
(config.json, metrics.jsonl, metrics.json, summary.json, eval.json, eval-paper.json; no
training), in the current formats and the old ones, and the `sattrain report` command.

What is checked is what the issue "Robustness numbers a reviewer would trust" asks: every
number labelled with its protocol and source, seeds of one configuration aggregated as
mean ± std (n - 1) with n, subset and full-split numbers never averaged together, failed
sanity checks shown, the monitor never presented as robustness, old run dirs still read.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from satdata.errors import SatkitError
from sattrain.cli_eval import report_cmd
from sattrain.report import (
    PLOT_DISTORTIONS,
    PLOT_EPOCHS,
    PLOT_EPS,
    config_key,
    load_run,
    mean_std,
    write_report,
)

STRONG_EPS = (1, 2, 4, 8)
PAPER_EPS = tuple(range(1, 9))
HP_SIGMAS = (2.82, 2.0, 1.414, 1.0, 0.7, 0.5)


# --------------------------------------------------------------------------- builders


def _options(method: str, seed: int, **over: Any) -> dict[str, Any]:
    """config.json "options" as TrainConfig.to_json() writes them (a representative subset)."""
    return {"store": f"/data/{seed}/cifar10.zarr", "out": f"runs/{method}-s{seed}", "method": method, "maps": [],
            "model": "resnet10", "epochs": 4, "batch_size": 128, "recipe": "paper", "lr": None, "eps": 8 / 255,
            "steps": 5, "step_size": 2 / 255, "device": "auto", "seed": seed, "resume": False, "eval_samples": 256,
            "eval_steps": 5, "summary_samples": 500, "memory_budget": 1 << 30, "threads": None, "progress": True,
            **over}


def _eval(protocol: str, *, clean: float, slope: float, samples: int = 355, split_size: int = 355,
          failed: tuple[str, ...] = (), aa: float | None = None, version: int = 2) -> dict[str, Any]:
    """An eval.json dict of sattrain.evaluation (version 2) or, with version=1, of the old evaluate."""
    eps = STRONG_EPS if protocol == "strong" else PAPER_EPS
    rows = [{"eps": k / 255, "eps_label": f"{k}/255", "step_size": (k / 255 / 4) if protocol == "strong" else 2 / 255,
             "value": round(clean - k * slope, 6)} for k in eps]
    d: dict[str, Any] = {
        "format": "satkit-eval", "version": version, "split": "test", "samples": samples, "split_size": split_size,
        "complete": samples == split_size, "metric": "accuracy", "clean": clean,
        "robust": {f"pgd@{r['eps_label']}": r["value"] for r in rows},
        "pgd": {"steps": 50 if protocol == "strong" else 5,
                "step_size": None if protocol == "strong" else 2 / 255,
                "step_fraction": 0.25 if protocol == "strong" else None,
                "step_label": "eps/4" if protocol == "strong" else "2/255",
                "restarts": 2 if protocol == "strong" else 1, "random_start": True, "loss": "ce", "results": rows},
        "cw": {"steps": 20, "initial_c": 1e-3, "lr": 0.01, "search_steps": 9 if protocol == "strong" else 3,
               "value": 0.05, "successes": 300, "median_l2": 0.25, "mean_l2": 0.3},
        "distortions": {
            "contrast": [{"level": c, "value": clean * c, **({"identity": True} if c == 1.0 else {})}
                         for c in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)],
            "lowpass": [{"level": s, "sigma": s, "value": clean / (1 + s / 4)} for s in (1, 2, 4, 8, 16, 32)],
            "highpass": [{"level": s, "sigma": s, "value": clean * s / 3} for s in HP_SIGMAS],
        },
        "sanity": {"passed": not failed,
                   "checks": [{"name": n, "passed": n not in failed, "detail": f"detail of {n}"}
                              for n in ("pgd-reaches-eps", "monotone-in-eps", "pgd-beats-fgsm", "large-eps-near-zero")],
                   "fgsm": [], "large_eps": {}},
        "skipped": {},
    }
    if version == 1:  # the old format: no protocol, no headline, no sanity, FFT radii
        d["pgd"] = {"steps": 5, "step_size": 2 / 255, "restarts": 1, "random_start": True, "loss": "ce",
                    "results": [{k: v for k, v in r.items() if k != "step_size"} for r in rows]}
        d["cw"] = {"steps": 20, "c": 1.0, "lr": 0.01, "kappa": 0.0, "value": 0.05, "successes": 8000,
                   "median_l2": 0.25, "mean_l2": 0.3}
        d["distortions"] = {"contrast": d["distortions"]["contrast"],
                            "lowpass": [{"radius": r, "fraction": r / 16, "value": clean * r / 16} for r in (2, 4, 8)],
                            "highpass": [{"radius": r, "fraction": r / 16, "value": clean} for r in (0, 2, 4)]}
        del d["sanity"]
        return d
    d["protocol"] = protocol
    d["protocol_label"] = f"{protocol} protocol"
    d["protocol_description"] = ("AutoAttack (standard, Linf 8/255) as the headline; PGD 50 steps of eps/4"
                                 if protocol == "strong" else "the SAT authors' evaluation: PGD 5 steps of 2/255")
    if protocol == "strong":
        aa_value = aa if aa is not None else round(clean - 9 * slope, 6)
        d["autoattack"] = {"eps": 8 / 255, "eps_label": "8/255", "norm": "Linf", "engine": "reference",
                           "package": "pyautoattack", "version": "standard",
                           "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "value": aa_value}
        d["robust"]["autoattack@8/255"] = aa_value
        head = {"name": "autoattack@8/255", "value": aa_value}
    else:
        head = {"name": "pgd@8/255", "value": rows[-1]["value"]}
    d["headline"] = {**head, "protocol": protocol, "protocol_label": f"{protocol} protocol", "samples": samples,
                     "complete": samples == split_size, "metric": "accuracy"}
    return d


def _make_run(root: Path, name: str, *, method: str = "sat", seed: int = 0, epochs: int = 4, clean: float = 0.8,
              evals: dict[str, dict[str, Any]] | None = None, old: bool = False, summary: bool = False,
              options: dict[str, Any] | None = None) -> Path:
    """A run directory as `sattrain run` (and `sattrain eval`) leaves it; ``old``: the format before today."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "options": options or _options(method, seed),
        "store": {"path": "cifar10.zarr", "dataset": "cifar10", "digest": "abc123"},
    }))
    key = "pgd_acc" if old else "pgd5_monitor"
    monitor = {"key": key, "attack": "pgd", "eps": "8/255", "steps": 5, "step_size": "2/255", "split": "val",
               "samples": 256}
    lines = []
    for e in range(epochs):
        grow = 1 - math.exp(-(e + 1) / 2)
        rec = {"epoch": e, "loss": 2.0 / (e + 1), "train_acc": clean * grow, "clean_acc": clean * grow + 0.01 * seed,
               key: 0.5 * grow, "metric": "accuracy", "seconds": 10.0 + e % 2}
        if not old:
            rec["monitor"] = monitor
        else:
            rec["pgd_eps"] = "8/255"
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if old:
        (d / "metrics.json").write_text(json.dumps({
            "metric": "accuracy", "clean_acc": clean, "robust_acc": {f"pgd@{k}/255": clean - 0.05 * k for k in (1, 2, 4, 8)},
            "attack": {"name": "pgd", "steps": 5, "step_size": "2/255", "loss": "ce"},
            "eval_split": "val", "eval_samples": 512, "epochs": epochs, "method": method,
        }))
    else:
        metrics: dict[str, Any] = {
            "metric": "accuracy", "summary": None, "best": {"epoch": epochs - 2, key: 0.4, "clean_acc": 0.7},
            "last": {"epoch": epochs - 1, key: 0.39}, "monitor": monitor, "epochs": epochs, "method": method,
        }
        if summary:
            s = _eval("strong", clean=clean, slope=0.04, samples=500, split_size=5000)
            s["split"] = "val"
            (d / "summary.json").write_text(json.dumps(s))
            metrics["summary"] = {"protocol": "strong", "samples": 500, "split": "val", "complete": False,
                                  "clean": clean, "robust": s["robust"], "headline": s["headline"],
                                  "file": "summary.json"}
        (d / "metrics.json").write_text(json.dumps(metrics))
    for fname, data in (evals or {}).items():
        (d / fname).write_text(json.dumps(data))
    return d


def _tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Each markdown table under its nearest heading, as a list of {column: cell} dicts."""
    out: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in md.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                out.setdefault(heading, []).append(dict(zip(header, cells)))
        else:
            header = None
    return out


def _row(rows: list[dict[str, str]], name: str) -> dict[str, str]:
    hits = [r for r in rows if (r.get("configuration") or r.get("run", "")).strip("⚠ ").split(" [")[0] == f"`{name}`"]
    assert len(hits) == 1, (name, rows)
    return hits[0]


def _pm(values: list[float]) -> str:
    """The report's 'mean ± std' cell of fractions, computed independently (statistics.stdev is n - 1)."""
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def _nonblank_png(path: Path) -> None:
    assert path.stat().st_size > 5000
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 500 and h >= 300
        a = np.asarray(im.convert("L"))
    assert (a < 128).mean() > 0.005, f"{path.name} looks empty"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture()
def study(tmp_path: Path) -> dict[str, Any]:
    """3 seeds of sat (strong + paper evals), 1 seed of standard (strong; a failed sanity check),
    and a pgd configuration with one full and one subset strong eval."""
    root = tmp_path / "runs"
    sat_clean = [0.80, 0.83, 0.78]
    sat_slope = [0.030, 0.025, 0.035]
    sat = [_make_run(root, f"sat-s{s}", seed=s, clean=c,
                     evals={"eval.json": _eval("strong", clean=c, slope=k),
                            "eval-paper.json": _eval("paper", clean=c + 0.01, slope=k / 2)})
           for s, c, k in zip(range(3), sat_clean, sat_slope)]
    std = _make_run(root, "std", method="standard", clean=0.9,
                    evals={"eval.json": _eval("strong", clean=0.9, slope=0.1, failed=("monotone-in-eps",))})
    pgd_full = _make_run(root, "pgd-s0", method="pgd", seed=0, clean=0.7,
                         evals={"eval.json": _eval("strong", clean=0.7, slope=0.02)})
    pgd_sub = _make_run(root, "pgd-s1", method="pgd", seed=1, clean=0.72,
                        evals={"eval.json": _eval("strong", clean=0.72, slope=0.02, samples=256)})
    return {"sat": sat, "sat_clean": sat_clean, "sat_slope": sat_slope, "std": std, "pgd": [pgd_full, pgd_sub],
            "all": [*sat, std, pgd_full, pgd_sub]}


# --------------------------------------------------------------------------- tests


def test_seeds_aggregate_with_mean_std_per_protocol(study: dict[str, Any], tmp_path: Path) -> None:
    md = write_report(study["all"], tmp_path / "out").read_text()
    tables = _tables(md)
    strong, paper = tables["Strong protocol"], tables["Paper protocol"]
    clean, slope = study["sat_clean"], study["sat_slope"]
    sat = _row(strong, "sat")
    assert sat["n"] == "3" and sat["protocol"] == "strong protocol" and sat["source"] == "test 355/355 (eval.json)"
    assert sat["clean"] == _pm(clean)
    assert sat["PGD 8/255"] == _pm([round(c - 8 * k, 6) for c, k in zip(clean, slope)])
    assert sat["headline"] == _pm([round(c - 9 * k, 6) for c, k in zip(clean, slope)]) + " (AutoAttack 8/255)"
    assert sat["sanity"] == "ok" and sat["CW median L2"] == "0.250 ± 0.000"
    assert [c for c in sat if c.startswith("PGD ")] == [f"PGD {k}/255" for k in STRONG_EPS]
    # the paper protocol of the same runs: its own table, its own numbers, its own label
    psat = _row(paper, "sat")
    assert psat["protocol"] == "paper protocol" and psat["n"] == "3"
    assert psat["clean"] == _pm([c + 0.01 for c in clean])
    assert psat["headline"] == _pm([round(c + 0.01 - 8 * k / 2, 6) for c, k in zip(clean, slope)]) + " (PGD 8/255)"
    assert [c for c in psat if c.startswith("PGD ")] == [f"PGD {k}/255" for k in PAPER_EPS]
    assert {r["configuration"].strip("⚠ ") for r in paper} == {"`sat`"}  # only runs with a paper eval
    # one seed: the value alone, n = 1
    std = _row(strong, "std")
    assert std["n"] == "1" and std["clean"] == "90.00" and std["PGD 8/255"] == "10.00"
    # per-run details follow, one row per seed
    per_run = tables["Strong protocol, per run"]
    assert _row(per_run, "sat-s1")["seed"] == "1" and _row(per_run, "sat-s1")["clean"] == "83.00"
    assert "mean ± sample standard deviation (n - 1)" in md
    assert "- `sat`: 3 run(s), seed(s) 0, 1, 2" in md and "differs in: method=sat" in md


def test_mean_std_matches_statistics() -> None:
    vals = [0.8, 0.83, 0.78]
    mean, std, n = mean_std(vals)  # type: ignore[misc]
    assert n == 3 and mean == pytest.approx(statistics.mean(vals)) and std == pytest.approx(statistics.stdev(vals))
    assert mean_std([0.5]) == (0.5, None, 1) and mean_std([None, float("nan")]) is None


def test_subset_and_full_split_are_labelled_and_not_averaged(study: dict[str, Any], tmp_path: Path) -> None:
    md = write_report(study["all"], tmp_path / "out").read_text()
    rows = [r for r in _tables(md)["Strong protocol"] if r["configuration"].startswith("`pgd`")]
    assert len(rows) == 2 and {r["n"] for r in rows} == {"1"}
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == {"test 355/355 (eval.json)", "test subset 256/355 (eval.json)"}
    assert by_source["test 355/355 (eval.json)"]["clean"] == "70.00"
    assert by_source["test subset 256/355 (eval.json)"]["clean"] == "72.00"
    assert all(" ± " not in r["clean"] for r in rows)
    note = rows[0]["configuration"].split("[")[1].rstrip("]")
    assert f"[{note}] `pgd`: its seeds were evaluated on different sources" in md
    assert "shown as separate rows, not averaged" in md


def test_failed_sanity_check_is_shown(study: dict[str, Any], tmp_path: Path) -> None:
    md = write_report(study["all"], tmp_path / "out").read_text()
    std = _row(_tables(md)["Strong protocol"], "std")
    assert std["configuration"].startswith("⚠ ") and std["sanity"] == "FAILED (monotone-in-eps)"
    assert "sanity check FAILED: monotone-in-eps: detail of monotone-in-eps" in md
    # one failing seed among three: the aggregate names the check and the seed
    run = _make_run(tmp_path / "x", "sat-s9", seed=9, clean=0.8,
                    evals={"eval.json": _eval("strong", clean=0.8, slope=0.03, failed=("pgd-beats-fgsm",))})
    md = write_report([*study["sat"], run], tmp_path / "out2").read_text()
    sat = _row(_tables(md)["Strong protocol"], "sat")
    assert sat["n"] == "4" and sat["sanity"] == "FAILED (pgd-beats-fgsm: seed 9)" and sat["configuration"][0] == "⚠"


def test_configuration_key_ignores_only_non_semantic_options(tmp_path: Path) -> None:
    a = load_run(_make_run(tmp_path, "a", seed=0))
    b = load_run(_make_run(tmp_path, "b", seed=1, options=_options("sat", 1, threads=4, device="cuda", progress=False)))
    c = load_run(_make_run(tmp_path, "c", seed=0, options=_options("sat", 0, lr=0.05)))
    assert config_key(a) == config_key(b) != config_key(c)


def test_no_aggregate_and_single_seed_default(study: dict[str, Any], tmp_path: Path) -> None:
    md = write_report(study["all"], tmp_path / "out", aggregate=False).read_text()
    strong = _tables(md)["Strong protocol"]
    assert "seed" in strong[0] and "n" not in strong[0] and len(strong) == 6
    assert _row(strong, "sat-s2")["clean"] == "78.00" and "## Configurations" not in md
    # every configuration a single seed: no aggregation by default
    md = write_report([study["std"], study["sat"][0]], tmp_path / "out2").read_text()
    assert "run" in _tables(md)["Strong protocol"][0] and "## Per-run numbers" not in md


def test_monitor_is_never_robustness(study: dict[str, Any], tmp_path: Path) -> None:
    md = write_report(study["all"], tmp_path / "out").read_text()
    tables = _tables(md)
    for name, rows in tables.items():
        if "Training" not in name:
            assert all("monitor" not in " ".join(r) for r in rows), name
    training = tables["Training (held-out monitor, not a robustness measure)"]
    row = _row(training, "sat-s0")
    assert row["monitor (not robustness)"] == "PGD-5 @ 8/255, val 256 (`pgd5_monitor`)"
    assert row["last monitor"] == f"{100 * 0.5 * (1 - math.exp(-2)):.2f}" and row["best epoch (by monitor)"] == "3"
    assert "## Accuracy per epoch (held-out monitor, not a robustness measure)" in md


def test_end_of_run_summary_is_strong_on_a_subset(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "sat", summary=True, evals={"eval-paper.json": _eval("paper", clean=0.8, slope=0.02)})
    md = write_report([run], tmp_path / "out").read_text()
    tables = _tables(md)
    strong = _row(tables["Strong protocol"], "sat")
    assert strong["source"] == "val subset 500/5000 (summary.json)" and strong["protocol"] == "strong protocol"
    assert _row(tables["Paper protocol"], "sat")["source"] == "test 355/355 (eval-paper.json)"
    # a full eval.json supersedes the subset summary for the strong protocol
    (run / "eval.json").write_text(json.dumps(_eval("strong", clean=0.81, slope=0.02)))
    strong = _row(_tables(write_report([run], tmp_path / "out").read_text())["Strong protocol"], "sat")
    assert strong["source"] == "test 355/355 (eval.json)" and strong["clean"] == "81.00"
    # without summary.json, metrics.json's summary entry is used
    (run / "summary.json").unlink()
    (run / "eval.json").unlink()
    md = write_report([run], tmp_path / "out").read_text()
    strong = _row(_tables(md)["Strong protocol"], "sat")
    assert strong["source"] == "val subset of 500 (summary.json)" and strong["clean"] == "80.00"
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["summary"]["split_size"] = 5000  # train.py records it since the summary plumbing change
    (run / "metrics.json").write_text(json.dumps(metrics))
    md = write_report([run], tmp_path / "out").read_text()
    assert _row(_tables(md)["Strong protocol"], "sat")["source"] == "val subset 500/5000 (summary.json)"
    assert "end-of-run summary as metrics.json records it (summary.json is missing" in md


def test_old_run_dirs_report_as_paper_protocol_and_monitor(tmp_path: Path) -> None:
    v1 = _make_run(tmp_path, "old-eval", old=True, evals={"eval.json": _eval("paper", clean=0.85, slope=0.05,
                                                                           version=1)})
    bare = _make_run(tmp_path, "old-bare", old=True, clean=0.7, method="pgd")
    md = write_report([v1, bare], tmp_path / "out").read_text()
    tables = _tables(md)
    assert "Strong protocol" not in tables
    paper = tables["Paper protocol"]
    a, b = _row(paper, "old-eval"), _row(paper, "old-bare")
    assert a["protocol"] == b["protocol"] == "paper protocol"
    assert a["source"] == "test 355/355 (eval.json)" and a["headline"] == "45.00 (PGD 8/255)" and a["sanity"] == "not run"
    assert b["source"] == "val subset of 512 (metrics.json)" and b["PGD 4/255"] == "50.00" and b["PGD 3/255"] == "-"
    assert "eval.json version 1 (written before protocols were named; it was the paper protocol)" in md
    assert "old metrics.json: end-of-training PGD on a held-out subset (paper protocol)" in md
    assert _row(tables["Training (held-out monitor, not a robustness measure)"], "old-bare")[
        "monitor (not robustness)"] == "PGD-5 @ 8/255 (`pgd_acc`)"
    assert "FFT cut-off radii, not Gaussian sigmas) are not plotted: `old-eval`" in md
    for name in (PLOT_EPOCHS, PLOT_EPS, PLOT_DISTORTIONS):
        _nonblank_png(tmp_path / "out" / name)


def test_plots_are_written_and_labelled(study: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    md = write_report(study["all"], out).read_text()
    for name in (PLOT_EPOCHS, PLOT_EPS, PLOT_DISTORTIONS):
        assert f"]({name})" in md
        _nonblank_png(out / name)
    assert "## Robust accuracy against eps, per protocol" in md
    with Image.open(out / PLOT_EPS) as im:  # two protocols present: two panels side by side
        assert im.size[0] > 1.6 * im.size[1]


def test_plot_titles_name_the_protocol_and_monitor(study: dict[str, Any], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    texts: list[str] = []
    real = Figure.savefig

    def spy(self: Figure, *a: Any, **k: Any) -> None:
        texts.extend(ax.get_title() for ax in self.axes)
        texts.extend(ax.get_xlabel() for ax in self.axes)
        texts.extend(t.get_text() for ax in self.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        texts.extend(t.get_text() for lg in self.legends for t in lg.get_texts())
        real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    write_report(study["all"], tmp_path / "out")
    assert "PGD robust accuracy (strong protocol)" in texts and "PGD robust accuracy (paper protocol)" in texts
    assert "held-out monitor (PGD-5, not a robustness measure)" in texts
    assert "sat (n=3, test 355/355 (eval.json))" in texts and "AutoAttack (headline)" in texts
    assert "Gaussian sigma, px (larger = more blur)" in texts
    assert any(t.startswith("Gaussian sigma, px (sweep 2.82 ... 0.5") for t in texts)
    assert any(t.startswith("sat (n=3, strong protocol") for t in texts)


def test_stale_distortion_plot_is_removed(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "sat", evals={"eval.json": _eval("strong", clean=0.8, slope=0.02)})
    bare = _make_run(tmp_path, "bare")
    out = tmp_path / "out"
    write_report([run], out)
    assert (out / PLOT_DISTORTIONS).exists()
    md = write_report([bare], out).read_text()
    assert not (out / PLOT_DISTORTIONS).exists() and not (out / PLOT_EPS).exists()
    assert PLOT_DISTORTIONS not in md and (out / PLOT_EPOCHS).exists()
    assert "No robustness measurement" in md and "`bare`" in md


def test_runs_with_equal_names_get_distinct_labels(tmp_path: Path) -> None:
    a = _make_run(tmp_path / "a", "run", clean=0.7, options=_options("sat", 0, maps=["mask"]))
    b = _make_run(tmp_path / "b", "run", clean=0.6, options=_options("sat", 0, maps=["boxes"]))
    md = write_report([a, b], tmp_path / "out").read_text()
    assert "`a/run`" in md and "`b/run`" in md


def test_report_errors_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SatkitError, match="not a sattrain run directory"):
        write_report([empty], tmp_path / "out")
    run = _make_run(tmp_path, "r", evals={"eval.json": _eval("strong", clean=0.8, slope=0.02)})
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{broken\n")
    with pytest.raises(SatkitError, match=r"metrics\.jsonl:5"):
        write_report([run], tmp_path / "out")
    run2 = _make_run(tmp_path, "r2")
    (run2 / "eval.json").write_text("[1, 2]")
    with pytest.raises(SatkitError, match="eval.json: expected a JSON object"):
        write_report([run2], tmp_path / "out")
    bad = _eval("strong", clean=0.8, slope=0.02)
    del bad["pgd"]["results"]
    (run2 / "eval.json").write_text(json.dumps(bad))
    with pytest.raises(SatkitError, match=r"r2/eval\.json: not a sattrain evaluation \(missing key 'results'\)"):
        write_report([run2], tmp_path / "out")
    bad = _eval("strong", clean=0.8, slope=0.02)
    bad["clean"] = "high"
    (run2 / "eval.json").write_text(json.dumps(bad))
    with pytest.raises(SatkitError, match=r"eval\.json: not a sattrain evaluation .*'clean'"):
        write_report([run2], tmp_path / "out")
    (run2 / "eval.json").unlink()
    (run2 / "eval-paper.json").write_text(json.dumps(_eval("strong", clean=0.8, slope=0.02)))
    with pytest.raises(SatkitError, match="eval-paper.json: protocol is 'strong'"):
        write_report([run2], tmp_path / "out")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SatkitError, match="--out"):
        write_report([_make_run(tmp_path, "ok")], afile)


def test_report_cli(study: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cli-report"
    res = CliRunner().invoke(report_cmd, [*map(str, study["all"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert str(out / "report.md") in res.output
    md = (out / "report.md").read_text()
    assert "configuration" in _tables(md)["Strong protocol"][0]
    res = CliRunner().invoke(report_cmd, [*map(str, study["sat"]), "--out", str(out), "--no-aggregate"])
    assert res.exit_code == 0, res.output
    assert len(_tables((out / "report.md").read_text())["Strong protocol"]) == 3
    res = CliRunner().invoke(report_cmd, ["--help"])
    assert "--aggregate / --no-aggregate" in res.output
    res = CliRunner().invoke(report_cmd, [str(tmp_path), "--out", str(out)])  # tmp_path holds no run files
    assert res.exit_code == 1 and "not a sattrain run directory" in res.output


def test_multilabel_runs_say_map(tmp_path: Path) -> None:
    ev = _eval("paper", clean=0.6, slope=0.02)
    ev["metric"] = ev["headline"]["metric"] = "mAP"
    run = _make_run(tmp_path, "voc", evals={"eval-paper.json": ev})
    assert load_run(run).metric == "mAP"
    md = write_report([run], tmp_path / "out").read_text()
    assert _row(_tables(md)["Paper protocol"], "voc")["metric"] == "mAP"


# --------------------------------------------------------------------------- the cost frontier


def _costed(run: Path, ips: float, *, samples: int = 1000, share: float = 0.0, replays: int | None = None) -> Path:
    """Add what `sattrain run` records of training speed to each metrics.jsonl line of ``run``."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for rec in lines:
        rec.update({"samples": samples, "images_per_s": ips, "attack_share": share})
        if replays:
            rec["replays"] = replays
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run


@pytest.fixture
def costed(tmp_path: Path) -> dict[str, list[Path]]:
    """standard x3, sat x3, pgd x2, free x1 with known speeds and AutoAttack values."""
    runs: dict[str, list[Path]] = {"standard": [], "sat": [], "pgd": [], "free": []}
    for s, ips in enumerate((1000.0, 1100.0, 900.0)):
        runs["standard"].append(_costed(_make_run(tmp_path, f"standard-s{s}", method="standard", seed=s, evals={
            "eval.json": _eval("strong", clean=0.9, slope=0.01, aa=0.1 + 0.01 * s)}), ips))
    for s, ips in enumerate((990.0, 980.0, 1000.0)):
        runs["sat"].append(_costed(_make_run(tmp_path, f"sat-s{s}", method="sat", seed=s, evals={
            "eval.json": _eval("strong", clean=0.9, slope=0.01, aa=0.3)}), ips))
    for s, ips in enumerate((170.0, 190.0)):
        runs["pgd"].append(_costed(_make_run(tmp_path, f"pgd-s{s}", method="pgd", seed=s, evals={
            "eval.json": _eval("strong", clean=0.85, slope=0.01, aa=0.6)}), ips, share=1.0))
    free = _make_run(tmp_path, "free-s0", method="free", seed=0, epochs=2,
                     options=_options("free", 0, epochs=4, replays=2), evals={
                         "eval.json": _eval("strong", clean=0.88, slope=0.01, aa=0.2)})
    runs["free"].append(_costed(free, 1010.0, share=1.0, replays=2))
    return runs


def test_frontier_table_costs_and_pareto(costed: dict[str, list[Path]], tmp_path: Path) -> None:
    out = tmp_path / "out"
    md = write_report([p for ps in costed.values() for p in ps], out).read_text()
    tables = _tables(md)
    fr = tables["Robust accuracy against training cost (the frontier)"]
    assert [r["method"] for r in fr] == ["sat", "free", "standard", "pgd"]  # by passes, then robustness
    std, sat, pgd, free = (_row(fr, n) for n in ("standard", "sat", "pgd", "free-s0"))
    assert std["n"] == "3" and std["train img/s"] == "1000 ± 100" and std["passes / example / epoch"] == "1.00 ± 0.00"
    assert std["AutoAttack 8/255"] == _pm([0.1, 0.11, 0.12]) and std["clean"] == "90.00 ± 0.00"
    # 4 epochs of 1000 images at the run's speed
    assert std["train s"] == f"{statistics.mean([4000 / 1000, 4000 / 1100, 4000 / 900]):.1f} ± " \
        f"{statistics.stdev([4000 / 1000, 4000 / 1100, 4000 / 900]):.1f}"
    assert pgd["passes / example / epoch"] == "6.00 ± 0.00" and pgd["n"] == "2"  # 5 steps + 1, every batch attacked
    t_pgd = statistics.mean([4000 / 170, 4000 / 190])
    t_std = statistics.mean([4000 / 1000, 4000 / 1100, 4000 / 900])
    assert pgd["time vs standard"] == f"{t_pgd / t_std:.2f}x"
    # free: 2 passes over the data, each minibatch replayed twice: 4 epochs of budget, 1 pass per example
    assert free["epochs (budget)"] == "4 (2 passes x 2 replays)" and free["passes / example / epoch"] == "1.00"
    assert free["train img/s"] == "1010" and free["train s"] == f"{4000 / 1010:.1f}"
    # Pareto: on passes sat (1 pass, 30%) and pgd; on images/s free (fastest), sat and pgd
    assert (std["Pareto"], free["Pareto"], sat["Pareto"], pgd["Pareto"]) == ("-", "images/s", "passes, images/s",
                                                                             "passes, images/s")
    per_run = tables["Frontier, per run"]
    assert {r["run"].strip("`") for r in per_run} == {p.name for ps in costed.values() for p in ps}
    assert _row(per_run, "pgd-s1")["train img/s"] == "190" and _row(per_run, "free-s0")["epochs run"] == "2"
    assert "](frontier.png)" in md
    _nonblank_png(out / "frontier.png")


def test_frontier_only_when_asked_or_measured(study: dict[str, Any], costed: dict[str, list[Path]],
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    md = write_report(study["all"], out).read_text()  # no training speed recorded: no frontier
    assert "the frontier" not in md and not (out / "frontier.png").exists()
    with pytest.raises(SatkitError, match="--frontier: no run has both"):
        write_report(study["all"], out, frontier=True)
    runs = [*costed["standard"], *costed["pgd"]]
    write_report(runs, out)
    assert (out / "frontier.png").exists()
    md = write_report(runs, out, frontier=False).read_text()
    assert "the frontier" not in md and not (out / "frontier.png").exists()  # the stale plot is removed
    # a run without AutoAttack and one at another radius are listed, not plotted
    bare = _costed(_make_run(tmp_path, "noaa", method="noise", evals={"eval.json": _eval("paper", clean=0.8, slope=0.01)}),
                   500.0)
    other = _eval("strong", clean=0.8, slope=0.01, aa=0.5)
    other["autoattack"]["eps_label"], other["headline"]["name"] = "4/255", "autoattack@4/255"
    far = _costed(_make_run(tmp_path, "aa4", method="noise", seed=5, evals={"eval.json": other}), 500.0)
    md = write_report([*runs, bare, far], out, frontier=True).read_text()
    assert "`noaa` (no strong-protocol evaluation: run `sattrain eval`)" in md
    assert ("`aa4` (another headline (AutoAttack 4/255, not AutoAttack 8/255): evaluate it again with "
            "`sattrain eval`)") in md
    res = CliRunner().invoke(report_cmd, [*map(str, study["all"]), "--out", str(out), "--frontier"])
    assert res.exit_code == 1 and "--frontier: no run has both" in res.output


def test_frontier_speed_fields_are_checked(costed: dict[str, list[Path]], tmp_path: Path) -> None:
    bad = costed["pgd"][1]
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["images_per_s"] = -3.0
    (bad / "metrics.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    warned: list[str] = []
    md = write_report([*costed["standard"], *costed["pgd"]], tmp_path / "out", warn=warned.append).read_text()
    assert len(warned) == 1 and "metrics.jsonl:1" in warned[0] and "'images_per_s' is -3.0" in warned[0]
    assert _row(_tables(md)["Robust accuracy against training cost (the frontier)"], "pgd-s0")["n"] == "1"


def test_worst_case_headline_is_named_and_on_the_frontier_with_its_kind(tmp_path: Path) -> None:
    """An eval.json with the per-sample worst case of AutoAttack and PGD as headline: the table
    names it, the frontier takes it, and a run whose headline is AutoAttack alone (an eval.json
    from before) is listed apart instead of being compared with it."""
    runs = []
    for seed in (0, 1):
        ev = _eval("strong", clean=0.8, slope=0.01, aa=0.4)
        ev["robust"]["autoattack+pgd@8/255"] = 0.35
        ev["headline"]["name"], ev["headline"]["value"] = "autoattack+pgd@8/255", 0.35
        runs.append(_costed(_make_run(tmp_path, f"new{seed}", method="pgd", seed=seed, evals={"eval.json": ev}), 400.0))
    old = _costed(_make_run(tmp_path, "old", method="pgd", seed=7, evals={"eval.json": _eval("strong", clean=0.8,
                                                                                                slope=0.01, aa=0.4)}),
                  400.0)
    out = tmp_path / "out"
    md = write_report([*runs, old], out, frontier=True).read_text()
    # the two kinds of headline are never averaged together
    heads = sorted((r["n"], r["headline"]) for r in _tables(md)["Strong protocol"])
    assert heads == [("1", "40.00 (AutoAttack 8/255)"), ("2", "35.00 ± 0.00 (AutoAttack+PGD 8/255)")]
    assert ("`old` (another headline (AutoAttack 8/255, not AutoAttack+PGD 8/255): evaluate it again with "
            "`sattrain eval`)") in md
