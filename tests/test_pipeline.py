"""The whole pipeline, as the README's "Maps from a teacher" section runs it, through the CLIs:
build -> train a teacher -> every kind of generated map -> compare -> SAT from a generated
map -> evaluate -> report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from satdata.cli import main as satdata_cli
from satdata.store import open_store
from sattrain.cli import main as sattrain_cli

METHODS = {  # method -> (encoding, channels)
    "gradcampp": ("unit", 1),
    "gradcam": ("unit", 1),
    "gbp": ("signed", 3),
    "smoothgrad": ("unit", 3),  # the SAT authors' SmoothGrad: per colour channel (satdata 1613b2f)
    "guided-gradcampp": ("signed", 3),
}


def _ok(result) -> None:  # noqa: ANN001
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_teacher_maps_sat_eval_report(digits_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "digits.zarr"
    shutil.copytree(digits_store, store)
    runner = CliRunner()
    # no end-of-run summary: the pipeline evaluates with `sattrain eval` below
    common = ["--epochs", "2", "--batch-size", "64", "--train-samples", "512", "--eval-samples", "128",
              "--eval-steps", "2", "--summary-samples", "0", "--device", "cpu", "-q"]

    teacher = tmp_path / "teacher"
    _ok(runner.invoke(sattrain_cli, ["run", str(store), "--method", "standard", "--out", str(teacher), *common]))

    for method, (encoding, channels) in METHODS.items():
        _ok(runner.invoke(satdata_cli, ["saliency", str(store), "--teacher", str(teacher), "--method", method,
                                        "--name", method, "--device", "cpu", "-q"]))
        info = open_store(store).info.maps[method]
        assert (info.encoding, info.channels) == (encoding, channels)
        assert info.provenance.get("method") == method
    _ok(runner.invoke(satdata_cli, ["verify", str(store)]))

    st = open_store(store)
    s = st.load("test", "saliency", "gradcampp")
    assert s.shape == (355, 16, 16) and s.dtype == np.uint8 and s.max() == 255
    g = st.load("test", "saliency", "gbp")
    assert g.shape == (355, 16, 16, 3) and set(np.unique(g)) <= {-127, 127}

    res = runner.invoke(satdata_cli, ["compare", str(store), "--map", "gradcampp", "--against", "ink", "--json"])
    _ok(res)
    scores = json.loads(res.output)
    flat = json.dumps(scores)
    assert "pointing" in flat and "iou" in flat.lower()

    student = tmp_path / "student"
    _ok(runner.invoke(sattrain_cli, ["run", str(store), "--method", "sat", "--map", "gradcampp",
                                     "--out", str(student), *common]))
    cfg = json.loads((student / "config.json").read_text())
    assert "gradcampp" in json.dumps(cfg)

    _ok(runner.invoke(sattrain_cli, ["eval", str(student), "--store", str(store), "--attacks", "pgd",
                                     "--eps", "1/255,4/255", "--samples", "128", "--device", "cpu", "-q"]))
    ev = json.loads((student / "eval.json").read_text())
    flat = json.dumps(ev)
    assert "clean" in flat

    _ok(runner.invoke(sattrain_cli, ["report", str(teacher), str(student), "--out", str(tmp_path / "report")]))
    assert (tmp_path / "report" / "report.md").is_file()
    assert list((tmp_path / "report").glob("*.png"))
