"""Hostile datasets on disk: every source reader, through the real CLI (issue 9, sources).

Each case copies a tiny dataset in its real on-disk format (tests/fixtures) into a sandbox,
damages it the way a careless or hostile user could (paths out of the root in annotations,
NaN and huge numbers, crafted RLE and polygons, FIFOs, link loops, decompression bombs,
odd image modes, crafted HDF5 files), runs ``satdata build`` on it and asserts what satkit
promises for every failure a user can cause:

* a non-zero exit and exactly one line on stderr, starting with "Error:", naming the
  offending file, and no traceback;
* no store left behind: nothing at --out, no ``.out.zarr.partial-*`` directory;
* nothing changed anywhere in the sandbox (the dataset, the working directory and an
  "outside" directory that crafted names and links aim at).

Cases where a bug would hang the test (a FIFO opened for reading) run the CLI in a
subprocess with a timeout. Positive cases check the documented image-mode rule (16-bit
greyscale scaled, CMYK converted, alpha composited on black) and that --skip-bad lists a
FIFO and a link loop as skipped. Hypothesis drives hostile file names, non-finite XML
numbers, crafted RLE strings and polygon coordinates.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from satdata.cli import main as satdata_main
from satdata.sources._base import relative_name_problem
from satdata.sources.coco import _usable_segmentation, rle_string_counts
from satdata.store import open_store
from tests.fixtures.cifar import make_cifar10
from tests.fixtures.coco import make_coco
from tests.fixtures.flowers17 import make_flowers17
from tests.fixtures.folder import make_folder
from tests.fixtures.tiny_imagenet import make_tiny_imagenet
from tests.fixtures.voc import make_voc
from test_hostile import tree_snapshot  # the sandbox snapshot every hostile corpus uses

HYPO = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SUBPROCESS_TIMEOUT = 60
BOX_ID = "2008_000002"  # VOC fixture: a 40x40 car, in train
SEG_ID = "2008_000003"  # VOC fixture: 56x32, in the segmentation train list


# --------------------------------------------------------------------------- pristine datasets


def _make_h5(path: Path) -> Path:
    """A small h5 file in satkit's layout: train 6 / val 3, 8x8 images, a binary map."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["satkit_h5_version"] = 1
        f.attrs["classes"] = json.dumps(["cat", "dog", "bird"])
        for split, n in (("train", 6), ("val", 3)):
            g = f.create_group(split)
            g["images"] = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
            g["labels"] = np.arange(n, dtype=np.int64) % 3
            g.create_dataset("ids", data=np.array([f"{split}/{i}" for i in range(n)], dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            g["boxes"] = np.array([[0, 0, 1, 1, 5, 6]], np.float32)
            s = g.create_group("saliency")
            s["mask"] = rng.integers(0, 2, size=(n, 8, 8), dtype=np.uint8)
            s["mask"].attrs.update({"encoding": "binary", "kind": "mask", "channels": 1})
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One untouched copy of each format (the cases copy what they need)."""
    base = tmp_path_factory.mktemp("pristine")
    make_voc(base / "voc")
    make_coco(base / "coco")
    make_tiny_imagenet(base / "tin", n_train=2, n_val=4)
    make_folder(base / "folder", per_class=2)
    make_cifar10(base / "cifar", per_batch=10)
    (base / "h5").mkdir()
    _make_h5(base / "h5" / "data.h5")
    return {
        "voc": base / "voc",
        "coco": base / "coco",
        "tin": base / "tin",
        "folder": base / "folder",
        "cifar": base / "cifar",
        "h5": base / "h5",
    }


@pytest.fixture(scope="module")
def pristine_flowers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flowers") / "17flowers"
    make_flowers17(root)
    return root


# --------------------------------------------------------------------------- the sandbox


@dataclass
class Sandbox:
    """One case's world: every path a command could touch lies under ``root``."""

    root: Path
    data: Path  # the dataset (a copy of a pristine one)
    work: Path  # the working directory of the command
    outside: Path  # what crafted names and links aim at
    out: Path  # --out

    def snapshot(self) -> dict[str, str]:
        return tree_snapshot(self.root)


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    root = tmp_path / "sandbox"
    sb = Sandbox(root=root, data=root / "data", work=root / "work", outside=root / "outside", out=root / "out.zarr")
    sb.work.mkdir(parents=True)
    sb.outside.mkdir()
    (sb.outside / "victim.txt").write_text("must survive\n")
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(sb.outside / "victim.jpg")
    monkeypatch.chdir(sb.work)
    monkeypatch.delenv("SATKIT_DEBUG", raising=False)
    yield sb


def _copy(pristine: Path, box: Sandbox) -> Path:
    shutil.copytree(pristine, box.data, symlinks=True)
    return box.data


def build_args(box: Sandbox, source: str, root: Path, *extra: str) -> list[str]:
    return ["build", "--source", source, "--root", str(root), "--out", str(box.out), "--size", "8", "-q", *extra]


def _check_failure(box: Sandbox, before: dict[str, str], code: int | None, stdout: str, stderr: str,
                   names: str, phrase: str) -> str:
    after = box.snapshot()
    assert code not in (0, None), (stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    line = lines[0]
    assert names in line, f"the error does not name {names}: {line}"
    assert phrase in line, f"expected {phrase!r} in: {line}"
    assert not box.out.exists() and not box.out.is_symlink(), "a store was left at --out"
    assert not list(box.root.glob(f".{box.out.name}.partial-*")), "a partial build was left"
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == set(), f"the sandbox changed: {sorted(changed)}"
    assert (box.outside / "victim.txt").read_text() == "must survive\n"
    return line


def expect_error(box: Sandbox, args: list[str], names: Path | str, phrase: str) -> str:
    """Run a failing build in-process; assert the promises (module docstring); return its line."""
    before = box.snapshot()
    res = CliRunner().invoke(satdata_main, args)
    assert isinstance(res.exception, SystemExit), f"escaped: {res.exception!r}"
    return _check_failure(box, before, res.exit_code, res.stdout, res.stderr, str(names), phrase)


def run_cli(box: Sandbox, args: list[str]) -> subprocess.CompletedProcess[str]:
    """The real command in its own process: a bug that blocks on a FIFO times out, not hangs."""
    env = {k: v for k, v in os.environ.items() if k != "SATKIT_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "satdata.cli", *args], cwd=box.work, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def expect_error_subprocess(box: Sandbox, args: list[str], names: Path | str, phrase: str) -> str:
    before = box.snapshot()
    proc = run_cli(box, args)
    return _check_failure(box, before, proc.returncode, proc.stdout, proc.stderr, str(names), phrase)


# --------------------------------------------------------------------------- crafted files


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))
    return path


def png_bomb(path: Path, w: int = 100_000, h: int = 100_000) -> Path:
    """A valid PNG header declaring w x h pixels, with almost no data: decoding it would
    allocate w * h bytes; satkit must refuse it from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 40 40
%%EndComments
newpath 0 0 moveto 40 40 lineto stroke showpage
%%EOF
"""

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lololololololololololololololololololololol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><size><width>40</width><height>40</height></size><filename>&lol9;</filename></annotation>
"""


def _voc_dir(data: Path) -> Path:
    return data / "VOCdevkit" / "VOC2012"


def _coco_edit(data: Path, change: Callable[[dict[str, Any]], None], split: str = "train") -> Path:
    path = data / "annotations" / f"instances_{split}2017.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))  # allow_nan: NaN and Infinity are written as JSON's extension
    return path


def _coco_ann(image_id: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        ann = next(a for a in d["annotations"] if a["image_id"] == image_id)
        ann[key] = value
    return change


def _coco_image(image_id: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        next(im for im in d["images"] if im["id"] == image_id)[key] = value
    return change


def _move_out_and_link(path: Path, box: Sandbox) -> Path:
    """Move a good file out of the dataset and leave a link to it in its place."""
    target = box.outside / path.name
    path.rename(target)
    path.symlink_to(target)
    return path


def _tiff(path: Path, arr: np.ndarray) -> Path:
    """A TIFF (whatever the name says): float32 is PIL mode F, int32 mode I."""
    Image.fromarray(arr).save(path, format="TIFF")
    return path


# --------------------------------------------------------------------------- the corpus

# name -> (dataset, source, damage(data) -> (file the error names, phrase))
Damage = Callable[[Path, Sandbox], tuple[Path | str, str]]
CASES: dict[str, tuple[str, str, Damage]] = {
    # ---- VOC: numbers, XML, lists, images, masks
    "voc-xml-nan-box": ("voc", "voc-boxes", lambda d, b: (
        _edit(_voc_dir(d) / "Annotations" / f"{BOX_ID}.xml", "<xmin>1<", "<xmin>nan<"), "not a finite number")),
    "voc-xml-huge-box": ("voc", "voc-boxes", lambda d, b: (
        _edit(_voc_dir(d) / "Annotations" / f"{BOX_ID}.xml", "<xmax>40<", "<xmax>1e999<"), "not a finite number")),
    "voc-xml-size-bomb": ("voc", "voc-boxes", lambda d, b: (
        _edit(_edit(_voc_dir(d) / "Annotations" / f"{BOX_ID}.xml", "<width>40<", "<width>1000000<"),
              "<height>40<", "<height>1000000<"), "more than the limit")),
    "voc-xml-nan-size": ("voc", "voc-boxes", lambda d, b: (
        _edit(_voc_dir(d) / "Annotations" / f"{BOX_ID}.xml", "<width>40<", "<width>NaN<"), "not a finite number")),
    "voc-xml-truncated": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "Annotations" / f"{BOX_ID}.xml").write_bytes(p.read_bytes()[:150]) and p,
        "malformed XML")),
    "voc-xml-not-utf8": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "Annotations" / f"{BOX_ID}.xml").write_bytes(
            p.read_bytes().replace(b"<name>car<", b"<name>c\xff\xfer<")) and p, "malformed XML")),
    "voc-xml-unknown-encoding": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "Annotations" / f"{BOX_ID}.xml").write_bytes(
            b'<?xml version="1.0" encoding="x-no-such"?>\n' + p.read_bytes()) and p, "malformed XML")),
    "voc-xml-billion-laughs": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "Annotations" / f"{BOX_ID}.xml").write_text(BILLION_LAUGHS) and p, "malformed XML")),
    "voc-xml-external-entity": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "Annotations" / f"{BOX_ID}.xml").write_text(
            f'<!DOCTYPE a [<!ENTITY x SYSTEM "file://{b.outside / "victim.txt"}">]>\n'
            "<annotation><size><width>40</width><height>40</height></size><filename>&x;</filename></annotation>")
        and p, "malformed XML")),
    "voc-list-not-utf8": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "ImageSets" / "Main" / "train.txt").write_bytes(b"2008_000001\n\xff\xfe\n") and p,
        "not UTF-8 text")),
    "voc-list-path-traversal": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "ImageSets" / "Main" / "train.txt").write_text("../../../../outside/victim\n") and p,
        "expected one image id")),
    "voc-jpeg-link-out-of-root": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "JPEGImages" / f"{BOX_ID}.jpg").unlink() or p.symlink_to(b.outside / "victim.jpg")
        or p, "leads outside the dataset root")),
    "voc-jpeg-link-loop": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "JPEGImages" / f"{BOX_ID}.jpg").unlink() or p.symlink_to(p.name) or p,
        "symbolic link loop")),
    "voc-jpeg-is-directory": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "JPEGImages" / f"{BOX_ID}.jpg").unlink() or p.mkdir() or p, "is a directory")),
    "voc-jpeg-decompression-bomb": ("voc", "voc-boxes", lambda d, b: (
        png_bomb(_voc_dir(d) / "JPEGImages" / f"{BOX_ID}.jpg", 10_000, 10_000), "than the limit of 89,478,485")),
    "voc-jpeg-is-eps": ("voc", "voc-boxes", lambda d, b: (
        (p := _voc_dir(d) / "JPEGImages" / f"{BOX_ID}.jpg").write_bytes(EPS) and p, "unknown or damaged format")),
    "voc-jpeg-float-mode": ("voc", "voc-boxes", lambda d, b: (
        _tiff(_voc_dir(d) / "JPEGImages" / f"{BOX_ID}.jpg", np.zeros((40, 40), np.float32)),
        "has mode 'F'")),
    "voc-mask-16-bit-values": ("voc", "voc-masks", lambda d, b: (
        (p := _voc_dir(d) / "SegmentationClass" / f"{SEG_ID}.png") and Image.fromarray(
            np.full((32, 56), 65535, np.uint16)).save(p) or p, "outside 0..255")),
    "voc-mask-32-bit-values": ("voc", "voc-masks", lambda d, b: (
        _tiff(_voc_dir(d) / "SegmentationClass" / f"{SEG_ID}.png", np.full((32, 56), 2 ** 31 - 1, np.int32)),
        "outside 0..255")),
    # ---- COCO: names, numbers, segmentations, JSON
    "coco-file-name-absolute": ("coco", "coco-boxes", lambda d, b: (
        _coco_edit(d, _coco_image(30, "file_name", str(b.outside / "victim.jpg"))), "is an absolute path")),
    "coco-file-name-dotdot": ("coco", "coco-boxes", lambda d, b: (
        _coco_edit(d, _coco_image(30, "file_name", "../../outside/victim.jpg")), "'..' part")),
    "coco-file-name-nul": ("coco", "coco-boxes", lambda d, b: (
        _coco_edit(d, _coco_image(30, "file_name", "000000000030.jpg\u0000.png")), "NUL")),
    "coco-image-size-bomb": ("coco", "coco-boxes", lambda d, b: (
        _coco_edit(d, lambda j: (_coco_image(30, "width", 10 ** 6)(j), _coco_image(30, "height", 10 ** 6)(j))),
        "more than the limit")),
    "coco-bbox-nan": ("coco", "coco-boxes", lambda d, b: (
        _coco_edit(d, _coco_ann(30, "bbox", [float("nan"), 4.0, 10.0, 10.0])), "not a finite number")),
    "coco-bbox-infinity": ("coco", "coco-boxes", lambda d, b: (
        _coco_edit(d, _coco_ann(30, "bbox", [1.0, 4.0, float("inf"), 10.0])), "not a finite number")),
    "coco-bbox-huge-int": ("coco", "coco-boxes", lambda d, b: (
        _coco_edit(d, _coco_ann(30, "bbox", [1, 4, 10 ** 30, 10])), "not a finite number")),
    "coco-area-nan": ("coco", "coco-boxes", lambda d, b: (
        _coco_edit(d, _coco_ann(30, "area", float("nan"))), "area nan is not a finite number")),
    "coco-polygon-nan": ("coco", "coco-masks", lambda d, b: (
        _coco_edit(d, _coco_ann(36, "segmentation", [[2.0, 2.0, float("nan"), 2.0, 6.0, 5.0]])),
        "not a finite number")),
    "coco-polygon-huge": ("coco", "coco-masks", lambda d, b: (
        _coco_edit(d, _coco_ann(36, "segmentation", [[2.0, 2.0, 1e30, 2.0, 6.0, 5.0]])), "too far outside")),
    "coco-polygon-absurd-length": ("coco", "coco-masks", lambda d, b: (
        _coco_edit(d, _coco_ann(36, "segmentation", [[-40.0, -30.0, 80.0, 70.0] * 10_000])), "pixels long")),
    "coco-rle-string-crafted": ("coco", "coco-masks", lambda d, b: (
        _coco_edit(d, _coco_ann(30, "segmentation", {"size": [32, 56], "counts": "oooooooooo0"})),
        "cannot decode its segmentation")),
    "coco-rle-string-overruns": ("coco", "coco-masks", lambda d, b: (
        _coco_edit(d, _coco_ann(30, "segmentation", {"size": [32, 56], "counts": mask_utils.encode(
            np.asfortranarray(np.ones((64, 56), np.uint8)))["counts"].decode()})), "runs add up to 3,584")),
    "coco-rle-counts-not-ints": ("coco", "coco-masks", lambda d, b: (
        _coco_edit(d, _coco_ann(30, "segmentation", {"size": [32, 56], "counts": [1.5, 1790.5]})),
        "counts do not cover")),
    "coco-json-nested-deep": ("coco", "coco-boxes", lambda d, b: (
        (p := d / "annotations" / "instances_train2017.json").write_text("[" * 100_000 + "]" * 100_000) and p,
        "nested too deeply")),
    "coco-json-not-utf8": ("coco", "coco-boxes", lambda d, b: (
        (p := d / "annotations" / "instances_train2017.json").write_bytes(b'{"images": "\xff\xfe"}') and p,
        "not UTF-8")),
    "coco-json-huge-integer": ("coco", "coco-boxes", lambda d, b: (
        (p := d / "annotations" / "instances_train2017.json").write_text('{"images": ' + "9" * 5000 + "}") and p,
        "unreadable JSON")),
    "coco-json-is-directory": ("coco", "coco-boxes", lambda d, b: (
        (p := d / "annotations" / "instances_train2017.json").unlink() or p.mkdir() or p, "is a directory")),
    "coco-image-link-out-of-root": ("coco", "coco-boxes", lambda d, b: (
        (p := d / "train2017" / "000000000030.jpg").unlink() or p.symlink_to(b.outside / "victim.jpg") or p,
        "leads outside the dataset root")),
    # ---- Tiny ImageNet: text files, names
    "tin-wnids-not-utf8": ("tin", "tiny-imagenet-boxes", lambda d, b: (
        (p := d / "tiny-imagenet-200" / "wnids.txt").write_bytes(b"n04067472\n\x80\x81\n") and p, "not UTF-8 text")),
    "tin-val-name-traversal": ("tin", "tiny-imagenet-boxes", lambda d, b: (
        (p := d / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text(
            "../../../../outside/victim.jpg\tn04067472\t1\t1\t5\t5\n") and f"{p}:1", "'..' part")),
    "tin-boxes-not-utf8": ("tin", "tiny-imagenet-boxes", lambda d, b: (
        (p := d / "tiny-imagenet-200" / "train" / "n01443537" / "n01443537_boxes.txt").write_bytes(b"\xc3\x28")
        and p, "not UTF-8 text")),
    # ---- Folder: links, modes, sizes
    "folder-mask-link-out-of-root": ("folder", "folder-masks", lambda d, b: (
        (p := d / "masks" / "cat" / "cat_x_00.png").unlink() or p.symlink_to(b.outside / "victim.jpg") or p,
        "leads outside the dataset root")),
    "folder-broken-link": ("folder", "folder-masks", lambda d, b: (
        (p := d / "images" / "cat" / "ghost.jpg").symlink_to(d / "nowhere.jpg") or p, "broken symbolic link")),
    "folder-image-link-loop": ("folder", "folder-masks", lambda d, b: (
        (p := d / "images" / "dog" / "loop.jpg").symlink_to("loop.jpg") or p, "symbolic link loop")),
    # the folder fixture's zebra_x_01.png is a 20x28 PNG
    "folder-image-bomb": ("folder", "folder-masks", lambda d, b: (
        png_bomb(d / "images" / "zebra" / "zebra_x_01.png"), "than the limit of 89,478,485")),
    "folder-image-int32-negative": ("folder", "folder-masks", lambda d, b: (
        _tiff(d / "images" / "zebra" / "zebra_x_01.png", np.full((28, 20), -5, np.int32)), "only 0..65535")),
    "folder-mask-size-differs": ("folder", "folder-masks", lambda d, b: (
        (p := d / "masks" / "zebra" / "zebra_x_01.png") and Image.fromarray(np.ones((5, 9), np.uint8)).save(p)
        or p, "mask is 9x5 but its image is 20x28")),
    # ---- Flowers-17 and CIFAR
    "cifar-batch-is-directory": ("cifar", "cifar10", lambda d, b: (
        (p := d / "cifar-10-batches-py" / "data_batch_2").unlink() or p.mkdir() or p, "is a directory")),
    "cifar-batch-link-out-of-root": ("cifar", "cifar10", lambda d, b: (
        _move_out_and_link(d / "cifar-10-batches-py" / "data_batch_2", b), "leads outside the dataset root")),
}


def _root_arg(dataset: str, data: Path) -> Path:
    return {"voc": data / "VOCdevkit", "tin": data, "coco": data, "folder": data, "cifar": data}[dataset]


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_dataset_is_one_error_line(case: str, box: Sandbox, pristine: dict[str, Path]) -> None:
    dataset, source, damage = CASES[case]
    data = _copy(pristine[dataset], box)
    got = damage(data, box)
    names, phrase = (got[0], got[-1])
    expect_error(box, build_args(box, source, _root_arg(dataset, data)), names, phrase)


# ---- HDF5


def _h5_change(change: Callable[[h5py.File, Sandbox], None]) -> Callable[[Path, Sandbox], None]:
    def apply(path: Path, box: Sandbox) -> None:
        with h5py.File(path, "a") as f:
            change(f, box)
    return apply


def _replace(f: h5py.File, name: str, **kw: Any) -> None:
    attrs = dict(f[name].attrs) if name in f else {}
    del f[name]
    f.create_dataset(name, **kw)
    f[name].attrs.update(attrs)


H5_CASES: dict[str, tuple[Callable[[Path, Sandbox], None], str, str]] = {
    # name: (damage, what the error names besides the file, phrase)
    "external-storage": (_h5_change(lambda f, b: _replace(
        f, "train/labels", shape=(6,), dtype=np.int64, external=[(str(b.outside / "victim.txt"), 0, 48)])),
        "train/labels", "HDF5 external storage"),
    "external-link": (_h5_change(lambda f, b: (f.__delitem__("val"), f.__setitem__(
        "val", h5py.ExternalLink(str(b.outside / "other.h5"), "/val")))), "val", "is an external link"),
    "map-name-dotdot": (_h5_change(lambda f, b: f.move("train/saliency/mask", "train/saliency/..")),
                        "saliency", "not a plain name"),
    "map-kind-path": (_h5_change(lambda f, b: f["train/saliency/mask"].attrs.__setitem__("kind", "../../x")),
                      "saliency/mask", "not a plain name"),
    "map-channels-text": (_h5_change(lambda f, b: f["train/saliency/mask"].attrs.__setitem__("channels", "many")),
                          "saliency/mask", "not an integer"),
    "float-labels": (_h5_change(lambda f, b: _replace(f, "train/labels", data=np.zeros(6, np.float32))),
                     "train/labels", "not integers"),
    "negative-label": (_h5_change(lambda f, b: f["train/labels"].__setitem__(2, -1)),
                       "train/labels[2]", "label -1 is not a class index"),
    "label-out-of-range": (_h5_change(lambda f, b: f["train/labels"].__setitem__(4, 2 ** 40)),
                           "train/labels[4]", "is not a class index"),
    "declared-but-not-stored": (_h5_change(lambda f, b: _replace(
        f, "train/images", shape=(6, 8, 8, 3), dtype=np.uint8, chunks=(1, 8, 8, 3))),
        "train/images", "stores no data"),
    "too-many-samples": (_h5_change(lambda f, b: _replace(
        f, "val/images", shape=(10 ** 9, 8, 8, 3), dtype=np.uint8, chunks=(1, 8, 8, 3))),
        "val/images", "more than the limit"),
    "image-size-bomb": (_h5_change(lambda f, b: _replace(
        f, "val/images", shape=(3, 100_000, 100_000, 3), dtype=np.uint8, chunks=(1, 64, 64, 3))),
        "val/images", "pixels"),
    "boxes-nan": (_h5_change(lambda f, b: f["train/boxes"].__setitem__((0, 3), np.nan)),
                  "train/boxes", "not a finite number"),
    "id-with-escape": (_h5_change(lambda f, b: f["train/ids"].__setitem__(1, "a\x1b[31mb")),
                       "train/ids[1]", "control character"),
    "duplicate-classes": (_h5_change(lambda f, b: f.attrs.__setitem__("classes", json.dumps(["a", "a", "b"]))),
                          "", "lists 'a' twice"),
    "dataset-name-path": (_h5_change(lambda f, b: f.attrs.__setitem__("dataset", "../../etc")),
                          "", "attribute 'dataset'"),
    "truncated-file": (lambda path, b: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
                       "", "not a readable HDF5 file"),
    "version-not-int": (_h5_change(lambda f, b: f.attrs.__setitem__("satkit_h5_version", "one")),
                        "", "not an integer"),
}


@pytest.mark.parametrize("case", sorted(H5_CASES))
def test_hostile_h5_is_one_error_line(case: str, box: Sandbox, pristine: dict[str, Path]) -> None:
    damage, what, phrase = H5_CASES[case]
    data = _copy(pristine["h5"], box)
    h5 = data / "data.h5"
    damage(h5, box)
    line = expect_error(box, build_args(box, "h5", h5), h5, phrase)
    assert what in line


# ---- FIFOs: a real process, so that a bug blocks a subprocess with a timeout, not the tests


FIFO_CASES: dict[str, tuple[str, str, Callable[[Path], Path]]] = {
    "voc-xml": ("voc", "voc-boxes", lambda d: _voc_dir(d) / "Annotations" / f"{BOX_ID}.xml"),
    "voc-jpeg": ("voc", "voc-boxes", lambda d: _voc_dir(d) / "JPEGImages" / f"{BOX_ID}.jpg"),
    "voc-split-list": ("voc", "voc-boxes", lambda d: _voc_dir(d) / "ImageSets" / "Main" / "train.txt"),
    "coco-json": ("coco", "coco-boxes", lambda d: d / "annotations" / "instances_val2017.json"),
    "tin-words": ("tin", "tiny-imagenet-boxes", lambda d: d / "tiny-imagenet-200" / "words.txt"),
    "folder-image": ("folder", "folder-masks", lambda d: d / "images" / "zebra" / "pipe.jpg"),
    "cifar-meta": ("cifar", "cifar10", lambda d: d / "cifar-10-batches-py" / "batches.meta"),
    "h5-root": ("h5", "h5", lambda d: d / "data.h5"),
}


def _fifo(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_a_fifo_is_refused_and_never_opened(case: str, box: Sandbox, pristine: dict[str, Path]) -> None:
    dataset, source, where = FIFO_CASES[case]
    data = _copy(pristine[dataset], box)
    fifo = _fifo(where(data))
    root = data / "data.h5" if dataset == "h5" else _root_arg(dataset, data)
    expect_error_subprocess(box, build_args(box, source, root), fifo, "is a FIFO (named pipe), not a regular file")


def test_flowers17_special_files(box: Sandbox, pristine_flowers: Path) -> None:
    """A datasplits.mat that is a FIFO or a directory is an error, never a silent fall-back
    to the default split; a trimap that is a link loop is named."""
    data = _copy(pristine_flowers, box)
    mat = data / "datasplits.mat"
    mat.unlink()
    os.mkfifo(mat)
    expect_error_subprocess(box, build_args(box, "flowers17-masks", data), mat, "is a FIFO")
    mat.unlink()
    mat.mkdir()
    expect_error(box, build_args(box, "flowers17-masks", data), mat, "is a directory, not a regular file")
    mat.rmdir()
    from scipy.io import savemat

    savemat(str(mat), {"trn1": np.ones((1, 100_000)), "val1": np.ones((1, 2)), "tst1": np.ones((1, 2))},
            do_compression=True)
    expect_error(box, build_args(box, "flowers17-masks", data), mat, "trn1 declares shape (1, 100000)")
    mat.unlink()
    trimap = data / "trimaps" / "image_0001.png"
    trimap.unlink()
    trimap.symlink_to(trimap.name)
    expect_error(box, build_args(box, "flowers17-masks", data), trimap, "symbolic link loop")


# --------------------------------------------------------------------------- --skip-bad


def test_skip_bad_lists_a_fifo_and_a_link_loop(box: Sandbox, pristine: dict[str, Path]) -> None:
    data = _copy(pristine["folder"], box)
    fifo = _fifo(data / "images" / "zebra" / "pipe.jpg")
    loop = data / "images" / "cat" / "loop.png"
    loop.symlink_to(loop.name)
    proc = run_cli(box, build_args(box, "folder-masks", data, "--skip-bad"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped 2 bad samples" in proc.stderr
    assert f"{fifo}: is a FIFO (named pipe), not a regular file" in proc.stderr
    assert f"{loop}: is a symbolic link loop" in proc.stderr
    st_ = open_store(box.out)
    assert st_.info.splits == {"train": 6}
    assert sorted(p for p, _ in st_.info.provenance["skipped"]) == sorted([str(fifo), str(loop)])


# --------------------------------------------------------------------------- image modes


def _mode_dataset(root: Path, images: dict[str, Image.Image]) -> None:
    """A folder-masks dataset of 8x8 images (one class), each with a full mask."""
    (root / "images" / "a").mkdir(parents=True)
    (root / "masks" / "a").mkdir(parents=True)
    for name, im in images.items():
        im.save(root / "images" / "a" / name)
        Image.fromarray(np.ones((8, 8), np.uint8)).save(root / "masks" / "a" / (Path(name).stem + ".png"))


def _stored(out: Path) -> dict[str, np.ndarray]:
    st_ = open_store(out)
    ids = [Path(i).name for i in st_.load("train", "ids").tolist()]
    return dict(zip(ids, st_.load("train", "images")))


def test_image_modes_build_by_the_documented_rule(box: Sandbox) -> None:
    grey16 = np.zeros((8, 8), np.uint16)
    grey16[:, 2:4], grey16[:, 4:6], grey16[:, 6:] = 257, 32768, 65535
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (200, 100, 50, 128)
    rgba[4:] = (255, 255, 255, 0)  # fully transparent white: black
    la = np.stack([np.full((8, 8), 200, np.uint8), np.full((8, 8), 255, np.uint8)], axis=2)
    cmyk = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8), "CMYK")
    pal = Image.fromarray(np.array([[0, 1] * 4] * 8, np.uint8), "P")
    pal.putpalette([10, 20, 30, 250, 240, 230] + [0, 0, 0] * 254)
    pal.info["transparency"] = 1
    grey_int = Image.fromarray(np.full((8, 8), 65535, np.int32), "I")
    images = {"grey16.png": Image.fromarray(grey16), "rgba.png": Image.fromarray(rgba, "RGBA"),
              "la.png": Image.fromarray(la, "LA"), "cmyk.jpg": cmyk, "pal.png": pal, "int.tif": grey_int}
    _mode_dataset(box.data, images)
    with Image.open(box.data / "images" / "a" / "grey16.png") as im:
        assert im.mode == "I;16"
    res = CliRunner().invoke(satdata_main, build_args(box, "folder-masks", box.data))
    assert res.exit_code == 0, res.output
    got = _stored(box.out)
    # 16-bit greyscale is scaled, round(v * 255 / 65535), never clipped
    assert got["grey16.png"][0, :, 0].tolist() == [0, 0, 1, 1, 128, 128, 255, 255]
    assert (got["grey16.png"] == got["grey16.png"][:, :, :1]).all()
    assert (got["int.tif"] == 255).all()
    # alpha is composited on black: colour * alpha / 255
    assert got["rgba.png"][:4].reshape(-1, 3).tolist() == [[100, 50, 25]] * 32
    assert (got["rgba.png"][4:] == 0).all()
    assert (got["la.png"] == 200).all()
    assert got["pal.png"][0, :2].tolist() == [[10, 20, 30], [0, 0, 0]]  # index 1 is transparent
    # CMYK goes through PIL's conversion (no colour profile)
    with Image.open(box.data / "images" / "a" / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(got["cmyk.jpg"], want)


# --------------------------------------------------------------------------- hypothesis

hostile_names = st.one_of(
    st.sampled_from(["/etc/passwd", "..", "../x.jpg", "a/../../b.jpg", "./x.jpg", "a//b.jpg", "a\\b.jpg",
                     "x.jpg\x00", "a\nb.jpg", "", "/"]),
    st.builds(lambda a, b: f"{a}/../{b}", st.text("abc", min_size=0, max_size=3), st.text("xyz", max_size=3)),
    st.builds(lambda s: "/" + s, st.text(min_size=1, max_size=12)),
    st.builds(lambda s, c: s + c + s, st.text("ab", max_size=3), st.sampled_from(["\x00", "\x01", "\x1b", "\x7f"])),
)


@HYPO
@given(name=hostile_names)
def test_hostile_coco_file_names_are_refused(name: str, box: Sandbox, pristine: dict[str, Path]) -> None:
    assert relative_name_problem(name) is not None
    if not box.data.exists():
        _copy(pristine["coco"], box)
    shutil.copy(pristine["coco"] / "annotations" / "instances_train2017.json",
                box.data / "annotations" / "instances_train2017.json")
    path = _coco_edit(box.data, _coco_image(25, "file_name", name))
    expect_error(box, build_args(box, "coco-boxes", box.data), path, "file_name")


non_finite = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "+Infinity", "1e999", "-1e400", "infinity"]),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: v != v or v in (float("inf"), float("-inf")))
    .map(repr),
)


@HYPO
@given(value=non_finite, tag=st.sampled_from(["xmin", "ymin", "xmax", "ymax"]))
def test_non_finite_voc_numbers_are_refused(value: str, tag: str, box: Sandbox, pristine: dict[str, Path]) -> None:
    if not box.data.exists():
        _copy(pristine["voc"], box)
    xml = _voc_dir(box.data) / "Annotations" / f"{BOX_ID}.xml"
    shutil.copy(_voc_dir(pristine["voc"]) / "Annotations" / f"{BOX_ID}.xml", xml)
    text = xml.read_text()
    start = text.index(f"<{tag}>") + len(tag) + 2
    xml.write_text(text[:start] + value + text[text.index(f"</{tag}>"):])
    line = expect_error(box, build_args(box, "voc-boxes", box.data / "VOCdevkit"), xml, "not a finite number")
    assert f"<{tag}>" in line


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under NumPy 2
@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_rle_strings_are_decoded_as_pycocotools_does(h: int, w: int, data: st.DataObject) -> None:
    """Strings pycocotools writes decode here to its runs; any string accepted here (and
    covering the image) decodes in pycocotools to a mask of exactly those runs."""
    bits = data.draw(st.lists(st.integers(0, 1), min_size=h * w, max_size=h * w))
    m = np.asfortranarray(np.array(bits, np.uint8).reshape(h, w, order="F"))
    rle = mask_utils.encode(m)
    runs = rle_string_counts(rle["counts"].decode())
    assert not isinstance(runs, str) and sum(runs) == h * w
    assert np.array_equal(np.repeat(np.arange(len(runs)) % 2, runs).reshape(h, w, order="F"), m)
    s = data.draw(st.text(alphabet=[chr(c) for c in range(40, 120)], max_size=12))
    got = rle_string_counts(s)
    if not isinstance(got, str) and sum(got) == h * w:
        dec = mask_utils.decode({"size": [h, w], "counts": s.encode()})
        assert np.array_equal(dec, np.repeat(np.arange(len(got)) % 2, got).reshape(h, w, order="F").astype(np.uint8))


coordinate = st.one_of(st.floats(-200, 200), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-10 ** 20, 10 ** 20), st.sampled_from([True, "1", None, [1.0]]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under NumPy 2
@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.lists(coordinate, min_size=6, max_size=12).filter(lambda p: len(p) % 2 == 0),
                min_size=1, max_size=3))
def test_only_sane_polygons_reach_pycocotools(seg: list[list[Any]]) -> None:
    h, w = 32, 48
    parts, problem = _usable_segmentation(seg, h, w)
    if problem is None and parts:
        a = np.asarray([v for p in parts for v in p], dtype=np.float64)
        assert np.isfinite(a).all() and a.min() >= -w and a.max() <= 2 * w
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
        assert mask_utils.decode(rle).shape == (h, w)
