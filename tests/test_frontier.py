"""bench/frontier.py --quick end to end (every method trained and evaluated through sattrain,
one table and one plot), and `sattrain report` drawing the same frontier from its run dirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from sattrain.cli_eval import report_cmd
from sattrain.methods import get_method, method_names

ROOT = Path(__file__).resolve().parents[1]
ISSUE_METHODS = ("standard", "noise", "sat", "fgsm-rs", "fgsm-rs+sat", "free", "pgd", "trades", "pgd+sat", "trades+sat")


def _table(md: str, first_cell: str) -> list[dict[str, str]]:
    """The markdown table whose header starts with ``| first_cell |``, as dicts."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(head, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # something drawn, not a blank canvas


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("frontier")
    out = {"json": d / "frontier.json", "md": d / "frontier.md", "png": d / "frontier.png", "work": d / "work"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "frontier.py"), "--quick", "--work", str(out["work"]),
                        "--json", str(out["json"]), "--markdown", str(out["md"]), "--plot", str(out["png"])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out["stderr"] = r.stderr
    out["result"] = json.loads(out["json"].read_text())
    return out


def test_quick_frontier_has_every_method_with_sensible_numbers(quick: dict[str, Any]) -> None:
    expected = [m for m in ISSUE_METHODS if m in method_names()]
    assert {"standard", "sat", "pgd", "trades", "fgsm-rs", "free"} <= set(expected)
    res = quick["result"]
    assert res["settings"]["methods"] == expected and f"plan: {len(expected)} methods" in quick["stderr"]
    rows = {r["method"]: r for r in res["frontier"]}
    assert set(rows) == set(expected) and len(res["frontier"]) == len(expected) and not res["excluded"]
    md = quick["md"].read_text()
    table = _table(md, "configuration")
    assert sorted(r["method"] for r in table) == sorted(expected)
    for r in table:
        assert r["source"] == "test subset 8/355 (eval.json)" and r["sanity"] == "ok", r
    std = rows["standard"]
    # chance is 10%: two epochs on 256 digits must do much better, and robust <= clean
    assert std["clean"]["mean"] >= 0.5
    for m, r in rows.items():
        assert r["headline"] == "autoattack+pgd@32/255" and r["n"] == 1
        assert 0 <= r["autoattack"]["mean"] <= r["clean"]["mean"] <= 1
        assert r["images_per_s"]["mean"] > 0 and r["train_seconds"]["mean"] > 0
        run = r["runs"][0]
        # every method trained the same budget: 2 epochs of the 256 images (free: 1 pass x 2 replays)
        assert run["budget_epochs"] == 2, (m, run)
        share = run["attack_share"]
        assert r["passes"]["mean"] == pytest.approx(get_method(m).passes(1 if m.startswith("fgsm") else 5, share))
    assert rows["standard"]["passes"]["mean"] == rows["sat"]["passes"]["mean"] == rows["free"]["passes"]["mean"] == 1
    assert rows["fgsm-rs"]["passes"]["mean"] == 2 and rows["pgd"]["passes"]["mean"] == 6
    assert rows["trades"]["passes"]["mean"] == 7
    free_run = rows["free"]["runs"][0]
    assert free_run["epochs_run"] == 1 and rows["free"]["budget"] == "2 (1 pass x 2 replays)"
    # six forward-backward passes per image cost more time than one (measured: a wide margin)
    assert rows["pgd"]["images_per_s"]["mean"] < rows["standard"]["images_per_s"]["mean"]
    # the PGD sweep is there, and the most robust point at the least cost is on the frontier
    assert set(rows["pgd"]["pgd"]) == {"8/255", "32/255"}
    cheapest = min(rows.values(), key=lambda r: (r["passes"]["mean"], -r["autoattack"]["mean"]))
    assert "passes" in cheapest["pareto"]
    assert "![Robust accuracy against training cost](frontier.png)" in md and "free: 1 pass(es)" in md
    _png(quick["png"])
    assert any("sattrain.evaluation.evaluate" in c or "sattrain eval" in c for c in res["commands"])


def test_sattrain_report_draws_the_frontier_from_run_dirs(quick: dict[str, Any], tmp_path: Path) -> None:
    runs = sorted((quick["work"] / "runs").iterdir())
    assert len(runs) == len(quick["result"]["frontier"])
    out = tmp_path / "report"
    res = CliRunner().invoke(report_cmd, [*map(str, runs), "--out", str(out), "--frontier"])
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    assert "## Robust accuracy against training cost (the frontier)" in md and "](frontier.png)" in md
    _png(out / "frontier.png")
    per_run = {r["run"].strip("`"): r for r in _table(md, "run | method | seed | passes / example / epoch")}
    assert set(per_run) == {p.name for p in runs}
    bench = {r["method"]: r["runs"][0] for r in quick["result"]["frontier"]}
    for name, r in per_run.items():
        b = bench[r["method"]]
        assert float(r["passes / example / epoch"]) == pytest.approx(b["passes"], abs=0.005)
        assert float(r["train img/s"]) == pytest.approx(b["images_per_s"], abs=0.5)
        assert float(r["train s"]) > 0 and r["epochs run"] == str(b["epochs_run"])
    # the same runs without the frontier
    res = CliRunner().invoke(report_cmd, [*map(str, runs), "--out", str(out), "--no-frontier"])
    assert res.exit_code == 0, res.output
    assert not (out / "frontier.png").exists() and "the frontier" not in (out / "report.md").read_text()
