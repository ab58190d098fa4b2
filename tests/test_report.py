"""sattrain.report: report.md and PNG plots from run directories in the documented format
(config.json, metrics.jsonl, metrics.json, eval.json), and the `sattrain report` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from satdata.errors import SatkitError
from sattrain.cli_eval import report_cmd
from sattrain.report import PLOT_DISTORTIONS, PLOT_EPOCHS, PLOT_EPS, load_run, write_report


def _make_run(
    root: Path,
    name: str,
    *,
    method: str,
    maps: list[str],
    epochs: int,
    clean: float,
    slope: float,
    with_eval: bool,
    metric: str = "accuracy",
) -> Path:
    """A run directory as `sattrain run` (and optionally `sattrain eval`) leaves it."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "options": {"method": method, "model": "resnet10", "maps": maps, "epochs": epochs, "eps": 8 / 255},
        "store": {"path": "cifar10.zarr", "dataset": "cifar10"},
    }))
    lines = []
    for e in range(epochs):
        grow = 1 - math.exp(-(e + 1) / 3)
        lines.append(json.dumps({
            "epoch": e, "map": maps[0] if maps else None, "p_t": None, "loss": 2.0 / (e + 1),
            "train_acc": clean * grow, "clean_acc": clean * grow, "pgd_acc": (clean - 8 * slope) * grow,
            "pgd_eps": "8/255", "metric": metric, "attack_share": 0.0, "lr": 1e-3, "samples": 50000,
            "seconds": 10.0 + e % 2, "images_per_s": 5000.0,
        }))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "metrics.json").write_text(json.dumps({
        "metric": metric, "clean_acc": clean,
        "robust_acc": {f"pgd@{k}/255": clean - k * slope for k in (1, 2, 4, 8)},
        "attack": {"name": "pgd", "steps": 5, "step_size": "2/255", "random_start": True, "loss": "ce"},
        "eval_split": "val", "eval_samples": 512, "epochs": epochs, "method": method, "model": "resnet10",
        "maps": maps, "final_loss": 0.1, "train_seconds": 10.5 * epochs,
    }))
    if with_eval:
        ev_clean = clean - 0.01
        pgd_rows = [{"eps": k / 255, "eps_label": f"{k}/255", "value": ev_clean - k * slope} for k in range(1, 9)]
        (d / "eval.json").write_text(json.dumps({
            "format": "satkit-eval", "version": 1, "split": "test", "samples": 10000, "split_size": 10000,
            "complete": True, "metric": metric, "clean": ev_clean,
            "robust": {**{f"pgd@{r['eps_label']}": r["value"] for r in pgd_rows}, "cw-l2": 0.05},
            "pgd": {"steps": 5, "step_size": 2 / 255, "restarts": 1, "random_start": True, "loss": "ce",
                    "results": pgd_rows},
            "cw": {"steps": 20, "c": 1.0, "lr": 0.01, "kappa": 0.0, "value": 0.05, "successes": 8000,
                   "median_l2": 0.25, "mean_l2": 0.3},
            "distortions": {
                "contrast": [{"level": c / 10, "value": ev_clean * c / 10} for c in range(1, 11)],
                "lowpass": [{"radius": r, "fraction": r / 16, "value": ev_clean * r / 16} for r in (2, 4, 8, 12, 16)],
                "highpass": [{"radius": r, "fraction": r / 16, "value": ev_clean * (1 - r / 16)} for r in (0, 2, 4, 8, 12)],
            },
            "skipped": {},
        }))
    return d


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "runs"
    return [
        _make_run(root, "std", method="standard", maps=[], epochs=12, clean=0.90, slope=0.11, with_eval=True),
        _make_run(root, "sat-boxes", method="sat", maps=["boxes"], epochs=12, clean=0.85, slope=0.08, with_eval=True),
        _make_run(root, "pgd", method="pgd", maps=[], epochs=8, clean=0.80, slope=0.05, with_eval=False),
    ]


def _nonblank_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 500 and h >= 300
        a = np.asarray(im.convert("L"))
    assert (a < 128).mean() > 0.005, f"{path.name} looks empty"


def test_report_table_and_plots(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    md_path = write_report(runs, out)
    assert md_path == out / "report.md"
    md = md_path.read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:7] == ["run", "method", "model", "map", "epochs", "metric", "clean"]
    assert [c for c in header if c.startswith("PGD ")] == [f"PGD {k}/255" for k in range(1, 9)]
    assert "CW-L2" in header and "s/epoch" in header
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in table[2:]}
    assert set(rows) == {"`std`", "`sat-boxes`", "`pgd`"}
    std = dict(zip(header, rows["`std`"]))
    assert std["method"] == "standard" and std["clean"] == "89.00" and std["PGD 8/255"] == "1.00"
    assert std["CW median L2"] == "0.250" and std["s/epoch"] == "10.5" and std["numbers from"].startswith("eval.json")
    sat = dict(zip(header, rows["`sat-boxes`"]))
    assert sat["map"] == "boxes" and sat["epochs"] == "12"
    pgd = dict(zip(header, rows["`pgd`"]))  # no eval.json: metrics.json's subset numbers, gaps as "-"
    assert pgd["clean"] == "80.00" and pgd["PGD 4/255"] == "60.00" and pgd["PGD 3/255"] == "-"
    assert pgd["CW-L2"] == "-" and "metrics.json" in pgd["numbers from"]
    for name in (PLOT_EPOCHS, PLOT_EPS, PLOT_DISTORTIONS):
        assert f"]({name})" in md
        _nonblank_png(out / name)
    assert "## Evaluation protocol" in md and "CW-L2 20 Adam steps" in md


def test_report_without_eval_has_no_distortion_plot_and_drops_a_stale_one(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(runs, out)
    assert (out / PLOT_DISTORTIONS).exists()
    md = write_report([runs[2]], out).read_text()
    assert not (out / PLOT_DISTORTIONS).exists()
    assert PLOT_DISTORTIONS not in md and (out / PLOT_EPS).exists()


def test_runs_with_equal_names_get_distinct_labels(tmp_path: Path) -> None:
    a = _make_run(tmp_path / "a", "run", method="sat", maps=["mask"], epochs=3, clean=0.7, slope=0.05, with_eval=False)
    b = _make_run(tmp_path / "b", "run", method="sat", maps=["boxes"], epochs=3, clean=0.6, slope=0.05, with_eval=False)
    md = write_report([a, b], tmp_path / "out").read_text()
    assert "`a/run`" in md and "`b/run`" in md


def test_multilabel_runs_say_map(tmp_path: Path) -> None:
    r = _make_run(tmp_path, "voc", method="sat", maps=["boxes"], epochs=2, clean=0.7, slope=0.02,
                  with_eval=False, metric="mAP")
    assert load_run(r).metric == "mAP"
    md = write_report([r], tmp_path / "out").read_text()
    assert "| mAP |" in md


def test_report_errors_name_the_file(tmp_path: Path, runs: list[Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SatkitError, match="not a sattrain run directory"):
        write_report([empty], tmp_path / "out")
    with (runs[0] / "metrics.jsonl").open("a") as f:
        f.write("{broken\n")
    with pytest.raises(SatkitError, match=r"metrics\.jsonl:13"):
        write_report([runs[0]], tmp_path / "out")
    (runs[1] / "eval.json").write_text("[1, 2]")
    with pytest.raises(SatkitError, match="eval.json: expected a JSON object"):
        write_report([runs[1]], tmp_path / "out")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SatkitError, match="--out"):
        write_report([runs[2]], afile)


def test_report_cli(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cli-report"
    res = CliRunner().invoke(report_cmd, [*map(str, runs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.md").exists() and str(out / "report.md") in res.output
    res = CliRunner().invoke(report_cmd, [str(tmp_path), "--out", str(out)])  # tmp_path holds no run files
    assert res.exit_code == 1 and "not a sattrain run directory" in res.output
