"""tiny-imagenet-boxes: label order, the inclusive-box convention, geometry, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from satdata.build import BuildConfig, build
from satdata.cli import main
from satdata.errors import SourceError
from satdata.geometry import apply_boxes, plan_fit, rasterize_boxes
from satdata.sources.tiny_imagenet import parse_box
from satdata.store import open_store
from tests.fixtures.tiny_imagenet import NAMES, WNIDS, TinyImageNetFixture, make_tiny_imagenet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyImageNetFixture:
    return make_tiny_imagenet(tmp_path_factory.mktemp("tin"))


def _build(root: Path, out: Path, **kw: object) -> None:
    build(BuildConfig(source="tiny-imagenet-boxes", root=str(root), out=str(out), progress=False, **kw))


def _no_store(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _continuous(box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([x0, y0, x1 + 1, y1 + 1], dtype=np.float64)


# --------------------------------------------------------------------------- convention


def test_parse_box_inclusive_to_continuous() -> None:
    assert parse_box(["0", "0", "63", "63"], "f") == (0.0, 0.0, 64.0, 64.0)
    assert parse_box(["7", "3", "7", "3"], "f") == (7.0, 3.0, 8.0, 4.0)  # one pixel: area 1
    assert "zero area" in parse_box(["8", "3", "7", "9"], "f")
    assert "outside" in parse_box(["0", "0", "64", "10"], "f")
    assert "outside" in parse_box(["-1", "0", "5", "10"], "f")
    assert "integers" in parse_box(["0", "0", "5.5", "10"], "f")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 63), st.integers(0, 63), st.integers(0, 63), st.integers(0, 63))
def test_converted_box_covers_exactly_the_listed_pixels(a: int, b: int, c: int, d: int) -> None:
    x0, x1 = sorted((a, c))
    y0, y1 = sorted((b, d))
    box = parse_box([str(x0), str(y0), str(x1), str(y1)], "f")
    assert not isinstance(box, str)
    drawn = rasterize_boxes(np.array([box]), (64, 64))
    want = np.zeros((64, 64), np.uint8)
    want[y0:y1 + 1, x0:x1 + 1] = 1
    np.testing.assert_array_equal(drawn, want)


# --------------------------------------------------------------------------- builds


def test_build_labels_order_and_boxes(tiny: TinyImageNetFixture, tmp_path: Path) -> None:
    out = tmp_path / "tin.zarr"
    _build(tiny.root, out, size=(32, 32))
    st_ = open_store(out)
    assert st_.info.classes == NAMES
    assert st_.info.splits == {"train": len(tiny.train), "val": len(tiny.val)}
    assert set(st_.info.maps) == {"boxes"}
    for split, truth in (("train", tiny.train), ("val", tiny.val)):
        ids = st_.load(split, "ids").tolist()
        assert sorted(ids) == sorted(truth)
        labels = st_.load(split, "labels")
        assert [truth[i][0] for i in ids] == labels.tolist()
        boxes = st_.load(split, "boxes")
        maps = st_.load(split, "saliency", "boxes")
        assert len(boxes) == len(ids)  # one box per image
        for row in boxes:
            k = int(row[0])
            label, raw = truth[ids[k]]
            fit = plan_fit((64, 64), (32, 32), "stretch")
            want = apply_boxes(_continuous(raw), fit)[0]
            assert int(row[1]) == label
            np.testing.assert_allclose(row[2:], want, atol=1e-5)
            np.testing.assert_array_equal(maps[k], rasterize_boxes(want, (32, 32)))
    # train ids in class order (wnids.txt), numeric order within a class
    train_ids = st_.load("train", "ids").tolist()
    assert train_ids[:3] == [f"train/{WNIDS[0]}/images/{WNIDS[0]}_{i}.JPEG" for i in range(3)]
    # the full-image box fills the map; the one-pixel box keeps a column
    full = train_ids.index(f"train/{WNIDS[0]}/images/{WNIDS[0]}_2.JPEG")
    assert st_.load("train", "saliency", "boxes")[full].all()


def test_worker_processes_give_the_same_store(tiny: TinyImageNetFixture, tmp_path: Path) -> None:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _build(tiny.root, a, size=(16, 16))
    _build(tiny.root, b, size=(16, 16), workers=2)
    sa, sb = open_store(a), open_store(b)
    for split in ("train", "val"):
        for field in ("images", "labels", "ids", "boxes"):
            np.testing.assert_array_equal(sa.load(split, field), sb.load(split, field))
        np.testing.assert_array_equal(sa.load(split, "saliency", "boxes"), sb.load(split, "saliency", "boxes"))


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_geometry_non_square(tiny: TinyImageNetFixture, tmp_path: Path, fit: str) -> None:
    out = tmp_path / f"{fit}.zarr"
    _build(tiny.root, out, size=(24, 40), fit=fit, splits=("val",))
    st_ = open_store(out)
    ids = st_.load("val", "ids").tolist()
    maps = st_.load("val", "saliency", "boxes")
    plan = plan_fit((64, 64), (24, 40), fit)
    for k, i in enumerate(ids):
        xy = apply_boxes(_continuous(tiny.val[i][1]), plan)
        np.testing.assert_array_equal(maps[k], rasterize_boxes(xy, (24, 40)))


def test_cli_root_is_parent_and_test_split_not_offered(tiny: TinyImageNetFixture, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.zarr"
    res = runner.invoke(main, ["build", "-s", "tiny-imagenet-boxes", "-r", str(tiny.root.parent),
                               "-o", str(out), "--size", "16", "--splits", "val", "-q"])
    assert res.exit_code == 0, res.output
    assert "val 6" in res.output and "maps: boxes" in res.output
    assert open_store(out).info.splits == {"val": 6}
    out2 = tmp_path / "test.zarr"
    res = runner.invoke(main, ["build", "-s", "tiny-imagenet-boxes", "-r", str(tiny.root),
                               "-o", str(out2), "--splits", "test", "-q"])
    assert res.exit_code != 0 and "has no split 'test'" in res.output
    _no_store(out2)


# --------------------------------------------------------------------------- bad input


def _edit_line(path: Path, lineno: int, new: str | None) -> None:
    lines = path.read_text().splitlines(keepends=True)
    if new is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new + "\n"
    path.write_text("".join(lines))


def _boxes_file(root: Path, k: int = 0) -> Path:
    return root / "train" / WNIDS[k] / f"{WNIDS[k]}_boxes.txt"


def _first_field(path: Path, lineno: int) -> str:
    return path.read_text().splitlines()[lineno - 1].split("\t")[0]


BAD_CASES = {
    "malformed line": (
        lambda r: _edit_line(_boxes_file(r), 2, f"{_first_field(_boxes_file(r), 2)}\t1\t2\t3"),
        lambda r: f"{_boxes_file(r)}:2: expected 5 tab-separated fields"),
    "non-integer coordinate": (
        lambda r: _edit_line(_boxes_file(r), 1, f"{_first_field(_boxes_file(r), 1)}\t1\t2\tx\t9"),
        lambda r: f"{_boxes_file(r)}:1: box coordinates must be integers"),
    "box outside": (
        lambda r: _edit_line(_boxes_file(r), 3, f"{_first_field(_boxes_file(r), 3)}\t0\t0\t64\t10"),
        lambda r: f"{_boxes_file(r)}:3: box (0, 0, 64, 10) lies outside the 64x64 image"),
    "zero area": (
        lambda r: _edit_line(r / "val" / "val_annotations.txt", 2, f"val_1.JPEG\t{WNIDS[1]}\t9\t4\t8\t20"),
        lambda r: f"{r / 'val' / 'val_annotations.txt'}:2: box (9, 4, 8, 20) has zero area"),
    "unknown wnid": (
        lambda r: _edit_line(r / "val" / "val_annotations.txt", 3, "val_2.JPEG\tn09999999\t1\t1\t5\t5"),
        lambda r: f"{r / 'val' / 'val_annotations.txt'}:3: unknown wnid 'n09999999'"),
    "listed but missing": (
        lambda r: (r / "val" / "images" / "val_4.JPEG").unlink(),
        lambda r: f"{r / 'val' / 'val_annotations.txt'}:5: image val/images/val_4.JPEG is listed but missing"),
    "listed twice": (
        lambda r: _edit_line(r / "val" / "val_annotations.txt", 4, f"val_0.JPEG\t{WNIDS[0]}\t1\t1\t5\t5"),
        lambda r: f"{r / 'val' / 'val_annotations.txt'}:4: val_0.JPEG listed twice (first at line 1)"),
    "image without a line": (
        lambda r: _edit_line(_boxes_file(r, 2), 1, None),
        lambda r: "has no line in n03444034_boxes.txt"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_sample_is_an_error_naming_file_and_line(case: str, tmp_path: Path) -> None:
    fx = make_tiny_imagenet(tmp_path / "data", n_train=3, n_val=6)
    damage, message = BAD_CASES[case]
    damage(fx.root)
    out = tmp_path / "out.zarr"
    with pytest.raises(SourceError) as err:
        _build(fx.root, out, size=(16, 16))
    assert message(fx.root) in str(err.value)
    _no_store(out)


def test_dataset_level_errors(tmp_path: Path) -> None:
    fx = make_tiny_imagenet(tmp_path / "data", n_train=2, n_val=4)
    out = tmp_path / "out.zarr"
    boxes = _boxes_file(fx.root, 3)
    boxes.unlink()
    with pytest.raises(SourceError, match=f"{boxes}: missing: class {WNIDS[3]} \\(listed in wnids.txt\\)"):
        _build(fx.root, out)
    _no_store(out)
    # a wnid with no name in words.txt
    words = fx.root / "words.txt"
    words.write_text("".join(l + "\n" for l in words.read_text().splitlines() if not l.startswith(WNIDS[2])))
    with pytest.raises(SourceError, match=f"{words}: has no name for class {WNIDS[2]}"):
        _build(fx.root, out)
    with pytest.raises(SourceError, match="not a Tiny ImageNet directory"):
        _build(tmp_path, out)
    _no_store(out)


def test_cli_bad_input_exits_nonzero_and_skip_bad_lists(tmp_path: Path) -> None:
    fx = make_tiny_imagenet(tmp_path / "data", n_train=3, n_val=6)
    ann = fx.root / "val" / "val_annotations.txt"
    _edit_line(ann, 2, "val_1.JPEG\tn09999999\t1\t1\t5\t5")
    _edit_line(_boxes_file(fx.root, 1), 1, f"{_first_field(_boxes_file(fx.root, 1), 1)}\t0\t0\t70\t5")
    runner = CliRunner()
    out = tmp_path / "out.zarr"
    args = ["build", "-s", "tiny-imagenet-boxes", "-r", str(fx.root), "-o", str(out), "--size", "16", "-q"]
    res = runner.invoke(main, args)
    assert res.exit_code == 1
    assert f"{_boxes_file(fx.root, 1)}:1:" in res.output
    _no_store(out)
    res = runner.invoke(main, args + ["--skip-bad"])
    assert res.exit_code == 0, res.output
    assert "skipped 2 bad samples" in res.output
    assert f"{ann}:2: unknown wnid" in res.output
    info = open_store(out).info
    assert info.splits == {"train": 11, "val": 5}
    assert info.provenance["skipped_count"] == 2
    assert {p for p, _ in info.provenance["skipped"]} == {f"{_boxes_file(fx.root, 1)}:1", f"{ann}:2"}
