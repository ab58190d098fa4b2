"""flowers17-masks: class order, trimap rule, splits, --unmasked, mask geometry, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.io import savemat

from satdata.build import BuildConfig, build
from satdata.cli import main
from satdata.errors import SatkitError, SourceError
from satdata.geometry import apply_map, plan_fit
from satdata.sources import SourceOptions
from satdata.sources.flowers17 import default_split
from satdata.store import open_store
from tests.fixtures.flowers17 import FOREGROUND, Flowers17Fixture, make_flowers17, write_trimap

# The dataset's order (image numbers 1-80 are Daffodil, ..., 1281-1360 Pansy).
OFFICIAL = ["Daffodil", "Snowdrop", "LilyValley", "Bluebell", "Crocus", "Iris", "Tigerlily",
            "Tulip", "Fritillary", "Sunflower", "Daisy", "ColtsFoot", "Dandelion", "Cowslip",
            "Buttercup", "Windflower", "Pansy"]


@pytest.fixture(scope="module")
def flowers(tmp_path_factory: pytest.TempPathFactory) -> Flowers17Fixture:
    return make_flowers17(tmp_path_factory.mktemp("f17") / "flowers")


def _build(root: Path, out: Path, **kw: object) -> None:
    build(BuildConfig(source="flowers17-masks", root=str(root), out=str(out), progress=False, **kw))


def _no_store(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _number(sample_id: str) -> int:
    return int(sample_id.split("_")[-1].split(".")[0])


def test_default_build_masked_images_only(flowers: Flowers17Fixture, tmp_path: Path) -> None:
    out = tmp_path / "f.zarr"
    _build(flowers.root, out, size=(16, 20), fit="crop")
    st = open_store(out)
    assert st.info.classes == OFFICIAL
    assert set(st.info.maps) == {"mask"} and st.info.maps["mask"].encoding == "binary"
    keys = {"train": "trn1", "val": "val1", "test": "tst1"}
    total = 0
    for split, key in keys.items():
        ids = st.load(split, "ids").tolist()
        nums = [_number(i) for i in ids]
        assert nums == sorted(set(flowers.splits[key]) & set(flowers.trimapped))
        assert st.load(split, "labels").tolist() == [(n - 1) // 80 for n in nums]
        masks = st.load(split, "saliency", "mask")
        for k, n in enumerate(nums):
            fit = plan_fit(flowers.sizes[n], (16, 20), "crop")
            np.testing.assert_array_equal(masks[k], apply_map(flowers.masks[n], fit, "binary"))
        total += len(ids)
    assert total == len(flowers.trimapped)


def test_trimap_rule_foreground_only(tmp_path: Path) -> None:
    """Only (128, 0, 0) is object: the boundary band and the background are not."""
    from satdata.sources.flowers17 import trimap_mask

    flower = np.zeros((10, 12), bool)
    flower[3:7, 4:9] = True
    for palette in (True, False):
        p = tmp_path / f"t{palette}.png"
        write_trimap(p, flower, palette=palette)
        np.testing.assert_array_equal(trimap_mask(p), flower.astype(np.uint8))


def test_cli_unmasked_whole_keeps_every_image(flowers: Flowers17Fixture, tmp_path: Path) -> None:
    out = tmp_path / "whole.zarr"
    res = CliRunner().invoke(main, ["build", "-s", "flowers17-masks", "-r", str(flowers.root), "-o", str(out),
                                    "--size", "8", "--unmasked", "whole", "-q"])
    assert res.exit_code == 0, res.output
    st = open_store(out)
    assert st.info.splits == {"train": 680, "val": 340, "test": 340}
    assert st.info.provenance["options"] == {"unmasked": "whole"}
    ids = st.load("val", "ids").tolist()
    masks = st.load("val", "saliency", "mask")
    for k, i in enumerate(ids):
        n = _number(i)
        if n in flowers.masks:
            want = apply_map(flowers.masks[n], plan_fit(flowers.sizes[n], (8, 8), "stretch"), "binary")
            np.testing.assert_array_equal(masks[k], want)
        else:
            assert masks[k].all()
    labels = st.load("train", "labels")
    assert np.bincount(labels, minlength=17).tolist() == [40] * 17


def test_without_datasplits_uses_documented_split(flowers: Flowers17Fixture, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(flowers.root, root)
    (root / "datasplits.mat").unlink()
    out = tmp_path / "d.zarr"
    _build(root, out, size=(8, 8))
    st = open_store(out)
    for split in ("train", "val", "test"):
        nums = [_number(i) for i in st.load(split, "ids").tolist()]
        assert nums == [n for n in flowers.trimapped if default_split(n) == split]
    # 40/20/20 a class
    counts = {s: sum(default_split(n) == s for n in range(1, 81)) for s in ("train", "val", "test")}
    assert counts == {"train": 40, "val": 20, "test": 20}


def test_root_parent_named_17flowers(flowers: Flowers17Fixture, tmp_path: Path) -> None:
    parent = tmp_path / "p"
    shutil.copytree(flowers.root, parent / "17flowers")
    out = tmp_path / "p.zarr"
    _build(parent, out, size=(8, 8), splits=("test",))
    assert open_store(out).info.splits["test"] == len(set(flowers.splits["tst1"]) & set(flowers.trimapped))


def test_bad_unmasked_value_is_refused(flowers: Flowers17Fixture, tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    with pytest.raises(SatkitError, match="--unmasked: must be one of skip, whole"):
        _build(flowers.root, out, options=SourceOptions(unmasked="all"), given_options=("unmasked",))
    _no_store(out)


# --------------------------------------------------------------------------- bad input


def _wrong_size_trimap(root: Path, n: int) -> None:
    flower = np.zeros((7, 9), bool)
    flower[2:5, 2:6] = True
    write_trimap(root / "trimaps" / f"image_{n:04d}.png", flower, palette=True)


def _no_foreground(root: Path, n: int) -> None:
    write_trimap(root / "trimaps" / f"image_{n:04d}.png", np.zeros((24, 18), bool), palette=False)


BAD_SAMPLES = {
    "mask size differs": (_wrong_size_trimap, "trimaps/image_{n:04d}.png: mask is 9x7 but its image is"),
    "trimap without foreground": (_no_foreground, "trimaps/image_{n:04d}.png: trimap has no foreground pixel"),
    "image missing": (lambda r, n: (r / "jpg" / f"image_{n:04d}.jpg").unlink(),
                      "jpg/image_{n:04d}.jpg: image {n} has trimap image_{n:04d}.png but its file is missing"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample_errors_then_skip_bad(case: str, flowers: Flowers17Fixture, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(flowers.root, root)
    n = 1  # image_0001: a trimapped Daffodil, 24x18
    damage, message = BAD_SAMPLES[case]
    damage(root, n)
    want = message.format(n=n)
    out = tmp_path / "out.zarr"
    with pytest.raises(SourceError) as err:
        _build(root, out, size=(8, 8))
    assert want in str(err.value)
    _no_store(out)
    res = CliRunner().invoke(main, ["build", "-s", "flowers17-masks", "-r", str(root), "-o", str(out),
                                    "--size", "8", "--skip-bad", "-q"])
    assert res.exit_code == 0, res.output
    assert "skipped 1 bad samples" in res.output and want in res.output
    st = open_store(out)
    assert sum(st.info.splits.values()) == len(flowers.trimapped) - 1
    assert all(f"image_{n:04d}" not in i for s in st.info.splits for i in st.load(s, "ids").tolist())


def _mat(root: Path, **over: np.ndarray) -> None:
    base = {"trn1": np.arange(1, 681, dtype=np.float64)[None, :],
            "val1": np.arange(681, 1021, dtype=np.float64)[None, :],
            "tst1": np.arange(1021, 1361, dtype=np.float64)[None, :]}
    base.update(over)
    savemat(str(root / "datasplits.mat"), base)


@pytest.mark.parametrize("damage,problem", [
    (lambda r: (r / "datasplits.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage" * 3), "not a readable MATLAB file"),
    (lambda r: _mat(r, val1=np.arange(600, 700, dtype=np.float64)[None, :]), "image 600 is in both trn1 and val1"),
    (lambda r: _mat(r, tst1=np.array([[1021.0, 1400.0]])), "tst1 holds image number 1400, outside 1..1360"),
    (lambda r: savemat(str(r / "datasplits.mat"), {"trn1": np.array([[1.0]])}), "has no 'val1'"),
])
def test_bad_datasplits_is_an_error_naming_it(damage, problem: str, flowers: Flowers17Fixture,
                                              tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(flowers.root, root)
    damage(root)
    out = tmp_path / "out.zarr"
    res = CliRunner().invoke(main, ["build", "-s", "flowers17-masks", "-r", str(root), "-o", str(out), "-q"])
    assert res.exit_code == 1
    assert f"{root / 'datasplits.mat'}: {problem}" in res.output
    _no_store(out)


def test_missing_directories(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    with pytest.raises(SourceError, match="not an Oxford 17 Flowers directory"):
        _build(tmp_path, out)
    (tmp_path / "jpg").mkdir()
    with pytest.raises(SourceError, match=r"trimaps: missing trimaps/ directory"):
        _build(tmp_path, out)
    _no_store(out)


def test_foreground_colour_constant() -> None:
    from satdata.sources.flowers17 import FOREGROUND_RGB, label_of

    assert FOREGROUND_RGB == FOREGROUND
    assert [label_of(n) for n in (1, 80, 81, 1281, 1360)] == [0, 0, 1, 16, 16]
