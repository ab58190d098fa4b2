"""HDF5 export and import: the documented layout, an exact round trip, resizing, and bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import satdata.sources.h5  # noqa: F401  (registers the "h5" source)
from satdata.addmap import NewMap, add_map
from satdata.build import BuildConfig, build
from satdata.cli_maps import export_cmd
from satdata.errors import SatkitError, SourceError
from satdata.export import export_h5
from satdata.geometry import FIT_MODES, apply_image, apply_map, plan_fit
from satdata.store import open_store
from satdata.verify import verify_digests


@pytest.fixture(scope="module")
def rich_store(digits_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits store plus a signed 3-channel map and a unit map covering every value."""
    out = tmp_path_factory.mktemp("h5") / "rich.zarr"
    shutil.copytree(digits_store, out)
    splits = open_store(out).info.splits
    rng = np.random.default_rng(0)
    signed = {s: rng.integers(-127, 128, size=(n, 16, 16, 3), dtype=np.int8) for s, n in splits.items()}
    unit = {s: rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8) for s, n in splits.items()}
    signed["train"][0, 0, 0] = [-127, 0, 127]
    unit["train"][0, 0, :2] = [0, 255]
    add_map(out, NewMap("gbp", "signed", "gbp", channels=3, provenance={"teacher": {"sha256": "ab"}}),
            lambda s: iter([signed[s]]))
    add_map(out, NewMap("cam", "unit", "gradcampp"), lambda s: iter([unit[s]]))
    return out


def test_export_writes_the_documented_layout(rich_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "rich.h5"
    res = CliRunner().invoke(export_cmd, [str(rich_store), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    st = open_store(rich_store)
    with h5py.File(out, "r") as f:
        assert f.attrs["satkit_h5_version"] == 1
        assert f.attrs["dataset"] == "digits" and f.attrs["label_kind"] == "single"
        assert json.loads(f.attrs["classes"]) == [str(i) for i in range(10)]
        assert sorted(f) == ["test", "train"]
        g = f["train"]
        n = st.info.splits["train"]
        assert g["images"].shape == (n, 16, 16, 3) and g["images"].dtype == np.uint8
        assert g["labels"].dtype == np.int64 and g["boxes"].shape[1] == 6
        assert h5py.check_string_dtype(g["ids"].dtype).encoding == "utf-8"
        assert g["ids"][0].decode() == str(st.load("train", "ids")[0])
        assert sorted(g["saliency"]) == ["box", "cam", "gbp", "ink"]
        gbp = g["saliency"]["gbp"]
        assert gbp.shape == (n, 16, 16, 3) and gbp.dtype == np.int8
        assert (gbp.attrs["encoding"], gbp.attrs["kind"], int(gbp.attrs["channels"])) == ("signed", "gbp", 3)
        assert json.loads(gbp.attrs["provenance"])["teacher"]["sha256"] == "ab"
    res = CliRunner().invoke(export_cmd, [str(rich_store), "--out", str(out), "-q"])
    assert res.exit_code == 1 and "--overwrite" in res.output
    # a subset of maps and splits
    export_h5(st, out, splits=["test"], maps=["ink"], overwrite=True, progress=False)
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["test"] and sorted(f["test"]["saliency"]) == ["ink"]
    with pytest.raises(SatkitError, match="--maps: .*no map 'nope'"):
        export_h5(st, out, maps=["nope"], overwrite=True, progress=False)


def test_round_trip_store_h5_store_is_bit_for_bit(rich_store: Path, tmp_path: Path) -> None:
    h5 = export_h5(open_store(rich_store), tmp_path / "rich.h5", progress=False)
    back = tmp_path / "back.zarr"
    build(BuildConfig(source="h5", root=str(h5), out=str(back), size=(16, 16), progress=False))
    a, b = open_store(rich_store), open_store(back)
    assert b.info.dataset == a.info.dataset and b.info.classes == a.info.classes
    assert b.info.splits == a.info.splits and b.info.label_kind == a.info.label_kind
    assert sorted(b.info.maps) == sorted(a.info.maps)
    for name, m in a.info.maps.items():
        got = b.info.maps[name]
        assert (got.encoding, got.kind, got.channels) == (m.encoding, m.kind, m.channels)
    for split in a.info.splits:
        for field in ("images", "labels", "ids", "boxes"):
            x, y = a.load(split, field), b.load(split, field)
            assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all(), (split, field)
        for name in a.info.maps:
            x, y = a.load(split, "saliency", name), b.load(split, "saliency", name)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), (split, name)
    assert verify_digests(b).ok


def test_same_size_fit_is_an_identity() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    maps = {
        "unit": rng.integers(0, 256, size=(16, 16), dtype=np.uint8),
        "signed": rng.integers(-127, 128, size=(16, 16, 3), dtype=np.int8),
        "binary": rng.integers(0, 2, size=(16, 16), dtype=np.uint8),
    }
    for mode in FIT_MODES:
        fit = plan_fit((16, 16), (16, 16), mode)
        assert np.array_equal(apply_image(img, fit), img)
        for enc, m in maps.items():
            out = apply_map(m, fit, enc)
            assert out.dtype == m.dtype and np.array_equal(out, m), (mode, enc)


def test_import_at_another_size_resizes_images_and_maps(rich_store: Path, tmp_path: Path) -> None:
    h5 = export_h5(open_store(rich_store), tmp_path / "rich.h5", progress=False)
    small = tmp_path / "small.zarr"
    build(BuildConfig(source="h5", root=str(h5), out=str(small), size=(8, 8), progress=False))
    st = open_store(small)
    n = st.info.splits["test"]
    assert st.load("test", "images").shape == (n, 8, 8, 3)
    assert st.load("test", "saliency", "gbp").shape == (n, 8, 8, 3)
    assert set(np.unique(st.load("test", "saliency", "ink"))) <= {0, 1}


def write_h5(path: Path, **over: object) -> Path:
    """A hand-written file in the layout: multi-label, boxes, no ids, defaults left out."""
    rng = np.random.default_rng(5)
    with h5py.File(path, "w") as f:
        f.attrs["satkit_h5_version"] = over.get("version", 1)
        f.attrs["classes"] = json.dumps(["cat", "dog", "bird"])
        for split, n in (("train", 6), ("val", 3)):
            g = f.create_group(split)
            g["images"] = rng.integers(0, 256, size=(n, 10, 12, 3), dtype=np.uint8)
            lab = np.zeros((n, 3), np.uint8)
            lab[np.arange(n), np.arange(n) % 3] = 1
            lab[0, 2] = over.get("label_value", 1)
            g["labels"] = lab
            g["boxes"] = np.array([[0, 0, 1, 1, 5, 6], [0, 2, 2, 2, 12, 10], [n - 1, 1, 0, 0, 3, 3]], np.float32)
            mask = rng.integers(0, 2, size=(n, 10, 12), dtype=np.uint8)
            if split == "train":
                mask[3, 0, 0] = over.get("mask_value", 1)
            s = g.create_group("saliency")
            s["mask"] = mask
            s["mask"].attrs["encoding"] = "binary"
            s["mask"].attrs["kind"] = "mask"
            s["mask"].attrs["channels"] = 1
            if split == "train" or not over.get("drop_val_map"):
                sg = rng.integers(-127, 128, size=(n, 10, 12, 3), dtype=np.int8)
                sg[0, 0, 0, 0] = over.get("signed_value", -127)
                s["sg"] = sg
                s["sg"].attrs["encoding"] = "signed"
                s["sg"].attrs["kind"] = "gbp"
                s["sg"].attrs["channels"] = 3
    return path


def test_hand_written_file_with_defaults(tmp_path: Path) -> None:
    h5 = write_h5(tmp_path / "hand.h5")
    out = tmp_path / "hand.zarr"
    build(BuildConfig(source="h5", root=str(h5), out=str(out), size=(10, 12), progress=False))
    st = open_store(out)
    assert st.info.dataset == "hand" and st.info.label_kind == "multi"
    assert st.info.splits == {"train": 6, "val": 3}
    assert list(st.load("train", "ids")[:2]) == ["train/0", "train/1"]
    with h5py.File(h5, "r") as f:
        assert np.array_equal(st.load("train", "labels"), f["train/labels"][...])
        assert np.array_equal(st.load("train", "saliency", "sg"), f["train/saliency/sg"][...])
        assert np.array_equal(st.load("val", "images"), f["val/images"][...])
        assert np.array_equal(st.load("train", "boxes"), f["train/boxes"][...])


@pytest.mark.parametrize("over, match", [
    ({"version": 2}, "layout version 2"),
    ({"mask_value": 2}, r"train/saliency/mask\[3\]: binary map has values other than 0/1"),
    ({"signed_value": -128}, r"train/saliency/sg\[0\]: signed map has -128"),
    ({"drop_val_map": True}, "split 'val' has other maps"),
    ({"label_value": 3}, r"train/labels\[0\]: multi-hot labels must be 0 or 1"),
])
def test_bad_files_are_named(tmp_path: Path, over: dict, match: str) -> None:
    h5 = write_h5(tmp_path / "bad.h5", **over)
    with pytest.raises(SourceError, match=match) as e:
        build(BuildConfig(source="h5", root=str(h5), out=str(tmp_path / "o.zarr"), size=(10, 12), progress=False))
    assert "bad.h5" in str(e.value)
    assert not (tmp_path / "o.zarr").exists()


def test_not_an_h5_layout(tmp_path: Path) -> None:
    p = tmp_path / "plain.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(SourceError, match="no 'satkit_h5_version'"):
        build(BuildConfig(source="h5", root=str(p), out=str(tmp_path / "o.zarr"), progress=False))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(SourceError, match="not a readable HDF5 file"):
        build(BuildConfig(source="h5", root=str(tmp_path / "text.h5"), out=str(tmp_path / "o.zarr"), progress=False))
    with h5py.File(p, "a") as f:
        f.attrs["satkit_h5_version"] = 1
        f.attrs["classes"] = "[]"
    with pytest.raises(SourceError, match="'classes' must be a JSON list"):
        build(BuildConfig(source="h5", root=str(p), out=str(tmp_path / "o.zarr"), progress=False))


def test_an_interrupted_export_leaves_no_file(rich_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import satdata.export as ex

    calls = {"n": 0}
    real = ex._copy

    def failing(*args: object, **kw: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(ex, "_copy", failing)
    with pytest.raises(KeyboardInterrupt):
        export_h5(open_store(rich_store), tmp_path / "x.h5", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_rewritten_file_is_read_afresh(rich_store: Path, tmp_path: Path) -> None:
    st = open_store(rich_store)
    h5 = tmp_path / "x.h5"
    export_h5(st, h5, maps=["ink"], progress=False)
    build(BuildConfig(source="h5", root=str(h5), out=str(tmp_path / "a.zarr"), size=(16, 16), progress=False))
    export_h5(st, h5, maps=["cam"], splits=["test"], overwrite=True, progress=False)
    build(BuildConfig(source="h5", root=str(h5), out=str(tmp_path / "b.zarr"), size=(16, 16), progress=False))
    b = open_store(tmp_path / "b.zarr")
    assert sorted(b.info.maps) == ["cam"] and list(b.info.splits) == ["test"]
    assert np.array_equal(b.load("test", "saliency", "cam"), st.load("test", "saliency", "cam"))
