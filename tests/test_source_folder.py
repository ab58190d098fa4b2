"""folder-masks: both layouts, ImageFolder class order, the non-zero mask rule, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from satdata.build import BuildConfig, build
from satdata.cli import main
from satdata.errors import SourceError
from satdata.geometry import apply_map, plan_fit
from satdata.sources.folder import read_object_mask
from satdata.store import open_store
from tests.fixtures.folder import SORTED, FolderFixture, make_folder


def _build(root: Path, out: Path, **kw: object) -> None:
    build(BuildConfig(source="folder-masks", root=str(root), out=str(out), progress=False, **kw))


def _no_store(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _check_split(out: Path, fx: FolderFixture, split: str, size: tuple[int, int], fit: str) -> None:
    st = open_store(out)
    ids = st.load(split, "ids").tolist()
    assert sorted(ids) == sorted(fx.samples[split])
    labels = st.load(split, "labels").tolist()
    masks = st.load(split, "saliency", "mask")
    for k, i in enumerate(ids):
        label, hw, obj = fx.samples[split][i]
        assert labels[k] == label
        np.testing.assert_array_equal(masks[k], apply_map(obj, plan_fit(hw, size, fit), "binary"))


def test_flat_layout_is_one_train_split(tmp_path: Path) -> None:
    fx = make_folder(tmp_path / "data")
    out = tmp_path / "flat.zarr"
    _build(fx.root, out, size=(20, 16), fit="pad")
    st = open_store(out)
    assert st.info.classes == SORTED == ["cat", "dog", "zebra"]
    assert st.info.splits == {"train": 9}
    _check_split(out, fx, "train", (20, 16), "pad")


def test_split_layout_via_cli_with_class_union(tmp_path: Path) -> None:
    fx = make_folder(tmp_path / "data", splits=("train", "val", "test"), per_class=2)
    # val lacks the zebra class: labels must still index the classes of every split
    shutil.rmtree(fx.root / "val" / "images" / "zebra")
    fx.samples["val"] = {k: v for k, v in fx.samples["val"].items() if "/zebra/" not in k}
    out = tmp_path / "s.zarr"
    res = CliRunner().invoke(main, ["build", "-s", "folder-masks", "-r", str(fx.root), "-o", str(out),
                                    "--size", "24x24", "--fit", "crop", "-q"])
    assert res.exit_code == 0, res.output
    st = open_store(out)
    assert st.info.classes == SORTED
    assert st.info.splits == {"train": 6, "val": 4, "test": 6}
    for split in ("train", "val", "test"):
        _check_split(out, fx, split, (24, 24), "crop")


def test_any_nonzero_value_is_object(tmp_path: Path) -> None:
    obj = np.zeros((6, 7), np.uint8)
    obj[1:4, 2:6] = 1
    idx = obj.copy()
    idx[1, 2:6] = 255  # a VOC-style void border: non-zero, so object
    p = tmp_path / "p.png"
    im = Image.frombytes("P", (7, 6), idx.tobytes())
    im.putpalette([0, 0, 0, 0, 0, 0] + [0, 0, 0] * 254)  # colours say nothing: indices count
    im.save(p)
    np.testing.assert_array_equal(read_object_mask(p), obj)
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[obj.astype(bool), 0] = 1  # a value that greyscale conversion would round to 0
    Image.fromarray(rgb).save(tmp_path / "r.png")
    np.testing.assert_array_equal(read_object_mask(tmp_path / "r.png"), obj)
    Image.fromarray(obj * 3).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_object_mask(tmp_path / "g.png"), obj)


# --------------------------------------------------------------------------- bad input


def _first(fx: FolderFixture, cls: str = "dog") -> str:
    return sorted(i for i in fx.samples["train"] if f"/{cls}/" in i)[0]


def test_missing_mask_is_bad_sample_named_by_image(tmp_path: Path) -> None:
    fx = make_folder(tmp_path / "data")
    img = _first(fx)
    mask = fx.root / "masks" / "dog" / (Path(img).stem + ".png")
    mask.unlink()
    out = tmp_path / "o.zarr"
    with pytest.raises(SourceError) as err:
        _build(fx.root, out)
    assert str(err.value).startswith(f"{fx.root / img}: has no mask (expected {mask})")
    _no_store(out)
    res = CliRunner().invoke(main, ["build", "-s", "folder-masks", "-r", str(fx.root), "-o", str(out),
                                    "--skip-bad", "--size", "8", "-q"])
    assert res.exit_code == 0, res.output
    assert "skipped 1 bad samples" in res.output and f"{fx.root / img}: has no mask" in res.output
    st = open_store(out)
    assert st.info.splits == {"train": 8}
    assert img not in st.load("train", "ids").tolist()


def test_mask_size_mismatch_is_error_naming_mask(tmp_path: Path) -> None:
    fx = make_folder(tmp_path / "data")
    img = _first(fx, "zebra")
    mask = fx.root / "masks" / "zebra" / (Path(img).stem + ".png")
    Image.fromarray(np.ones((5, 9), np.uint8)).save(mask)
    out = tmp_path / "o.zarr"
    res = CliRunner().invoke(main, ["build", "-s", "folder-masks", "-r", str(fx.root), "-o", str(out), "-q"])
    assert res.exit_code == 1
    assert f"{mask}: mask is 9x5 but its image is" in res.output
    _no_store(out)


def test_same_stem_twice_is_bad(tmp_path: Path) -> None:
    fx = make_folder(tmp_path / "data")
    img = fx.root / _first(fx, "cat")
    Image.open(img).convert("RGB").save(img.with_suffix(".bmp"))
    out = tmp_path / "o.zarr"
    with pytest.raises(SourceError, match="shares the stem"):
        _build(fx.root, out)
    _no_store(out)


def test_layout_errors(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="not a folder dataset"):
        _build(tmp_path / "empty", out)
    fx = make_folder(tmp_path / "both", splits=("train",), per_class=1)
    shutil.copytree(fx.root / "train" / "images", fx.root / "images")
    with pytest.raises(SourceError, match="has both images/ and train/images/"):
        _build(fx.root, out)
    fx = make_folder(tmp_path / "nomasks", per_class=1)
    shutil.rmtree(fx.root / "masks")
    with pytest.raises(SourceError, match=f"{fx.root / 'masks'}: missing masks directory"):
        _build(fx.root, out)
    with pytest.raises(SourceError, match="no such directory"):
        _build(tmp_path / "nowhere", out)
    _no_store(out)
