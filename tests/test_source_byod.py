"""Bring your own dataset: --classes auto|FILE, COCO's --annotations/--images per split, and
declared splits whose files are missing.

Fixtures are in the datasets' real formats: a VOC-style export with classes of its own
(tests/fixtures/voc.py: real XML, JPEGs, palette PNGs in the tool's label order) and the
tiny COCO (tests/fixtures/coco.py), read back with torchvision's VOC parser and
pycocotools as references.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.testing import assert_allclose, assert_array_equal

from satdata.build import BuildConfig, build
from satdata.cli import main
from satdata.errors import SatkitError, SourceError
from satdata.geometry import apply_boxes, apply_map, plan_fit, rasterize_boxes
from satdata.sources import BadSamples, SourceOptions, make_source
from satdata.sources._classes import MAX_CLASSES
from satdata.store import open_store
from tests.fixtures import build_config
from tests.fixtures.coco import CocoFixture, make_coco
from tests.fixtures.voc import EXPORT_LABELS, VocFixture, make_voc, make_voc_export

SIZE = (24, 20)  # (H, W)
REPO = Path(__file__).resolve().parents[1]
AUTO_ORDER = ["Lamp shade", "cat-toy", "mug"]  # sorted by code point: upper case first
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> VocFixture:
    """A VOC-style export with classes "mug", "cat-toy", "Lamp shade" (the tool's order)."""
    return make_voc_export(tmp_path_factory.mktemp("export") / "export")


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> CocoFixture:
    return make_coco(tmp_path_factory.mktemp("coco") / "coco")


def _cfg(source: str, root: Path, out: Path, **kw: Any) -> BuildConfig:
    return build_config(source, root, out, SIZE, **kw)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["build", "-q", *args])


def _one_line_error(r: Any, msg: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.output.strip() == f"Error: {msg}"


def _check_voc_boxes(st: Any, fx: VocFixture, classes: list[str], split_ids: dict[str, list[str]]) -> None:
    """Labels, stored boxes and box maps of a voc-boxes store against what the fixture wrote:
    every object of a listed class, its class index that of its name in ``classes``."""
    assert st.info.classes == classes
    for split, all_ids in split_ids.items():
        ids = [i for i in all_ids if any(o.name in classes for o in fx.images[i][2])]
        assert list(st.load(split, "ids")) == [f"JPEGImages/{i}.jpg" for i in ids]
        labels, maps, boxes = st.load(split, "labels"), st.load(split, "saliency", "boxes"), st.load(split, "boxes")
        for k, iid in enumerate(ids):
            w, h, objs = fx.images[iid]
            objs = [o for o in objs if o.name in classes]
            want = np.zeros(len(classes), dtype=np.uint8)
            want[[classes.index(o.name) for o in objs]] = 1
            assert_array_equal(labels[k], want)
            xy = apply_boxes(np.array([o.box for o in objs]), plan_fit((h, w), SIZE, "stretch"))
            rows = boxes[boxes[:, 0] == k]
            assert rows[:, 1].tolist() == [classes.index(o.name) for o in objs]
            assert_allclose(rows[:, 2:], xy, atol=1e-4)
            # the map is the union of exactly these boxes
            assert_array_equal(maps[k], rasterize_boxes(rows[:, 2:], SIZE))
            assert_array_equal(maps[k], rasterize_boxes(xy, SIZE))


# --------------------------------------------------------------------------- VOC: --classes


def test_voc_export_needs_classes_and_builds_with_auto(export: VocFixture, tmp_path: Path) -> None:
    with pytest.raises(SourceError) as ei:  # PASCAL's 20 stay the default, and say what to do
        build(_cfg("voc-boxes", export.devkit, tmp_path / "pascal.zarr"))
    assert str(ei.value) == (f"{export.xml('frame_000001')}: object 1 ('mug'): unknown class 'mug' (not one of "
                             "the 20 VOC classes; for classes of your own pass --classes auto or FILE)")

    st = open_store(build(_cfg("voc-boxes", export.devkit, tmp_path / "a.zarr",
                               options=SourceOptions(classes="auto"))).path)
    assert st.info.dataset == "voc" and st.info.label_kind == "multi"
    _check_voc_boxes(st, export, AUTO_ORDER, export.main_splits)
    prov = st.info.provenance
    assert prov["options"] == {"classes": "auto"}
    assert prov["classes"] == {"from": "auto", "order": "sorted by Unicode code point",
                               "scanned": ["Annotations/*.xml (6 files)"]}
    # every XML is read: the list does not depend on --splits (val has no mug) nor on the source
    val = open_store(build(_cfg("voc-boxes", export.devkit, tmp_path / "v.zarr", splits=("val",),
                                options=SourceOptions(classes="auto"))).path)
    assert val.info.classes == AUTO_ORDER
    assert not any(o.name == "mug" for i in export.main_splits["val"] for o in export.images[i][2])


def test_voc_export_builds_with_a_class_file(export: VocFixture, tmp_path: Path) -> None:
    f = tmp_path / "labels.txt"
    f.write_text("# the tool's label order\n\nmug\n   cat-toy  \n# lamps\nLamp shade\n\n")
    opts = SourceOptions(classes=str(f))
    st = open_store(build(_cfg("voc-boxes", export.devkit, tmp_path / "b.zarr", options=opts)).path)
    _check_voc_boxes(st, export, list(EXPORT_LABELS), export.main_splits)
    assert st.info.provenance["classes"] == {"from": "file", "file": str(f.resolve()), "order": "as listed in the file",
                                             "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}

    # voc-masks (decoded in a worker process): mask index i+1 is class i of the file; the masks'
    # labels agree with the XML
    st = open_store(build(_cfg("voc-masks", export.devkit, tmp_path / "m.zarr", options=opts, workers=1)).path)
    assert st.info.classes == list(EXPORT_LABELS) and st.info.splits == {"train": 3, "val": 2}
    n = len(EXPORT_LABELS)
    for split, ids in export.seg_splits.items():
        labels, mask = st.load(split, "labels"), st.load(split, "saliency", "mask")
        bmap, boxes = st.load(split, "saliency", "boxes"), st.load(split, "boxes")
        for k, iid in enumerate(ids):
            raw = export.masks[iid]
            w, h, objs = export.images[iid]
            fit = plan_fit((h, w), SIZE, "stretch")
            assert_array_equal(mask[k], apply_map(((raw >= 1) & (raw <= n)).astype(np.uint8), fit, "binary"))
            in_mask = sorted(int(v) - 1 for v in np.unique(raw[(raw >= 1) & (raw <= n)]))
            assert np.flatnonzero(labels[k]).tolist() == in_mask
            rows = boxes[boxes[:, 0] == k]
            assert sorted(set(rows[:, 1].astype(int))) == sorted({EXPORT_LABELS.index(o.name) for o in objs})
            assert set(in_mask) <= set(rows[:, 1].astype(int))  # each mask class is a boxed object's
            assert_array_equal(bmap[k], rasterize_boxes(rows[:, 2:], SIZE))
    # frame_000001's mug (index 1) and cat-toy (index 2) are both in the mask and the labels
    assert st.load("train", "labels")[0].tolist() == [1, 1, 0]


def test_voc_export_xml_agrees_with_torchvision(export: VocFixture) -> None:
    from torchvision.datasets import VOCDetection

    parse = object.__new__(VOCDetection).parse_voc_xml  # torchvision's own XML reader
    src = make_source("voc-boxes", export.devkit, SourceOptions(classes="auto"), BadSamples(False), ["classes"])
    assert src.classes == AUTO_ORDER
    for split in ("train", "val"):
        recs = src.records(split)
        assert len(recs) == len(export.main_splits[split])
        for rec in recs:
            jpg, xml, hw, boxes = rec.data
            ann = parse(ET.parse(xml).getroot())["annotation"]
            assert hw == (int(ann["size"]["height"]), int(ann["size"]["width"]))
            expected = [[AUTO_ORDER.index(o["name"]), float(o["bndbox"]["xmin"]) - 1, float(o["bndbox"]["ymin"]) - 1,
                         float(o["bndbox"]["xmax"]), float(o["bndbox"]["ymax"])] for o in ann["object"]]
            assert_array_equal(boxes, np.asarray(expected))
            assert rec.label == tuple(sorted({r[0] for r in expected}))


def test_voc_masks_refuse_a_list_in_another_order_than_the_palette(export: VocFixture, tmp_path: Path) -> None:
    # sorted, "Lamp shade" is class 0, but the tool drew mugs with mask index 1
    with pytest.raises(SourceError) as ei:
        build(_cfg("voc-masks", export.devkit, tmp_path / "x.zarr", options=SourceOptions(classes="auto")))
    assert str(ei.value) == (f"{export.png('frame_000001')}: mask holds class 'Lamp shade' (index 1) but "
                             "frame_000001.xml has no 'Lamp shade' object: is the --classes list in the order of "
                             "the masks' indices (mask index i+1 is class i)?")
    assert not (tmp_path / "x.zarr").exists()
    # an export whose tool numbered its labels in sorted order builds with auto
    fx = make_voc_export(tmp_path / "sorted", labels=tuple(AUTO_ORDER))
    st = open_store(build(_cfg("voc-masks", fx.devkit, tmp_path / "s.zarr", options=SourceOptions(classes="auto"))).path)
    assert st.info.classes == AUTO_ORDER
    for split, ids in fx.seg_splits.items():
        for k, iid in enumerate(ids):
            raw = fx.masks[iid]
            want = sorted(int(v) - 1 for v in np.unique(raw[(raw >= 1) & (raw <= 3)]))
            assert np.flatnonzero(st.load(split, "labels")[k]).tolist() == want
            assert set(want) == {AUTO_ORDER.index(o.name) for o in fx.images[iid][2]}


def test_voc_class_the_list_lacks(export: VocFixture, tmp_path: Path) -> None:
    f = tmp_path / "two.txt"
    f.write_text("mug\ncat-toy\n")
    out = tmp_path / "o.zarr"
    with pytest.raises(SourceError) as ei:
        build(_cfg("voc-boxes", export.devkit, out, options=SourceOptions(classes=str(f))))
    want = (f"{export.xml('frame_000002')}: object 1 ('Lamp shade'): unknown class 'Lamp shade' (not in {f}, the "
            "--classes list; add it there, or pass --skip-unknown-classes to leave such objects out)")
    assert str(ei.value) == want
    _one_line_error(_cli("--source", "voc-boxes", "--root", str(export.devkit), "--out", str(out),
                         "--classes", str(f)), want)
    assert not out.exists()

    # --skip-unknown-classes: the lamps are left out, and an image of lamps only, counted
    res = build(_cfg("voc-boxes", export.devkit, out, options=SourceOptions(classes=str(f), skip_unknown_classes=True)))
    st = open_store(res.path)
    _check_voc_boxes(st, export, ["mug", "cat-toy"], export.main_splits)
    assert "JPEGImages/frame_000002.jpg" not in list(st.load("train", "ids"))
    assert res.notes == {"train": {"objects_of_unlisted_classes": 1, "images_only_unlisted_classes": 1},
                         "val": {"objects_of_unlisted_classes": 1, "images_only_unlisted_classes": 0}}
    assert st.info.provenance["options"] == {"classes": str(f), "skip_unknown_classes": True}

    # voc-masks: a mask index beyond the list (the lamp's 3 in a list of 2) is an error
    with pytest.raises(SourceError) as ei:
        build(_cfg("voc-masks", export.devkit, out, overwrite=True,
                   options=SourceOptions(classes=str(f), skip_unknown_classes=True)))
    assert str(ei.value).startswith(f"{export.png('frame_000005')}: mask has values 3, which are neither a class "
                                    "(1-2: the --classes list has 2)")


CLASS_FILE_ERRORS: dict[str, tuple[Any, str]] = {
    # name: (content, the problem after "<file>: ")
    "duplicate": ("mug\ncat-toy\n\nmug\n", "line 4: class 'mug' is listed twice (first on line 1)"),
    "inline-comment": ("mug # coffee\n", "line 1: 'mug # coffee' holds '#' (comments go on their own line)"),
    "control": ("mug\n\ncup\tsaucer\n", "line 3: 'cup\\tsaucer' holds a tab or control character"),
    "too-long": ("mug\n" + "x" * 300 + "\n", "line 2: class name is 300 characters long (at most 256)"),
    "too-many": ("".join(f"c{i}\n" for i in range(MAX_CLASSES + 1)),
                 f"line {MAX_CLASSES + 1}: more than 10,000 classes (is this a list of class names?)"),
    "no-names": ("# labels\n\n   \n", "class list (--classes) names no class (blank lines and # comments only)"),
    "not-utf8": (b"mug\n\xff\n", "class list (--classes) is not UTF-8 text (byte 0xff at position 4)"),
    "background": ("background\nmug\ncat-toy\nLamp shade\n", "line 1: class 'background': background is mask index 0 "
                                                             "in VOC, not an object class: leave it out of the list"),
    "missing": (None, "missing class list (--classes FILE)"),
}


@pytest.mark.parametrize("case", sorted(CLASS_FILE_ERRORS))
def test_voc_class_file_errors(export: VocFixture, tmp_path: Path, case: str) -> None:
    content, problem = CLASS_FILE_ERRORS[case]
    f = tmp_path / "classes.txt"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    with pytest.raises(SourceError) as ei:
        build(_cfg("voc-boxes", export.devkit, tmp_path / "o.zarr", options=SourceOptions(classes=str(f))))
    assert str(ei.value) == f"{f}: {problem}"
    _one_line_error(_cli("--source", "voc-masks", "--root", str(export.devkit), "--out", str(tmp_path / "o.zarr"),
                         "--classes", str(f)), f"{f}: {problem}")
    assert not (tmp_path / "o.zarr").exists()


def test_voc_masks_list_limit_and_empty_classes_value(export: VocFixture, tmp_path: Path) -> None:
    f = tmp_path / "many.txt"
    f.write_text("".join(f"c{i}\n" for i in range(255)))
    with pytest.raises(SourceError, match=rf"^{re.escape(str(f))}: 255 classes, but voc-masks reads class "
                                          r"indices 1\.\.254 from palette masks"):
        make_source("voc-masks", export.devkit, SourceOptions(classes=str(f)), BadSamples(False), ["classes"])
    # voc-boxes has no palette: 255 names are fine (objects of the export's classes are unknown to them)
    assert len(make_source("voc-boxes", export.devkit, SourceOptions(classes=str(f)), BadSamples(False),
                           ["classes"]).classes) == 255
    with pytest.raises(SatkitError, match="--classes: expected auto or a file of class names"):
        make_source("voc-boxes", export.devkit, SourceOptions(classes=" "), BadSamples(False), ["classes"])
    r = _cli("--source", "cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "c.zarr"), "--classes", "auto")
    assert r.exit_code == 1 and "--classes: not an option of source 'cifar10'" in r.output


def test_voc_default_build_records_no_class_list(tmp_path: Path) -> None:
    fx = make_voc(tmp_path / "data")
    prov = build(_cfg("voc-boxes", fx.devkit, tmp_path / "d.zarr")).info.provenance
    assert "classes" not in prov and prov["options"] == {} and prov["notes"] == {}


# --------------------------------------------------------------------------- VOC: split lists


def test_voc_misnamed_split_list_is_an_error(tmp_path: Path) -> None:
    fx = make_voc(tmp_path / "data")
    main_dir = fx.voc_dir / "ImageSets" / "Main"
    (main_dir / "train.txt").rename(main_dir / "Train.txt")
    for name in ("trainval.txt", "cat_train.txt"):  # VOC's own files, not look-alikes
        (main_dir / name).write_text("2008_000001\n")
    out = tmp_path / "o.zarr"
    want = (f"{main_dir / 'train.txt'}: missing split list of split 'train' (found instead: 'Train.txt'): "
            "rename it, or pass --splits val to build only the splits present")
    with pytest.raises(SourceError) as ei:
        build(_cfg("voc-boxes", fx.devkit, out))
    assert str(ei.value) == want
    _one_line_error(_cli("--source", "voc-boxes", "--root", str(fx.devkit), "--out", str(out)), want)
    assert not out.exists()
    assert build(_cfg("voc-boxes", fx.devkit, out, splits=("val",))).info.splits == {"val": 4}

    # nothing like it: what the folder holds is named (a CVAT export's default.txt, say)
    (main_dir / "Train.txt").rename(main_dir / "default.txt")
    with pytest.raises(SourceError) as ei:
        build(_cfg("voc-boxes", fx.devkit, tmp_path / "p.zarr"))
    assert str(ei.value) == (f"{main_dir / 'train.txt'}: missing split list of split 'train' (nothing similar; "
                             "Main/ holds 'default.txt', 'trainval.txt', 'val.txt'): add it, or pass --splits val "
                             "to build only the splits present")
    seg = fx.voc_dir / "ImageSets" / "Segmentation"
    (seg / "val.txt").rename(seg / "val .txt")
    with pytest.raises(SourceError, match=r"Segmentation/val\.txt: missing split list of split 'val' \(found instead: "
                                          r"'val \.txt'\): rename it, or pass --splits train"):
        build(_cfg("voc-masks", fx.devkit, tmp_path / "q.zarr"))


# --------------------------------------------------------------------------- COCO: files


@pytest.mark.parametrize("name", ["instances_train2017 .json", "instances_Train2017.json"])
def test_coco_misnamed_train_file_is_an_error(tmp_path: Path, name: str) -> None:
    fx = make_coco(tmp_path / "coco")
    fx.ann_files["train"].rename(fx.root / "annotations" / name)
    src = make_source("coco-boxes", fx.root, SourceOptions(), BadSamples(False))
    assert src.available_splits() == ["train", "val"]  # declared, not silently val only
    out = tmp_path / "o.zarr"
    want = (f"{fx.root / 'annotations' / 'instances_train2017.json'}: missing annotation file of split 'train' "
            f"(found instead: {name!r}): rename it, or pass --splits val to build only the splits present")
    with pytest.raises(SourceError) as ei:
        build(_cfg("coco-boxes", fx.root, out))
    assert str(ei.value) == want
    _one_line_error(_cli("--source", "coco-masks", "--root", str(fx.root), "--out", str(out)), want)
    assert not out.exists()
    assert build(_cfg("coco-boxes", fx.root, out, splits=("val",))).info.splits == {"val": 2}  # on purpose


def test_coco_missing_image_folder_and_older_year(tmp_path: Path) -> None:
    fx = make_coco(tmp_path / "coco")
    fx.image_dirs["val"].rename(fx.root / "Val2017")
    with pytest.raises(SourceError) as ei:
        build(_cfg("coco-boxes", fx.root, tmp_path / "o.zarr"))
    assert str(ei.value) == (f"{fx.root / 'val2017'}: missing val2017 image folder of split 'val' (found instead: "
                             "'Val2017'): rename it, or pass --splits train to build only the splits present")
    # only val of the newest year: train2014 beside it is named, not used
    fx = make_coco(tmp_path / "c2")
    fx.ann_files["train"].rename(fx.root / "annotations" / "instances_train2014.json")
    with pytest.raises(SourceError, match=r"instances_train2017\.json: missing annotation file of split 'train' "
                                          r"\(found instead: 'instances_train2014\.json'\)"):
        build(_cfg("coco-boxes", fx.root, tmp_path / "p.zarr"))


def _export_layout(coco: CocoFixture, root: Path) -> None:
    """The tiny COCO re-laid as an export: labels/<split>.json, pics/<split>/."""
    (root / "labels").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(coco.ann_files[split], root / "labels" / f"{split}.json")
        shutil.copytree(coco.image_dirs[split], root / "pics" / split)


@pytest.mark.parametrize("source", ["coco-boxes", "coco-masks"])
def test_coco_annotations_and_images_per_split(coco: CocoFixture, tmp_path: Path, source: str) -> None:
    root = tmp_path / "export"
    _export_layout(coco, root)
    opts = SourceOptions(annotations=("train=labels/train.json", f"val={root / 'labels' / 'val.json'}"),
                         images=("val=pics/val", "train=pics/train/"))  # absolute inside --root is fine too
    a = open_store(build(_cfg(source, coco.root, tmp_path / "tree.zarr")).path)
    b = open_store(build(_cfg(source, root, tmp_path / "mine.zarr", options=opts)).path)
    assert b.info.dataset == "coco" and b.info.classes == a.info.classes and b.info.splits == a.info.splits
    for split in ("train", "val"):
        assert list(b.load(split, "ids")) == [f"pics/{split}/{Path(i).name}" for i in a.load(split, "ids")]
        for field, m in [("images", None), ("labels", None), ("boxes", None)] + [("saliency", n) for n in a.info.maps]:
            assert_array_equal(b.load(split, field, m), a.load(split, field, m))
    assert b.info.provenance["options"] == {"annotations": list(opts.annotations), "images": list(opts.images)}

    # the CLI's repeated flags
    r = _cli("--source", source, "--root", str(root), "--out", str(tmp_path / "cli.zarr"),
             "--annotations", "train=labels/train.json", "--images", "train=pics/train")
    assert r.exit_code == 0, r.output
    assert open_store(tmp_path / "cli.zarr").info.splits == {"train": 4}


PER_SPLIT_ERRORS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "no-images": (("train=labels/train.json",), (), "--annotations train=...: no --images train=DIR for split 'train'"),
    "no-annotations": (("train=labels/train.json",), ("train=pics/train", "val=pics/val"),
                       "--images val=...: no --annotations val=FILE for split 'val'"),
    "no-split": (("labels/train.json",), ("train=pics/train",), "--annotations labels/train.json: expected SPLIT=PATH"),
    "unknown-split": (("valid=labels/val.json",), ("valid=pics/val",),
                      "--annotations valid=labels/val.json: unknown split 'valid' (one of train, val, test)"),
    "twice": (("train=labels/train.json", "train=labels/val.json"), ("train=pics/train",),
              "--annotations: split 'train' given twice"),
    "dotdot": (("train=../coco/annotations/instances_train2017.json",), ("train=pics/train",),
               "--annotations train=../coco/annotations/instances_train2017.json: leads outside --root"),
    "absolute-outside": (("train=ABS",), ("train=pics/train",), "not inside --root"),
}


@pytest.mark.parametrize("case", sorted(PER_SPLIT_ERRORS))
def test_coco_per_split_option_errors(coco: CocoFixture, tmp_path: Path, case: str) -> None:
    root = tmp_path / "export"
    _export_layout(coco, root)
    anns, imgs, phrase = PER_SPLIT_ERRORS[case]
    anns = tuple(a.replace("ABS", str(coco.ann_files["train"])) for a in anns)
    with pytest.raises(SatkitError) as ei:
        build(_cfg("coco-boxes", root, tmp_path / "o.zarr", options=SourceOptions(annotations=anns, images=imgs)))
    assert phrase in str(ei.value) and "\n" not in str(ei.value)
    assert not (tmp_path / "o.zarr").exists()


def test_coco_per_split_missing_file_names_what_is_there(coco: CocoFixture, tmp_path: Path) -> None:
    root = tmp_path / "export"
    _export_layout(coco, root)
    opts = SourceOptions(annotations=("train=labels/Train.json", "val=labels/val.json"),
                         images=("train=pics/train", "val=pics/val"))
    with pytest.raises(SourceError) as ei:
        build(_cfg("coco-boxes", root, tmp_path / "o.zarr", options=opts))
    assert str(ei.value) == (f"{root / 'labels' / 'Train.json'}: missing annotation file of split 'train' (found "
                             "instead: 'train.json'): rename it, or pass --splits val to build only the splits present")


# --------------------------------------------------------------------------- COCO: --classes


def _pycoco_boxes(path: Path, image_id: int, classes: list[str]) -> np.ndarray:
    """pycocotools' boxes of an image, for the categories in ``classes`` (by name), as [cls, x1, y1, x2, y2]."""
    from pycocotools.coco import COCO

    api = COCO(str(path))
    name = {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}
    anns = [a for a in api.loadAnns(api.getAnnIds(imgIds=[image_id], iscrowd=None)) if name[a["category_id"]] in classes]
    return np.array([[classes.index(name[a["category_id"]]), a["bbox"][0], a["bbox"][1],
                      a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]).reshape(-1, 5)


def _check_coco_store(st: Any, files: dict[str, Path], classes: list[str]) -> None:
    assert st.info.classes == classes
    for split, path in files.items():
        data = json.loads(path.read_text())
        ids = [int(Path(i).stem) for i in st.load(split, "ids")]
        size = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        expected_ids = [im["id"] for im in data["images"] if len(_pycoco_boxes(path, im["id"], classes))]
        assert ids == expected_ids
        labels, maps, boxes = st.load(split, "labels"), st.load(split, "saliency", "boxes"), st.load(split, "boxes")
        for k, image_id in enumerate(ids):
            ref = _pycoco_boxes(path, image_id, classes)
            xy = apply_boxes(ref[:, 1:], plan_fit(size[image_id], SIZE, "stretch"))
            rows = boxes[boxes[:, 0] == k]
            assert rows[:, 1].tolist() == ref[:, 0].tolist()
            assert_allclose(rows[:, 2:], xy, atol=1e-4)
            assert_array_equal(maps[k], rasterize_boxes(rows[:, 2:], SIZE))
            want = np.zeros(len(classes), dtype=np.uint8)
            want[ref[:, 0].astype(int)] = 1
            assert_array_equal(labels[k], want)


def test_coco_class_file_selects_and_orders_by_name(coco: CocoFixture, tmp_path: Path) -> None:
    f = tmp_path / "animals.txt"
    f.write_text("dog\n# people too\nperson\n")
    out = tmp_path / "o.zarr"
    with pytest.raises(SourceError) as ei:
        build(_cfg("coco-boxes", coco.root, out, options=SourceOptions(classes=str(f))))
    assert re.fullmatch(rf"{re.escape(str(coco.ann_files['train']))}: annotation \d+: category id 3: unknown class "
                        rf"'car' \(not in {re.escape(str(f))}, the --classes list; add it there, or pass "
                        r"--skip-unknown-classes to leave such objects out\)", str(ei.value))
    res = build(_cfg("coco-masks", coco.root, out, options=SourceOptions(classes=str(f), skip_unknown_classes=True)))
    st = open_store(res.path)
    _check_coco_store(st, coco.ann_files, ["dog", "person"])
    assert res.notes["train"]["objects_of_unlisted_classes"] == 3  # a car, a cat, a toothbrush
    assert res.notes["train"]["images_only_unlisted_classes"] == 1  # image 30: the cat
    assert res.notes["val"]["images_only_unlisted_classes"] == 1  # image 285: the car
    # the mask is the union of the listed objects only (pycocotools' annToMask)
    from pycocotools.coco import COCO

    api = COCO(str(coco.ann_files["train"]))
    k = list(st.load("train", "ids")).index("train2017/000000000036.jpg")  # a toothbrush and a person
    union = np.zeros((36, 44), dtype=np.uint8)
    for a in api.loadAnns(api.getAnnIds(imgIds=[36], iscrowd=None)):
        if a["category_id"] == 1:
            union |= api.annToMask(a)
    assert_array_equal(st.load("train", "saliency", "mask")[k], apply_map(union, plan_fit((36, 44), SIZE, "stretch"),
                                                                          "binary"))

    # a listed name that no file declares is a typo, named with its line
    f.write_text("dog\nperson\ndogs\n")
    with pytest.raises(SourceError) as ei:
        build(_cfg("coco-boxes", coco.root, out, overwrite=True,
                   options=SourceOptions(classes=str(f), skip_unknown_classes=True)))
    assert str(ei.value) == (f"{f}: line 3: class 'dogs': not a category of annotations/instances_train2017.json, "
                             "annotations/instances_val2017.json (they have: 'car', 'cat', 'dog', 'person', "
                             "'toothbrush')")


def test_coco_classes_auto_matches_categories_by_name(tmp_path: Path) -> None:
    fx = make_coco(tmp_path / "coco")
    swap = {1: 90, 90: 1}  # val numbers person and toothbrush the other way round
    for split in ("train", "val"):
        data = fx.load(split)
        data["categories"].append({"supercategory": "kitchen", "id": 44, "name": "bottle"})  # used by no annotation
        if split == "val":
            for c in data["categories"]:
                c["id"] = swap.get(c["id"], c["id"])
            for a in data["annotations"]:
                a["category_id"] = swap.get(a["category_id"], a["category_id"])
        fx.save(split, data)
    with pytest.raises(SourceError, match=r"instances_val2017\.json: categories differ from those of .*; --classes "
                                          r"FILE matches categories by name"):
        build(_cfg("coco-boxes", fx.root, tmp_path / "d.zarr"))
    st = open_store(build(_cfg("coco-boxes", fx.root, tmp_path / "a.zarr", options=SourceOptions(classes="auto"))).path)
    _check_coco_store(st, fx.ann_files, ["car", "cat", "dog", "person", "toothbrush"])
    assert st.info.provenance["classes"] == {
        "from": "auto", "order": "sorted by Unicode code point",
        "scanned": ["annotations/instances_train2017.json", "annotations/instances_val2017.json"]}
    # every split's file is read: a val-only build has the same list (val has no cat nor toothbrush)
    v = build(_cfg("coco-boxes", fx.root, tmp_path / "v.zarr", splits=("val",), options=SourceOptions(classes="auto")))
    assert v.info.classes == ["car", "cat", "dog", "person", "toothbrush"]


# --------------------------------------------------------------------------- help and README


def test_build_help_teaches_the_new_options() -> None:
    r = CliRunner().invoke(main, ["build", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for phrase in ("--classes auto|FILE", "--skip-unknown-classes", "--annotations SPLIT=FILE", "--images SPLIT=DIR",
                   "--annotations train=ann/train.json --images train=img/train", "mask index i+1 is class i",
                   "a missing one is an error, never a smaller store"):
        assert phrase in text, phrase


def _readme_byod_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Your own classes and layouts"):text.index("## Looking at a store")]
    return [c for c in re.findall(r"`(satdata build [^`]+)`", section)]


def test_readme_byod_commands_run(coco: CocoFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmds = _readme_byod_commands()
    assert len(cmds) == 2 and "--classes auto" in cmds[0] and "--annotations" in cmds[1]
    make_voc_export(tmp_path / "my-voc")
    _export_layout(coco, tmp_path / "my-coco")
    (tmp_path / "classes.txt").write_text("# what I want from this export\nperson\ndog\n")
    monkeypatch.chdir(tmp_path)
    for cmd in cmds:
        argv = shlex.split(cmd)
        r = CliRunner().invoke(main, argv[1:] + ["-q"])
        assert r.exit_code == 0, (cmd, r.output)
    assert open_store(tmp_path / "mine.zarr").info.classes == AUTO_ORDER
    st = open_store(tmp_path / "mine-coco.zarr")
    assert st.info.classes == ["person", "dog"] and set(st.info.maps) == {"mask", "boxes"}
    assert st.info.provenance["classes"]["from"] == "file"
