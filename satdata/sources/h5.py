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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from satdata.errors import SourceError
from satdata.sources._base import BadSamples, Decoded, MapSpec, Record, Source, SourceOptions, register_source
from satdata.store import ENCODINGS, SPLITS

H5_VERSION = 1
# h5py's chunk cache per open dataset: enough for a few chunks of images, so that reading
# samples in order decompresses each chunk once.
CHUNK_CACHE_BYTES = 64 * 1024 * 1024


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


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _json_attr(attrs: Any, key: str, default: Any = None) -> Any:
    if key not in attrs:
        return default
    v = attrs[key]
    if isinstance(v, (bytes, str)):
        try:
            return json.loads(_text(v))
        except json.JSONDecodeError:
            return _text(v)
    if isinstance(v, np.ndarray):
        return [_text(x) for x in v.tolist()]
    return v


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
        if not path.is_file():
            raise SourceError(path, "no such HDF5 file (--root names the .h5 file)")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise SourceError(path, f"not a readable HDF5 file ({e})") from None
        with f:
            self._read_layout(f, path)

    def _read_layout(self, f: Any, path: Path) -> None:
        import h5py

        attrs = f.attrs
        if "satkit_h5_version" not in attrs:
            raise SourceError(path, "not in satkit's h5 layout (no 'satkit_h5_version' attribute)")
        version = int(attrs["satkit_h5_version"])
        if version > H5_VERSION or version < 1:
            raise SourceError(path, f"h5 layout version {version} is not one this satkit reads ({H5_VERSION})")
        classes = _json_attr(attrs, "classes")
        if not isinstance(classes, list) or not classes:
            raise SourceError(path, "attribute 'classes' must be a JSON list of class names")
        self.classes = [str(c) for c in classes]
        self._dataset = _text(attrs["dataset"]) if "dataset" in attrs else path.stem
        if "hflip" in attrs:
            hflip = attrs["hflip"]
            if not isinstance(hflip, (bool, np.bool_)):
                raise SourceError(path, f"attribute 'hflip' must be a boolean, got {hflip!r}")
            self.hflip = bool(hflip)
        self._splits = [s for s in SPLITS if s in f and isinstance(f[s], h5py.Group)]
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
            im = g["images"]
            if im.ndim != 4 or im.shape[3] != 3 or im.dtype != np.uint8:
                raise SourceError(path, f"{s}/images is {im.shape} {im.dtype}, not (N, H, W, 3) uint8")
            n = int(im.shape[0])
            if image_hw is None:
                image_hw = im.shape[1:3]
            elif im.shape[1:3] != image_hw:
                raise SourceError(path, f"{s}/images are {im.shape[2]}x{im.shape[1]}, other splits' "
                                  f"{image_hw[1]}x{image_hw[0]}")
            lab = g["labels"]
            split_kind = "single" if lab.ndim == 1 else "multi"
            if lab.shape[0] != n or lab.ndim > 2 or (lab.ndim == 2 and lab.shape[1] != len(self.classes)):
                raise SourceError(path, f"{s}/labels is {lab.shape}, expected ({n},) or ({n}, {len(self.classes)})")
            if lab.dtype.kind not in "iub":
                raise SourceError(path, f"{s}/labels has dtype {lab.dtype}, not integers")
            if kind is None:
                kind = split_kind
            if kind not in ("single", "multi") or split_kind != kind:
                raise SourceError(path, f"{s}/labels {lab.shape} do not fit label_kind {kind!r}")
            if "ids" in g and g["ids"].shape != (n,):
                raise SourceError(path, f"{s}/ids is {g['ids'].shape}, expected ({n},)")
            if "boxes" in g and (g["boxes"].ndim != 2 or g["boxes"].shape[1] != 6):
                raise SourceError(path, f"{s}/boxes is {g['boxes'].shape}, expected (M, 6)")
            split_maps = self._read_maps(g, s, n, path)
            if maps is None:
                maps = split_maps
            elif split_maps != maps:  # names, kinds, encodings and channels
                raise SourceError(path, f"split {s!r} has other maps than {self._splits[0]!r} "
                                  f"({', '.join(split_maps) or 'none'} vs {', '.join(maps) or 'none'})")
            self._sizes[s] = n
        self.label_kind = kind or "single"
        self.maps = dict(maps or {})

    def _read_maps(self, g: Any, split: str, n: int, path: Path) -> dict[str, H5MapSpec]:
        out: dict[str, H5MapSpec] = {}
        if "saliency" not in g:
            return out
        h, w = g["images"].shape[1:3]
        for name in sorted(g["saliency"]):
            d = g["saliency"][name]
            where = f"{split}/saliency/{name}"
            enc = _text(d.attrs.get("encoding", ""))
            if enc not in ENCODINGS:
                raise SourceError(path, f"{where}: attribute 'encoding' is {enc!r}, not one of {', '.join(ENCODINGS)}")
            if d.dtype != np.dtype(ENCODINGS[enc][0]):
                raise SourceError(path, f"{where}: dtype {d.dtype} does not fit encoding {enc!r} ({ENCODINGS[enc][0]})")
            channels = int(d.attrs.get("channels", 1 if d.ndim == 3 else (d.shape[3] if d.ndim == 4 else 0)))
            want = (n, h, w) if channels == 1 else (n, h, w, channels)
            if tuple(d.shape) != want or channels < 1:
                raise SourceError(path, f"{where}: shape {d.shape} does not fit {n} images of {w}x{h} "
                                  f"with {channels} channels")
            prov = _json_attr(d.attrs, "provenance", {})
            out[name] = H5MapSpec(kind=_text(d.attrs.get("kind", "map")), encoding=enc, from_boxes=False,
                                  channels=channels, provenance=prov if isinstance(prov, dict) else {})
        return out

    @property
    def dataset(self) -> str:
        return self._dataset

    def available_splits(self) -> list[str]:
        return list(self._splits)

    def records(self, split: str) -> list[Record]:
        import h5py

        n = self._sizes[split]
        with h5py.File(self.root, "r") as f:
            g = f[split]
            labels = np.asarray(g["labels"][...])
            ids = [_text(x) for x in g["ids"][...].tolist()] if "ids" in g else [f"{split}/{i}" for i in range(n)]
            boxes = np.asarray(g["boxes"][...], dtype=np.float64) if "boxes" in g else None
        per_sample: dict[int, list[np.ndarray]] = {}
        if boxes is not None:
            for row in boxes:
                i = int(row[0])
                if row[0] != i or not 0 <= i < n:
                    raise SourceError(self.root, f"{split}/boxes: sample index {row[0]:g} is not one of 0..{n - 1}")
                per_sample.setdefault(i, []).append(row[1:])
        k = len(self.classes)
        out = []
        for i in range(n):
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
            out.append(Record(id=ids[i], label=label, data=(split, i, bx)))
        return out

    def decode(self, record: Record) -> Decoded:
        split, i, bx = record.data
        image = np.asarray(_dataset(self.root, f"{split}/images")[i])
        masks: dict[str, np.ndarray] = {}
        for name, spec in self.maps.items():
            m = np.asarray(_dataset(self.root, f"{split}/saliency/{name}")[i])
            if spec.encoding == "binary" and m.size and m.max() > 1:
                raise SourceError(f"{self.root}:{split}/saliency/{name}[{i}]", "binary map has values other than 0/1")
            if spec.encoding == "signed" and m.size and m.min() < -127:
                raise SourceError(f"{self.root}:{split}/saliency/{name}[{i}]", "signed map has -128 (valid: -127..127)")
            masks[name] = m
        return Decoded(image=image, masks=masks, boxes=bx)


__all__ = ["H5MapSpec", "H5Source", "H5_VERSION"]
