"""CIFAR-10 and CIFAR-100, the "python version" pickles from Krizhevsky's page. No maps.

Layouts read (``--root`` is the batches directory or the directory holding it)::

    cifar-10-batches-py/   data_batch_1 .. data_batch_5 (train), test_batch, batches.meta
    cifar-100-python/      train, test, meta

Each batch is a pickled dict (written by Python 2 with protocol 2): ``data``, a (N, 3072)
uint8 array whose rows are a 32x32 image as three row-major planes R, G, B (1024 values
each), and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100; the 20 coarse labels are
not used). ``batches.meta``/``meta`` hold the class names (``label_names`` /
``fine_label_names``). Keys are read whether they unpickle as bytes (``b'data'``) or as str.

The store has no saliency maps (``maps = {}``): it is a plain classification store, still
valid and trainable (without SAT's map term). Splits ``train`` and ``test``.

Speed: ``records()`` reads each batch file once and every record carries its image as a
(32, 32, 3) view of the batch array, so decoding 50,000 images reads no files at all.

Safety: the batches are pickles, and unpickling can run code, so they are read with an
unpickler that only builds plain containers and numpy arrays; a file that asks for
anything else is refused as "not a CIFAR batch". A batch is read only if it is a regular
file inside ``--root`` (a FIFO, a directory, a link loop or a link out of the root is an
error naming it) of at most ``MAX_BATCH_BYTES``.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from satdata.errors import SourceError
from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    read_bytes,
    register_source,
)

SIDE = 32
ROW = 3 * SIDE * SIDE  # 3072
MAX_BATCH_BYTES = 2 * 1024 ** 3  # CIFAR-100's train is 158 MB


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 keeps the implementation in numpy._core; pickles name either module
        from numpy._core import multiarray as ma
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma  # type: ignore[no-redef]
    import codecs

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores Python 3 bytes
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = ma._reconstruct
        allowed[(mod, "scalar")] = ma.scalar
    return allowed


class _Refused(pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles containers and numpy arrays only; any other global is refused."""

    _allowed: ClassVar[dict[tuple[str, str], Any] | None] = None

    def find_class(self, module: str, name: str) -> Any:
        if _BatchUnpickler._allowed is None:
            _BatchUnpickler._allowed = _numpy_globals()
        try:
            return _BatchUnpickler._allowed[(module, name)]
        except KeyError:
            raise _Refused(f"refers to {module}.{name}, which a CIFAR batch never does (refused)") from None


def _key(k: Any) -> Any:
    return k.decode("latin-1") if isinstance(k, bytes) else k


def load_pickle(path: Path, root: str | Path | None = None) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys, or SourceError naming the file."""
    raw = read_bytes(path, "batch file", root, missing="missing batch file", max_bytes=MAX_BATCH_BYTES)
    try:
        # latin-1 is what numpy arrays pickled by Python 2 need (numpy's own advice).
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as e:
        raise SourceError(path, f"not a CIFAR batch: the pickle {e}") from None
    except pickle.UnpicklingError as e:
        raise SourceError(path, f"not a CIFAR batch: unreadable or corrupt pickle ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError,
            MemoryError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(path, f"not a CIFAR batch: unreadable or corrupt pickle ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise SourceError(path, f"cannot read ({e})") from None
    if not isinstance(obj, dict):
        raise SourceError(path, f"not a CIFAR batch: the pickle holds a {type(obj).__name__}, not a dict")
    return {_key(k): v for k, v in obj.items()}


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


class _Cifar(Source):
    """What CIFAR-10 and CIFAR-100 share; subclasses name their files and keys."""

    dirname: ClassVar[str]
    meta_file: ClassVar[str]
    names_key: ClassVar[str]
    labels_key: ClassVar[str]
    split_files: ClassVar[dict[str, tuple[str, ...]]]
    n_classes: ClassVar[int]

    options = ()
    label_kind = "single"
    maps: dict[str, MapSpec] = {}
    needs_root = True

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        self.base = self._find_base(self.root)
        meta_path = self.base / self.meta_file
        meta = load_pickle(meta_path, self.root)
        if self.names_key not in meta:
            raise SourceError(meta_path, f"has no {self.names_key!r} (keys: {', '.join(map(str, meta))})")
        raw = meta[self.names_key]
        if not isinstance(raw, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in raw):
            raise SourceError(meta_path, f"{self.names_key!r} is not a list of class names")
        names = [_text(n) for n in raw]
        if len(names) != self.n_classes:
            raise SourceError(meta_path, f"lists {len(names)} class names, expected {self.n_classes}")
        if not all(n.strip() and len(n) <= 256 for n in names) or len(set(names)) != len(names):
            raise SourceError(meta_path, f"{self.names_key!r} holds an empty, overlong or repeated class name")
        self.classes = names

    def _find_base(self, root: Path) -> Path:
        for cand in (root, root / self.dirname):
            if os.path.lexists(cand / self.meta_file):  # in any form: load_pickle names a FIFO or a bad link
                return cand
        if not root.exists():
            raise SourceError(root, "no such directory")
        raise SourceError(root, f"no {self.meta_file} here or in {self.dirname}/ "
                                f"(not the python version of {self.name.upper()})")

    def available_splits(self) -> list[str]:
        return list(self.split_files)

    def read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(N, 32, 32, 3) uint8 images and (N,) int64 labels of one batch file, checked."""
        d = load_pickle(path, self.root)
        for key in ("data", self.labels_key):
            if key not in d:
                raise SourceError(path, f"has no {key!r} (keys: {', '.join(map(str, d))})")
        data = d["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
            shape = getattr(data, "shape", None)
            dtype = getattr(data, "dtype", type(data).__name__)
            raise SourceError(path, f"'data' is {shape} {dtype}, expected (N, {ROW}) uint8")
        try:
            labels = np.asarray(d[self.labels_key], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise SourceError(path, f"{self.labels_key!r} is not a list of integers") from None
        if len(labels) != len(data):
            raise SourceError(path, f"has {len(data)} images but {len(labels)} {self.labels_key}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            bad = int(labels.min() if labels.min() < 0 else labels.max())
            raise SourceError(path, f"label {bad} is outside 0..{len(self.classes) - 1}")
        images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # planes R, G, B -> HWC
        return np.ascontiguousarray(images), labels

    def records(self, split: str) -> list[Record]:
        if split not in self.split_files:
            raise SourceError(self.base, f"{self.name} has no split {split!r} (it has: train, test)")
        paths = [self.base / f for f in self.split_files[split]]
        for p in paths:  # name a missing file before spending time on the others
            if not os.path.lexists(p):
                raise SourceError(p, "missing batch file")
        out: list[Record] = []
        for p in paths:
            images, labels = self.read_batch(p)
            out.extend(Record(id=f"{p.name}:{i}", label=int(y), data=images[i])
                       for i, y in enumerate(labels.tolist()))
        return out

    def decode(self, record: Record) -> Decoded:
        return Decoded(image=record.data)


@register_source
class Cifar10(_Cifar):
    name = "cifar10"
    summary = "CIFAR-10, python pickles (cifar-10-batches-py); no maps"
    dirname = "cifar-10-batches-py"
    meta_file = "batches.meta"
    names_key = "label_names"
    labels_key = "labels"
    split_files = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    n_classes = 10


@register_source
class Cifar100(_Cifar):
    name = "cifar100"
    summary = "CIFAR-100, python pickles (cifar-100-python), fine labels; no maps"
    dirname = "cifar-100-python"
    meta_file = "meta"
    names_key = "fine_label_names"
    labels_key = "fine_labels"
    split_files = {"train": ("train",), "test": ("test",)}
    n_classes = 100
