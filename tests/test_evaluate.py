"""sattrain.evaluation: eval.json from a real checkpoint, mAP, and the eval CLI (the
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
from satdata.store import ArrayWriter, open_store
from sattrain.checkpoint import save_checkpoint
from sattrain.cli_eval import eval_cmd, parse_attacks, parse_eps_list
from sattrain.evaluation import (
    PartialEvaluationWarning,
    average_precision,
    default_batch_size,
    evaluate,
    format_eps,
    format_table,
    mean_average_precision,
)
from sattrain.models import create_model

# Subset evaluations warn by design; the tests that check the warning capture it explicitly.
pytestmark = [pytest.mark.filterwarnings("ignore::sattrain.evaluation.PartialEvaluationWarning"),
              pytest.mark.usefixtures("one_thread_module")]  # tiny tensors: more threads only contend


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
    """A multi-label store written with ArrayWriter from the digits: classes 'small' (digit < 5),
    'even', and 'loop' (0, 6, 8, 9), multi-hot uint8 labels."""
    src = open_store(digits_store)
    out = tmp_path_factory.mktemp("stores") / "digits-multi.zarr"
    w = ArrayWriter(out, dataset="digits-multi", classes=["small", "even", "loop"],
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
        r = evaluate(run_dir, digits_store, protocol="paper", eps=(2 / 255, 8 / 255), samples=120, device="cpu",
                     batch_size=64)
    on_disk = json.loads((run_dir / "eval.json").read_text())
    assert on_disk["clean"] == r["clean"] and on_disk["robust"] == r["robust"]
    assert r["protocol"] == "paper" and r["protocol_label"] == "paper protocol"
    assert r["split"] == "test" and r["samples"] == 120 and r["split_size"] == 355 and not r["complete"]
    assert r["metric"] == "accuracy"
    assert all(0.0 <= v <= 1.0 for v in _numbers(r))
    assert r["clean"] > 0.6, "the trained model should be well above chance"
    assert set(r["robust"]) == {"pgd@2/255", "pgd@8/255", "cw-l2"}
    for v in r["robust"].values():
        assert v <= r["clean"]
    assert r["robust"]["pgd@8/255"] < r["clean"] - 0.1
    # the paper's PGD: 5 steps of 2/255, one start
    assert (r["pgd"]["steps"], r["pgd"]["step_size"], r["pgd"]["restarts"]) == (5, 2 / 255, 1)
    cw = r["cw"]
    assert (cw["initial_c"], cw["search_steps"], cw["steps"]) == (1e-3, 3, 20)
    assert cw["value"] < r["clean"] and cw["successes"] > 0
    assert math.isfinite(cw["median_l2"]) and 0 < cw["median_l2"] < 5
    # the authors' sweeps; contrast 1 is their (labelled) reference point and leaves the images alone
    assert [row["level"] for row in r["distortions"]["contrast"]] == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    assert [row["sigma"] for row in r["distortions"]["lowpass"]] == [1, 2, 4, 8, 16, 32]
    contrast1 = r["distortions"]["contrast"][-1]
    assert contrast1["identity"] and abs(contrast1["value"] - r["clean"]) <= 1 / 120
    assert r["distortions"]["contrast"][0]["value"] < r["clean"]  # c = 0.1 hurts
    assert r["distortions"]["lowpass"][-1]["value"] < 0.35  # sigma 32 on 16x16 leaves a flat grey image
    # the headline of the paper protocol is its PGD at the largest eps, labelled
    assert r["headline"]["name"] == "pgd@8/255" and r["headline"]["protocol_label"] == "paper protocol"
    # the sanity checks run under the paper protocol too; its 5-step PGD (last iterate) can come out
    # weaker than FGSM on a weak model, which is exactly what they are there to say
    assert [c["name"] for c in r["sanity"]["checks"]][:3] == ["pgd-reaches-eps", "monotone-in-eps", "pgd-beats-fgsm"]
    assert all(row["adv_accuracy"] >= row["value"] for row in r["pgd"]["results"])  # the authors' scoring
    table = format_table(r)
    assert "paper protocol" in table and "pgd eps=8/255 (5 x 2/255)" in table and "cw-l2" in table
    assert "contrast c=0.1" in table and "seeded subset" in table and "sanity checks:" in table
    assert "authors' scoring" in table
    # throughput per measurement, next to its seconds: samples (a sweep: per setting) per second
    assert set(r["samples_per_s"]) == set(r["seconds"]) == {"clean", "pgd", "cw", "distortions", "sanity"}
    assert on_disk["samples_per_s"] == r["samples_per_s"] and r["config"]["batch_size"] == 64
    levels = sum(len(rows) for rows in r["distortions"].values())
    per = {"clean": 120, "pgd": 120 * 2, "cw": 120, "distortions": 120 * levels, "sanity": 120 * (2 + 1)}
    for k, v in r["samples_per_s"].items():
        assert v > 0, k
        if r["seconds"][k] >= 0.05:  # seconds are rounded to the millisecond in eval.json
            assert math.isclose(v, per[k] / r["seconds"][k], rel_tol=0.03), (k, v, r["seconds"][k])
    assert "throughput: clean " in table and "samples/s per eps" in table and "(batches of 64)" in table


def test_strong_protocol_is_the_default_and_beats_the_paper_protocol(run_dir: Path, digits_store: Path) -> None:
    kw = dict(eps=(4 / 255, 8 / 255), samples=96, device="cpu", write=False)
    strong = evaluate(run_dir, digits_store, attacks=("pgd", "sanity"), **kw)
    paper = evaluate(run_dir, digits_store, protocol="paper", attacks=("pgd",), **kw)
    assert strong["protocol"] == "strong"
    p = strong["pgd"]
    assert (p["steps"], p["step_fraction"], p["restarts"]) == (50, 0.25, 2)
    assert [row["step_size"] for row in p["results"]] == [1 / 255, 2 / 255]  # eps/4
    for e in ("4/255", "8/255"):
        assert strong["robust"][f"pgd@{e}"] <= paper["robust"][f"pgd@{e}"]
    assert strong["robust"]["pgd@8/255"] < paper["robust"]["pgd@8/255"], "50 x eps/4 should find more than 5 x 2/255"
    names = [c["name"] for c in strong["sanity"]["checks"]]
    assert names == ["pgd-reaches-eps", "monotone-in-eps", "pgd-beats-fgsm", "large-eps-near-zero"]
    assert strong["sanity"]["passed"] and strong["sanity"]["large_eps"]["value"] <= 0.05


def test_sanity_checks_flag_a_weak_attack_and_a_masked_model(run_dir: Path, digits_store: Path) -> None:
    from sattrain.evaluation import GradientMaskingWarning

    # 2 steps of 1/255 cannot reach 8/255: flagged before any number is trusted
    with pytest.warns(GradientMaskingWarning, match="pgd-reaches-eps"):
        r = evaluate(run_dir, digits_store, eps=(8 / 255,), steps=2, step_size=1 / 255, attacks=("pgd", "sanity"),
                     samples=48, device="cpu", write=False)
    failed = {c["name"] for c in r["sanity"]["checks"] if not c["passed"]}
    assert "pgd-reaches-eps" in failed and not r["sanity"]["passed"]
    assert "FAIL" in format_table(r)


def test_masked_gradients_fail_the_sanity_checks(digits_store: Path, tmp_path: Path) -> None:
    """A model whose input gradient is zero almost everywhere (inputs quantised to 4 levels with a
    straight rounding) resists PGD and FGSM alike but not a large radius or, here, monotonicity:
    at least one check must fire."""
    from sattrain.evaluation import GradientMaskingWarning

    st = open_store(digits_store)
    model = _train(_images(st, "train"), torch.from_numpy(st.load("train", "labels")).long(), 10, multi=False)
    run = _save_run(tmp_path / "masked", model, st, "single")
    import sattrain.evaluation as ev

    real_load = ev.model_from_checkpoint

    class Quantised(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(torch.round(x * 3) / 3)  # round() has a zero gradient

    def load(ckpt, path, dev):  # type: ignore[no-untyped-def]
        m, spec = real_load(ckpt, path, dev)
        return Quantised(m).eval(), spec

    ev.model_from_checkpoint = load
    try:
        with pytest.warns(GradientMaskingWarning):
            r = evaluate(run, digits_store, eps=(2 / 255, 8 / 255), attacks=("pgd", "sanity"), samples=64,
                         device="cpu", write=False)
    finally:
        ev.model_from_checkpoint = real_load
    failed = {c["name"] for c in r["sanity"]["checks"] if not c["passed"]}
    assert "large-eps-near-zero" in failed, r["sanity"]


def test_evaluate_is_reproducible_and_complete_without_subset(run_dir: Path, digits_store: Path, tmp_path: Path) -> None:
    import warnings

    kw = dict(eps=(4 / 255,), attacks=("pgd",), device="cpu", write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialEvaluationWarning)
        a = evaluate(run_dir, digits_store, **kw)
    b = evaluate(run_dir, digits_store, **kw)
    assert a["complete"] and a["samples"] == 355
    assert a["robust"] == b["robust"]
    assert a["config"]["batch_size"] == 256  # no batch size given: the CPU's default
    assert set(a["samples_per_s"]) == {"clean", "pgd"}
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


def test_autoattack_reference_runs_the_standard_ensemble(run_dir: Path, digits_store: Path) -> None:
    # A radius no small CNN survives: APGD-CE alone fools every point, so this stays quick
    # while exercising the whole path through the authors' package.
    r = evaluate(run_dir, digits_store, attacks=("autoattack",), autoattack_eps=64 / 255, samples=8,
                 device="cpu", write=False)
    aa = r["autoattack"]
    assert aa["engine"] == "reference" and aa["package"].startswith("pyautoattack")
    assert aa["version"] == "standard" and aa["eps_label"] == "64/255"
    assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert r["robust"]["autoattack@64/255"] == 0.0 <= r["clean"]
    assert r["headline"]["name"] == "autoattack@64/255" and r["headline"]["protocol"] == "strong"


@pytest.mark.parametrize("fools", ["nothing", "odd"])
def test_headline_is_the_per_sample_worst_case_of_autoattack_and_pgd(
        run_dir: Path, digits_store: Path, monkeypatch, fools: str) -> None:
    """A sample either AutoAttack or PGD fools counts as fooled in the headline. An AutoAttack
    engine stand-in that fools nothing (or exactly the odd samples) makes the two disagree."""
    import sattrain.evaluation as ev

    def fake(model, num_classes, eps, seed, *args):  # type: ignore[no-untyped-def]
        def run(x, y):  # type: ignore[no-untyped-def]
            x_adv = x.clone()
            if fools == "odd":
                x_adv[1::2, :, 0, 0] = 1.0 - x_adv[1::2, :, 0, 0]  # changed: the engine's verdict "fooled"
            return x_adv
        return run, {"engine": "reference", "package": "stand-in", "version": "standard", "norm": "Linf",
                     "attacks": ["apgd-ce"]}

    monkeypatch.setattr(ev, "autoattack_reference", fake)
    n = 32
    r = evaluate(run_dir, digits_store, attacks=("autoattack", "pgd"), eps=(4 / 255, 8 / 255), samples=n,
                 device="cpu", write=False)
    aa, pgd8, w = r["autoattack"]["value"], r["robust"]["pgd@8/255"], r["worst_case"]
    assert r["headline"]["name"] == "autoattack+pgd@8/255" and r["headline"]["value"] == w["value"]
    assert r["robust"]["autoattack+pgd@8/255"] == w["value"] and w["attacks"] == ["autoattack", "pgd@8/255"]
    assert round(w["value"] * n) == round(aa * n) - w["fooled_by_pgd_only"] == round(pgd8 * n) - w[
        "fooled_by_autoattack_only"]
    assert w["value"] <= min(aa, pgd8)
    if fools == "nothing":
        # AutoAttack alone would report clean accuracy; PGD fools some: the headline is PGD's
        assert aa == r["clean"] and w["value"] == pgd8 < aa and w["fooled_by_autoattack_only"] == 0
        assert w["fooled_by_pgd_only"] == round((r["clean"] - pgd8) * n) > 0
    else:
        assert w["value"] < min(aa, pgd8) and w["fooled_by_autoattack_only"] > 0 and w["fooled_by_pgd_only"] > 0
    table = format_table(r)
    assert "worst case of autoattack and pgd@8/255 (per sample)" in table
    assert f"headline (strong protocol): autoattack+pgd@8/255 = {w['value']:.4f}" in table
    # PGD not at AutoAttack's radius: no worst case, the headline is AutoAttack alone
    r4 = evaluate(run_dir, digits_store, attacks=("autoattack", "pgd"), eps=(4 / 255,), samples=n, device="cpu",
                  write=False)
    assert "worst_case" not in r4 and r4["headline"]["name"] == "autoattack@8/255"


@pytest.mark.parametrize("engine", ["reference", "torchattacks"])
@pytest.mark.parametrize("pool_batches", [1, 2, 100])
def test_autoattack_sees_many_batches_at_once_and_attacks_in_batches(
        run_dir: Path, digits_store: Path, monkeypatch, engine: str, pool_batches: int) -> None:
    """AutoAttack gets whole batches pooled up to POOL_BYTES (the survivors of many batches then
    share full batches), runs its attacks in batches of batch_size, and each result is scored
    against its own batch's clean predictions."""
    import sattrain.evaluation as ev

    if engine == "torchattacks":
        pytest.importorskip("torchattacks")
    calls: list[int] = []
    attacked: list[int] = []
    real = {"reference": ev.autoattack_reference, "torchattacks": ev.autoattack_torchattacks}[engine]

    def recording(model, num_classes, eps, seed, *args):  # type: ignore[no-untyped-def]
        model_calls = model.forward

        def counting(x):  # type: ignore[no-untyped-def]
            attacked.append(x.shape[0])
            return model_calls(x)

        model.forward = counting
        run, info = real(model, num_classes, eps, seed, *args)

        def run_recorded(x, y):  # type: ignore[no-untyped-def]
            calls.append(x.shape[0])
            try:
                return run(x, y)
            finally:
                model.forward = model_calls
        return run_recorded, info

    monkeypatch.setattr(ev, f"autoattack_{engine}", recording)
    monkeypatch.setattr(ev, "POOL_BYTES", pool_batches * 8 * 4 * 3 * 16 * 16)  # pool_batches batches of 8
    r = evaluate(run_dir, digits_store, attacks=("autoattack",), autoattack_eps=64 / 255, samples=20,
                 batch_size=8, autoattack_engine=engine, device="cpu", write=False)
    want = {1: [8, 8, 4], 2: [16, 4], 100: [20]}[pool_batches]
    assert calls == want
    assert attacked and max(attacked) <= 8  # every forward pass of the attack: at most one batch
    assert r["robust"]["autoattack@64/255"] == 0.0 and r["samples"] == 20


def test_autoattack_engines_agree_and_beat_pgd(run_dir: Path, digits_store: Path) -> None:
    """satkit's torchattacks assembly against the reference package, and both against PGD."""
    pytest.importorskip("torchattacks")
    # 8/255 on 32 samples: APGD-CE settles most points, so FAB-T and Square (minutes on a CPU
    # for robust points) see few; the two engines must still agree on every point but one.
    kw = dict(attacks=("autoattack",), autoattack_eps=8 / 255, samples=32, device="cpu", write=False)
    ref = evaluate(run_dir, digits_store, **kw)["autoattack"]["value"]
    ours = evaluate(run_dir, digits_store, autoattack_engine="torchattacks", **kw)["autoattack"]["value"]
    pgd5 = evaluate(run_dir, digits_store, protocol="paper", attacks=("pgd",), eps=(8 / 255,), samples=32,
                    device="cpu", write=False)["robust"]["pgd@8/255"]
    assert abs(ref - ours) <= 1 / 32, (ref, ours)
    assert ref <= pgd5 and ours <= pgd5


def test_autoattack_torchattacks_engine_without_torchattacks_names_the_extra(run_dir: Path, digits_store: Path,
                                                                              monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import now raises ImportError
    with pytest.raises(SatkitError, match=r"satkit\[autoattack\]"):
        evaluate(run_dir, digits_store, attacks=("autoattack",), autoattack_engine="torchattacks", samples=4,
                 device="cpu", write=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attacks=("fgsm",)), "unknown attack 'fgsm'"),
        (dict(protocol="weak"), "--protocol"),
        (dict(step_size="eps/zero"), "--step-size"),
        (dict(step_size=0.0), "--step-size"),
        (dict(cw_search_steps=0), "--cw-search-steps"),
        (dict(autoattack_engine="foolbox"), "--autoattack-engine"),
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


def test_default_batch_size_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 on the CPU (results unchanged); 1024 on a CUDA device of at least 40 GiB, else 256."""
    from types import SimpleNamespace

    assert default_batch_size(torch.device("cpu")) == 256
    assert default_batch_size(torch.device("meta")) == 256
    for gib, want in ((141, 1024), (40, 1024), (39.5, 256), (16, 256)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda _d, gib=gib: SimpleNamespace(total_memory=int(gib * 2**30)))
        assert default_batch_size(torch.device("cuda")) == want, gib

    def broken(_d: object) -> None:
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    assert default_batch_size(torch.device("cuda:1")) == 256


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


def test_eval_cli_protocols(run_dir: Path, digits_store: Path, tmp_path: Path) -> None:
    """--protocol paper writes eval-paper.json beside the strong eval.json, labelled; --step-size eps/K."""
    import shutil

    from sattrain.cli_eval import parse_step_size

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "eval.json").unlink(missing_ok=True)
    runner = CliRunner()
    res = runner.invoke(eval_cmd, [str(run), "--store", str(digits_store), "--protocol", "paper", "--attacks", "pgd",
                                   "--eps", "8/255", "--samples", "24", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "paper protocol" in res.output and "headline (paper protocol): pgd@8/255" in res.output
    assert json.loads((run / "eval-paper.json").read_text())["protocol"] == "paper"
    assert not (run / "eval.json").exists()
    res = runner.invoke(eval_cmd, [str(run), "--store", str(digits_store), "--attacks", "pgd", "--eps", "8/255",
                                   "--steps", "10", "--step-size", "eps/2", "--samples", "24", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    e = json.loads((run / "eval.json").read_text())
    assert e["protocol"] == "strong" and e["pgd"]["step_fraction"] == 0.5 and e["pgd"]["steps"] == 10
    assert "pgd eps=8/255 (10 x eps/2, 2 starts)" in res.output
    assert parse_step_size("eps/4") == "eps/4" and parse_step_size("2/255") == 2 / 255
    res = runner.invoke(eval_cmd, [str(run), "--store", str(digits_store), "--step-size", "eps/0"])
    assert res.exit_code == 1 and "--step-size" in res.output and "Traceback" not in res.output
