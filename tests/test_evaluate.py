"""sattrain.evaluate: eval.json from a real checkpoint, mAP, and the eval CLI (the
distortion definitions are tested in test_distortions.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from satdata.errors import SatkitError
from satdata.store import StoreWriter, open_store
from sattrain.checkpoint import save_checkpoint
from sattrain.cli_eval import eval_cmd, parse_attacks, parse_eps_list
from sattrain.evaluate import (
    PartialEvaluationWarning,
    average_precision,
    evaluate,
    format_eps,
    format_table,
    mean_average_precision,
)
from sattrain.models import create_model

# Subset evaluations warn by design; the tests that check the warning capture it explicitly.
pytestmark = pytest.mark.filterwarnings("ignore::sattrain.evaluate.PartialEvaluationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and extra threads only contend for the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(store, split: str) -> torch.Tensor:
    return torch.from_numpy(store.load(split, "images")).permute(0, 3, 1, 2).float().div(255).contiguous()


def _train(x: torch.Tensor, y: torch.Tensor, num_classes: int, multi: bool, epochs: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            out = model(x[idx])
            loss = F.binary_cross_entropy_with_logits(out, y[idx].float()) if multi else F.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _save_run(run: Path, model: torch.nn.Module, store, label_kind: str) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run / "checkpoint.pt", {
        "model": model.state_dict(),
        "optimizer": None,
        "epoch": 3,
        "config": {"model": "small-cnn", "method": "standard"},
        "model_spec": {"name": "small-cnn", "num_classes": len(store.info.classes), "label_kind": label_kind,
                       "image_size": list(store.info.image_size), "classes": list(store.info.classes)},
        "rng": {},
        "extra": {},
    })
    return run


@pytest.fixture(scope="module")
def run_dir(digits_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir whose checkpoint is a small-cnn trained 3 epochs on the 16x16 digits (~80% test)."""
    st = open_store(digits_store)
    model = _train(_images(st, "train"), torch.from_numpy(st.load("train", "labels")).long(), 10, multi=False)
    return _save_run(tmp_path_factory.mktemp("runs") / "std", model, st, "single")


@pytest.fixture(scope="module")
def multi_store(digits_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-label store written with StoreWriter from the digits: classes 'small' (digit < 5),
    'even', and 'loop' (0, 6, 8, 9), multi-hot uint8 labels."""
    src = open_store(digits_store)
    out = tmp_path_factory.mktemp("stores") / "digits-multi.zarr"
    w = StoreWriter(out, dataset="digits-multi", classes=["small", "even", "loop"],
                    image_size=src.info.image_size, label_kind="multi", maps={})
    for split in ("train", "test"):
        images = src.load(split, "images")
        d = src.load(split, "labels")
        labels = np.stack([d < 5, d % 2 == 0, np.isin(d, [0, 6, 8, 9])], axis=1).astype(np.uint8)
        w.create_split(split, len(images))
        w.write(split, 0, images, labels, [f"{split}-{i}" for i in range(len(images))], {})
        w.close_split(split, len(images))
    w.finish({"source": "test"})
    return out


@pytest.fixture(scope="module")
def multi_run(multi_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    st = open_store(multi_store)
    model = _train(_images(st, "train"), torch.from_numpy(st.load("train", "labels")), 3, multi=True)
    return _save_run(tmp_path_factory.mktemp("runs") / "multi", model, st, "multi")


def _numbers(r: dict) -> list[float]:
    vals = [r["clean"], *r["robust"].values()]
    for rows in r.get("distortions", {}).values():
        vals += [row["value"] for row in rows]
    return vals


# --------------------------------------------------------------------------- evaluate


def test_evaluate_writes_valid_eval_json(run_dir: Path, digits_store: Path) -> None:
    with pytest.warns(PartialEvaluationWarning, match="120 of the 355"):
        r = evaluate(run_dir, digits_store, eps=(2 / 255, 8 / 255), samples=120, device="cpu", batch_size=64)
    on_disk = json.loads((run_dir / "eval.json").read_text())
    assert on_disk["clean"] == r["clean"] and on_disk["robust"] == r["robust"]
    assert r["split"] == "test" and r["samples"] == 120 and r["split_size"] == 355 and not r["complete"]
    assert r["metric"] == "accuracy"
    assert all(0.0 <= v <= 1.0 for v in _numbers(r))
    assert r["clean"] > 0.6, "the trained model should be well above chance"
    assert set(r["robust"]) == {"pgd@2/255", "pgd@8/255", "cw-l2"}
    for v in r["robust"].values():
        assert v <= r["clean"]
    assert r["robust"]["pgd@8/255"] < r["clean"] - 0.1
    cw = r["cw"]
    assert cw["value"] < r["clean"] and cw["successes"] > 0
    assert math.isfinite(cw["median_l2"]) and 0 < cw["median_l2"] < 5
    # identities of the sweeps: contrast 1 and high-pass radius 0 leave the images alone
    contrast1 = [row for row in r["distortions"]["contrast"] if row["level"] == 1.0][0]
    hp0 = [row for row in r["distortions"]["highpass"] if row["radius"] == 0][0]
    assert abs(contrast1["value"] - r["clean"]) <= 1 / 120
    assert abs(hp0["value"] - r["clean"]) <= 1 / 120
    assert r["distortions"]["contrast"][0]["value"] < r["clean"]  # c = 0.1 hurts
    table = format_table(r)
    assert "pgd eps=8/255" in table and "cw-l2" in table and "contrast c=0.1" in table and "seeded subset" in table


def test_evaluate_is_reproducible_and_complete_without_subset(run_dir: Path, digits_store: Path, tmp_path: Path) -> None:
    import warnings

    kw = dict(eps=(4 / 255,), attacks=("pgd",), device="cpu", write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialEvaluationWarning)
        a = evaluate(run_dir, digits_store, **kw)
    b = evaluate(run_dir, digits_store, **kw)
    assert a["complete"] and a["samples"] == 355
    assert a["robust"] == b["robust"]
    assert not (tmp_path / "eval.json").exists()
    out = tmp_path / "elsewhere.json"
    evaluate(run_dir / "checkpoint.pt", digits_store, eps=(1 / 255,), attacks=("pgd",), samples=16, device="cpu", out=out)
    assert json.loads(out.read_text())["samples"] == 16


def test_evaluate_multilabel_reports_map(multi_run: Path, multi_store: Path) -> None:
    r = evaluate(multi_run, multi_store, eps=(2 / 255, 8 / 255), samples=150, device="cpu",
                 attacks=("pgd", "cw", "distortions"))
    assert r["metric"] == "mAP" and r["pgd"]["loss"] == "bce"
    assert all(v is not None and 0.0 <= v <= 1.0 for v in _numbers(r))
    assert r["clean"] > 0.6
    assert r["robust"]["pgd@8/255"] < r["clean"]
    assert "cw" in r["skipped"] and "cw" not in r
    assert "mAP" in format_table(r)


def test_autoattack_runs_the_standard_ensemble(run_dir: Path, digits_store: Path) -> None:
    pytest.importorskip("torchattacks")
    # A radius no small CNN survives: APGD-CE alone fools every point, so this stays quick
    # while exercising the whole path.
    r = evaluate(run_dir, digits_store, attacks=("autoattack",), autoattack_eps=64 / 255, samples=8,
                 device="cpu", write=False)
    aa = r["autoattack"]
    assert aa["version"] == "standard" and aa["eps_label"] == "64/255"
    assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert r["robust"]["autoattack@64/255"] == 0.0 <= r["clean"]


def test_autoattack_without_torchattacks_names_the_extra(run_dir: Path, digits_store: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import now raises ImportError
    with pytest.raises(SatkitError, match=r"satkit\[autoattack\]"):
        evaluate(run_dir, digits_store, attacks=("autoattack",), samples=4, device="cpu", write=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attacks=("fgsm",)), "unknown attack 'fgsm'"),
        (dict(split="val"), "no split 'val'"),
        (dict(eps=(8.0,)), "outside"),
        (dict(samples=0), "--samples"),
        (dict(device="tpu"), "--device"),
    ],
)
def test_evaluate_rejects_bad_options(run_dir: Path, digits_store: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SatkitError, match=match):
        evaluate(run_dir, digits_store, write=False, **kwargs)


def test_evaluate_refuses_a_store_with_other_classes(multi_store: Path, run_dir: Path) -> None:
    with pytest.raises(SatkitError, match="label"):
        evaluate(run_dir, multi_store, attacks=("pgd",), samples=4, device="cpu", write=False)


# --------------------------------------------------------------------------- mAP


def test_average_precision_matches_scikit_learn() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        t = rng.integers(0, 2, n)
        if t.sum() == 0:
            t[0] = 1
        s = np.round(rng.random(n), 1)  # many ties
        assert average_precision(s, t) == pytest.approx(average_precision_score(t, s), abs=1e-12)
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    targets = np.array([[1, 0], [0, 0], [1, 0]])  # second class has no positives: left out
    assert mean_average_precision(scores, targets) == pytest.approx(1.0)


# --------------------------------------------------------------------------- CLI


def test_parsers() -> None:
    assert parse_eps_list("1/255, 8/255,0.5") == [1 / 255, 8 / 255, 0.5]
    assert format_eps(8 / 255) == "8/255" and format_eps(0.01) == "0.01"
    with pytest.raises(SatkitError, match="--eps"):
        parse_eps_list("8")
    with pytest.raises(SatkitError, match="--eps"):
        parse_eps_list(" , ")
    assert parse_attacks("PGD,cw") == ["pgd", "cw"]
    with pytest.raises(SatkitError, match="unknown attack"):
        parse_attacks("pgd,deepfool")


def test_eval_cli(run_dir: Path, digits_store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "e.json"
    res = runner.invoke(eval_cmd, [str(run_dir), "--store", str(digits_store), "--eps", "1/255,4/255",
                                   "--attacks", "pgd", "--samples", "32", "--device", "cpu", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "pgd eps=4/255" in res.output and "clean" in res.output
    assert json.loads(out.read_text())["config"]["eps"] == [1 / 255, 4 / 255]
    res = runner.invoke(eval_cmd, [str(run_dir), "--store", str(digits_store), "--attacks", "pgd", "--eps", "2/255",
                                   "--samples", "16", "--device", "cpu", "--json", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["robust"].keys() == {"pgd@2/255"}
    res = runner.invoke(eval_cmd, [str(run_dir), "--store", str(digits_store), "--eps", "9"])
    assert res.exit_code == 1 and "--eps" in res.output and "Traceback" not in res.output
