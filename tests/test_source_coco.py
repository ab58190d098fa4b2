"""coco-boxes and coco-masks: real instances_*.json (polygons, RLE) and JPEGs into a store."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image

from satdata.build import BuildConfig, build
from satdata.cli import main
from satdata.errors import SourceError
from satdata.geometry import apply_boxes, apply_image, apply_map, plan_fit, rasterize_boxes
from satdata.sources import BadSamples, SourceOptions, make_source
from satdata.sources._base import read_image
from satdata.store import open_store
from tests.fixtures import build_config
from tests.fixtures.coco import CLASSES, CocoFixture, make_coco

SIZE = (24, 20)  # (H, W)
# pycocotools' decode (used by the reference COCO.annToMask) trips a NumPy 2 deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CAT_INDEX = {1: 0, 3: 1, 17: 2, 18: 3, 90: 4}


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> CocoFixture:
    """A tiny COCO 2017 shared by the tests that only read it."""
    return make_coco(tmp_path_factory.mktemp("coco") / "coco")


def _cfg(source: str, root: Path, out: Path, **kw: Any) -> BuildConfig:
    return build_config(source, root, out, SIZE, **kw)


def _reference(fx: CocoFixture, split: str) -> tuple[Any, list[int]]:
    """pycocotools' own reading of the file, and the ids of the images with annotations."""
    from pycocotools.coco import COCO

    api = COCO(str(fx.ann_files[split]))
    listed = [im["id"] for im in fx.load(split)["images"]]
    return api, [i for i in listed if api.getAnnIds(imgIds=[i], iscrowd=None)]


def _ref_union(api: Any, image_id: int) -> np.ndarray:
    info = api.loadImgs([image_id])[0]
    union = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    for a in api.loadAnns(api.getAnnIds(imgIds=[image_id], iscrowd=None)):
        union |= api.annToMask(a)
    return union


def _ref_boxes(api: Any, image_id: int) -> np.ndarray:
    anns = api.loadAnns(api.getAnnIds(imgIds=[image_id], iscrowd=None))
    return np.array([[CAT_INDEX[a["category_id"]], a["bbox"][0], a["bbox"][1],
                      a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])


# --------------------------------------------------------------------------- reading


def test_coco_fixture_has_every_segmentation_kind(coco: CocoFixture) -> None:
    segs = [a["segmentation"] for s in ("train", "val") for a in coco.load(s)["annotations"]]
    assert any(isinstance(s, list) and len(s) == 2 for s in segs)  # a two-part polygon
    assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segs)  # uncompressed RLE
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs)  # compressed RLE
    assert any(a["iscrowd"] == 1 for a in coco.load("train")["annotations"])


def test_coco_classes_notes_and_pickling(coco: CocoFixture) -> None:
    src = make_source("coco-boxes", coco.root, SourceOptions(), BadSamples(False))
    assert src.available_splits() == ["train", "val"]
    assert src.classes == CLASSES  # categories sorted by id, not in the file's order
    assert src.dataset == "coco2017"
    # classes parsed the train file once; a worker must not receive that parse
    assert pickle.loads(pickle.dumps(src))._pending == {}
    recs = src.records("train")
    assert [r.id for r in recs] == [f"train2017/{i:012d}.jpg" for i in (9, 25, 30, 36)]
    assert src.notes["train"] == {"images": 5, "images_without_annotations": 1, "boxes_without_area": 0}
    src.records("val")
    assert src.notes["val"]["images_without_annotations"] == 1


def test_coco_masks_match_pycocotools(coco: CocoFixture) -> None:
    src = make_source("coco-masks", coco.root, SourceOptions(), BadSamples(False))
    for split in ("train", "val"):
        api, with_anns = _reference(coco, split)
        recs = src.records(split)
        assert [int(Path(r.id).stem) for r in recs] == with_anns
        for rec, image_id in zip(recs, with_anns):
            d = src.decode(rec)
            want = _ref_union(api, image_id)
            assert d.image.shape == want.shape + (3,)
            assert d.masks["mask"].dtype == np.uint8
            assert_array_equal(d.masks["mask"], want)
            assert 0 < want.mean() < 1
            assert_allclose(d.boxes, _ref_boxes(api, image_id))
            cats = {a["category_id"] for a in api.loadAnns(api.getAnnIds(imgIds=[image_id], iscrowd=None))}
            assert rec.label == tuple(sorted(CAT_INDEX[c] for c in cats))


@pytest.mark.parametrize("source", ["coco-boxes", "coco-masks"])
def test_coco_build(coco: CocoFixture, tmp_path: Path, source: str) -> None:
    st = open_store(build(_cfg(source, coco.root, tmp_path / "c.zarr")).path)
    info = st.info
    assert info.dataset == "coco2017" and info.classes == CLASSES and info.label_kind == "multi"
    assert info.splits == {"train": 4, "val": 2}
    assert set(info.maps) == ({"boxes", "mask"} if source == "coco-masks" else {"boxes"})
    for split in ("train", "val"):
        api, with_anns = _reference(coco, split)
        assert list(st.load(split, "ids")) == [f"{split}2017/{i:012d}.jpg" for i in with_anns]
        images, labels = st.load(split, "images"), st.load(split, "labels")
        bmap, boxes = st.load(split, "saliency", "boxes"), st.load(split, "boxes")
        for k, image_id in enumerate(with_anns):
            meta = api.loadImgs([image_id])[0]
            fit = plan_fit((meta["height"], meta["width"]), SIZE, "stretch")
            ref = _ref_boxes(api, image_id)
            xy = apply_boxes(ref[:, 1:], fit)
            assert_array_equal(bmap[k], rasterize_boxes(xy, SIZE))
            assert_allclose(boxes[boxes[:, 0] == k][:, 2:], xy, atol=1e-4)
            want = np.zeros(len(CLASSES), dtype=np.uint8)
            want[ref[:, 0].astype(int)] = 1
            assert_array_equal(labels[k], want)
            assert_array_equal(images[k], apply_image(read_image(coco.image(split, image_id)), fit))
            if source == "coco-masks":
                mask = st.load(split, "saliency", "mask")
                assert_array_equal(mask[k], apply_map(_ref_union(api, image_id), fit, "binary"))


def test_coco_greyscale_image_becomes_rgb(coco: CocoFixture) -> None:
    with Image.open(coco.image("train", 25)) as im:
        assert im.mode == "L"
    src = make_source("coco-boxes", coco.root, SourceOptions(), BadSamples(False))
    rec = next(r for r in src.records("train") if r.id.endswith("000000000025.jpg"))
    img = src.decode(rec).image
    assert img.shape == (40, 40, 3) and (img[..., 0] == img[..., 1]).all()


def test_coco_label_largest(coco: CocoFixture, tmp_path: Path) -> None:
    opts = SourceOptions(label="largest")
    for source in ("coco-boxes", "coco-masks"):
        st = open_store(build(_cfg(source, coco.root, tmp_path / f"{source}.zarr", options=opts)).path)
        assert st.info.label_kind == "single"
        for split in ("train", "val"):
            api, with_anns = _reference(coco, split)
            want = []
            for image_id in with_anns:
                anns = api.loadAnns(api.getAnnIds(imgIds=[image_id], iscrowd=None))
                want.append(CAT_INDEX[max(anns, key=lambda a: a["area"])["category_id"]])
            assert st.load(split, "labels").tolist() == want
    # image 9: the person polygon is listed first, the two-part dog is larger
    assert want and st.load("train", "labels")[0] == CLASSES.index("dog")


@pytest.mark.parametrize("source,args,kind", [
    ("coco-boxes", [], "multi"),
    ("coco-masks", ["--label", "largest", "--splits", "val"], "single"),
])
def test_coco_cli_build(coco: CocoFixture, tmp_path: Path, source: str, args: list[str], kind: str) -> None:
    out = tmp_path / "cli.zarr"
    r = CliRunner().invoke(main, ["build", "--source", source, "--root", str(coco.root), "--out", str(out),
                                  "--size", "16", "-q", *args])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    info = open_store(out).info
    assert info.label_kind == kind and info.image_size == (16, 16)
    assert info.splits == ({"val": 2} if "--splits" in args else {"train": 4, "val": 2})
    r = CliRunner().invoke(main, ["build", "--source", source, "--root", str(coco.root), "--out",
                                  str(tmp_path / "x"), "--drop-difficult"])
    assert r.exit_code != 0 and "--drop-difficult: not an option" in r.output


def test_coco_masks_in_worker_processes(coco: CocoFixture, tmp_path: Path) -> None:
    a = open_store(build(_cfg("coco-masks", coco.root, tmp_path / "a.zarr")).path)
    b = open_store(build(_cfg("coco-masks", coco.root, tmp_path / "b.zarr", workers=1)).path)
    for split in ("train", "val"):
        for field, m in (("images", None), ("labels", None), ("saliency", "mask"), ("saliency", "boxes")):
            assert_array_equal(a.load(split, field, m), b.load(split, field, m))


def test_coco_box_without_area_and_overshoot(tmp_path: Path) -> None:
    fx = make_coco(tmp_path / "coco")
    data = fx.load("train")
    first, second = [a for a in data["annotations"] if a["image_id"] == 9]
    first["bbox"][2] = 0.0  # COCO has a few boxes without area
    second["bbox"][2] = 48.4 - second["bbox"][0]  # overshoots the 48-wide image by 0.4 px
    fx.save("train", data)
    src = make_source("coco-boxes", fx.root, SourceOptions(), BadSamples(False))
    rec = src.records("train")[0]
    assert src.notes["train"]["boxes_without_area"] == 1
    assert rec.label == (CAT_INDEX[1], CAT_INDEX[18])  # the object without a box still labels
    assert_allclose(rec.data[4], [[CAT_INDEX[18], second["bbox"][0], second["bbox"][1], 48.0,
                                   second["bbox"][1] + second["bbox"][3]]])
    res = build(_cfg("coco-boxes", fx.root, tmp_path / "ok.zarr"))
    assert res.info.splits == {"train": 4, "val": 2}


def test_coco_degenerate_segmentations(tmp_path: Path) -> None:
    fx = make_coco(tmp_path / "coco")
    data = fx.load("train")
    person, dog = [a for a in data["annotations"] if a["image_id"] == 9]
    # train2017's annotation 918 (cocoapi#355): a flat 4-point polygon, a box of height 0
    person.update(segmentation=[[16.65, 8.33, 16.65, 8.33, 17.68, 8.33, 17.68, 8.33]],
                  bbox=[16.65, 8.33, 1.03, 0.0], area=0.0)
    dog["segmentation"] = [[40.0, 30.0, 41.0, 31.0]] + dog["segmentation"]  # a 2-point part first
    fx.save("train", data)
    src = make_source("coco-masks", fx.root, SourceOptions(), BadSamples(False))
    recs = src.records("train")
    assert src.notes["train"]["boxes_without_area"] == 1
    api, _ = _reference(fx, "train")
    dog_only = api.annToMask({**dog, "segmentation": dog["segmentation"][1:]})
    assert_array_equal(src.decode(recs[0]).masks["mask"], dog_only | _ref_union_of(api, [person["id"]]))
    assert recs[0].label == (CAT_INDEX[1], CAT_INDEX[18])
    assert build(_cfg("coco-masks", fx.root, tmp_path / "ok.zarr")).info.splits == {"train": 4, "val": 2}

    data["annotations"] = [a for a in data["annotations"] if a["id"] != person["id"]]
    dog["segmentation"] = [[40.0, 30.0, 41.0, 31.0]]  # nothing with area left
    data["annotations"] = [dog if a["id"] == dog["id"] else a for a in data["annotations"]]
    fx.save("train", data)
    src = make_source("coco-masks", fx.root, SourceOptions(), BadSamples(False))
    recs = src.records("train")
    assert src.notes["train"]["segmentations_without_area"] == 1
    assert not src.decode(recs[0]).masks["mask"].any()


def _ref_union_of(api: Any, ann_ids: list[int]) -> np.ndarray:
    masks = [api.annToMask(a) for a in api.loadAnns(ann_ids)]
    return np.bitwise_or.reduce(masks)


# --------------------------------------------------------------------------- bad input


def _ann(fx: CocoFixture, split: str, image_id: int, k: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    data = fx.load(split)
    return data, [a for a in data["annotations"] if a["image_id"] == image_id][k]


def _set(fx: CocoFixture, image_id: int, key: str, value: Any, k: int = 0) -> tuple[Path, str]:
    data, ann = _ann(fx, "train", image_id, k)
    ann[key] = value
    fx.save("train", data)
    return fx.ann_files["train"], f"annotation {ann['id']}: "


def _malformed(fx: CocoFixture) -> tuple[Path, str]:
    p = fx.ann_files["val"]
    p.write_text('{\n  "images": [\n    {"id": 1,}\n  ]\n}\n')
    return p, "malformed JSON at line 3, column 14: Expecting property name enclosed in double quotes"


def _missing_image(fx: CocoFixture) -> tuple[Path, str]:
    p = fx.image("train", 30)
    p.unlink()
    return p, "image file is missing (image 30 of instances_train2017.json)"


def _resized_image(fx: CocoFixture) -> tuple[Path, str]:
    p = fx.image("train", 30)
    Image.new("RGB", (50, 32)).save(p, "JPEG")
    return p, "image is 50x32 but instances_train2017.json gives 56x32"


def _with_phrase(got: tuple[Path, str], phrase: str) -> tuple[Path, str]:
    return got[0], got[1] + phrase


CASES: dict[str, tuple[str, Callable[[CocoFixture], tuple[Path, str]], int]] = {
    # name: (source, damage -> (file the error names, phrase), train samples left with --skip-bad)
    "malformed-json": ("coco-boxes", _malformed, -1),
    "unknown-category": ("coco-boxes", lambda fx: _with_phrase(_set(fx, 30, "category_id", 999),
                                                               "unknown category id 999"), 3),
    "unknown-image": ("coco-masks", lambda fx: _with_phrase(_set(fx, 9, "image_id", 424242),
                                                            "unknown image id 424242"), 4),
    "missing-image": ("coco-boxes", _missing_image, 3),
    "image-not-its-size": ("coco-masks", _resized_image, 3),
    "bbox-outside": ("coco-boxes", lambda fx: _with_phrase(_set(fx, 30, "bbox", [40.0, 4.0, 30.0, 20.0]),
                                                           "bbox [40.0, 4.0, 30.0, 20.0] lies outside the 56x32"), 3),
    "bbox-malformed": ("coco-boxes", lambda fx: _with_phrase(_set(fx, 30, "bbox", [1, 2, 3]), "bbox [1, 2, 3] is not"), 3),
    "odd-polygon": ("coco-masks", lambda fx: _with_phrase(
        _set(fx, 36, "segmentation", [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]), "a polygon has 7 coordinates"), 3),
    "rle-wrong-size": ("coco-masks", lambda fx: _with_phrase(
        _set(fx, 30, "segmentation", {"size": [10, 10], "counts": "52203"}), "RLE size [10, 10] is not"), 3),
    "rle-undecodable": ("coco-masks", lambda fx: _with_phrase(
        _set(fx, 30, "segmentation", {"size": [32, 56], "counts": "PP"}), "cannot decode its segmentation"), 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_coco_bad_input(tmp_path: Path, case: str) -> None:
    source, damage, left = CASES[case]
    fx = make_coco(tmp_path / "coco")
    bad_file, phrase = damage(fx)
    out = tmp_path / "out.zarr"

    with pytest.raises(SourceError) as ei:
        build(_cfg(source, fx.root, out))
    msg = str(ei.value)
    assert msg.startswith(f"{bad_file}: ") and phrase in msg and "\n" not in msg, msg
    assert not out.exists() and not list(tmp_path.glob(".out.zarr*"))

    r = CliRunner().invoke(main, ["build", "--source", source, "--root", str(fx.root), "--out", str(out), "-q"])
    assert r.exit_code == 1 and f"Error: {bad_file}: " in r.output and phrase in r.output, r.output
    assert not out.exists()

    if left < 0:  # a malformed file is never one bad sample
        with pytest.raises(SourceError, match="malformed JSON"):
            build(_cfg(source, fx.root, out, skip_bad=True))
        assert not out.exists()
        return
    res = build(_cfg(source, fx.root, out, skip_bad=True))
    assert [(p, phrase in problem) for p, problem in res.bad] == [(str(bad_file), True)]
    assert open_store(out).info.splits == {"train": left, "val": 2}


def test_coco_unknown_category_image_is_not_counted_empty(tmp_path: Path) -> None:
    fx = make_coco(tmp_path / "coco")
    _set(fx, 30, "category_id", 999)
    bad = BadSamples(True)
    src = make_source("coco-boxes", fx.root, SourceOptions(), bad)
    assert [r.id for r in src.records("train")] == [f"train2017/{i:012d}.jpg" for i in (9, 25, 36)]
    assert src.notes["train"]["images_without_annotations"] == 1
    assert len(bad.items) == 1


def test_coco_unusable_dataset(tmp_path: Path) -> None:
    fx = make_coco(tmp_path / "coco")
    out = tmp_path / "out.zarr"
    # an older year beside the newest is ignored
    shutil.copy(fx.ann_files["val"], fx.root / "annotations" / "instances_val2014.json")
    assert make_source("coco-boxes", fx.root, SourceOptions(), BadSamples(False)).dataset == "coco2017"
    # the two files must share one class list
    data = fx.load("val")
    data["categories"] = data["categories"][:-1]
    fx.save("val", data)
    with pytest.raises(SourceError, match=r"instances_val2017\.json: categories differ from those of .*train2017"):
        build(_cfg("coco-boxes", fx.root, out))
    fx.ann_files["val"].unlink()
    shutil.rmtree(fx.image_dirs["train"])
    with pytest.raises(SourceError, match=r"train2017: missing train2017 image folder of split 'train'"):
        build(_cfg("coco-boxes", fx.root, out, splits=("train",)))
    fx.image_dirs["train"].mkdir()
    fx.ann_files["train"].write_text(json.dumps({"images": []}))
    with pytest.raises(SourceError, match=r"instances_train2017\.json: not a COCO instances file"):
        build(_cfg("coco-boxes", fx.root, out, splits=("train",)))
    for p in (fx.root / "annotations").iterdir():
        p.unlink()
    with pytest.raises(SourceError, match=r"annotations: has no instances_train20xx\.json"):
        build(_cfg("coco-boxes", fx.root, out))
    with pytest.raises(SourceError, match=r"annotations: missing annotations folder"):
        build(_cfg("coco-boxes", tmp_path, out))
    assert not out.exists()
