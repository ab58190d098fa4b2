"""HDF5 files in satkit's h5 layout (what ``satdata export`` writes), as a build source.

``satdata build --source h5 --root FILE.h5 --out STORE`` imports such a file. The layout,
version 1 (any HDF5 writer can produce it; h5py shown)::

    FILE.h5
      attrs  satkit_h5_version   1
             classes             JSON list of class names, e.g. '["cat", "dog"]'
                                 (a 1-D array of strings is accepted too)
             dataset             dataset name                     [default: the file's stem]
             label_kind          "single" or "multi"     [default: from the labels' shape]
             store_provenance    JSON: the exported store's provenance (ignored on import)
             hflip               bool: whether a horizontal flip keeps the class
                                 (the store's StoreInfo.hflip)            [default: true]
      <split>/                   train, val, test: whichever the file has
        images                   uint8 (N, H, W, 3), RGB
        labels                   integer (N,) class indices, or uint8 (N, K) multi-hot 0/1
        ids                      utf-8 strings (N,): where each sample came from
                                                               [default: "<split>/<index>"]
        boxes                    float32 (M, 6) [sample, class, x1, y1, x2, y2] in pixels of
                                 the images, x to the right, y down        [optional]
        saliency/<name>          uint8 or int8 (N, H, W), or (N, H, W, C) for C channels
          attrs  encoding        "binary" (uint8 0/1), "unit" (uint8 0..255 = S * 255) or
                                 "signed" (int8 -127..127 = S * 127)
                 kind            what the map shows: "mask", "boxes", "gradcampp", ...
                 channels        C (1 for (N, H, W))
                 provenance      JSON: where the map came from          [optional]

Every split holds the same maps with the same attributes. Images of one file share one
size. Each map comes through the builder's geometry like any mask: when the file's
images are already at ``--size`` the fit is an identity and every stored value arrives
bit for bit (also boxes and ids), so store -> h5 -> store round-trips exactly; at
another size images and maps are resized together (satdata.geometry.apply_map). Box maps
are imported as the masks they are, not redrawn from the boxes, for the same reason.

Map values are checked on import: binary maps must be 0/1 and signed maps must lie in
-127..127 (-128 has no meaning in the encoding).

Hostile files. ``--root`` must be a regular file (never a FIFO or a device). A file that
reaches outside itself is refused: an external link, a dataset with external storage or a
virtual dataset (each would make HDF5 read another file). Declared shapes are bounded by
what the file holds (a contiguous dataset must lie inside the file; a chunked one must
have stored data, in chunks of at most ``MAX_CHUNK_BYTES``) and by a memory budget:
at most ``MAX_SAMPLES`` samples a split, images of at most PIL's MAX_IMAGE_PIXELS, and
labels, ids and boxes of at most ``READ_BUDGET_BYTES`` each (they are read whole).
Labels must be integers (a float dtype is refused; a negative or out-of-range label is a
bad sample), boxes finite numbers, ids UTF-8 text of at most ``MAX_ID_CHARS``
characters without control characters, map names and kinds plain names (they become
paths in the store), classes unique non-empty names, and every attribute of the type
documented above; anything else is an error naming the file and the dataset or attribute.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from satdata.errors import SourceError
from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    check_file,
    max_image_pixels,
    register_source,
    short,
)
from satdata.store import ENCODINGS, MAX_CHANNELS, MAX_CLASSES, SPLITS, is_plain_name

H5_VERSION = 1
# h5py's chunk cache per open dataset: enough for a few chunks of images, so that reading
# samples in order decompresses each chunk once.
CHUNK_CACHE_BYTES = 64 * 1024 * 1024
# Budgets against crafted declarations (far beyond what satkit's stores hold).
MAX_SAMPLES = 10_000_000  # per split
READ_BUDGET_BYTES = 1024 ** 3  # labels, ids, boxes of one split are each read whole
MAX_CHUNK_BYTES = 256 * 1024 ** 2  # one chunk is decompressed whole to read one sample
MAX_ID_CHARS = 1024
# The store's rule for a dataset name (satdata.store): letters, digits, spaces, ._+-.
_DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]{0,127}")


# A map of an h5 file: a MapSpec with its channel count and recorded provenance.
H5MapSpec = MapSpec


_OPEN: dict[tuple[int, str], tuple[tuple[int, int, int], Any, dict[str, Any]]] = {}


def _dataset(path: Path, name: str) -> Any:
    """This process's open h5py dataset ``name`` of the file at path.

    Handles are per process (h5py handles do not cross processes) and datasets stay
    open, because HDF5's chunk cache lives in an open dataset: reopening one per sample
    would decompress its chunk again for every sample. The file is reopened when the
    file at path is another one than when it was opened (replaced or rewritten), so a
    later build never reads a stale file.
    """
    import h5py

    key = (os.getpid(), str(path))
    check_file(path, "HDF5 file", missing="no such HDF5 file (--root names the .h5 file)")
    st = os.stat(path)
    sig = (st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _OPEN.get(key)
    if cached is None or cached[0] != sig or not cached[1].id.valid:
        if cached is not None and cached[1].id.valid:
            cached[1].close()
        cached = (sig, h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES), {})
        _OPEN[key] = cached
    datasets = cached[2]
    d = datasets.get(name)
    if d is None:
        d = datasets[name] = cached[1][name]
    return d


class _Bad(Exception):
    """A problem of the file's layout; becomes SourceError(file, problem)."""


def _text(v: Any) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"text {short(bytes(v))} is not UTF-8 (byte at position {e.start})") from None
    return str(v)


def _json_attr(attrs: Any, key: str, default: Any = None) -> Any:
    if key not in attrs:
        return default
    v = attrs[key]
    if isinstance(v, (bytes, str, np.bytes_)):
        text = _text(v)
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
        except (RecursionError, ValueError):
            raise _Bad(f"attribute {key!r} holds JSON nested too deeply or numbers too long to read") from None
    if isinstance(v, np.ndarray):
        return [_text(x) for x in v.tolist()]
    return v


def _int_attr(attrs: Any, key: str, default: int | None = None) -> int | None:
    if key not in attrs:
        return default
    v = attrs[key]
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise _Bad(f"attribute {key!r} is {short(v)}, not an integer")
    return int(v)


def _dataset_name(attrs: Any, path: Path) -> str:
    """The 'dataset' attribute (checked), or a name made from the file's stem."""
    if "dataset" in attrs:
        name = _text(attrs["dataset"])
        if not _DATASET_RE.fullmatch(name) or ".." in name:
            raise _Bad(f"attribute 'dataset' is {short(name)}: expected a name of letters, digits, spaces "
                       "and ._+- (at most 128 characters)")
        return name
    stem = re.sub(r"[^A-Za-z0-9 ._+-]", "_", path.stem).replace("..", "_")
    stem = re.sub(r"^[^A-Za-z0-9]+", "", stem)[:128]
    return stem or "h5"


def _link_problem(group: Any, name: str) -> str | None:
    """Why member ``name`` of group is refused as a link out of the file, or None."""
    import h5py

    try:
        link = group.get(name, getlink=True)
    except (KeyError, ValueError, OSError):
        return None
    if isinstance(link, h5py.ExternalLink):
        return (f"is an external link (to {short(link.path)} in {short(link.filename)}): an h5 file for "
                "satkit holds its own data")
    return None


def _member(group: Any, name: str, where: str) -> Any:
    """group[name], refusing an external link."""
    problem = _link_problem(group, name)
    if problem:
        raise _Bad(f"{where} {problem}")
    return group[name]


def _storage_problem(d: Any, file_size: int) -> str | None:
    """Why dataset d's declared shape is not backed by data in this file, or None."""
    import h5py

    if d.is_virtual:
        return "is a virtual dataset (its data lives in other files): refused"
    if d.external:
        return f"keeps its data in another file ({short(d.external[0][0])}, HDF5 external storage): refused"
    if d.size == 0:
        return None
    layout = d.id.get_create_plist().get_layout()
    storage = int(d.id.get_storage_size())
    declared = f"{d.shape} {d.dtype}"
    if layout == h5py.h5d.CONTIGUOUS:
        offset = d.id.get_offset()
        if offset is None or storage == 0:
            return f"declares {declared} but stores no data"
        if offset + storage > file_size:
            return (f"declares {declared}: {storage:,} bytes at offset {offset:,}, past the end of the "
                    f"{file_size:,}-byte file (truncated or crafted)")
    elif layout == h5py.h5d.CHUNKED:
        if storage == 0:
            return f"declares {declared} but stores no data"
        chunk = math.prod(d.chunks) * d.dtype.itemsize
        if chunk > MAX_CHUNK_BYTES:
            return f"has chunks of {chunk:,} bytes, more than the limit of {MAX_CHUNK_BYTES:,}"
    return None


def _checked(d: Any, where: str, file_size: int) -> Any:
    problem = _storage_problem(d, file_size)
    if problem:
        raise _Bad(f"{where} {problem}")
    return d


def _budget(nbytes: int, where: str) -> None:
    if nbytes > READ_BUDGET_BYTES:
        raise _Bad(f"{where} would take {nbytes:,} bytes to read, more than the budget of {READ_BUDGET_BYTES:,}")


def _id_problem(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"id {short(v)} is not text"
    if len(v) > MAX_ID_CHARS:
        return f"id is {len(v):,} characters long (at most {MAX_ID_CHARS})"
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        return f"id {short(v)} holds a NUL or control character"
    return None


@register_source
class H5Source(Source):
    name = "h5"
    summary = "an HDF5 file in satkit's h5 layout (satdata export writes it); --root is the file"
    options = ()
    label_kind = "single"
    needs_root = True

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        import h5py

        path = self.root
        size = check_file(path, "HDF5 file", missing="no such HDF5 file (--root names the .h5 file)")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise SourceError(path, f"not a readable HDF5 file ({short(str(e), 200)})") from None
        with f:
            try:
                self._read_layout(f, path, size)
            except _Bad as e:
                raise SourceError(path, str(e)) from None
            except SourceError:
                raise
            except (OSError, KeyError, ValueError, TypeError, RuntimeError, OverflowError) as e:
                raise SourceError(path, f"damaged HDF5 file ({type(e).__name__}: {short(str(e), 200)})") from None

    def _read_layout(self, f: Any, path: Path, file_size: int) -> None:
        import h5py

        attrs = f.attrs
        if "satkit_h5_version" not in attrs:
            raise SourceError(path, "not in satkit's h5 layout (no 'satkit_h5_version' attribute)")
        version = _int_attr(attrs, "satkit_h5_version")
        if version is None or version > H5_VERSION or version < 1:
            raise SourceError(path, f"h5 layout version {version} is not one this satkit reads ({H5_VERSION})")
        classes = _json_attr(attrs, "classes")
        if not isinstance(classes, list) or not classes:
            raise SourceError(path, "attribute 'classes' must be a JSON list of class names")
        if (len(classes) > MAX_CLASSES
                or not all(isinstance(c, str) and c.strip() and len(c) <= 256 for c in classes)):
            raise SourceError(path, f"attribute 'classes' must list 1 to {MAX_CLASSES:,} names of 1 to 256 "
                                    f"characters, got {short(classes)}")
        if len(set(classes)) != len(classes):
            dup = next(c for i, c in enumerate(classes) if c in classes[:i])
            raise SourceError(path, f"attribute 'classes' lists {short(dup)} twice")
        self.classes = list(classes)
        self._dataset = _dataset_name(attrs, path)
        if "hflip" in attrs:
            hflip = attrs["hflip"]
            if not isinstance(hflip, (bool, np.bool_)):
                raise SourceError(path, f"attribute 'hflip' must be a boolean, got {short(hflip)}")
            self.hflip = bool(hflip)
        members = set(f)  # link names, whether or not their target exists
        present = [s for s in SPLITS if s in members]
        for s in present:
            problem = _link_problem(f, s)
            if problem:
                raise _Bad(f"{s} {problem}")
        self._splits = [s for s in present if isinstance(f[s], h5py.Group)]
        if not self._splits:
            raise SourceError(path, f"has no split group (one of {', '.join(SPLITS)})")
        kind = _text(attrs["label_kind"]) if "label_kind" in attrs else None
        self._sizes: dict[str, int] = {}
        maps: dict[str, H5MapSpec] | None = None
        image_hw = None
        for s in self._splits:
            g = f[s]
            for key in ("images", "labels"):
                if key not in g:
                    raise SourceError(path, f"split {s!r} has no {key!r} dataset")
            im = _member(g, "images", f"{s}/images")
            if not isinstance(im, h5py.Dataset) or im.ndim != 4 or im.shape[3] != 3 or im.dtype != np.uint8:
                shape, dtype = getattr(im, "shape", "a group"), getattr(im, "dtype", "")
                raise SourceError(path, f"{s}/images is {shape} {dtype}, not (N, H, W, 3) uint8")
            n = int(im.shape[0])
            if n > MAX_SAMPLES:
                raise SourceError(path, f"{s}/images declares {n:,} samples, more than the limit of {MAX_SAMPLES:,}")
            h, w = int(im.shape[1]), int(im.shape[2])
            if h < 1 or w < 1 or h * w > max_image_pixels():
                raise SourceError(path, f"{s}/images are {w}x{h}: expected 1 to {max_image_pixels():,} pixels")
            _checked(im, f"{s}/images", file_size)
            if image_hw is None:
                image_hw = im.shape[1:3]
            elif im.shape[1:3] != image_hw:
                raise SourceError(path, f"{s}/images are {im.shape[2]}x{im.shape[1]}, other splits' "
                                  f"{image_hw[1]}x{image_hw[0]}")
            lab = _member(g, "labels", f"{s}/labels")
            if not isinstance(lab, h5py.Dataset):
                raise SourceError(path, f"{s}/labels is a group, not a dataset")
            split_kind = "single" if lab.ndim == 1 else "multi"
            if lab.ndim not in (1, 2) or lab.shape[0] != n or (lab.ndim == 2 and lab.shape[1] != len(self.classes)):
                raise SourceError(path, f"{s}/labels is {lab.shape}, expected ({n},) or ({n}, {len(self.classes)})")
            if lab.dtype.kind not in "iub":
                raise SourceError(path, f"{s}/labels has dtype {lab.dtype}, not integers")
            _checked(lab, f"{s}/labels", file_size)
            _budget(lab.size * lab.dtype.itemsize, f"{s}/labels")
            if kind is None:
                kind = split_kind
            if kind not in ("single", "multi") or split_kind != kind:
                raise SourceError(path, f"{s}/labels {lab.shape} do not fit label_kind {short(kind)}")
            if "ids" in g:
                ids = _member(g, "ids", f"{s}/ids")
                if not isinstance(ids, h5py.Dataset) or ids.shape != (n,):
                    raise SourceError(path, f"{s}/ids is {getattr(ids, 'shape', 'a group')}, expected ({n},)")
                if h5py.check_string_dtype(ids.dtype) is None and ids.dtype.kind not in "SU":
                    raise SourceError(path, f"{s}/ids has dtype {ids.dtype}, not strings")
                _checked(ids, f"{s}/ids", file_size)
                _budget(n * max(ids.dtype.itemsize, 16), f"{s}/ids")
            if "boxes" in g:
                boxes = _member(g, "boxes", f"{s}/boxes")
                if not isinstance(boxes, h5py.Dataset) or boxes.ndim != 2 or boxes.shape[1] != 6:
                    raise SourceError(path, f"{s}/boxes is {getattr(boxes, 'shape', 'a group')}, expected (M, 6)")
                if boxes.dtype.kind not in "iuf":
                    raise SourceError(path, f"{s}/boxes has dtype {boxes.dtype}, not numbers")
                _checked(boxes, f"{s}/boxes", file_size)
                _budget(boxes.shape[0] * 6 * 8, f"{s}/boxes")
            split_maps = self._read_maps(g, s, n, path, file_size)
            if maps is None:
                maps = split_maps
            elif split_maps != maps:  # names, kinds, encodings and channels
                raise SourceError(path, f"split {s!r} has other maps than {self._splits[0]!r} "
                                  f"({', '.join(split_maps) or 'none'} vs {', '.join(maps) or 'none'})")
            self._sizes[s] = n
        self.label_kind = kind or "single"
        self.maps = dict(maps or {})

    def _read_maps(self, g: Any, split: str, n: int, path: Path, file_size: int) -> dict[str, H5MapSpec]:
        import h5py

        out: dict[str, H5MapSpec] = {}
        if "saliency" not in g:
            return out
        sal = _member(g, "saliency", f"{split}/saliency")
        if not isinstance(sal, h5py.Group):
            raise SourceError(path, f"{split}/saliency is a dataset, not a group of maps")
        h, w = g["images"].shape[1:3]
        for name in sorted(sal):
            where = f"{split}/saliency/{name if is_plain_name(name) else short(name)}"
            if not is_plain_name(name):
                raise SourceError(path, f"{where}: map name {short(name)} is not a plain name (letters, digits "
                                        "and ._+-, at most 128 characters, no '..'): it becomes a path in the store")
            d = _member(sal, name, where)
            if not isinstance(d, h5py.Dataset):
                raise SourceError(path, f"{where} is a group, not a dataset")
            enc = _text(d.attrs.get("encoding", ""))
            if enc not in ENCODINGS:
                raise SourceError(path, f"{where}: attribute 'encoding' is {short(enc)}, not one of "
                                        f"{', '.join(ENCODINGS)}")
            if d.dtype != np.dtype(ENCODINGS[enc][0]):
                raise SourceError(path, f"{where}: dtype {d.dtype} does not fit encoding {enc!r} ({ENCODINGS[enc][0]})")
            try:
                channels = _int_attr(d.attrs, "channels", 1 if d.ndim == 3 else (d.shape[3] if d.ndim == 4 else 0))
            except _Bad as e:
                raise SourceError(path, f"{where}: {e}") from None
            if channels is None or not 1 <= channels <= MAX_CHANNELS:
                raise SourceError(path, f"{where}: {channels} channels (expected 1 to {MAX_CHANNELS})")
            want = (n, h, w) if channels == 1 else (n, h, w, channels)
            if tuple(d.shape) != want:
                raise SourceError(path, f"{where}: shape {d.shape} does not fit {n} images of {w}x{h} "
                                  f"with {channels} channels")
            _checked(d, where, file_size)
            kind = _text(d.attrs.get("kind", "map"))
            if not is_plain_name(kind):
                raise SourceError(path, f"{where}: attribute 'kind' is {short(kind)}, not a plain name (letters, "
                                        "digits and ._+-, at most 128 characters)")
            prov = _json_attr(d.attrs, "provenance", {})
            out[name] = H5MapSpec(kind=kind, encoding=enc, from_boxes=False,
                                  channels=channels, provenance=prov if isinstance(prov, dict) else {})
        return out

    @property
    def dataset(self) -> str:
        return self._dataset

    def available_splits(self) -> list[str]:
        return list(self._splits)

    def records(self, split: str) -> list[Record]:
        try:
            return self._records(split)
        except _Bad as e:
            raise SourceError(self.root, str(e)) from None
        except SourceError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise SourceError(self.root, f"damaged HDF5 file: cannot read {split}/labels, ids or boxes "
                                         f"({type(e).__name__}: {short(str(e), 200)})") from None

    def _records(self, split: str) -> list[Record]:
        import h5py

        n = self._sizes[split]
        check_file(self.root, "HDF5 file", missing="no such HDF5 file (--root names the .h5 file)")
        with h5py.File(self.root, "r") as f:
            g = f[split]
            labels = np.asarray(g["labels"][...])
            raw_ids = g["ids"][...].tolist() if "ids" in g else None
            boxes = np.asarray(g["boxes"][...], dtype=np.float64) if "boxes" in g else None
        per_sample: dict[int, list[np.ndarray]] = {}
        if boxes is not None:
            if not np.isfinite(boxes).all():
                row = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
                raise SourceError(self.root, f"{split}/boxes[{row}] has a value that is not a finite number")
            for row in boxes:
                i = int(row[0])
                if row[0] != i or not 0 <= i < n:
                    raise SourceError(self.root, f"{split}/boxes: sample index {row[0]:g} is not one of 0..{n - 1}")
                per_sample.setdefault(i, []).append(row[1:])
        k = len(self.classes)
        out = []
        for i in range(n):
            if raw_ids is None:
                sample_id = f"{split}/{i}"
            else:
                try:
                    sample_id = _text(raw_ids[i])
                    problem = _id_problem(sample_id)
                except _Bad as e:
                    problem = str(e)
                if problem:
                    self.bad(f"{self.root}:{split}/ids[{i}]", problem)
                    continue
            where = f"{self.root}:{split}/labels[{i}]"
            if self.label_kind == "single":
                y = int(labels[i])
                if not 0 <= y < k:
                    self.bad(where, f"label {y} is not a class index (the file has {k} classes)")
                    continue
                label: int | tuple[int, ...] = y
            else:
                row = labels[i]
                if not np.isin(row, (0, 1)).all():
                    self.bad(where, "multi-hot labels must be 0 or 1")
                    continue
                label = tuple(int(c) for c in np.flatnonzero(row))
            bx = np.stack(per_sample[i]) if i in per_sample else None
            out.append(Record(id=sample_id, label=label, data=(split, i, bx)))
        return out

    def decode(self, record: Record) -> Decoded:
        split, i, bx = record.data
        where = f"{self.root}:{split}/images[{i}]"
        try:
            image = np.asarray(_dataset(self.root, f"{split}/images")[i])
            masks: dict[str, np.ndarray] = {}
            for name, spec in self.maps.items():
                where = f"{self.root}:{split}/saliency/{name}[{i}]"
                m = np.asarray(_dataset(self.root, f"{split}/saliency/{name}")[i])
                if spec.encoding == "binary" and m.size and m.max() > 1:
                    raise SourceError(where, "binary map has values other than 0/1")
                if spec.encoding == "signed" and m.size and m.min() < -127:
                    raise SourceError(where, "signed map has -128 (valid: -127..127)")
                masks[name] = m
        except SourceError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise SourceError(where, f"cannot read it: damaged HDF5 data ({type(e).__name__}: "
                                     f"{short(str(e), 200)})") from None
        return Decoded(image=image, masks=masks, boxes=bx)


__all__ = ["H5MapSpec", "H5Source", "H5_VERSION"]
