"""MS COCO instances: object boxes, and object masks decoded from polygons and RLE.

Layout read (as the official zips unpack)::

    <root>/
      annotations/instances_train2017.json    images, annotations, categories
      annotations/instances_val2017.json
      train2017/<file_name>                   the images named by the JSON
      val2017/<file_name>

Splits are ``train`` and ``val``, whichever annotation files are present; when several
years are (2014 and 2017), the newest is read. Classes are the categories sorted by id
(COCO's ids have gaps: 80 classes, ids 1-90); class index i is the i-th category.

Every annotation counts, crowd regions (``iscrowd: 1``) included: a crowd of people is
object, not background. A ``bbox`` ``[x, y, w, h]`` in continuous pixel coordinates becomes
``x1 = x, y1 = y, x2 = x + w, y2 = y + h``; a box that overshoots the image by less than
a pixel is clipped to it, a box further outside is a bad sample, and a box with no area
(train2017 has some, e.g. annotation 918, cocodataset/cocoapi#355) is left out of the box
map but still labels its image.

``coco-masks`` decodes every annotation's ``segmentation`` with pycocotools (the
reference decoder: polygons, uncompressed RLE as used for crowds, and compressed RLE
strings) exactly as ``pycocotools.coco.COCO.annToMask`` does, and stores their union.
Polygon parts with fewer than 3 points have no area and are left out (as detectron2
does); a polygon with an odd number of coordinates is a bad sample.

Images that have no annotation at all are left out (they are not errors: COCO has about
1% of them); how many, per split, is in ``source.notes[split]``, with the number of boxes
and segmentations without area.

Labels are multi-hot over the categories present (``--label multi``) or the category of
the largest object by its annotated ``area`` (``--label largest``; ties go to the first
annotation), the same for both sources so boxes and masks stores hold identical labels.

Hostile input. pycocotools' C code trusts its input, so everything is checked before it
gets there: a ``file_name`` must be a plain relative path (no absolute path, '..', NUL,
backslash) and its file a regular file inside ``--root``; an image may declare at most
PIL's MAX_IMAGE_PIXELS; ``bbox`` and ``area`` must be finite numbers (JSON's NaN and
Infinity are refused, naming the annotation); polygon coordinates must be finite and lie
within one image size of the image, and an annotation's polygons at most
``MAX_POLYGON_LENGTH`` pixels long (pycocotools allocates in proportion); a compressed
RLE string is decoded here first and must be well formed and cover exactly the image (a
crafted one would make pycocotools write past its buffer). An annotation file that is not
UTF-8 JSON, is nested too deeply or is larger than ``MAX_JSON_BYTES`` is an error naming it.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from satdata.errors import SatkitError, SourceError
from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    image_hw,
    is_finite_number,
    pixels_problem,
    read_bytes,
    read_image,
    register_source,
    relative_name_problem,
    require_dir,
    short,
)
from satdata.sources._classes import (
    AUTO,
    ClassList,
    auto_classes,
    check_classes_option,
    missing_split_file,
    read_class_file,
    refuse_names,
)

LABEL_MODES = ("multi", "largest")
SPLIT_ORDER = ("train", "val")  # of the COCO tree
CUSTOM_SPLITS = ("train", "val", "test")  # what --annotations/--images may name
_ANN_FILE = re.compile(r"instances_(train|val)(\d{4})\.json")
# A box may overshoot the image by rounding in the annotation tool; further out is an error.
BOX_TOLERANCE_PX = 1.0
_NUMBER = (int, float)  # JSON numbers; checked with type() in the hot loop (bool is not one)
MAX_JSON_BYTES = 4 * 1024 ** 3  # instances_train2017.json is 448 MB
# pycocotools rasterises a polygon along its edges at 5x: memory grows with their length
# (the larger of |dx|, |dy| per edge, in pixels, summed over an annotation's parts).
MAX_POLYGON_LENGTH = 2_000_000
MAX_RLE_DIGITS = 6  # characters per number of a compressed RLE string (30 bits)


def load_json(path: Path, root: str | Path | None = None) -> Any:
    """Parse a JSON file, or raise SourceError naming it (with line and column).

    The file must be a regular file (inside ``root`` when given) of at most MAX_JSON_BYTES;
    nesting deeper than Python's recursion limit, and integers longer than Python converts
    (4300 digits), are errors naming the file.
    """
    raw = read_bytes(path, "annotation file", root, missing="missing annotation file", max_bytes=MAX_JSON_BYTES)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise SourceError(path, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise SourceError(path, "not JSON text (not UTF-8)") from None
    except RecursionError:
        raise SourceError(path, "JSON nested too deeply to read (arrays or objects inside each other "
                                "beyond Python's recursion limit)") from None
    except MemoryError:
        raise SourceError(path, "JSON too large to read (out of memory)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise SourceError(path, f"unreadable JSON ({short(str(e), 120)})") from None


@dataclass
class CocoIndex:
    """One instances_*.json, checked and indexed by image (annotations walked once)."""

    path: Path
    categories: list[tuple[int, str]]  # (id, name), sorted by id
    images: list[dict[str, Any]]  # in the file's order
    by_image: dict[Any, list[dict[str, Any]]]  # image id -> its annotations
    unusable: set[Any] = field(default_factory=set)  # images with a bad annotation (--skip-bad)


def _is_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def index_coco(path: Path, bad: BadSamples, root: str | Path | None = None) -> CocoIndex:
    """Load and index one COCO instances file.

    Structural problems (not a COCO file, an image entry without id/file_name/size,
    duplicate ids) make the file unusable: SourceError. An annotation naming an unknown
    image or category is a bad sample: ``bad`` raises unless --skip-bad, in which case the
    annotation is dropped and, for an unknown category, its image too.
    """
    data = load_json(path, root)
    if not isinstance(data, dict):
        raise SourceError(path, "not a COCO instances file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise SourceError(path, f"not a COCO instances file (no {key!r} list)")

    cats: dict[Any, str] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_id(c.get("id")) or not isinstance(c.get("name"), str):
            raise SourceError(path, f"categories[{i}] lacks an 'id' or 'name'")
        if not c["name"].strip() or len(c["name"]) > 256:
            raise SourceError(path, f"category {short(c['id'])} has name {short(c['name'])}: expected 1 to 256 "
                                    "characters, not only spaces")
        if c["id"] in cats:
            raise SourceError(path, f"category id {short(c['id'])} appears twice")
        cats[c["id"]] = c["name"]
    if not cats:
        raise SourceError(path, "has no categories")
    try:
        categories = sorted(cats.items())
    except TypeError:
        raise SourceError(path, "category ids mix numbers and strings") from None
    names = [n for _, n in categories]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SourceError(path, f"category name {short(dup)} is used by more than one id")

    images: list[dict[str, Any]] = data["images"]
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not _is_id(im.get("id")):
            raise SourceError(path, f"images[{i}] lacks an 'id'")
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise SourceError(path, f"image {short(im['id'])} lacks a 'file_name'")
        if not (_positive_int(im.get("width")) and _positive_int(im.get("height"))):
            raise SourceError(path, f"image {short(im['id'])} lacks a positive integer 'width' and 'height'")
        if im["id"] in by_image:
            raise SourceError(path, f"image id {short(im['id'])} appears twice")
        by_image[im["id"]] = []

    unusable: set[Any] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_id(ann.get("id")):
            raise SourceError(path, f"annotations[{i}] lacks an 'id'")
        iid = ann.get("image_id")
        anns = by_image.get(iid) if _is_id(iid) else None
        if anns is None:
            bad(path, f"annotation {short(ann['id'])}: unknown image id {short(iid)}")
            continue
        cid = ann.get("category_id")
        if not _is_id(cid) or cid not in cats:
            bad(path, f"annotation {short(ann['id'])}: unknown category id {short(cid)}")
            unusable.add(iid)
            continue
        anns.append(ann)
    return CocoIndex(path, categories, images, by_image, unusable)


def _polygons_problem(seg: list[list[Any]], h: int, w: int) -> str | None:
    """Why an annotation's polygons must not reach pycocotools, or None.

    Each coordinate must be a finite number within one image size of the image (x in
    [-w, 2w], y in [-h, 2h]), and the polygons' edges at most MAX_POLYGON_LENGTH pixels
    long in all: pycocotools casts to int without checking and allocates per pixel of edge.
    """
    longest = 0.0
    n_points = 0
    for poly in seg:
        xs, ys = poly[0::2], poly[1::2]
        try:
            total = math.fsum(poly)
            x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
        except (TypeError, ValueError, OverflowError):
            bad = next((v for v in poly if not is_finite_number(v) and not isinstance(v, bool)), None)
            return f"a polygon has coordinate {short(bad)}, not a finite number"
        if not math.isfinite(total):
            bad = next((v for v in poly if not is_finite_number(v)), total)
            return f"a polygon has coordinate {short(bad)}, not a finite number"
        if x_lo < -w or x_hi > 2 * w or y_lo < -h or y_hi > 2 * h:
            return (f"a polygon spans x {x_lo:g}..{x_hi:g}, y {y_lo:g}..{y_hi:g}: too far outside the "
                    f"{w}x{h} image")
        n_points += len(xs)
        longest = max(longest, x_hi - x_lo, y_hi - y_lo)
    if n_points * longest <= MAX_POLYGON_LENGTH:
        return None
    length = 0.0
    for poly in seg:
        if len(poly) >= 6:
            a = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            length += float(np.abs(np.diff(np.vstack([a, a[:1]]), axis=0)).max(axis=1).sum())
    if length > MAX_POLYGON_LENGTH:
        return f"polygons are {length:,.0f} pixels long, more than the limit of {MAX_POLYGON_LENGTH:,}"
    return None


def rle_string_counts(s: str) -> list[int] | str:
    """The run lengths of a compressed RLE string (pycocotools' rleFrString), or the problem.

    Decoded here, as the C code does, so that a crafted string (characters outside the
    alphabet, a number cut off at the end, runs that do not add up) never reaches it.
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                return "compressed RLE ends in the middle of a number"
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return f"compressed RLE has character {short(s[p])} at position {p}, outside its alphabet ('0'..'o')"
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if k > MAX_RLE_DIGITS and more:
                return f"compressed RLE has a number longer than {MAX_RLE_DIGITS} characters at position {p}"
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if not 0 <= x < 2 ** 32:
            return f"compressed RLE has run length {x} (run {len(counts) + 1})"
        counts.append(x)
    return counts


def _usable_segmentation(seg: Any, h: int, w: int) -> tuple[Any, str | None]:
    """(what to decode, problem) for one annotation's segmentation on an h x w image.

    Polygon parts with fewer than 3 points have no area and are left out, as detectron2
    does (pycocotools would read a lone 4-number part as a box); when no part is left, the
    segmentation is None: the object adds nothing to the mask. A polygon with an odd
    number of coordinates, a coordinate that is not a finite number or lies far outside
    the image, or RLE that does not fit the image, is a problem.
    """
    if type(seg) is list:
        for poly in seg:
            if type(poly) is not list or len(poly) % 2:
                n = len(poly) if isinstance(poly, list) else type(poly).__name__
                return None, f"a polygon has {n} coordinates (needs x, y pairs)"
        problem = _polygons_problem(seg, h, w)
        if problem:
            return None, problem
        parts = [poly for poly in seg if len(poly) >= 6]
        return (parts or None), None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and list(size) == [h, w]):
            return None, f"RLE size {short(size)} is not the image's [height, width] [{h}, {w}]"
        if isinstance(counts, list):
            if not all(type(c) is int and c >= 0 for c in counts) or sum(counts) != h * w:
                return None, f"uncompressed RLE counts do not cover the {w}x{h} image"
            return seg, None
        if isinstance(counts, str) and counts:
            runs = rle_string_counts(counts)
            if isinstance(runs, str):
                return None, f"cannot decode its segmentation: {runs}"
            if sum(runs) != h * w:
                return None, (f"cannot decode its segmentation: compressed RLE runs add up to {sum(runs):,} "
                              f"pixels, not the {w}x{h} image's {h * w:,}")
            return seg, None
        return None, "RLE has no 'counts'"
    return None, f"segmentation is a {type(seg).__name__}, not polygons or RLE"


def annotation_rle(seg: Any, h: int, w: int) -> dict[str, Any]:
    """One annotation's segmentation as one RLE (as pycocotools' COCO.annToRLE does)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons: one RLE per part, merged
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):  # uncompressed RLE (crowds)
        return mask_utils.frPyObjects(seg, h, w)
    return seg  # compressed RLE


def _split_paths(values: Sequence[str], flag: str) -> dict[str, str]:
    """{split: path} of repeated ``SPLIT=PATH`` values; a malformed or repeated one is an error."""
    out: dict[str, str] = {}
    for v in values:
        split, sep, path = str(v).partition("=")
        split = split.strip()
        if not sep or not split or not path.strip():
            raise SatkitError(f"{flag} {v}: expected SPLIT=PATH, e.g. {flag} train=...")
        if split not in CUSTOM_SPLITS:
            raise SatkitError(f"{flag} {v}: unknown split {split!r} (one of {', '.join(CUSTOM_SPLITS)})")
        if split in out:
            raise SatkitError(f"{flag}: split {split!r} given twice ({out[split]}, {path})")
        out[split] = path.strip()
    return out


def _check_label_mode(opts: SourceOptions) -> str:
    if opts.label not in LABEL_MODES:
        raise SatkitError(f"--label: unknown mode {opts.label!r} (one of {', '.join(LABEL_MODES)})")
    return opts.label


class _CocoBase(Source):
    """What coco-boxes and coco-masks share: files, index, classes, records."""

    options = ("label", "classes", "skip_unknown_classes", "annotations", "images")
    with_masks = False

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        self.label_mode = _check_label_mode(opts)
        self.label_kind = "single" if self.label_mode == "largest" else "multi"
        self.year: str | None = None
        # split -> its annotation file, its image folder, and that folder relative to the root
        # (the prefix of the store's ids): every split declared, present or not.
        self.files: dict[str, Path] = {}
        self.img_dirs: dict[str, Path] = {}
        self.id_prefix: dict[str, str] = {}
        if opts.annotations or opts.images:
            self._given_files(opts)
        else:
            self._tree_files()
        # Indexed files not yet turned into records (classes may need one before records()).
        self._pending: dict[str, CocoIndex] = {}
        self._classes: list[str] | None = None
        self._categories_from: Path | None = None
        self._choice = check_classes_option(opts.classes)
        self.class_list: ClassList | None = None  # a --classes list, once settled
        self._kept: set[str] | None = None  # the splits to build (prepare): other indices are let go
        # Per split: images listed, left out for having no annotation, boxes (and, for masks,
        # segmentations) without area.
        self.notes: dict[str, dict[str, Any]] = {}

    def _tree_files(self) -> None:
        """The COCO tree: annotations/instances_{train,val}<year>.json of the newest year, and
        <split><year>/; both splits are declared as soon as either file of that year is there."""
        ann_dir = require_dir(self.root / "annotations", "annotations folder")
        found: dict[str, dict[str, Path]] = {}
        for p in sorted(ann_dir.iterdir()):
            m = _ANN_FILE.fullmatch(p.name)
            # Any entry of that name counts: one that is not a regular file (a FIFO, a
            # directory, a broken link) is an error when read, never silently left out.
            if m:
                found.setdefault(m.group(2), {})[m.group(1)] = p
        if not found:
            raise SourceError(ann_dir, "has no instances_train20xx.json or instances_val20xx.json")
        self.year = max(found)
        for s in SPLIT_ORDER:
            self.files[s] = ann_dir / f"instances_{s}{self.year}.json"
            self.img_dirs[s] = self.root / f"{s}{self.year}"
            self.id_prefix[s] = f"{s}{self.year}"

    def _given_files(self, opts: SourceOptions) -> None:
        """--annotations SPLIT=FILE and --images SPLIT=DIR, paths relative to --root (or absolute inside it)."""
        files = _split_paths(opts.annotations, "--annotations")
        dirs = _split_paths(opts.images, "--images")
        for split in files.keys() - dirs.keys():
            raise SatkitError(f"--annotations {split}=...: no --images {split}=DIR for split {split!r} "
                              "(give both per split)")
        for split in dirs.keys() - files.keys():
            raise SatkitError(f"--images {split}=...: no --annotations {split}=FILE for split {split!r} "
                              "(give both per split)")
        for split in CUSTOM_SPLITS:
            if split in files:
                self.files[split] = self._inside_root(files[split], "--annotations", split)
                self.img_dirs[split] = d = self._inside_root(dirs[split], "--images", split)
                self.id_prefix[split] = "" if d == self.root else d.relative_to(self.root).as_posix()

    def _inside_root(self, value: str, flag: str, split: str) -> Path:
        shown = f"{flag} {split}={value}"
        if "\x00" in value:
            raise SatkitError(f"{shown}: the path holds a NUL character")
        if os.path.isabs(value):
            real, base = os.path.realpath(value), os.path.realpath(self.root)
            if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
                raise SatkitError(f"{shown}: not inside --root {self.root} (give a path relative to --root, "
                                  "or an absolute one inside it)")
            return self.root / os.path.relpath(real, base) if real != base else self.root
        rel = posixpath.normpath(value)
        if rel == ".":
            return self.root
        if rel == ".." or rel.startswith("../"):
            raise SatkitError(f"{shown}: leads outside --root {self.root} (paths are relative to --root)")
        problem = relative_name_problem(rel)
        if problem:
            raise SatkitError(f"{shown}: the path {problem}")
        return self.root / rel

    # The class list comes from the annotation files; read lazily so that a build parses
    # each (possibly 450 MB) file once.
    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        if self._choice is not None:
            return list(self._custom_classes().names)
        if self._classes is None:
            present = [s for s in self.files if os.path.lexists(self.files[s])]
            split = present[0] if present else next(iter(self.files))
            self._pending[split] = self._index(split)
        return list(self._classes or [])

    @classes.setter
    def classes(self, value: list[str]) -> None:
        self._classes = list(value) if value else None

    def __getstate__(self) -> dict[str, Any]:
        # Workers receive the source: never ship a parsed annotation file with it.
        state = self.__dict__.copy()
        state["_pending"] = {}
        return state

    @property
    def dataset(self) -> str:
        return f"coco{self.year}" if self.year else "coco"

    def available_splits(self) -> list[str]:
        """The declared splits: train and val of the tree (whether or not their files are
        there: a missing one is an error when built), or those --annotations names."""
        return list(self.files)

    def prepare(self, splits: Sequence[str]) -> None:
        self._kept = set(splits)
        for split in splits:
            self._require_files(split)
        if self._choice is not None:
            self._custom_classes()

    def _require_files(self, split: str) -> None:
        """A missing annotation file or image folder of a split: an error naming it and what looks like it."""
        present = [s for s in self.files if os.path.lexists(self.files[s]) and os.path.lexists(self.img_dirs[s])]
        if not os.path.lexists(self.files[split]):
            others = {p.name for s, p in self.files.items() if s != split}
            raise missing_split_file(self.files[split], "annotation file", split, present, lambda n: n in others)
        img_dir = self.img_dirs[split]
        if not img_dir.is_dir():
            if img_dir.exists():
                raise SourceError(img_dir, f"{self._img_what(split)} is not a directory")
            others = {p.name for s, p in self.img_dirs.items() if s != split}
            raise missing_split_file(img_dir, self._img_what(split), split, present, lambda n: n in others)

    def _img_what(self, split: str) -> str:
        return f"{split}{self.year} image folder" if self.year else "image folder"

    def _custom_classes(self) -> ClassList:
        """The --classes list: every present split's file is indexed (once: the indices wait in
        _pending for records), so that the list never depends on --splits."""
        if self.class_list is not None:
            return self.class_list
        assert self._choice is not None
        wanted = read_class_file(self._choice) if self._choice != AUTO else None
        declared: dict[str, set[str]] = {}  # category name -> the files declaring it
        used: set[str] = set()
        scanned: list[str] = []
        for split, path in self.files.items():
            if not os.path.lexists(path):
                continue  # an error when that split is built
            idx = self._pending.get(split) or self._index(split)
            if self._kept is None or split in self._kept:
                self._pending[split] = idx
            names = dict(idx.categories)
            for _, name in idx.categories:
                declared.setdefault(name, set()).add(path.name)
            used.update(names[a["category_id"]] for anns in idx.by_image.values() for a in anns)
            scanned.append(self._rel(path))
        if not scanned:
            raise SourceError(next(iter(self.files.values())), "missing annotation file (no split has one)")
        if wanted is None:
            self.class_list = auto_classes(used, scanned, self.files[next(iter(self.files))])
        else:
            shown = ", ".join(scanned)
            refuse_names(wanted, lambda n: None if n in declared else (
                f"not a category of {shown} (they have: "
                + ", ".join(repr(c) for c in sorted(declared)[:12]) + (", ..." if len(declared) > 12 else "") + ")"))
            self.class_list = wanted
        self.class_provenance = self.class_list.provenance()
        return self.class_list

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def _index(self, split: str) -> CocoIndex:
        idx = index_coco(self.files[split], self.bad, self.root)
        if self._choice is not None:  # categories are matched to the list by name, per file
            return idx
        names = [n for _, n in idx.categories]
        if self._classes is None:
            self._classes, self._categories_from = names, idx.path
        elif names != self._classes:
            raise SourceError(idx.path, f"categories differ from those of {self._categories_from} "
                                        "(a store has one class list; --classes FILE matches categories by name)")
        return idx

    def _cat_index(self, idx: CocoIndex) -> dict[Any, int]:
        """Category id -> class index (a custom list: only the categories it names)."""
        if self._choice is None:
            return {cid: i for i, (cid, _) in enumerate(idx.categories)}
        index = self._custom_classes().index()
        return {cid: index[name] for cid, name in idx.categories if name in index}

    def records(self, split: str) -> list[Record]:
        """One record per image with at least one annotation, in the file's order."""
        self._require_files(split)
        if self._choice is not None:
            self._custom_classes()
        idx = self._pending.pop(split, None) or self._index(split)
        img_dir = require_dir(self.img_dirs[split], self._img_what(split))
        listing = set(os.listdir(img_dir))  # one listing, not a stat per image
        cat_index = self._cat_index(idx)
        custom, skip_unlisted = self._choice is not None, self.opts.skip_unknown_classes
        cat_names = dict(idx.categories)
        out: list[Record] = []
        empty = no_area = no_mask = unlisted = only_unlisted = 0
        json_name, json_path, dir_prefix = idx.path.name, str(idx.path), str(img_dir) + os.sep
        id_prefix = self.id_prefix[split] + "/" if self.id_prefix[split] else ""
        for im in idx.images:
            iid = im["id"]
            if iid in idx.unusable:  # already reported as bad (--skip-bad)
                continue
            anns = idx.by_image[iid]
            if not anns:
                empty += 1
                continue
            if custom:
                kept = [a for a in anns if a["category_id"] in cat_index]
                if len(kept) < len(anns):
                    if not skip_unlisted:
                        a = next(a for a in anns if a["category_id"] not in cat_index)
                        name = cat_names[a["category_id"]]
                        self.bad(idx.path, f"annotation {short(a['id'])}: category id {short(a['category_id'])}: "
                                           + self._custom_classes().unknown(name, "the categories"))
                        continue
                    unlisted += len(anns) - len(kept)
                    if not kept:
                        only_unlisted += 1
                        continue
                    anns = kept
            fname = im["file_name"]
            problem = relative_name_problem(fname)
            if problem:
                self.bad(idx.path, f"image {short(iid)}: file_name {short(fname)} {problem}")
                continue
            too_big = pixels_problem(im["width"], im["height"])
            if too_big:
                self.bad(idx.path, f"image {short(iid)} {too_big}")
                continue
            img_path = dir_prefix + fname
            # A name with folders is looked up on disk; any entry there counts as present
            # (decode names a FIFO, a directory or a link loop for what it is).
            present = fname in listing if "/" not in fname else os.path.lexists(img_path)
            if not present:
                self.bad(img_path, f"image file is missing (image {short(iid)} of {json_name})")
                continue
            got = self._image_objects(idx.path, iid, anns, cat_index, im["height"], im["width"])
            if got is None:
                continue
            boxes, segs, label, n_no_area, n_no_mask = got
            no_area += n_no_area
            no_mask += n_no_mask
            out.append(Record(id=id_prefix + fname, label=label,
                              data=(img_path, json_path, im["height"], im["width"], boxes, segs)))
        self.notes[split] = {"images": len(idx.images), "images_without_annotations": empty,
                             "boxes_without_area": no_area}
        if self.with_masks:
            self.notes[split]["segmentations_without_area"] = no_mask
        if skip_unlisted:
            self.notes[split].update(objects_of_unlisted_classes=unlisted, images_only_unlisted_classes=only_unlisted)
        return out

    def _image_objects(self, path: Path, iid: Any, anns: list[dict[str, Any]], cat_index: dict[Any, int],
                       h: int, w: int
                       ) -> tuple[list[list[float]], tuple[tuple[Any, Any], ...], Any, int, int] | None:
        """(box rows [cls, x1, y1, x2, y2], (annotation id, segmentation)s, label, boxes without
        area, segmentations without area) of one image, or None when an annotation is bad
        (reported through self.bad)."""
        rows: list[list[float]] = []
        segs: list[tuple[Any, Any]] = []
        best_area: float = -1.0
        best_cls = 0
        no_area = no_mask = 0
        t = BOX_TOLERANCE_PX
        for ann in anns:  # the hot loop of a COCO build's listing: ~860k annotations
            aid, cls = ann["id"], cat_index[ann["category_id"]]
            bbox = ann.get("bbox")
            if not (type(bbox) is list and len(bbox) == 4 and type(bbox[0]) in _NUMBER and type(bbox[1]) in _NUMBER
                    and type(bbox[2]) in _NUMBER and type(bbox[3]) in _NUMBER):
                self.bad(path, f"annotation {short(aid)}: bbox {short(bbox)} is not [x, y, width, height]")
                return None
            x1, y1, bw, bh = bbox
            if not (is_finite_number(x1) and is_finite_number(y1) and is_finite_number(bw)
                    and is_finite_number(bh)):
                self.bad(path, f"annotation {short(aid)}: bbox {short(bbox)} has a value that is not a finite number")
                return None
            x2, y2 = x1 + bw, y1 + bh
            if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
                    self.bad(path, f"annotation {short(aid)}: bbox {short(bbox)} lies outside the {w}x{h} "
                                   f"image {short(iid)}")
                    return None
                x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
                y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
            if x2 > x1 and y2 > y1:
                rows.append([cls, x1, y1, x2, y2])
            else:
                no_area += 1
            if self.with_masks:
                seg, problem = _usable_segmentation(ann.get("segmentation"), h, w)
                if problem:
                    self.bad(path, f"annotation {short(aid)}: {problem}")
                    return None
                if seg is None:
                    no_mask += 1
                else:
                    segs.append((aid, seg))
            area = ann.get("area")
            if type(area) not in _NUMBER:
                area = max(bw, 0) * max(bh, 0)
            elif not is_finite_number(area):
                self.bad(path, f"annotation {short(aid)}: area {short(area)} is not a finite number")
                return None
            if area > best_area:
                best_area, best_cls = area, cls
        if self.label_mode == "largest":
            label: Any = best_cls
        else:
            label = tuple(sorted({cat_index[a["category_id"]] for a in anns}))
        # Kept as plain rows until decode: 117k small arrays cost more to build and pickle.
        return rows, tuple(segs), label, no_area, no_mask

    def _read(self, record: Record) -> tuple[np.ndarray, np.ndarray]:
        """The image (checked against the JSON's size) and the boxes as a (k, 5) array."""
        img_path, json_path, h, w, rows, _ = record.data
        image = read_image(Path(img_path), self.root)
        ih, iw = image_hw(image)
        if (ih, iw) != (h, w):
            raise SourceError(img_path, f"image is {iw}x{ih} but "
                                        f"{Path(json_path).name} gives {w}x{h}")
        return image, np.asarray(rows, dtype=np.float64).reshape(-1, 5)


@register_source
class CocoBoxes(_CocoBase):
    """COCO instances: one sample per annotated image, map = union of its boxes."""

    name = "coco-boxes"
    summary = "MS COCO instances (annotations/instances_*.json + images); map: object boxes"
    label_kind = "multi"
    maps = {"boxes": MapSpec(kind="boxes", encoding="binary", from_boxes=True)}
    with_masks = False

    def decode(self, record: Record) -> Decoded:
        image, boxes = self._read(record)
        return Decoded(image=image, masks={}, boxes=boxes)


@register_source
class CocoMasks(_CocoBase):
    """COCO instances: union of the instance masks (polygons and RLE), plus the boxes."""

    name = "coco-masks"
    summary = ("MS COCO instances (annotations/instances_*.json + images); "
               "maps: object mask (polygons and RLE), object boxes")
    label_kind = "multi"
    maps = {
        "mask": MapSpec(kind="mask", encoding="binary"),
        "boxes": MapSpec(kind="boxes", encoding="binary", from_boxes=True),
    }
    with_masks = True

    def decode(self, record: Record) -> Decoded:
        from pycocotools import mask as mask_utils

        image, boxes = self._read(record)
        _, json_path, h, w, _, segs = record.data
        union = np.zeros((h, w), dtype=np.uint8)
        with warnings.catch_warnings():
            # pycocotools' Cython decode trips NumPy 2's __array__(copy=...) deprecation on
            # every call; the result is correct, the warning is noise to a user.
            warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
            for aid, seg in segs:
                try:
                    m = mask_utils.decode(annotation_rle(seg, h, w))
                except Exception as e:  # pycocotools raises bare Exception/ValueError/TypeError
                    raise SourceError(json_path, f"annotation {short(aid)}: cannot decode its segmentation "
                                                 f"({short(str(e), 120)})") from None
                np.bitwise_or(union, m, out=union)
        return Decoded(image=image, masks={"mask": union}, boxes=boxes)
