"""PASCAL VOC (2007-2012): object boxes from the XML annotations, masks from SegmentationClass.

Layout read (the official tars unpack to ``VOCdevkit/VOC20xx/``)::

    VOCdevkit/VOC2012/
      Annotations/<id>.xml                   one XML per image: <size>, <object>s
      JPEGImages/<id>.jpg
      ImageSets/Main/{train,val,test}.txt     one image id per line    (voc-boxes)
      ImageSets/Segmentation/{train,val}.txt  one image id per line    (voc-masks)
      SegmentationClass/<id>.png              palette PNG: 0 background, 1..20 the classes,
                                              255 the "void" band around each object

``--root`` may be the ``VOCdevkit`` folder (``--year`` picks a ``VOC20xx`` in it; by
default the only one, or the newest), a ``VOC20xx`` folder itself, or the folder the tar
was unpacked in (holding ``VOCdevkit``).

Box coordinates. VOC gives ``xmin ymin xmax ymax`` as 1-based pixel indices, inclusive
at both ends: a box over the whole image is ``(1, 1, W, H)``. satkit boxes are continuous
coordinates with the image spanning ``[0, W) x [0, H)``, so pixel column ``i`` (1-based)
covers ``[i - 1, i)`` and the box becomes ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax,
y2 = ymax`` (the convention detectron2's VOC loader also uses). A box must have area and
lie inside the image's ``<size>``; anything else is a bad sample.

Labels are multi-hot over the classes (``--label multi``, the default) or the class
of the largest object (``--label largest``: the largest box for voc-boxes, the class with
the most pixels for voc-masks; ties go to the first).

voc-masks also draws a ``boxes`` map from the same images' XML annotations, so a model
trained on masks and one trained on boxes see identical images and labels.

With ``--drop-difficult`` (voc-boxes), how many objects were dropped per split is in
``source.notes[split]``.

Classes. By default the 20 PASCAL classes in the devkit's order; an object of any other
class is a bad sample. ``--classes auto`` takes the class names of every XML in
``Annotations/`` (sorted by Unicode code point; all of them, so the list does not depend on
``--splits`` or on voc-boxes vs voc-masks), ``--classes FILE`` a list of names, one per
line, in index order (satdata.sources._classes): for exports of other tools (CVAT, Label
Studio, ...) in VOC's layout. ``background`` is never a class (it is mask index 0). With
``--skip-unknown-classes`` an object whose class the list lacks is left out (counted per
split in ``source.notes``; an image with no other object is left out too) instead of
being an error. For voc-masks, mask index i + 1 is class i of the list (so a list has at
most 254 classes) and, with a list of one's own, every class a mask holds must be the
class of one of its XML's objects: a list in another order than the masks' palette is
refused, not silently mislabelled.

Splits. train and val are expected (test too when its list exists): a missing list is an
error naming it and what looks like it nearby (``--splits`` builds fewer on purpose).

Hostile input. Image ids come from the ImageSets lists and must be plain names (letters,
digits, ``_.-``; never a path); every file is opened only if it is a regular file inside
``--root`` (satdata.sources._base.open_file: no FIFO, device, directory, link loop or
link out of the root). An XML number must be finite (``nan``, ``inf``, ``1e999`` are
errors naming the object), ``<size>`` may declare at most PIL's MAX_IMAGE_PIXELS, and an
XML that is truncated, not UTF-8 (or its declared encoding), or larger than 16 MiB is an
error naming it. ``<filename>`` is read but never used to find the image (the id is).
A SegmentationClass PNG with values outside 0..255 (a 16- or 32-bit PNG) is refused
before its values are counted.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from satdata.errors import SatkitError, SourceError
from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    check_mask_size,
    image_hw,
    open_file,
    pixels_problem,
    read_image,
    read_png_indices,
    read_text,
    register_source,
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

# The 20 VOC classes in the devkit's order (VOCinit.m); class index i is mask index i + 1.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}
BACKGROUND_INDEX = 0
VOID_INDEX = 255  # the unlabelled band around objects in SegmentationClass PNGs

SPLIT_ORDER = ("train", "val", "test")
LABEL_MODES = ("multi", "largest")
_YEAR_DIR = re.compile(r"VOC(\d{4})")
_IMAGE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,255}")
MAX_XML_BYTES = 16 * 1024 * 1024  # a real VOC annotation is about 1 KB
DEFAULT_LIST = "the 20 VOC classes"
MAX_MASK_CLASSES = VOID_INDEX - 1  # palette masks: 1..254 classes, 255 void
# ImageSets/Main also holds per-class lists (<class>_train.txt): never a split list
_CLASS_LIST_FILE = re.compile(r".+_(?:train|val|trainval|test)\.txt")


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class VocObject:
    """One <object> of an annotation, its box already in continuous pixel coordinates."""

    name: str
    class_index: int  # -1: a class the list lacks (kept only to be counted, or while scanning)
    difficult: bool
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 with the image spanning [0, W) x [0, H)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return (x2 - x1) * (y2 - y1)


@dataclass(frozen=True)
class VocAnnotation:
    """What satkit reads from one VOC XML file."""

    filename: str | None
    width: int
    height: int
    objects: tuple[VocObject, ...]


def _number(elem: ET.Element, tag: str, path: Path, where: str) -> float:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise SourceError(path, f"{where} lacks <{tag}>")
    text = child.text.strip()
    try:
        v = float(text)
    except ValueError:
        raise SourceError(path, f"{where}: <{tag}> is {short(text)}, not a number") from None
    if not math.isfinite(v):
        raise SourceError(path, f"{where}: <{tag}> is {short(text)}, not a finite number")
    return v


def parse_voc_xml(path: Path, root: str | Path | None = None,
                  class_index: Mapping[str, int] | None = _CLASS_INDEX,
                  unknown: Callable[[str], str] | None = None, keep_unknown: bool = False) -> VocAnnotation:
    """Parse one VOC annotation file, checking every object's class and box.

    Raises SourceError naming the file (and the line, for malformed XML) on the first
    problem: the whole annotation is then unusable, so the caller treats it as one bad
    sample. Only an object's own ``<bndbox>`` is read (VOC2012's person-layout ``<part>``s
    carry their own boxes, which are not objects). The file must be a regular file
    (inside ``root`` when given) of at most MAX_XML_BYTES.

    Classes: ``class_index`` maps names to indices (default: the 20 VOC classes); a name
    it lacks is an error (``unknown(name)`` says what, default "not one of the 20 VOC
    classes"), or, with ``keep_unknown``, an object of class index -1. ``class_index``
    None reads every name as it is (class index -1), for listing the classes in use.
    """
    try:
        with open_file(path, "annotation XML", root, missing="annotation XML is missing",
                       max_bytes=MAX_XML_BYTES) as f:
            tree = ET.parse(f)
    except ET.ParseError as e:
        line, col = e.position
        raise SourceError(path, f"malformed XML at line {line}, column {col + 1}: {_parse_error_text(e)}") from None
    except LookupError as e:  # <?xml encoding="..."?> that Python does not know
        raise SourceError(path, f"malformed XML: {short(str(e), 120)}") from None
    except OSError as e:
        raise SourceError(path, f"cannot read annotation XML ({e.strerror or e})") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise SourceError(path, f"unreadable XML ({type(e).__name__}: {short(str(e), 120)})") from None
    root = tree.getroot()
    if root.tag != "annotation":
        raise SourceError(path, f"root element is <{root.tag}>, not <annotation>")
    size = root.find("size")
    if size is None:
        raise SourceError(path, "lacks <size>")
    width, height = _number(size, "width", path, "<size>"), _number(size, "height", path, "<size>")
    if width < 1 or height < 1 or width != int(width) or height != int(height):
        raise SourceError(path, f"<size> {width:g}x{height:g} is not a positive whole number of pixels")
    w, h = int(width), int(height)
    too_big = pixels_problem(w, h)
    if too_big:
        raise SourceError(path, f"<size> {too_big}")
    objects = []
    for k, obj in enumerate(root.findall("object"), start=1):
        name_el = obj.find("name")
        name = (name_el.text or "").strip() if name_el is not None else ""
        where = f"object {k} ({short(name, 40)})" if name else f"object {k}"
        if not name:
            raise SourceError(path, f"{where} lacks <name>")
        cls = class_index.get(name, -1) if class_index is not None else -1
        if cls < 0 and class_index is not None and not keep_unknown:
            raise SourceError(path, f"{where}: " + (unknown(name) if unknown else
                                                    f"unknown class {short(name)} (not one of {DEFAULT_LIST}; "
                                                    "for classes of your own pass --classes auto or FILE)"))
        diff_el = obj.find("difficult")
        difficult = diff_el is not None and (diff_el.text or "0").strip() not in ("0", "")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise SourceError(path, f"{where} lacks <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bnd, t, path, f"{where} <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax"))
        shown = f"(xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g})"
        # 1-based inclusive pixel indices -> continuous coordinates (module docstring).
        x1, y1, x2, y2 = xmin - 1.0, ymin - 1.0, xmax, ymax
        if not (x2 > x1 and y2 > y1):
            raise SourceError(path, f"{where}: <bndbox> {shown} has zero or negative area")
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise SourceError(path, f"{where}: <bndbox> {shown} lies outside the {w}x{h} image of <size>")
        objects.append(VocObject(name, cls, difficult, (x1, y1, x2, y2)))
    fn = root.find("filename")
    filename = fn.text.strip() if fn is not None and fn.text else None
    return VocAnnotation(filename, w, h, tuple(objects))


def _parse_error_text(e: ET.ParseError) -> str:
    # "not well-formed (invalid token): line 3, column 4" -> "not well-formed (invalid token)"
    return re.sub(r":\s*line \d+, column \d+$", "", str(e))


def read_id_list(path: Path, root: str | Path | None = None) -> list[str]:
    """Image ids of an ImageSets list (one per line); a malformed list is a SourceError.

    An id is a plain name (letters, digits, ``_.-``, at most 255 characters, not '.' or
    '..'): it becomes ``<id>.xml``, ``<id>.jpg`` and ``<id>.png`` and can never leave their
    folders.
    """
    text = read_text(path, "split list", root, missing="missing split list")
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        if not _IMAGE_ID.fullmatch(s) or s in (".", ".."):
            raise SourceError(path, f"line {n}: expected one image id, got {short(s)}")
        if s in first_line:
            raise SourceError(path, f"line {n}: image id {s!r} is listed twice (first on line {first_line[s]})")
        first_line[s] = n
        ids.append(s)
    return ids


def find_voc_dir(root: Path, year: str | None) -> tuple[Path, str | None]:
    """The VOC20xx folder under root (VOCdevkit, a VOC20xx folder, or the unpack folder).

    Returns (folder, year or None when the folder is not named VOC20xx).
    """
    want = None
    if year is not None:
        m = re.fullmatch(r"(?:VOC)?(\d{4})", str(year).strip(), flags=re.IGNORECASE)
        if not m:
            raise SatkitError(f"--year: expected a year such as 2012, got {year!r}")
        want = m.group(1)
    require_dir(root, "VOC root folder")
    if any((root / d).is_dir() for d in ("Annotations", "JPEGImages", "ImageSets")):
        m = _YEAR_DIR.fullmatch(root.name)
        have = m.group(1) if m else None
        if want is not None and have is not None and want != have:
            raise SatkitError(f"--year {want}: {root} is the VOC{have} folder")
        return root, have or want
    found: dict[str, Path] = {}
    for base in (root, root / "VOCdevkit"):
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            m = _YEAR_DIR.fullmatch(child.name)
            if m and child.is_dir():
                found.setdefault(m.group(1), child)
    if not found:
        raise SourceError(root, "no VOC20xx folder here (expected VOCdevkit/VOC2012/Annotations, ...)")
    if want is None:
        want = max(found)
    elif want not in found:
        raise SatkitError(f"--year {want}: {root} has no VOC{want} (it has: "
                          + ", ".join(f"VOC{y}" for y in sorted(found)) + ")")
    return found[want], want


def _check_label_mode(opts: SourceOptions) -> str:
    if opts.label not in LABEL_MODES:
        raise SatkitError(f"--label: unknown mode {opts.label!r} (one of {', '.join(LABEL_MODES)})")
    return opts.label


# --------------------------------------------------------------------------- sources


class _VocBase(Source):
    """What voc-boxes and voc-masks share: the folder, the year, the lists, the XML, the classes."""

    list_dir: str = ""  # ImageSets/<list_dir>

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        self.label_mode = _check_label_mode(opts)
        self.label_kind = "single" if self.label_mode == "largest" else "multi"
        self.voc_dir, self.year = find_voc_dir(self.root, opts.year)
        self.ann_dir = require_dir(self.voc_dir / "Annotations", "Annotations folder")
        self.img_dir = require_dir(self.voc_dir / "JPEGImages", "JPEGImages folder")
        self.sets_dir = require_dir(self.voc_dir / "ImageSets" / self.list_dir, f"ImageSets/{self.list_dir} folder")
        # Per split, counts worth keeping with the store (objects dropped as difficult or of
        # classes the list lacks).
        self.notes: dict[str, dict[str, Any]] = {}
        # --classes auto parses every XML once to list the classes; records() reuses those
        # parses (never shipped to a worker: see __getstate__).
        self._scanned: dict[str, VocAnnotation | SourceError] = {}
        choice = check_classes_option(opts.classes)
        if choice is None:
            self.class_list = ClassList(VOC_CLASSES, "dataset")
        elif choice == AUTO:
            self.class_list = self._scan_classes()
        else:
            self.class_list = read_class_file(choice)
        if self.class_list.custom:
            refuse_names(self.class_list, lambda n: "background is mask index 0 in VOC, not an object class: "
                                                    "leave it out of the list" if n.casefold() == "background" else None)
        self.classes = list(self.class_list.names)
        self.class_provenance = self.class_list.provenance()
        self._class_index = self.class_list.index()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scanned"] = {}
        return state

    @property
    def dataset(self) -> str:
        return f"voc{self.year}" if self.year else "voc"

    def available_splits(self) -> list[str]:
        """train and val (and test when its list exists): the splits a VOC tree declares.

        A list present in any form counts (a FIFO or a broken link is an error when read);
        a missing train or val list is an error when that split is built (``prepare``),
        never a split silently left out.
        """
        present = [s for s in SPLIT_ORDER if os.path.lexists(self.sets_dir / f"{s}.txt")]
        if not present:
            try:
                held = sorted(os.listdir(self.sets_dir))
            except OSError:
                held = []
            shown = (" (it holds " + ", ".join(repr(n) for n in held[:8]) + (", ..." if len(held) > 8 else "") + ")"
                     if held else "")
            raise SourceError(self.sets_dir, "has none of train.txt, val.txt, test.txt" + shown)
        return [s for s in SPLIT_ORDER if s in ("train", "val") or s in present]

    def prepare(self, splits: Sequence[str]) -> None:
        for split in splits:
            self._require_list(split)

    def _require_list(self, split: str) -> Path:
        path = self.sets_dir / f"{split}.txt"
        if not os.path.lexists(path):
            present = [s for s in SPLIT_ORDER if os.path.lexists(self.sets_dir / f"{s}.txt")]
            expected = {f"{s}.txt" for s in SPLIT_ORDER} | {"trainval.txt"}
            raise missing_split_file(path, "split list", split, present, lambda n: n in expected,
                                     lambda n: bool(_CLASS_LIST_FILE.fullmatch(n)))
        return path

    def _scan_classes(self) -> ClassList:
        """--classes auto: the class names of every XML in Annotations/ (parsed once, kept)."""
        names: set[str] = set()
        try:
            entries = sorted(e for e in os.listdir(self.ann_dir) if e.endswith(".xml"))
        except OSError as e:
            raise SourceError(self.ann_dir, f"cannot list the Annotations folder ({e.strerror or e})") from None
        for entry in entries:
            try:
                ann = parse_voc_xml(self.ann_dir / entry, self.root, None)
            except SourceError as e:  # reported as a bad sample if a built split lists it
                self._scanned[entry[:-4]] = e
                continue
            self._scanned[entry[:-4]] = ann
            names.update(o.name for o in ann.objects)
        return auto_classes(names, [f"{self._rel(self.ann_dir)}/*.xml ({len(entries):,} files)"], self.ann_dir)

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def _listed(self, split: str) -> list[str]:
        return read_id_list(self._require_list(split), self.root)

    def _existing_images(self) -> set[str]:
        # One directory listing instead of a stat per image (VOC2012 has 17k JPEGs).
        return set(os.listdir(self.img_dir))

    def _annotation(self, image_id: str, images: set[str]) -> tuple[VocAnnotation, Path, Path] | None:
        """(annotation, xml, jpg) of an id, or None after reporting a problem to self.bad."""
        xml = self.ann_dir / f"{image_id}.xml"
        jpg = self.img_dir / f"{image_id}.jpg"
        unknown = None if self.class_list.origin == "dataset" else (
            lambda name: self.class_list.unknown(name, DEFAULT_LIST))
        try:
            got = self._scanned.pop(image_id, None)
            if isinstance(got, SourceError):
                raise got
            if got is None:
                ann = parse_voc_xml(xml, self.root, self._class_index, unknown, self.opts.skip_unknown_classes)
            else:  # scanned by --classes auto, which lists every name it holds
                ann = replace(got, objects=tuple(replace(o, class_index=self._class_index[o.name])
                                                 for o in got.objects))
        except SourceError as e:
            self.bad(e.path, e.problem)
            return None
        if f"{image_id}.jpg" not in images:
            self.bad(jpg, "image file is missing (listed in ImageSets)")
            return None
        return ann, xml, jpg

    def _listed_objects(self, ann: VocAnnotation, counts: dict[str, int]) -> list[VocObject] | None:
        """The objects of classes in the list, counting those left out (--skip-unknown-classes);
        None when there were objects and none is of a listed class (the image is left out)."""
        objects = [o for o in ann.objects if o.class_index >= 0]
        if len(objects) < len(ann.objects):
            counts["objects_of_unlisted_classes"] += len(ann.objects) - len(objects)
            if not objects:
                counts["images_only_unlisted_classes"] += 1
                return None
        return objects

    def _unlisted_counts(self) -> dict[str, int]:
        return {"objects_of_unlisted_classes": 0, "images_only_unlisted_classes": 0}


def _boxes_array(objects: list[VocObject] | tuple[VocObject, ...]) -> np.ndarray:
    rows = [[o.class_index, *o.box] for o in objects]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _check_image_size(image: np.ndarray, hw: tuple[int, int], jpg: str, xml: str) -> None:
    h, w = hw
    ih, iw = image_hw(image)
    if (ih, iw) != (h, w):
        raise SourceError(jpg, f"image is {iw}x{ih} but {xml} gives <size> {w}x{h}")


@register_source
class VocBoxes(_VocBase):
    """PASCAL VOC detection: one sample per image of ImageSets/Main, map = union of its boxes."""

    name = "voc-boxes"
    summary = "PASCAL VOC detection (Annotations, JPEGImages, ImageSets/Main); map: object boxes"
    options = ("label", "drop_difficult", "year", "classes", "skip_unknown_classes")
    label_kind = "multi"
    maps = {"boxes": MapSpec(kind="boxes", encoding="binary", from_boxes=True)}
    list_dir = "Main"

    def records(self, split: str) -> list[Record]:
        """Parse the XML of every image listed for split (main process)."""
        images = self._existing_images()
        out: list[Record] = []
        dropped = 0
        unlisted = self._unlisted_counts()
        for image_id in self._listed(split):
            got = self._annotation(image_id, images)
            if got is None:
                continue
            ann, xml, jpg = got
            listed = self._listed_objects(ann, unlisted)
            if listed is None:
                continue
            objects = list(listed)
            if self.opts.drop_difficult:
                dropped += sum(o.difficult for o in objects)
                objects = [o for o in objects if not o.difficult]
                if not objects and listed:
                    self.bad(xml, "every object is <difficult> (none left with --drop-difficult)")
                    continue
            if not objects:
                self.bad(xml, "has no <object>")
                continue
            if self.label_mode == "largest":
                label: int | tuple[int, ...] = max(objects, key=lambda o: o.area).class_index
            else:
                label = tuple(sorted({o.class_index for o in objects}))
            out.append(Record(id=self._rel(jpg), label=label,
                              data=(str(jpg), str(xml), (ann.height, ann.width), _boxes_array(objects))))
        notes: dict[str, Any] = {}
        if self.opts.drop_difficult:
            notes["difficult_objects_dropped"] = dropped
        if self.opts.skip_unknown_classes:
            notes.update(unlisted)
        if notes:
            self.notes[split] = notes
        return out

    def decode(self, record: Record) -> Decoded:
        jpg, xml, hw, boxes = record.data
        image = read_image(Path(jpg), self.root)
        _check_image_size(image, hw, jpg, xml)
        return Decoded(image=image, masks={}, boxes=boxes)


@register_source
class VocMasks(_VocBase):
    """PASCAL VOC segmentation: SegmentationClass masks, plus the same images' boxes."""

    name = "voc-masks"
    summary = ("PASCAL VOC segmentation (SegmentationClass, ImageSets/Segmentation); "
               "maps: object mask, object boxes")
    options = ("label", "year", "classes", "skip_unknown_classes")
    label_kind = "multi"
    maps = {
        "mask": MapSpec(kind="mask", encoding="binary"),
        "boxes": MapSpec(kind="boxes", encoding="binary", from_boxes=True),
    }
    list_dir = "Segmentation"

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        self.seg_dir = require_dir(self.voc_dir / "SegmentationClass", "SegmentationClass folder")
        if len(self.classes) > MAX_MASK_CLASSES:
            raise SourceError(self.class_list.path or self.ann_dir,
                              f"{len(self.classes):,} classes, but voc-masks reads class indices 1..{MAX_MASK_CLASSES} "
                              f"from palette masks (mask index i+1 is class i, {VOID_INDEX} is void)")

    def records(self, split: str) -> list[Record]:
        """Parse each listed image's XML and read its mask once for the labels (main process)."""
        images = self._existing_images()
        out: list[Record] = []
        unlisted = self._unlisted_counts()
        custom = self.class_list.custom
        for image_id in self._listed(split):
            got = self._annotation(image_id, images)
            if got is None:
                continue
            ann, xml, jpg = got
            png = self.seg_dir / f"{image_id}.png"
            try:
                counts = _class_pixel_counts(png, self.root, len(self.classes), custom)
            except SourceError as e:
                self.bad(e.path, e.problem)
                continue
            if not counts.any():
                self.bad(png, "mask has no object pixels (only background and void)")
                continue
            if not ann.objects:
                self.bad(xml, "has no <object> (the boxes map would be empty)")
                continue
            objects = self._listed_objects(ann, unlisted)
            if objects is None:
                continue
            if custom:
                # A list of one's own must be in the masks' index order: each class a mask
                # holds is the class of one of the image's objects.
                named = {o.class_index for o in objects}
                stray = [int(i) for i in np.flatnonzero(counts) if int(i) not in named]
                if stray:
                    c = self.classes[stray[0]]
                    self.bad(png, f"mask holds class {short(c)} (index {stray[0] + 1}) but {xml.name} has no "
                                  f"{short(c)} object: is the --classes list in the order of the masks' indices "
                                  "(mask index i+1 is class i)?")
                    continue
            if self.label_mode == "largest":
                label: int | tuple[int, ...] = int(np.argmax(counts))
            else:
                label = tuple(int(i) for i in np.flatnonzero(counts))
            out.append(Record(id=self._rel(jpg), label=label,
                              data=(str(jpg), str(xml), str(png), (ann.height, ann.width),
                                    _boxes_array(objects))))
        if self.opts.skip_unknown_classes:
            self.notes[split] = dict(unlisted)
        return out

    def decode(self, record: Record) -> Decoded:
        jpg, xml, png, hw, boxes = record.data
        image = read_image(Path(jpg), self.root)
        idx = read_png_indices(Path(png), self.root)
        check_mask_size(idx, image, Path(png))
        _check_image_size(image, hw, jpg, xml)
        mask = ((idx >= 1) & (idx <= len(self.classes))).astype(np.uint8)
        return Decoded(image=image, masks={"mask": mask}, boxes=boxes)


def _class_pixel_counts(png: Path, root: str | Path | None = None, n: int = len(VOC_CLASSES),
                        custom: bool = False) -> np.ndarray:
    """Pixels per class (n,) of a SegmentationClass PNG; other than 0, 1..n, 255 is an error.

    ``custom``: the n classes are a --classes list (the messages say so)."""
    idx = read_png_indices(png, root)
    if idx.ndim != 2:
        raise SourceError(png, f"mask has shape {idx.shape}, not a single-channel image")
    if idx.dtype != np.uint8:
        # A 16- or 32-bit mask: its values are checked before np.bincount sees them (a
        # value of 2**31 would make it allocate 16 GB; a negative one makes it fail).
        lo, hi = (int(idx.min()), int(idx.max())) if idx.size else (0, 0)
        if lo < 0 or hi > 255:
            raise SourceError(png, f"mask has values {lo}..{hi}, outside 0..255: a VOC mask holds class "
                                   f"indices 0-{n} and 255 (void)")
        idx = idx.astype(np.uint8)
    hist = np.bincount(idx.ravel(), minlength=256)
    stray = [v for v in np.flatnonzero(hist) if not (v <= n or v == VOID_INDEX)]
    if stray:
        shown = ", ".join(str(int(v)) for v in stray[:5]) + (", ..." if len(stray) > 5 else "")
        if custom:
            raise SourceError(png, f"mask has values {shown}, which are neither a class (1-{n}: the --classes "
                                   f"list has {n}), background (0) nor void (255): does the list lack classes, "
                                   "or is it an RGB rendering instead of the palette PNG?")
        raise SourceError(png, f"mask has values {shown}, which are neither a class (1-{n}), background (0) "
                               "nor void (255): is it an RGB rendering instead of the palette PNG?")
    return hist[1:n + 1]
