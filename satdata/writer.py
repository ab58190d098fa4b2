"""Write a satkit store from one's own converter: ``satdata.StoreWriter`` (docs/api.md).

::

    from satdata import StoreWriter

    with StoreWriter("mine.zarr", dataset="mine", classes=["cat", "dog"], image_size=(64, 64),
                     maps={"mask": "binary"}) as w:
        for image, label, mask in my_samples():          # uint8 (64, 64, 3), int, bool (64, 64)
            w.add("train", image, label, maps={"mask": mask})
    # leaving the block: digests computed, the store committed at mine.zarr in one rename

Samples are buffered per split and written a whole file (chunk or shard) at a time, in the
store's own layout (docs/store-format.md), into a private directory beside the output. The
store appears at ``path`` only when the ``with`` block ends without an exception (or at
``close()``): an error, a Ctrl-C or a kill leaves nothing that opens as a store, and an
existing store at ``path`` is replaced only with ``overwrite=True``, and then atomically.
The output lock is held meanwhile, so a concurrent ``satdata build`` of the same path is
refused, not interleaved.

Images are uint8 (H, W, 3) at exactly ``image_size`` (resize them first: satkit's own
sources fit images with :mod:`satdata.geometry`). Labels are class indices
(``label_kind="single"``), or for ``"multi"`` a list of class indices or a numpy multi-hot
vector. Maps
are given in S units, float in [-1, 1] (``unit`` maps in [0, 1]) or bool, (H, W) or
(H, W, C), and are quantised by their encoding (``binary``, ``unit``, ``signed``; see
:data:`satdata.store.ENCODINGS`). Boxes, optional, are ``(class, x1, y1, x2, y2)`` in pixels.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from satdata.errors import SatkitError
from satdata.store import ENCODINGS, LABEL_KINDS, SPLITS, MapInfo, StoreInfo, encode_map, is_plain_name
from satdata.store import ArrayWriter as _ArrayWriter

__all__ = ["StoreWriter"]

MAX_CLASSES = 100_000


class StoreWriter:
    """A new store, filled sample by sample (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, dataset: str, classes: Sequence[str],
                 image_size: tuple[int, int], label_kind: str = "single",
                 maps: Mapping[str, str | MapInfo] | None = None, hflip: bool = True, overwrite: bool = False,
                 provenance: Mapping[str, Any] | None = None) -> None:
        from satdata.build import check_out
        from satdata.atomic import identity, make_private_dir, output_lock, partial_path, probe_writable

        if label_kind not in LABEL_KINDS:
            raise SatkitError(f"label_kind: must be one of {', '.join(LABEL_KINDS)}, got {label_kind!r}")
        classes = [str(c) for c in classes]
        if not 1 <= len(classes) <= MAX_CLASSES or len(set(classes)) != len(classes) or not all(classes):
            raise SatkitError(f"classes: expected 1 to {MAX_CLASSES:,} distinct non-empty names, got {len(classes)}"
                              + (" with repeats or empty names" if classes else ""))
        h, w = (int(v) for v in image_size)
        if not (1 <= h <= 16384 and 1 <= w <= 16384):
            raise SatkitError(f"image_size: expected (height, width) in [1, 16384], got {tuple(image_size)!r}")
        infos: dict[str, MapInfo] = {}
        for name, spec in (maps or {}).items():
            if not is_plain_name(name):
                raise SatkitError(f"maps: {name!r} is not a plain name (letters, digits, ._+-)")
            info = spec if isinstance(spec, MapInfo) else MapInfo(name=name, encoding=str(spec), kind="custom")
            if info.encoding not in ENCODINGS:
                raise SatkitError(f"maps: {name}: unknown encoding {info.encoding!r} (one of {', '.join(ENCODINGS)})")
            infos[name] = info
        self.path = Path(path)
        self.dataset, self.classes, self.image_size, self.label_kind = str(dataset), classes, (h, w), label_kind
        self.maps = infos
        self._provenance = dict(provenance or {})
        self._t0 = time.time()
        self._stack = ExitStack()
        self._done = False
        out = self.path
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            probe_writable(out.parent, "path")
            self._stack.enter_context(output_lock(out))
            self._before = identity(out)
            try:
                check_out(out, overwrite)
            except SatkitError as e:
                raise SatkitError(str(e).replace("pass --overwrite", "pass overwrite=True")) from None
            self._tmp = partial_path(out)
            make_private_dir(self._tmp)
            self._stack.callback(self._discard)
            self._w = _ArrayWriter(self._tmp, dataset=self.dataset, classes=classes, image_size=(h, w),
                                   label_kind=label_kind, maps=infos, hflip=bool(hflip))
        except BaseException:
            self._stack.close()
            raise
        self._buffers: dict[str, dict[str, list[Any]]] = {}
        self._written: dict[str, int] = {}
        self._capacity: dict[str, int] = {}
        self._boxes: dict[str, list[np.ndarray]] = {}

    # ------------------------------------------------------------------ context

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Discard everything written; ``path`` is left as it was."""
        self._done = True
        self._stack.close()

    def _discard(self) -> None:
        from satdata.atomic import remove_partial

        if self._tmp.exists():
            remove_partial(self._tmp)

    # ------------------------------------------------------------------ samples

    def add(self, split: str, image: np.ndarray, label: int | Sequence[int] | np.ndarray, *, id: str | None = None,
            maps: Mapping[str, np.ndarray] | None = None,
            boxes: Sequence[Sequence[float]] | np.ndarray | None = None) -> None:
        """Add one sample to ``split`` (train, val or test)."""
        if self._done:
            raise SatkitError(f"{self.path}: the writer is closed")
        if split not in SPLITS:
            raise SatkitError(f"split: unknown split {split!r} (one of {', '.join(SPLITS)})")
        where = f"{split} sample {self._written.get(split, 0) + len(self._buffers.get(split, {}).get('images', []))}"
        img = np.asarray(image)
        if img.dtype != np.uint8 or img.shape != (*self.image_size, 3):
            raise SatkitError(f"{where}: image must be uint8 of shape {(*self.image_size, 3)}, got {img.dtype} "
                              f"{img.shape}")
        lab = self._label(label, where)
        given = dict(maps or {})
        if set(given) != set(self.maps):
            raise SatkitError(f"{where}: maps given {sorted(given)}, the store has {sorted(self.maps)}")
        stored = {}
        for name, info in self.maps.items():
            m = np.asarray(given[name])
            if m.ndim == 3 and m.shape[2] == 1:
                m = m[..., 0]
            want = self.image_size if info.channels == 1 else (*self.image_size, info.channels)
            if m.shape != tuple(want):
                raise SatkitError(f"{where}: map {name} has shape {m.shape}, expected {tuple(want)}")
            if m.dtype != bool and not np.isfinite(m.astype(np.float64)).all():
                raise SatkitError(f"{where}: map {name} holds NaN or infinite values")
            stored[name] = encode_map(m, info.encoding)
        buf = self._buffers.setdefault(split, {"images": [], "labels": [], "ids": [], **{f"map:{n}": [] for n in self.maps}})
        index = self._written.get(split, 0) + len(buf["images"])
        if boxes is not None and len(boxes):
            b = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
            if not np.isfinite(b).all() or ((b[:, 0] < 0) | (b[:, 0] >= len(self.classes))).any():
                raise SatkitError(f"{where}: boxes must be finite (class, x1, y1, x2, y2) with classes in "
                                  f"[0, {len(self.classes)})")
            self._boxes.setdefault(split, []).append(np.concatenate([np.full((len(b), 1), index, np.float32), b], 1))
        buf["images"].append(img)
        buf["labels"].append(lab)
        buf["ids"].append(str(index) if id is None else str(id))
        for name in self.maps:
            buf[f"map:{name}"].append(stored[name])
        if split not in self._capacity:  # one file's worth at first; grown as samples come
            self._capacity[split] = self._w.shard or self._w.chunk
            self._w.create_split(split, self._capacity[split])
        if len(buf["images"]) >= self._w.split_chunk[split]:
            self._flush(split)

    def _label(self, label: Any, where: str) -> np.ndarray:
        k = len(self.classes)
        if self.label_kind == "single":
            if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or not 0 <= label < k:
                raise SatkitError(f"{where}: label must be a class index in [0, {k}), got {label!r}")
            return np.int64(label)
        if isinstance(label, np.ndarray):  # a multi-hot vector
            if label.shape == (k,) and np.isin(label, (0, 1)).all():
                return label.astype(np.uint8)
        elif isinstance(label, (list, tuple)):  # class indices
            arr = np.asarray(label, dtype=np.int64) if all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in label) else None
            if arr is not None and ((arr >= 0) & (arr < k)).all():
                hot = np.zeros(k, np.uint8)
                hot[arr] = 1
                return hot
        raise SatkitError(f"{where}: a multi-label label must be a numpy array of {k} zeros and ones, or a list of "
                          f"class indices in [0, {k}), got {repr(label)[:60]}")

    def _flush(self, split: str) -> None:
        buf = self._buffers[split]
        n = len(buf["images"])
        if not n:
            return
        start = self._written.get(split, 0)
        need = start + self._w.split_chunk[split]
        if need > self._capacity[split]:
            self._capacity[split] = max(need, 2 * self._capacity[split])
            self._w.resize_split(split, self._capacity[split])
        self._w.write(split, start, np.stack(buf["images"]), np.stack(buf["labels"]), buf["ids"],
                      {name: np.stack(buf[f"map:{name}"]) for name in self.maps})
        self._written[split] = start + n
        for v in buf.values():
            v.clear()

    # ------------------------------------------------------------------ the end

    def close(self) -> StoreInfo | None:
        """Write what is buffered, compute the digests and commit the store at ``path``."""
        from satdata import __version__
        from satdata.build import commit

        if self._done:
            return None
        try:
            if not self._capacity:
                raise SatkitError(f"{self.path}: no sample was added; nothing to write")
            for split in list(self._capacity):
                self._flush(split)
                self._w.close_split(split, self._written[split])
                if self._boxes.get(split) or any(self._boxes.values()):
                    self._w.write_boxes(split, np.concatenate(self._boxes[split]) if self._boxes.get(split)
                                        else np.zeros((0, 6), np.float32))
            info = self._w.finish({
                "source": "satdata.StoreWriter", **self._provenance,
                "counts": dict(self._written), "tool": f"satkit {__version__}",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.time() - self._t0, 3),
            })
            commit(self._tmp, self.path, self._before)
            return info
        finally:
            self._done = True
            self._stack.close()
