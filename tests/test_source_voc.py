"""voc-boxes and voc-masks: real VOC XML, JPEGs and palette PNGs, end to end into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image

from satdata.build import BuildConfig, build
from satdata.cli import main
from satdata.errors import SatkitError, SourceError
from satdata.geometry import apply_boxes, apply_image, apply_map, plan_fit, rasterize_boxes
from satdata.sources import BadSamples, SourceOptions, make_source
from satdata.sources._base import read_image, read_png_indices
from satdata.sources.voc import VOC_CLASSES, parse_voc_xml, read_id_list
from satdata.store import open_store
from tests.fixtures.voc import VocFixture, make_voc, write_palette_png

SIZE = (24, 20)  # (H, W): not square, so a swapped axis shows


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> VocFixture:
    """A VOCdevkit/VOC2012 shared by the tests that only read it."""
    return make_voc(tmp_path_factory.mktemp("voc"))


def _cfg(source: str, root: Path, out: Path, **kw: object) -> BuildConfig:
    opts = kw.pop("options", SourceOptions())
    given = tuple(opts.non_default())  # type: ignore[union-attr]
    return BuildConfig(source=source, root=str(root), out=str(out), size=SIZE, progress=False,
                       options=opts, given_options=given, **kw)  # type: ignore[arg-type]


def _fit(fx: VocFixture, iid: str):
    w, h, _ = fx.images[iid]
    return plan_fit((h, w), SIZE, "stretch")


# --------------------------------------------------------------------------- parsing


def test_voc_box_convention_is_one_based_inclusive(voc: VocFixture) -> None:
    # <bndbox> (1, 1, 40, 40) on a 40x40 image is the whole image: [0, 40) x [0, 40).
    whole = parse_voc_xml(voc.xml("2008_000002"))
    assert (whole.width, whole.height) == (40, 40)
    assert [(o.name, o.box) for o in whole.objects] == [("car", (0.0, 0.0, 40.0, 40.0))]
    # (5, 4, 30, 30) -> x1 = 4, y1 = 3, x2 = 30, y2 = 30; the person's layout <part> is no object.
    ann = parse_voc_xml(voc.xml("2008_000001"))
    assert [(o.name, o.box, o.difficult) for o in ann.objects] == [
        ("dog", (4.0, 3.0, 30.0, 30.0), False), ("person", (19.0, 1.0, 46.0, 35.0), False)]
    assert [o.difficult for o in parse_voc_xml(voc.xml("2008_000003")).objects] == [False, True]


def test_voc_xml_agrees_with_torchvision(voc: VocFixture) -> None:
    from torchvision.datasets import VOCDetection

    src = make_source("voc-boxes", voc.devkit, SourceOptions(), BadSamples(False))
    for split in ("train", "val"):
        ds = VOCDetection(str(voc.base), year="2012", image_set=split, download=False)
        recs = src.records(split)
        assert len(recs) == len(ds) == len(voc.main_splits[split])
        for i, rec in enumerate(recs):
            img, target = ds[i]
            ann = target["annotation"]
            jpg, _, hw, boxes = rec.data
            assert Path(jpg) == Path(ds.images[i])
            assert hw == (int(ann["size"]["height"]), int(ann["size"]["width"])) == (img.height, img.width)
            expected = [[VOC_CLASSES.index(o["name"]), float(o["bndbox"]["xmin"]) - 1, float(o["bndbox"]["ymin"]) - 1,
                         float(o["bndbox"]["xmax"]), float(o["bndbox"]["ymax"])] for o in ann["object"]]
            assert_array_equal(boxes, np.asarray(expected))

    # --drop-difficult keeps exactly torchvision's <difficult>0</difficult> objects.
    bad = BadSamples(True)
    src = make_source("voc-boxes", voc.devkit, SourceOptions(drop_difficult=True), bad, ["drop_difficult"])
    ds = VOCDetection(str(voc.base), year="2012", image_set="val", download=False)
    kept = {Path(r.data[0]).stem: r.data[3] for r in src.records("val")}
    for i in range(len(ds)):
        objs = [o for o in ds[i][1]["annotation"]["object"] if o["difficult"] == "0"]
        stem = Path(ds.images[i]).stem
        if not objs:
            assert stem not in kept
            continue
        assert_array_equal(kept[stem][:, 0], [VOC_CLASSES.index(o["name"]) for o in objs])
    assert bad.items == [(str(voc.xml("2008_000009")), bad.items[0][1])]
    assert src.notes["val"] == {"difficult_objects_dropped": 2}


def test_voc_split_list_reader(tmp_path: Path) -> None:
    p = tmp_path / "train.txt"
    p.write_text("2008_000001\n\n2008_000002  \n")
    assert read_id_list(p) == ["2008_000001", "2008_000002"]
    p.write_text("2008_000001\n2008_000002 -1\n")  # a per-class list is not a split list
    with pytest.raises(SourceError, match=r"train\.txt: line 2: expected one image id"):
        read_id_list(p)
    p.write_text("a\nb\na\n")
    with pytest.raises(SourceError, match="line 3: image id 'a' is listed twice"):
        read_id_list(p)


# --------------------------------------------------------------------------- builds


def test_voc_boxes_build(voc: VocFixture, tmp_path: Path) -> None:
    res = build(_cfg("voc-boxes", voc.devkit, tmp_path / "voc.zarr"))
    st = open_store(res.path)
    info = st.info
    assert info.dataset == "voc2012"
    assert info.classes == list(VOC_CLASSES)
    assert info.label_kind == "multi"
    assert info.splits == {"train": 5, "val": 4}
    assert list(info.maps) == ["boxes"] and info.maps["boxes"].kind == "boxes"
    for split, ids in voc.main_splits.items():
        assert list(st.load(split, "ids")) == [f"VOC2012/JPEGImages/{i}.jpg" for i in ids]
        images, labels = st.load(split, "images"), st.load(split, "labels")
        maps, boxes = st.load(split, "saliency", "boxes"), st.load(split, "boxes")
        assert labels.shape == (len(ids), 20) and labels.dtype == np.uint8
        for k, iid in enumerate(ids):
            objs = voc.images[iid][2]
            fit = _fit(voc, iid)
            want = np.zeros(20, dtype=np.uint8)
            want[[o.cls for o in objs]] = 1  # difficult objects count unless dropped
            assert_array_equal(labels[k], want)
            xy = apply_boxes(np.array([o.box for o in objs]), fit)
            assert_array_equal(maps[k], rasterize_boxes(xy, SIZE))
            assert_array_equal(images[k], apply_image(read_image(voc.jpg(iid)), fit))
            rows = boxes[boxes[:, 0] == k]
            assert_array_equal(rows[:, 1], [o.cls for o in objs])
            assert_allclose(rows[:, 2:], xy, atol=1e-4)
    train_maps = st.load("train", "saliency", "boxes")
    assert train_maps[1].all()  # the whole-image car box
    assert 0 < train_maps[0].mean() < 1


def test_voc_masks_build(voc: VocFixture, tmp_path: Path) -> None:
    png = voc.png("2008_000001")
    with Image.open(png) as im:  # the fixture is a real palette PNG with VOC's colours
        assert im.mode == "P" and im.getpalette()[255 * 3:] == [224, 224, 192]
    res = build(_cfg("voc-masks", voc.devkit, tmp_path / "vocm.zarr"))
    st = open_store(res.path)
    assert st.info.splits == {"train": 3, "val": 2}
    assert set(st.info.maps) == {"mask", "boxes"}
    differs = 0
    for split, ids in voc.seg_splits.items():
        labels = st.load(split, "labels")
        mask, bmap = st.load(split, "saliency", "mask"), st.load(split, "saliency", "boxes")
        for k, iid in enumerate(ids):
            raw = voc.masks[iid]
            assert_array_equal(read_png_indices(voc.png(iid)), raw)  # indices, not colours
            assert (raw == 255).any() and (raw == 0).any()
            fit = _fit(voc, iid)
            obj = ((raw >= 1) & (raw <= 20)).astype(np.uint8)  # 0 and 255 are not object
            assert_array_equal(mask[k], apply_map(obj, fit, "binary"))
            xy = apply_boxes(np.array([o.box for o in voc.images[iid][2]]), fit)
            assert_array_equal(bmap[k], rasterize_boxes(xy, SIZE))
            want = np.zeros(20, dtype=np.uint8)
            want[np.unique(raw[(raw >= 1) & (raw <= 20)]) - 1] = 1
            assert_array_equal(labels[k], want)
            differs += int((mask[k] != bmap[k]).any())
    assert differs == 5  # ellipses, not boxes


def test_voc_label_largest(voc: VocFixture, tmp_path: Path) -> None:
    opts = SourceOptions(label="largest")
    st = open_store(build(_cfg("voc-boxes", voc.devkit, tmp_path / "b.zarr", options=opts)).path)
    assert st.info.label_kind == "single"
    for split, ids in voc.main_splits.items():
        want = [max(voc.images[i][2], key=lambda o: o.area).cls for i in ids]
        assert st.load(split, "labels").tolist() == want
    # the largest box is not always the first object
    assert st.load("train", "labels")[0] == VOC_CLASSES.index("person")

    st = open_store(build(_cfg("voc-masks", voc.devkit, tmp_path / "m.zarr", options=opts)).path)
    for split, ids in voc.seg_splits.items():
        want = [int(np.argmax(np.bincount(voc.masks[i].ravel(), minlength=256)[1:21])) for i in ids]
        assert st.load(split, "labels").tolist() == want


def test_voc_drop_difficult(voc: VocFixture, tmp_path: Path) -> None:
    opts = SourceOptions(drop_difficult=True)
    with pytest.raises(SourceError, match=r"2008_000009\.xml: every object is <difficult>"):
        build(_cfg("voc-boxes", voc.devkit, tmp_path / "a.zarr", options=opts))
    assert not (tmp_path / "a.zarr").exists()
    res = build(_cfg("voc-boxes", voc.devkit, tmp_path / "b.zarr", options=opts, skip_bad=True))
    assert [p for p, _ in res.bad] == [str(voc.xml("2008_000009"))]
    st = open_store(res.path)
    assert st.info.splits == {"train": 5, "val": 3}
    assert st.info.provenance["options"] == {"drop_difficult": True}
    for split in ("train", "val"):
        ids = [i for i in voc.main_splits[split] if i != "2008_000009"]
        labels, maps = st.load(split, "labels"), st.load(split, "saliency", "boxes")
        for k, iid in enumerate(ids):
            objs = [o for o in voc.images[iid][2] if not o.difficult]
            assert sorted(np.flatnonzero(labels[k])) == sorted({o.cls for o in objs})
            xy = apply_boxes(np.array([o.box for o in objs]), _fit(voc, iid))
            assert_array_equal(maps[k], rasterize_boxes(xy, SIZE))
    # the bottle of 2008_000003 and the person of 2008_000007 are gone
    assert st.load("train", "labels")[2, VOC_CLASSES.index("bottle")] == 0
    assert st.load("val", "labels")[1, VOC_CLASSES.index("person")] == 0


@pytest.mark.parametrize("source,args,splits,kind", [
    ("voc-boxes", [], {"train": 5, "val": 4}, "multi"),
    ("voc-boxes", ["--label", "largest", "--drop-difficult", "--skip-bad"], {"train": 5, "val": 3}, "single"),
    ("voc-masks", ["--year", "2012"], {"train": 3, "val": 2}, "multi"),
])
def test_voc_cli_build(voc: VocFixture, tmp_path: Path, source: str, args: list[str],
                       splits: dict[str, int], kind: str) -> None:
    out = tmp_path / "cli.zarr"
    r = CliRunner().invoke(main, ["build", "--source", source, "--root", str(voc.devkit), "--out", str(out),
                                  "--size", "16", "-q", *args])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    info = open_store(out).info
    assert info.splits == splits and info.label_kind == kind and info.image_size == (16, 16)
    if "--skip-bad" in args:
        assert "skipped 1 bad samples" in r.output and "2008_000009.xml" in r.output


def test_voc_cli_rejects_options(voc: VocFixture, tmp_path: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["build", "--source", "voc-masks", "--root", str(voc.devkit), "--out", str(tmp_path / "x"),
                   "--drop-difficult"])
    assert r.exit_code != 0 and "--drop-difficult: not an option of source 'voc-masks'" in r.output
    r = run(main, ["build", "--source", "voc-boxes", "--root", str(voc.devkit), "--out", str(tmp_path / "x"),
                   "--year", "2010"])
    assert r.exit_code != 0 and "--year 2010" in r.output and "VOC2012" in r.output
    assert not (tmp_path / "x").exists()


def test_voc_year_and_root_forms(tmp_path: Path) -> None:
    make_voc(tmp_path, "2012")
    fx07 = make_voc(tmp_path, "2007")

    def src(root: Path, year: str | None = None):
        opts = SourceOptions(year=year)
        return make_source("voc-boxes", root, opts, BadSamples(False), ["year"] if year else [])

    assert src(tmp_path / "VOCdevkit").dataset == "voc2012"  # the newest by default
    assert src(tmp_path).dataset == "voc2012"  # the folder holding VOCdevkit
    s07 = src(tmp_path / "VOCdevkit", "2007")
    assert s07.dataset == "voc2007" and s07.available_splits() == ["train", "val", "test"]
    assert src(fx07.voc_dir).dataset == "voc2007"  # a VOC20xx folder itself
    assert src(fx07.voc_dir, "VOC2007").dataset == "voc2007"
    with pytest.raises(SatkitError, match=r"--year 2012: .*VOC2007 folder"):
        src(fx07.voc_dir, "2012")
    with pytest.raises(SatkitError, match=r"--year: expected a year"):
        src(tmp_path, "latest")
    res = build(_cfg("voc-boxes", tmp_path / "VOCdevkit", tmp_path / "07.zarr",
                     options=SourceOptions(year="2007"), splits=("test",)))
    assert res.info.dataset == "voc2007" and res.info.splits == {"test": 2}
    assert list(open_store(res.path).load("test", "ids")) == ["VOC2007/JPEGImages/000008.jpg",
                                                              "VOC2007/JPEGImages/000009.jpg"]


def test_voc_masks_in_worker_processes(voc: VocFixture, tmp_path: Path) -> None:
    a = open_store(build(_cfg("voc-masks", voc.devkit, tmp_path / "a.zarr")).path)
    b = open_store(build(_cfg("voc-masks", voc.devkit, tmp_path / "b.zarr", workers=1)).path)
    for split in ("train", "val"):
        for field, m in (("images", None), ("labels", None), ("saliency", "mask"), ("saliency", "boxes")):
            assert_array_equal(a.load(split, field, m), b.load(split, field, m))


# --------------------------------------------------------------------------- bad input

BOX_ID = "2008_000002"  # train, Main only: a 40x40 image with one car (1, 1, 40, 40)
SEG_ID = "2008_000003"  # train, Main and Segmentation: 56x32


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:200])
    return path


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


def _jpeg(path: Path, w: int, h: int) -> Path:
    Image.new("RGB", (w, h), (90, 10, 200)).save(path, "JPEG")
    return path


def _rgb_mask(path: Path) -> Path:
    with Image.open(path) as im:
        im.convert("RGB").save(path)
    return path


def _small_mask(path: Path) -> Path:
    write_palette_png(path, np.ones((20, 20), dtype=np.uint8))
    return path


Mutation = Callable[[VocFixture], Path]
BAD_CASES: dict[str, tuple[str, Mutation, str]] = {
    # name: (source, damage -> the file the error must name, phrase)
    "malformed-xml": ("voc-boxes", lambda fx: _truncate(fx.xml(BOX_ID)), "malformed XML at line"),
    "missing-xml": ("voc-boxes", lambda fx: _unlink(fx.xml(BOX_ID)), "annotation XML is missing"),
    "missing-jpeg": ("voc-boxes", lambda fx: _unlink(fx.jpg(BOX_ID)), "image file is missing"),
    "unknown-class": ("voc-boxes", lambda fx: _edit(fx.xml(BOX_ID), "<name>car<", "<name>spaceship<"),
                      "unknown class 'spaceship'"),
    "zero-area-box": ("voc-boxes", lambda fx: _edit(fx.xml(BOX_ID), "<xmax>40<", "<xmax>0<"), "zero or negative area"),
    "box-outside": ("voc-boxes", lambda fx: _edit(fx.xml(BOX_ID), "<ymax>40<", "<ymax>41<"),
                    "lies outside the 40x40 image"),
    "missing-bndbox-field": ("voc-boxes", lambda fx: _edit(fx.xml(BOX_ID), "<ymax>40</ymax>", ""), "lacks <ymax>"),
    "missing-bndbox": ("voc-boxes", lambda fx: _edit(_edit(fx.xml(BOX_ID), "<bndbox>", "<box>"), "</bndbox>", "</box>"),
                       "lacks <bndbox>"),
    "bad-number": ("voc-boxes", lambda fx: _edit(fx.xml(BOX_ID), "<xmin>1<", "<xmin>one<"), "'one', not a number"),
    "image-not-its-size": ("voc-boxes", lambda fx: _jpeg(fx.jpg(BOX_ID), 30, 40), "image is 30x40 but"),
    "damaged-jpeg": ("voc-boxes", lambda fx: _truncate(fx.jpg(BOX_ID)), "image is truncated or damaged"),
    "mask-size": ("voc-masks", lambda fx: _small_mask(fx.png(SEG_ID)), "mask is 20x20 but its image is 56x32"),
    "mask-rgb": ("voc-masks", lambda fx: _rgb_mask(fx.png(SEG_ID)), "neither a class (1-20)"),
    "missing-mask": ("voc-masks", lambda fx: _unlink(fx.png(SEG_ID)), "mask file is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_voc_bad_input(tmp_path: Path, case: str) -> None:
    source, damage, phrase = BAD_CASES[case]
    fx = make_voc(tmp_path / "data")
    bad_file = damage(fx)
    out = tmp_path / "out.zarr"

    with pytest.raises(SourceError) as ei:
        build(_cfg(source, fx.devkit, out))
    msg = str(ei.value)
    assert msg.startswith(f"{bad_file}: ") and phrase in msg and "\n" not in msg
    assert not out.exists() and not list(tmp_path.glob(".out.zarr*"))

    r = CliRunner().invoke(main, ["build", "--source", source, "--root", str(fx.devkit), "--out", str(out), "-q"])
    assert r.exit_code == 1 and f"Error: {bad_file}: " in r.output and phrase in r.output
    assert not out.exists()

    res = build(_cfg(source, fx.devkit, out, skip_bad=True))
    assert len(res.bad) == 1 and res.bad[0][0] == str(bad_file) and phrase in res.bad[0][1]
    st = open_store(out)
    skipped = BOX_ID if source == "voc-boxes" else SEG_ID
    n_train = len(fx.main_splits["train"] if source == "voc-boxes" else fx.seg_splits["train"])
    assert st.info.splits["train"] == n_train - 1
    assert f"VOC2012/JPEGImages/{skipped}.jpg" not in list(st.load("train", "ids"))
    assert st.info.provenance["skipped_count"] == 1


def test_voc_unusable_dataset(tmp_path: Path) -> None:
    fx = make_voc(tmp_path / "data")
    out = tmp_path / "out.zarr"
    split_list = _edit(fx.voc_dir / "ImageSets" / "Main" / "train.txt", "2008_000002\n", "2008_000002 1\n")
    for skip in (False, True):  # a malformed list is never one bad sample
        with pytest.raises(SourceError, match=rf"^{split_list}: line 2: expected one image id"):
            build(_cfg("voc-boxes", fx.devkit, out, skip_bad=skip))
    assert not out.exists()
    (fx.voc_dir / "SegmentationClass").rename(tmp_path / "elsewhere")
    with pytest.raises(SourceError, match=r"SegmentationClass: missing SegmentationClass folder"):
        build(_cfg("voc-masks", fx.devkit, out))
    with pytest.raises(SourceError, match=r"no VOC20xx folder"):
        build(_cfg("voc-boxes", tmp_path, out))
    for name in ("train.txt", "val.txt"):
        (fx.voc_dir / "ImageSets" / "Main" / name).unlink()
    with pytest.raises(SourceError, match=r"Main: has none of train.txt, val.txt, test.txt"):
        build(_cfg("voc-boxes", fx.devkit, out))
    assert not out.exists()


def test_voc_xml_parse_error_names_line(tmp_path: Path) -> None:
    p = tmp_path / "x.xml"
    p.write_text("<annotation>\n  <size><width>3</width>\n  <height>2</height></size>\n  <object><name>cat\n</annotation>\n")
    with pytest.raises(SourceError, match=r"x\.xml: malformed XML at line 5, column 3: mismatched tag"):
        parse_voc_xml(p)
    p.write_text("<annotation><object><name>cat</name></object></annotation>")
    with pytest.raises(SourceError, match="lacks <size>"):
        parse_voc_xml(p)
    p.write_text("<annotation><size><width>0</width><height>2</height></size></annotation>")
    with pytest.raises(SourceError, match="<size> 0x2 is not a positive"):
        parse_voc_xml(p)
