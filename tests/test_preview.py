"""Contact sheets: the right samples, the right overlay per encoding, readable errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from satdata.cli import main
from satdata.errors import SatkitError, StoreError
from satdata.preview import OBJECT_TINT, OUTLINE, WRONG, contact_sheet, make_sheet, overlay
from satdata.store import MapInfo, ArrayWriter, open_store


def sheet_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def contains(sheet: np.ndarray, tile: np.ndarray) -> bool:
    """Whether the tile appears, pixel for pixel, somewhere in the sheet."""
    th, tw = tile.shape[:2]
    win = sliding_window_view(sheet, (th, tw, 3))[:, :, 0]
    # cheap prefilter on the top-left pixel, then exact comparison
    ys, xs = np.nonzero((win[:, :, 0, 0] == tile[0, 0]).all(axis=-1))
    return any(np.array_equal(win[y, x], tile) for y, x in zip(ys, xs))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small multi-label store with a unit and a 3-channel signed map, and one without maps."""
    root = tmp_path_factory.mktemp("preview")
    n, h, w = 6, 6, 10
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.stack([np.full((h, w, 3), 40 * i, np.uint8) for i in range(n)])
    labels = np.zeros((n, 3), np.uint8)
    labels[np.arange(n), np.arange(n) % 3] = 1
    labels[0, 2] = 1
    cam = np.stack([(xx * 255 // (w - 1)).astype(np.uint8)] * n)
    g = np.where(xx < w // 2, -127, 127).astype(np.int8)
    gbp = np.stack([np.stack([g, g, g], axis=-1)] * n)
    maps = {"cam": MapInfo("cam", "unit", "gradcampp"), "gbp": MapInfo("gbp", "signed", "gbp", channels=3)}
    for name, mp in (("maps.zarr", maps), ("plain.zarr", {})):
        wr = ArrayWriter(root / name, dataset="synthetic", classes=["cat", "dog", "pottedplant"],
                         image_size=(h, w), label_kind="multi", maps=mp)
        wr.create_split("val", n)
        wr.write("val", 0, images, labels, [f"s{i}" for i in range(n)],
                 {"cam": cam, "gbp": gbp} if mp else {})
        wr.close_split("val", n)
        wr.finish({"source": "test"})
    return root


def test_default_sheet_of_digits(digits_store: Path, tmp_path: Path) -> None:
    out = contact_sheet(open_store(digits_store), tmp_path / "sub" / "sheet.png")
    assert out == tmp_path / "sub" / "sheet.png"
    sheet = sheet_array(out)
    # 32 tiles of 16x16 shown at x8 (128 px) in 8 columns and 4 rows, plus captions and a title
    assert 8 * 128 <= sheet.shape[1] <= 8 * 128 + 8 * 16
    assert 4 * 128 < sheet.shape[0] < 4 * 128 + 4 * 60 + 80
    contact_sheet(digits_store, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes(), "the same seed gave another sheet"
    other = contact_sheet(digits_store, tmp_path / "other.png", seed=1)
    assert other.read_bytes() != out.read_bytes()


def test_tiles_show_the_chosen_samples_with_their_map(digits_store: Path, tmp_path: Path) -> None:
    st = open_store(digits_store)
    out = contact_sheet(st, tmp_path / "s.png", split="test", map_name="box", n=3, seed=7, scale=3)
    sheet = sheet_array(out)
    idx = np.sort(np.random.default_rng(7).choice(355, size=3, replace=False))
    images = st.load("test", "images")
    boxes = st.load("test", "saliency", "box")
    for i in idx:
        tile = np.repeat(np.repeat(images[i], 3, 0), 3, 1)
        q = np.repeat(np.repeat(boxes[i], 3, 0), 3, 1)
        want = overlay(tile, q, st.info.maps["box"])
        assert contains(sheet, want), f"sample {i} is not on the sheet as expected"


def test_binary_overlay_tints_object_outlines_it_and_keeps_background() -> None:
    tile = np.full((8, 8, 3), 100, np.uint8)
    q = np.zeros((8, 8), np.uint8)
    q[2:6, 2:6] = 1
    out = overlay(tile, q, MapInfo("m", "binary", "mask"))
    assert np.array_equal(out[q == 0], tile[q == 0]), "background was changed"
    assert (out[2, 2:6] == OUTLINE).all() and (out[5, 2:6] == OUTLINE).all()
    inner = out[3:5, 3:5].reshape(-1, 3).astype(int)
    assert (inner[:, 1] > inner[:, 0]).all() and (inner[:, 1] > 100).all(), "object not tinted green"
    assert np.allclose(inner[0], 100 * 0.6 + OBJECT_TINT * 0.4, atol=1)
    # an object touching the border is outlined along it too
    full = overlay(tile, np.ones((8, 8), np.uint8), MapInfo("m", "binary", "boxes"))
    assert (full[0] == OUTLINE).all() and (full[:, -1] == OUTLINE).all()


def test_unit_and_signed_overlays(synthetic: Path, tmp_path: Path) -> None:
    tile = np.full((4, 6, 3), 128, np.uint8)
    unit = MapInfo("cam", "unit", "gradcampp")
    cold = overlay(tile, np.zeros((4, 6), np.uint8), unit)
    hot = overlay(tile, np.full((4, 6), 255, np.uint8), unit)
    assert np.array_equal(cold, tile) and not np.array_equal(hot, tile)
    assert hot[0, 0, 0] > hot[0, 0, 2], "S=1 should show the hot end of the colour map"
    signed = MapInfo("gbp", "signed", "gbp", channels=3)
    pos = overlay(tile, np.full((4, 6, 3), 127, np.int8), signed)
    neg = overlay(tile, np.full((4, 6, 3), -127, np.int8), signed)
    zero = overlay(tile, np.zeros((4, 6, 3), np.int8), signed)
    assert pos[0, 0, 0] > pos[0, 0, 2] and neg[0, 0, 2] > neg[0, 0, 0]
    assert np.array_equal(zero, tile)
    for name in ("cam", "gbp"):
        out = contact_sheet(synthetic / "maps.zarr", tmp_path / f"{name}.png", map_name=name, scale=2)
        assert sheet_array(out).shape[0] > 12


def test_store_without_maps_previews(synthetic: Path, tmp_path: Path) -> None:
    st = open_store(synthetic / "plain.zarr")
    out = contact_sheet(st, tmp_path / "plain.png", n=100, scale=1)  # n larger than the split
    sheet = sheet_array(out)
    for i in range(6):  # every sample, unaltered
        assert contains(sheet, st.load("val", "images")[i])


def test_errors_name_the_store_and_what_exists(synthetic: Path, digits_store: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no split 'val' \(the store has: train, test\)") as e:
        contact_sheet(digits_store, tmp_path / "x.png", split="val")
    assert str(digits_store) in str(e.value)
    with pytest.raises(StoreError, match=r"no saliency map 'mask' \(maps in the store: box, ink\)"):
        contact_sheet(digits_store, tmp_path / "x.png", map_name="mask")
    with pytest.raises(StoreError, match=r"maps in the store: none"):
        contact_sheet(synthetic / "plain.zarr", tmp_path / "x.png", map_name="cam")
    with pytest.raises(SatkitError, match="-n: must be at least 1"):
        contact_sheet(digits_store, tmp_path / "x.png", n=0)
    assert not (tmp_path / "x.png").exists()


def test_preview_command(digits_store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["preview", str(digits_store), "--out", str(tmp_path / "p.png"),
                               "--map", "ink", "-n", "5", "--split", "test"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"wrote {tmp_path / 'p.png'}"
    sheet_array(tmp_path / "p.png")
    res = runner.invoke(main, ["preview", str(digits_store), "--out", str(tmp_path / "q.png"), "--map", "nope"])
    assert res.exit_code == 1 and "no saliency map 'nope'" in res.output
    assert len(res.output.strip().splitlines()) == 1


def teacher_map_store(digits_store: Path, out: Path, wrong_every: int = 3) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of the digits store with teacher-like maps that record their target class:
    'gcpp' (predicted; every ``wrong_every``-th sample's class is off by one) and 'lab'
    (made for the label)."""
    import shutil

    from satdata.addmap import NewMap, add_map

    shutil.copytree(digits_store, out)
    st = open_store(out)
    targets = {}
    for s in st.info.splits:
        y = st.load(s, "labels")
        t = y.copy()
        t[::wrong_every] = (t[::wrong_every] + 1) % 10
        targets[s] = t
    teacher = {"kind": "sattrain", "classes": st.info.classes}
    add_map(out, NewMap("gcpp", "unit", "gradcampp", targets=True,
                        provenance={"target": "predicted", "teacher": teacher}),
            lambda s: iter([(np.zeros((st.info.splits[s], 16, 16), np.uint8), targets[s])]))
    add_map(out, NewMap("lab", "unit", "gradcampp", targets=True, provenance={"target": "label", "teacher": teacher}),
            lambda s: iter([(np.zeros((st.info.splits[s], 16, 16), np.uint8), st.load(s, "labels"))]))
    return out, targets


def test_teacher_maps_caption_the_teachers_class_and_mark_mismatches(digits_store: Path, tmp_path: Path) -> None:
    store, targets = teacher_map_store(digits_store, tmp_path / "t.zarr")
    st = open_store(store)
    labels = st.load("test", "labels")
    sheet = make_sheet(st, split="test", map_name="gcpp", n=12, seed=3, scale=4)
    idx = np.sort(np.random.default_rng(3).choice(355, size=12, replace=False))
    assert [t.index for t in sheet.tiles] == idx.tolist()
    for t in sheet.tiles:
        y, p = int(labels[t.index]), int(targets["test"][t.index])
        assert t.label == str(y)
        assert t.wrong == (p != y)
        assert t.teacher == (f"teacher: {p} (wrong)" if p != y else f"teacher: {p}")
    n_wrong = int((targets["test"][idx] != labels[idx]).sum())
    assert 0 < n_wrong < 12 and sheet.wrong == n_wrong
    assert f"red = the teacher's class is not the label ({n_wrong} of 12)" in sheet.subtitle
    # a wrong tile is framed in red; a sheet with all-correct tiles has no such frame
    img = np.asarray(sheet.image)
    assert (img == np.array(WRONG, np.uint8)).all(axis=-1).sum() >= n_wrong * 4 * (64 - 1) * 2

    res = CliRunner().invoke(main, ["preview", str(store), "--map", "gcpp", "--split", "test", "-n", "12",
                                    "--seed", "3", "--scale", "4", "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == (f"wrote {tmp_path / 'p.png'} (the teacher's class differs from the label "
                                  f"on {n_wrong} of 12 tiles)")
    assert np.array_equal(sheet_array(tmp_path / "p.png"), img)

    # a map made for the label says so and is never "wrong"; no count is printed
    lab = make_sheet(st, split="test", map_name="lab", n=5, seed=1)
    assert all(t.teacher == f"map for: {int(labels[t.index])}" and not t.wrong for t in lab.tiles)
    res = CliRunner().invoke(main, ["preview", str(store), "--map", "lab", "--out", str(tmp_path / "l.png")])
    assert res.exit_code == 0 and res.output.strip() == f"wrote {tmp_path / 'l.png'}"
    # maps without targets (the store's own, or teacher maps from before) preview as before
    ink = make_sheet(st, split="test", map_name="ink", n=5, seed=1)
    assert all(t.teacher is None and not t.wrong for t in ink.tiles)
    assert "teacher" not in ink.subtitle and not (np.asarray(ink.image) == np.array(WRONG, np.uint8)).all(-1).any()


def test_teacher_captions_for_multi_label_and_unknown_targets() -> None:
    from satdata.preview import teacher_captions

    classes = ["cat", "dog", "pottedplant"]
    labels = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]], np.uint8)
    mi = MapInfo("cam", "unit", "gradcampp", provenance={"target": "predicted"}, targets=True)
    got = teacher_captions(np.array([2, 0, 2, -1]), labels, classes, "multi", mi)
    assert got == [("teacher: pottedplant", False), ("teacher: cat (wrong)", True),
                   ("teacher: pottedplant", False), ("teacher: ?", False)]
    # a teacher with other classes: its names are shown, right or wrong is not judged
    other = MapInfo("cam", "unit", "gradcampp", targets=True,
                    provenance={"target": "predicted", "teacher": {"classes": ["a", "b", "c", "d"]}})
    assert teacher_captions(np.array([3]), labels[:1], classes, "multi", other) == [("teacher: d", False)]
