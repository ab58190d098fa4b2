"""The public Python API (docs/api.md): its examples run as written, and each name does what
the CLI does: the same batches, the same numbers, the same stores."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import satdata
import sattrain
from satdata.errors import SatkitError
from satdata.store import open_store

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::sattrain.evaluation.PartialEvaluationWarning")]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)


def test_public_names_resolve() -> None:
    for pkg in (sattrain, satdata):
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, (pkg.__name__, name)
        assert set(pkg.__all__) <= set(dir(pkg))
    import importlib
    import pkgutil
    from types import ModuleType

    # importing a submodule binds it on its package: no public name may be a module's name
    for pkg in (sattrain, satdata):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not mod.name.endswith(("__main__", ".dask")):
                importlib.import_module(mod.name)
        for name in pkg.__all__:
            assert not isinstance(getattr(pkg, name), ModuleType), (pkg.__name__, name)
    assert callable(sattrain.evaluate) and callable(sattrain.train)
    with pytest.raises(AttributeError):
        sattrain.no_such_name  # noqa: B018


def test_docs_api_examples_run_as_written(digits_store32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(digits_store32, tmp_path / "digits.zarr")  # what `satdata build --source digits` writes
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) == 3
    ns: dict = {}
    with pytest.warns(sattrain.evaluation.PartialEvaluationWarning):
        exec(compile(blocks[0], "docs/api.md[0]", "exec"), ns)
    result = ns["result"]
    assert result["clean"] > 0.8  # ten classes: chance is 0.1; the doc says about 0.95
    assert result["robust"]["pgd@8/255"] <= result["robust"]["pgd@2/255"] <= result["clean"]
    assert "clean" in capsys.readouterr().out
    ns = {}
    exec(compile(blocks[1], "docs/api.md[1]", "exec"), ns)
    x, y, S = ns["x"], ns["y"], ns["S"]
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,) and S.shape == (64, 1, 32, 32)
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and set(torch.unique(S).tolist()) <= {-1.0, 1.0}
    ns = {}
    exec(compile(blocks[2], "docs/api.md[2]", "exec"), ns)
    assert ns["store"].info.splits == {"train": 200, "test": 100}
    res = CliRunner().invoke(_satdata_main(), ["verify", "mine.zarr"])
    assert res.exit_code == 0, res.output


def _satdata_main():  # type: ignore[no-untyped-def]
    from satdata.cli import main

    return main


# --------------------------------------------------------------------------- StoreDataset / StoreLoader


def test_dataset_items_equal_the_loaders_batches(digits_store: Path) -> None:
    ds = sattrain.StoreDataset(digits_store, "test", maps="ink")
    loader = sattrain.StoreLoader(digits_store, "test", batch_size=50, maps="ink", augment="none", shuffle=False)
    assert len(ds) == 355 and len(loader) == 8 and loader.placement == "device"
    first = next(iter(loader))
    for i in (0, 7, 49):
        x, y, S = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and y.dtype == torch.int64
        assert torch.equal(x, first.x[i]) and int(y) == int(first.y[i]) and torch.equal(S, first.S[i])
    st = open_store(digits_store)
    assert (ds[-1][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().tolist() == \
        st.load("test", "images")[-1].tolist()
    with pytest.raises(IndexError):
        ds[355]
    two = sattrain.StoreDataset(digits_store, "test", maps=["ink", "box"])
    assert set(two[0][2]) == {"ink", "box"} and len(sattrain.StoreDataset(digits_store, "test")[0]) == 2


def test_dataset_per_sample_reads_when_over_budget(digits_store: Path) -> None:
    held = sattrain.StoreDataset(digits_store, "test", maps="box")
    lazy = sattrain.StoreDataset(digits_store, "test", maps="box", memory_budget=1)
    for i in (0, 100, 354):
        a, b = held[i], lazy[i]
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_dataset_with_dataloader_workers_and_a_joint_transform(digits_store: Path) -> None:
    def flip(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flip(-1), s.flip(-1)

    ds = sattrain.StoreDataset(digits_store, "train", maps="box", transform=flip)
    plain = sattrain.StoreDataset(digits_store, "train", maps="box")
    assert torch.equal(ds[3][2], plain[3][2].flip(-1)) and torch.equal(ds[3][0], plain[3][0].flip(-1))
    loader = torch.utils.data.DataLoader(ds, batch_size=100, num_workers=2)
    seen = sum(b[0].shape[0] for b in loader)
    assert seen == 1442


def test_loader_epochs_reshuffle_reproducibly_and_pick_maps(digits_store: Path) -> None:
    a = sattrain.StoreLoader(digits_store, "train", batch_size=64, maps=["ink", "box"], seed=3)
    b = sattrain.StoreLoader(digits_store, "train", batch_size=64, maps=["ink", "box"], seed=3)
    e0 = [batch.y for batch in a]
    e1 = [batch.y for batch in a]
    assert len(e0) == len(a) == 23 and not all(torch.equal(u, v) for u, v in zip(e0, e1))
    b.set_epoch(1)
    assert all(torch.equal(u, v) for u, v in zip(e1, [batch.y for batch in b]))
    chosen = set()
    for _ in range(6):
        next(iter(a))
        chosen.add(a.map_name)
    assert chosen == {"ink", "box"}
    with pytest.raises(SatkitError, match="batch_size"):
        sattrain.StoreLoader(digits_store, "train", batch_size=1)
    with pytest.raises(SatkitError, match="no split 'val'"):
        sattrain.StoreLoader(digits_store, "val")
    with pytest.raises(SatkitError, match="no map 'nope'"):
        sattrain.StoreDataset(digits_store, "train", maps="nope")


def test_sat_perturbation_is_sat_perturb_at_the_curriculum() -> None:
    sat = sattrain.SATPerturbation(eps0=4 / 255, alpha=0.6)
    x, S = torch.rand(4, 3, 8, 8), torch.sign(torch.randn(4, 1, 8, 8))
    got = sat(x, S, 10, torch.Generator().manual_seed(1))
    want = sattrain.sat_perturb(x, S, eps=4 / 255, p=sattrain.curriculum_p(10, 0.6),
                                generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want) and sat.p(10) == pytest.approx(0.4)
    with pytest.raises(SatkitError, match="alpha"):
        sattrain.SATPerturbation(alpha=0)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_a_module_equals_evaluating_its_run(digits_store: Path, tmp_path: Path) -> None:
    """The same weights give the same numbers whether evaluate() gets the run or the module."""
    run = sattrain.train(sattrain.TrainConfig(store=str(digits_store), out=str(tmp_path / "run"), method="standard",
                                              epochs=2, batch_size=64, train_samples=256, eval_samples=32,
                                              eval_steps=1, summary_samples=0, device="cpu", progress=False),
                         log=lambda m: None)
    kw = dict(attacks=["pgd"], eps=[2 / 255, 8 / 255], steps=5, restarts=1, device="cpu", write=False)
    by_run = sattrain.evaluate(run, digits_store, **kw)
    model, _ = sattrain.load_model(run)
    model.train()
    before = [p.requires_grad for p in model.parameters()]
    by_module = sattrain.evaluate(model, sattrain.StoreDataset(digits_store, "test"), **kw)
    assert by_module["clean"] == by_run["clean"] and by_module["robust"] == by_run["robust"]
    assert by_module["checkpoint"] is None and by_module["model"]["name"] == "SmallCNN"
    assert model.training and [p.requires_grad for p in model.parameters()] == before  # given back as it was
    assert not (tmp_path / "eval.json").exists()

    # a model that normalises its own input, against the same model given normalize=
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    class Inner(nn.Module):  # takes normalised input
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.m(z * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1))

    normed = sattrain.evaluate(Inner(), digits_store, normalize=(mean, std), **kw)
    assert normed["clean"] == pytest.approx(by_run["clean"], abs=1 / 355)
    assert normed["normalize"] == [list(mean), list(std)]


def test_evaluate_refuses_a_module_that_does_not_fit(digits_store: Path, tmp_path: Path) -> None:
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 7))
    with pytest.raises(SatkitError, match=r"outputs of shape \(256, 7\).*expected logits \(256, 10\)"):
        sattrain.evaluate(wrong, digits_store, attacks=["pgd"], eps=[8 / 255], device="cpu")
    with pytest.raises(SatkitError, match="normalize"):
        sattrain.evaluate(wrong, digits_store, normalize=((0.5,), (0.0,)), device="cpu")
    out = tmp_path / "mine.json"
    ok = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    r = sattrain.evaluate(ok, digits_store, attacks=["pgd"], eps=[8 / 255], steps=2, restarts=1, samples=50,
                          device="cpu", out=out)
    assert json.loads(out.read_text())["clean"] == r["clean"]


# --------------------------------------------------------------------------- StoreWriter


def test_store_writer_round_trip_and_a_run_on_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (150, 16, 16, 3), dtype=np.uint8)
    masks = rng.random((150, 16, 16)) > 0.5
    cams = rng.random((150, 16, 16)).astype(np.float32)
    out = tmp_path / "mine.zarr"
    with satdata.StoreWriter(out, dataset="mine", classes=["a", "b", "c"], image_size=(16, 16),
                             maps={"mask": "binary", "cam": "unit"}, provenance={"converter": "test"}) as w:
        for i in range(150):
            w.add("train" if i < 100 else "test", images[i], i % 3, id=f"s{i}",
                  maps={"mask": masks[i], "cam": cams[i]}, boxes=[(i % 3, 1, 2, 9, 10)] if i % 2 else None)
    st = satdata.open_store(out)
    assert st.info.splits == {"train": 100, "test": 50} and st.info.provenance["converter"] == "test"
    assert np.array_equal(st.load("train", "images"), images[:100])
    assert st.load("test", "labels").tolist() == [i % 3 for i in range(100, 150)]
    assert np.array_equal(st.load("train", "saliency", "mask"), masks[:100].astype(np.uint8))
    assert np.abs(st.load("test", "saliency", "cam") / 255 - cams[100:]).max() <= 0.5 / 255 + 1e-7
    boxes = st.load("train", "boxes")
    assert boxes.shape == (50, 6) and boxes[0].tolist() == [1, 1, 1, 2, 9, 10]
    from satdata.cli import main as satdata_main
    from sattrain.cli import main as sattrain_main

    assert CliRunner().invoke(satdata_main, ["verify", str(out)]).exit_code == 0
    res = CliRunner().invoke(sattrain_main, ["run", str(out), "--map", "mask", "--epochs", "1", "--batch-size", "32",
                                             "--summary-samples", "0", "--out", str(tmp_path / "run"), "-q"])
    assert res.exit_code == 0, res.output


def test_store_writer_leaves_nothing_on_error_and_refuses_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    with pytest.raises(RuntimeError):
        with satdata.StoreWriter(out, dataset="x", classes=["a"], image_size=(8, 8)) as w:
            w.add("train", np.zeros((8, 8, 3), np.uint8), 0)
            raise RuntimeError("a converter's own bug")
    assert os.listdir(tmp_path) == []
    with satdata.StoreWriter(out, dataset="x", classes=["a", "b"], image_size=(8, 8), label_kind="multi") as w:
        with pytest.raises(SatkitError, match=r"train sample 0: image must be uint8 of shape \(8, 8, 3\)"):
            w.add("train", np.zeros((8, 9, 3), np.uint8), [0])
        with pytest.raises(SatkitError, match="unknown split"):
            w.add("holdout", np.zeros((8, 8, 3), np.uint8), [0])
        with pytest.raises(SatkitError, match="list of class indices"):
            w.add("train", np.zeros((8, 8, 3), np.uint8), [2])
        w.add("train", np.zeros((8, 8, 3), np.uint8), [0, 1])
        w.add("train", np.zeros((8, 8, 3), np.uint8), np.array([1, 0]))
    assert satdata.open_store(out).load("train", "labels").tolist() == [[1, 1], [1, 0]]
    with pytest.raises(SatkitError, match="already exists.*overwrite=True"):
        satdata.StoreWriter(out, dataset="x", classes=["a"], image_size=(8, 8))
    with pytest.raises(SatkitError, match="no sample was added"):
        satdata.StoreWriter(out, dataset="x", classes=["a"], image_size=(8, 8), overwrite=True).close()
    assert satdata.open_store(out).info.splits == {"train": 2}  # the old store is untouched
