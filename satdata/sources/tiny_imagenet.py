"""Tiny ImageNet (cs231n's ``tiny-imagenet-200``) with its bounding boxes as the saliency map.

Layout read (``--root`` is ``tiny-imagenet-200`` or the directory holding it)::

    tiny-imagenet-200/
      wnids.txt                          one WordNet id per line: the classes, in label order
      words.txt                          wnid<TAB>name, name, ...   (class name: the first one)
      train/<wnid>/<wnid>_boxes.txt      <file><TAB>x0<TAB>y0<TAB>x1<TAB>y1, one line per image
      train/<wnid>/images/<wnid>_<i>.JPEG
      val/val_annotations.txt            <file><TAB><wnid><TAB>x0<TAB>y0<TAB>x1<TAB>y1
      val/images/val_<i>.JPEG

Splits ``train`` (500 images a class in the real set) and ``val`` (10,000); ``test`` has no
labels or boxes and is not offered. Every image is 64x64 with exactly one box.

Box convention: the four numbers are *inclusive pixel indices*, 0-based: a box covers the
columns x0..x1 and the rows y0..y1, both ends included. The evidence is the files
themselves: boxes spanning the whole image are written ``0 .. 63`` on the 64-pixel image
(e.g. ``n07873807_0.JPEG 0 6 63 61``), so 63 is the last pixel, not the far edge. In
satkit's continuous frame (the image spans [0, 64)) the box is therefore
``[x0, x1 + 1) x [y0, y1 + 1)``; a one-pixel box (x0 == x1) has area 1, and a box has zero
area only when x1 < x0 or y1 < y0.

Problems are reported with the file and line they come from: a malformed line, an unknown
wnid, a box outside 0..63 or with zero area, an image listed twice or listed but missing,
and an image on disk that no line annotates are bad samples (``--skip-bad`` skips them);
a missing ``wnids.txt``/``words.txt``/boxes file is an error for the whole dataset.

Hostile input. The text files must be UTF-8 regular files inside ``--root`` (a FIFO, a
directory or a link out of the root is an error naming it, never a hang); a file name on a
line must be a plain name (no '/', '..', NUL) and only names of entries of the images
folder are ever opened, each again only if it is a regular file inside the root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from satdata.errors import SourceError
from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    read_image,
    read_text,
    register_source,
    relative_name_problem,
    require_dir,
    short,
)

IMAGE_SIZE = 64  # every Tiny ImageNet image is 64x64
DIRNAME = "tiny-imagenet-200"
_WNID = re.compile(r"^n\d{8}$")
_NUMBER = re.compile(r"(\d+)(?=\.[^.]+$)")


def find_root(root: Path) -> Path:
    """The ``tiny-imagenet-200`` directory: ``root`` itself or its child of that name."""
    for cand in (root, root / DIRNAME):
        if os.path.lexists(cand / "wnids.txt"):  # in any form: read_wnids names a FIFO or a bad link
            return cand
    if not root.exists():
        raise SourceError(root, "no such directory")
    raise SourceError(root, f"not a Tiny ImageNet directory (no wnids.txt here or in {DIRNAME}/)")


def read_wnids(path: Path, root: str | Path | None = None) -> list[str]:
    """The class wnids in label order; duplicates or malformed ids are errors."""
    text = read_text(path, "wnids.txt (the list of class ids)", root)
    wnids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        w = line.strip()
        if not w:
            continue
        if not _WNID.fullmatch(w):
            raise SourceError(f"{path}:{lineno}", f"not a WordNet id: {short(w)} (expected n########)")
        if w in seen:
            raise SourceError(f"{path}:{lineno}", f"wnid {w} listed twice (first at line {seen[w]})")
        seen[w] = lineno
        wnids.append(w)
    if not wnids:
        raise SourceError(path, "lists no classes")
    return wnids


def read_class_names(path: Path, wnids: list[str], root: str | Path | None = None) -> list[str]:
    """First name of each wnid in words.txt; a name shared by two classes gets its wnid appended."""
    text = read_text(path, "words.txt (the class names)", root)
    wanted = set(wnids)
    names: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, sep, rest = line.partition("\t")
        wnid = wnid.strip()
        if wnid in wanted:
            first = rest.split(",")[0].strip()
            if not sep or not first:
                raise SourceError(f"{path}:{lineno}", f"no name for {wnid}")
            if len(first) > 256:
                raise SourceError(f"{path}:{lineno}", f"the name of {wnid} is {len(first):,} characters long "
                                                      "(at most 256)")
            names[wnid] = first
    missing = [w for w in wnids if w not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SourceError(path, f"has no name for class {missing[0]}{more}")
    out = [names[w] for w in wnids]
    counts: dict[str, int] = {}
    for n in out:
        counts[n] = counts.get(n, 0) + 1
    # e.g. ImageNet's two "crane"s: keep names unique so a class name identifies a class.
    return [f"{n} ({w})" if counts[n] > 1 else n for n, w in zip(out, wnids)]


def parse_box(fields: list[str], where: str) -> tuple[float, float, float, float] | str:
    """Inclusive pixel box x0 y0 x1 y1 -> continuous (x1, y1, x2, y2), or the problem as text."""
    try:
        x0, y0, x1, y1 = (int(v) for v in fields)
    except ValueError:
        return f"box coordinates must be integers, got {short(' '.join(fields))}"
    if x1 < x0 or y1 < y0:
        return f"box ({x0}, {y0}, {x1}, {y1}) has zero area (x1 < x0 or y1 < y0)"
    last = IMAGE_SIZE - 1
    if min(x0, y0) < 0 or max(x1, y1) > last:
        return (f"box ({x0}, {y0}, {x1}, {y1}) lies outside the {IMAGE_SIZE}x{IMAGE_SIZE} image "
                f"(pixel indices run 0..{last})")
    return float(x0), float(y0), float(x1 + 1), float(y1 + 1)


def _sort_key(name: str) -> tuple[int, str]:
    m = _NUMBER.search(name)
    return (int(m.group(1)) if m else -1, name)


@register_source
class TinyImageNetBoxes(Source):
    name = "tiny-imagenet-boxes"
    summary = "Tiny ImageNet (tiny-imagenet-200): 200 classes, 64x64; map: the annotated box"
    options = ()
    label_kind = "single"
    maps = {"boxes": MapSpec(kind="boxes", encoding="binary", from_boxes=True)}
    needs_root = True

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        self.base = find_root(self.root)
        self.wnids = read_wnids(self.base / "wnids.txt", self.root)
        self.classes = read_class_names(self.base / "words.txt", self.wnids, self.root)
        self._index = {w: i for i, w in enumerate(self.wnids)}

    def available_splits(self) -> list[str]:
        return ["train", "val"]

    def records(self, split: str) -> list[Record]:
        if split == "train":
            return self._train_records()
        if split == "val":
            return self._val_records()
        raise SourceError(self.base, f"Tiny ImageNet has no labelled split {split!r} (it has: train, val)")

    # ------------------------------------------------------------------ parsing

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.base).as_posix()

    def _record(self, image: Path, label: int, box: tuple[float, float, float, float]) -> Record:
        return Record(id=self._rel(image), label=label, data=(str(image), label, box))

    def _listing(self, img_dir: Path, listing: Path,
                 lines: list[tuple[int, str, int, list[str] | None]]) -> list[Record]:
        """Records of one annotation file from its lines: (lineno, file, label, box fields).

        Box fields are None for a line the caller already reported as bad. Every file a
        line names, good or bad, counts as mentioned (so it is reported once); images on
        disk that no line mentions are bad samples too.
        """
        on_disk = {p.name for p in img_dir.iterdir() if not p.name.startswith(".")}
        listed: dict[str, tuple[int, Record]] = {}
        for lineno, fname, label, box_fields in lines:
            if box_fields is None:
                continue
            where = f"{listing}:{lineno}"
            problem = relative_name_problem(fname)
            if problem is None and "/" in fname:
                problem = "has a '/': expected a file name of the images folder"
            if problem:
                self.bad(where, f"file name {short(fname)} {problem}")
                continue
            if fname in listed:
                self.bad(where, f"{fname} listed twice (first at line {listed[fname][0]})")
                continue
            box = parse_box(box_fields, where)
            if isinstance(box, str):
                self.bad(where, box)
                continue
            if fname not in on_disk:
                self.bad(where, f"image {self._rel(img_dir / fname)} is listed but missing")
                continue
            listed[fname] = (lineno, self._record(img_dir / fname, label, box))
        mentioned = {fname for _, fname, _, _ in lines}
        for fname in sorted(on_disk - mentioned, key=_sort_key):
            if fname.lower().endswith((".jpeg", ".jpg")):
                self.bad(img_dir / fname, f"has no line in {listing.name}")
        return [r for _, r in sorted(listed.values(), key=lambda v: _sort_key(v[1].id))]

    def _train_records(self) -> list[Record]:
        train = require_dir(self.base / "train", "train/ directory")
        out: list[Record] = []
        for label, wnid in enumerate(self.wnids):
            cls_dir = train / wnid
            boxes_file = cls_dir / f"{wnid}_boxes.txt"
            if not os.path.lexists(boxes_file):
                raise SourceError(boxes_file, f"missing: class {wnid} (listed in wnids.txt) has no boxes file")
            img_dir = require_dir(cls_dir / "images", f"images directory of class {wnid}")
            lines: list[tuple[int, str, int, list[str] | None]] = []
            for lineno, fields in self._lines(boxes_file):
                box_fields: list[str] | None = fields[1:]
                if len(fields) != 5:
                    self.bad(f"{boxes_file}:{lineno}",
                             f"expected 5 tab-separated fields (file x0 y0 x1 y1), got {len(fields)}")
                    box_fields = None
                lines.append((lineno, fields[0], label, box_fields))
            out.extend(self._listing(img_dir, boxes_file, lines))
        return out

    def _val_records(self) -> list[Record]:
        val = require_dir(self.base / "val", "val/ directory")
        ann = val / "val_annotations.txt"
        img_dir = require_dir(val / "images", "val/images directory")
        lines: list[tuple[int, str, int, list[str] | None]] = []
        for lineno, fields in self._lines(ann):
            where = f"{ann}:{lineno}"
            label, box_fields = -1, None
            if len(fields) != 6:
                self.bad(where, f"expected 6 tab-separated fields (file wnid x0 y0 x1 y1), got {len(fields)}")
            elif fields[1] not in self._index:
                self.bad(where, f"unknown wnid {short(fields[1])} (not in wnids.txt)")
            else:
                label, box_fields = self._index[fields[1]], fields[2:]
            lines.append((lineno, fields[0], label, box_fields))
        return self._listing(img_dir, ann, lines)

    def _lines(self, path: Path) -> list[tuple[int, list[str]]]:
        text = read_text(path, path.name, self.root, missing=f"missing {path.name}")
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                out.append((lineno, line.strip().split("\t") if "\t" in line else line.split()))
        return out

    # ------------------------------------------------------------------ decoding

    def decode(self, record: Record) -> Decoded:
        path, label, (x1, y1, x2, y2) = record.data
        image = read_image(Path(path), self.root)
        boxes = np.array([[label, x1, y1, x2, y2]], dtype=np.float64)
        return Decoded(image=image, boxes=boxes)
