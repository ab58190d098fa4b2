"""The satkit store format, version 1: the one module that knows array names and attributes.

A store is a Zarr v3 group (a directory, or a ``.zip`` of one)::

    store.zarr/                      root attrs["satkit"]: see StoreInfo
      <split>/                       train, val, test: whichever the source has
        images            uint8  (N, H, W, 3)
        labels            int64  (N,)  single-label, or uint8 (N, K) multi-hot
        ids               string (N,)  the source's id of each sample (file name)
        boxes             float32 (M, 6) [sample, class, x1, y1, x2, y2], stored frame (optional)
        saliency/<name>   uint8 or int8 (N, H, W) or (N, H, W, C): one array per named map
        map_targets/<name>  int64 (N,): the class each map was computed for (optional,
                          teacher maps; MapInfo.targets says whether a map has one)

Arrays are chunked along N only, by whole samples, so that reading a split is a few
sequential whole-chunk reads (see ``samples_per_chunk``). Each map records an encoding,
and the trainer derives the SAT saliency S from the stored integers q with one affine
map ``S = scale * q + offset`` (see ``ENCODINGS``):

    binary  uint8 0/1 object mask      S = 2q - 1         (+1 object, -1 background)
    unit    uint8 q/255 in [0, 1]      S = q / 255
    signed  int8  q/127 in [-1, 1]     S = q / 127

The ``satkit`` attribute is written last, after every array and digest: a directory
without it (an unfinished build) is refused by :func:`open_store`.

This module depends on numpy and zarr only, so the trainer can import it without the
build side's heavier dependencies.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr

from satdata.errors import StoreError

FORMAT_VERSION = 1
ATTR_KEY = "satkit"
SPLITS = ("train", "val", "test")
SPLIT_ORDER = {name: i for i, name in enumerate(SPLITS)}
LABEL_KINDS = ("single", "multi")

# encoding -> (stored dtype, scale, offset): S = scale * q + offset.
ENCODINGS: dict[str, tuple[str, float, float]] = {
    "binary": ("uint8", 2.0, -1.0),
    "unit": ("uint8", 1.0 / 255.0, 0.0),
    "signed": ("int8", 1.0 / 127.0, 0.0),
}

# Target bytes of one chunk of images: big enough that a split is a few hundred files at
# most, small enough that a chunk decodes quickly.
CHUNK_TARGET_BYTES = 2 * 1024 * 1024
# Per-chunk digests are truncated: they locate corruption, the full sha256 guards content.
CHUNK_DIGEST_HEX = 16


@dataclass(frozen=True)
class MapInfo:
    """One named saliency map of a store."""

    name: str
    encoding: str  # a key of ENCODINGS
    kind: str  # what it shows: "boxes", "mask", "gradcampp", "gbp", ...
    channels: int = 1  # 1: (N, H, W); C > 1: (N, H, W, C)
    provenance: dict[str, Any] = field(default_factory=dict)
    # The array's name under <split>/saliency/ when it differs from the map's name: a map
    # replaced in place is written under a fresh name, then the attributes switch to it.
    array: str = ""
    # Whether <split>/map_targets/<array_name> holds, per sample, the class index the map
    # was computed for (teacher maps: the teacher's prediction, or the label with
    # `--target label`); -1 where it is not known. Maps without it (built from
    # annotations, or added before satkit recorded targets) have False.
    targets: bool = False

    @property
    def array_name(self) -> str:
        return self.array or self.name

    def affine(self) -> tuple[float, float]:
        """(scale, offset) such that S = scale * q + offset for stored values q."""
        _, scale, offset = ENCODINGS[self.encoding]
        return scale, offset


@dataclass(frozen=True)
class StoreInfo:
    """Everything in root attrs['satkit']."""

    format_version: int
    dataset: str
    classes: list[str]
    image_size: tuple[int, int]  # (H, W)
    label_kind: str  # "single" or "multi"
    splits: dict[str, int]  # split -> number of samples
    maps: dict[str, MapInfo]
    provenance: dict[str, Any] = field(default_factory=dict)
    digests: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Whether a horizontal flip keeps an image's class (and its map's meaning): True for
    # natural photographs, False for e.g. digits (a mirrored 2 is not a 2). Training's
    # default augmentation reads it. Absent in stores written before it existed: True.
    hflip: bool = True

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "StoreInfo":
        """Parse and type-check root attrs['satkit']; raises StoreError naming the store and the attribute.

        Every value is checked for its type and range, not coerced: a format_version of
        1.9, true or "1", a class list with duplicates, a negative split size or a map
        of an unknown encoding are refused, never truncated or converted into something
        that reads but means another thing. Names that become paths are checked by
        :func:`check_names`.
        """
        if not isinstance(d, Mapping):
            raise StoreError(f"{where}: attribute 'satkit' is {_short(d)}; expected an object")
        for key in ("format_version", "dataset", "classes", "image_size", "label_kind", "splits", "maps"):
            if key not in d:
                raise StoreError(f"{where}: attribute 'satkit' has no {key}")
        version = d["format_version"]
        if not _is_int(version):
            raise StoreError(f"{where}: attribute 'satkit' has format_version {_short(version)}; "
                             f"expected the integer {FORMAT_VERSION}")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{where}: store format version {version} is newer than this satkit reads "
                f"(version {FORMAT_VERSION}); upgrade satkit"
            )
        if version < 1:
            raise StoreError(f"{where}: invalid store format version {version}")
        dataset = d["dataset"]
        if not isinstance(dataset, str) or not _DATASET_RE.fullmatch(dataset) or ".." in dataset:
            raise StoreError(f"{where}: attribute 'satkit' has dataset {_short(dataset)}; expected a name of "
                             "letters, digits, spaces and ._+- (no path separators)")
        classes = d["classes"]
        if (not isinstance(classes, list) or not classes or len(classes) > MAX_CLASSES
                or not all(isinstance(c, str) and c.strip() for c in classes)):
            raise StoreError(f"{where}: attribute 'satkit' has classes {_short(classes)}; expected a list of "
                             f"1 to {MAX_CLASSES:,} non-empty names")
        if len(set(classes)) != len(classes):
            dup = next(c for i, c in enumerate(classes) if c in classes[:i])
            raise StoreError(f"{where}: attribute 'satkit' lists class {_short(dup)} twice; classes must be unique")
        size = d["image_size"]
        if (not isinstance(size, list) or len(size) != 2
                or not all(_is_int(v) and 1 <= v <= MAX_IMAGE_SIDE for v in size)):
            raise StoreError(f"{where}: attribute 'satkit' has image_size {_short(size)}; expected two integers "
                             f"in [1, {MAX_IMAGE_SIDE}] (height, width)")
        label_kind = d["label_kind"]
        if label_kind not in LABEL_KINDS:
            raise StoreError(f"{where}: unknown label kind {_short(label_kind)} (known: {', '.join(LABEL_KINDS)})")
        splits = d["splits"]
        if not isinstance(splits, Mapping) or not splits:
            raise StoreError(f"{where}: attribute 'satkit' has splits {_short(splits)}; expected an object of "
                             "split name -> number of samples")
        for name, n in splits.items():
            if not _is_int(n) or n < 0:
                raise StoreError(f"{where}: split {_short(name)} has {_short(n)} samples in attribute 'satkit'; "
                                 "expected a non-negative integer")
        raw_maps = d["maps"]
        if not isinstance(raw_maps, Mapping):
            raise StoreError(f"{where}: attribute 'satkit' has maps {_short(raw_maps)}; expected an object")
        maps = {}
        for name, m in raw_maps.items():
            maps[name] = _map_from_json(name, m, where)
        hflip = d.get("hflip", True)
        if not isinstance(hflip, bool):
            raise StoreError(f"{where}: attribute 'satkit' has hflip={_short(hflip)}; expected true or false "
                             "(whether a horizontal flip keeps the class)")
        provenance = d.get("provenance", {})
        if not isinstance(provenance, Mapping):
            raise StoreError(f"{where}: attribute 'satkit' has provenance {_short(provenance)}; expected an object")
        digests = d.get("digests", {})
        if not isinstance(digests, Mapping):
            raise StoreError(f"{where}: attribute 'satkit' has digests {_short(digests)}; expected an object")
        for key, rec in digests.items():
            chunks = rec.get("chunks", []) if isinstance(rec, Mapping) else None
            if (not isinstance(rec, Mapping) or not isinstance(rec.get("sha256", ""), str)
                    or not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks)):
                raise StoreError(f"{where}: the digest of {_short(key)} in attribute 'satkit' is {_short(rec)}; "
                                 "expected an object with sha256 and a list of chunk digests")
        info = cls(
            format_version=version,
            dataset=dataset,
            classes=list(classes),
            image_size=(size[0], size[1]),
            label_kind=label_kind,
            splits=dict(splits),
            maps=maps,
            provenance=dict(provenance),
            digests={k: dict(v) for k, v in digests.items()},
            hflip=hflip,
        )
        check_names(info, where)
        return info


# Bounds of what a store may declare: far beyond any real dataset, small enough that a
# crafted value cannot make a reader allocate without limit.
MAX_CLASSES = 1_000_000
MAX_IMAGE_SIDE = 65_536
MAX_CHANNELS = 64
# A name that becomes a path component inside the store (split, map, array): a plain
# relative name, never '..', '/', '\\', NUL or an absolute path.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
# The dataset name is shown and used (sanitised) in default run directory names; it may
# hold spaces (an HDF5 file's stem), never a path separator or a control character.
_DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]{0,127}")


def _is_int(v: Any) -> bool:
    """An int proper: True and 1.0 are not integers in a store's attributes."""
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any, limit: int = 60) -> str:
    """repr(v) cut to ``limit`` characters: crafted values can be megabytes long."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` is a plain relative name: letters, digits, ._+-, no '..', at most 128 characters."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and ".." not in name


def _map_from_json(name: Any, m: Any, where: str) -> MapInfo:
    """One entry of attrs['satkit']['maps'], type-checked."""
    if not isinstance(m, Mapping):
        raise StoreError(f"{where}: map {_short(name)} in attribute 'satkit' is {_short(m)}; expected an object")
    fields = {k: v for k, v in m.items() if k in MapInfo.__dataclass_fields__}
    for key in ("name", "encoding", "kind"):
        if not isinstance(fields.get(key), str):
            raise StoreError(f"{where}: map {_short(name)} has {key} {_short(fields.get(key))} in attribute "
                             "'satkit'; expected a string")
    if fields["name"] != name:
        raise StoreError(f"{where}: map {_short(name)} calls itself {_short(fields['name'])} in attribute 'satkit'")
    if fields["encoding"] not in ENCODINGS:
        raise StoreError(f"{where}: map {_short(name)} has unknown encoding {_short(fields['encoding'])} "
                         f"(known: {', '.join(ENCODINGS)})")
    channels = fields.get("channels", 1)
    if not _is_int(channels) or not 1 <= channels <= MAX_CHANNELS:
        raise StoreError(f"{where}: map {_short(name)} has channels {_short(channels)}; expected an integer "
                         f"in [1, {MAX_CHANNELS}]")
    targets = fields.get("targets", False)
    if not isinstance(targets, bool):
        raise StoreError(f"{where}: map {_short(name)} has targets={_short(targets)} in attribute "
                         "'satkit'; expected true or false")
    array = fields.get("array", "")
    if not isinstance(array, str):
        raise StoreError(f"{where}: map {_short(name)} has array {_short(array)}; expected a name")
    provenance = fields.get("provenance", {})
    if not isinstance(provenance, Mapping):
        raise StoreError(f"{where}: map {_short(name)} has provenance {_short(provenance)}; expected an object")
    return MapInfo(**{**fields, "provenance": dict(provenance)})


def check_names(info: StoreInfo, where: str) -> None:
    """Refuse a store whose attributes name a path outside it: the one check of every
    name that comes from a store and becomes a path (split names, map names, map array
    names, map kinds, digest keys).

    Each must be a plain relative name (:data:`NAME_RE`, no '..'); a digest key is two
    or three such names joined by '/'. Raises StoreError naming the store and the value.
    """
    def bad(what: str, value: Any) -> StoreError:
        return StoreError(f"{where}: attribute 'satkit' has {what} {_short(value)}: not a plain name "
                          "(letters, digits and ._+-, at most 128 characters, no '..' or '/')")

    for split in info.splits:
        if not is_plain_name(split):
            raise bad("split name", split)
    for m in info.maps.values():
        if not is_plain_name(m.name):
            raise bad("map name", m.name)
        if m.array and not is_plain_name(m.array):
            raise bad(f"array name of map {m.name!r}:", m.array)
        if not is_plain_name(m.kind):
            raise bad(f"kind of map {m.name!r}:", m.kind)
    for key in info.digests:
        parts = key.split("/") if isinstance(key, str) else []
        if not 2 <= len(parts) <= 3 or not all(is_plain_name(p) for p in parts):
            raise bad("digest key", key)


def resolve_inside(root: str | Path, relative: str) -> Path:
    """``root / relative`` resolved, refused (StoreError) unless it stays strictly inside root.

    Symbolic links are followed before the comparison: a link inside a store that points
    elsewhere is refused like a '..' in a name.
    """
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target == base or not target.is_relative_to(base):
        raise StoreError(f"{root}: {relative} leads outside the store (to {target})")
    return target


# --------------------------------------------------------------------------- names


TARGETS_GROUP = "map_targets"  # <split>/map_targets/<map array name>: int64 (N,)
TARGETS_DTYPE = "int64"
TARGET_UNKNOWN = -1  # the target class of a sample whose map came without one


def array_path(split: str, field_name: str, map_name: str | None = None) -> str:
    """The path of an array inside the store: 'train/images', 'val/saliency/mask', ...

    ``field_name`` "saliency" and "map_targets" take the map's *array* name
    (``MapInfo.array_name``): 'train/saliency/cam.1a2b3c4d', 'train/map_targets/cam.1a2b3c4d'.
    """
    if field_name in ("saliency", TARGETS_GROUP):
        if not map_name:
            raise ValueError(f"a {field_name} array needs a map name")
        return f"{split}/{field_name}/{map_name}"
    if field_name not in ("images", "labels", "ids", "boxes"):
        raise ValueError(f"unknown store field {field_name!r}")
    return f"{split}/{field_name}"


def split_arrays(info: StoreInfo, split: str) -> list[str]:
    """Every array a split must hold, in a stable order (boxes only where present)."""
    paths = [array_path(split, f) for f in ("images", "labels", "ids")]
    paths += [array_path(split, "saliency", info.maps[m].array_name) for m in sorted(info.maps)]
    paths += [array_path(split, TARGETS_GROUP, info.maps[m].array_name) for m in sorted(info.maps)
              if info.maps[m].targets]
    if array_path(split, "boxes") in info.digests:
        paths.append(array_path(split, "boxes"))
    return paths


def all_arrays(info: StoreInfo) -> list[str]:
    return [p for s in sorted(info.splits, key=lambda s: SPLIT_ORDER.get(s, 99)) for p in split_arrays(info, s)]


def samples_per_chunk(image_size: tuple[int, int], channels: int = 3) -> int:
    """Samples per chunk: a power of two near CHUNK_TARGET_BYTES of images, in [8, 1024]."""
    per_sample = max(1, image_size[0] * image_size[1] * channels)
    n = max(1, CHUNK_TARGET_BYTES // per_sample)
    return int(min(1024, max(8, 2 ** int(math.floor(math.log2(n))))))


def map_shape(info: MapInfo, n: int, image_size: tuple[int, int]) -> tuple[int, ...]:
    h, w = image_size
    return (n, h, w) if info.channels == 1 else (n, h, w, info.channels)


def map_dtype(encoding: str) -> np.dtype:
    if encoding not in ENCODINGS:
        raise StoreError(f"unknown map encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    return np.dtype(ENCODINGS[encoding][0])


# --------------------------------------------------------------------------- digests


def write_unit(arr: "zarr.Array") -> int:
    """Samples per stored file along axis 0: the unit a writer writes whole (the shard of
    a sharded array, else the chunk). Distributed builds split work on this unit."""
    shards = getattr(arr, "shards", None)
    return int((shards or arr.chunks)[0]) if arr.ndim else 1


def iter_chunks(arr: "zarr.Array") -> Iterator[tuple[int, int]]:
    """(start, stop) sample ranges of the chunks along axis 0."""
    n = arr.shape[0]
    step = arr.chunks[0] if arr.ndim else 1
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _canonical_bytes(block: np.ndarray) -> bytes:
    if block.dtype.kind in ("U", "O", "T"):
        return json.dumps([str(x) for x in block.tolist()], ensure_ascii=False).encode()
    return np.ascontiguousarray(block).tobytes()


def chunk_key(arr: "zarr.Array", i: int) -> str:
    """The store key of the i-th chunk along axis 0 (arrays are chunked along N only)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}"


def read_chunk_file(arr: "zarr.Array", i: int) -> bytes | None:
    """The stored (encoded) bytes of chunk i, or None where no chunk was written."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(arr.store.get(chunk_key(arr, i), prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def chunk_file_digest(data: bytes | None) -> str:
    return "absent" if data is None else hashlib.sha256(data).hexdigest()[:CHUNK_DIGEST_HEX]


def digest_array(arr: "zarr.Array") -> dict[str, Any]:
    """Two digests: the meaning of the array, and the bytes of every chunk file.

    ``sha256`` covers the decoded values (dtype, shape, C-order contents), so it does not
    depend on the codec and identifies content across machines (manifests use it).
    ``chunks`` holds a short sha256 of each chunk file as stored, so ``verify`` catches a
    flipped byte anywhere in a file, including the padding zarr keeps beyond the last
    sample of a boundary chunk, and names the chunk and its sample range.
    """
    whole = hashlib.sha256()
    whole.update(f"{arr.dtype}|{tuple(arr.shape)}|".encode())
    chunks = []
    for i, (a, b) in enumerate(iter_chunks(arr)):
        whole.update(_canonical_bytes(np.asarray(arr[a:b])))
        chunks.append(chunk_file_digest(read_chunk_file(arr, i)))
    return {"sha256": whole.hexdigest(), "chunk_size": int(arr.chunks[0]), "chunks": chunks}


def store_digest(info: StoreInfo) -> str:
    """One sha256 over every array's digest: identifies a store's contents."""
    h = hashlib.sha256()
    for p in sorted(info.digests):
        h.update(f"{p}={info.digests[p]['sha256']};".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


def _plain_chunk_dir(arr: "zarr.Array") -> Path | None:
    """The directory of an array's chunk files when they hold plain C-order values on a
    local disk (no filters, no compression, one-byte or little-endian values), else None."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore

        if not isinstance(arr.store, LocalStore) or arr.compressors or arr.filters:
            return None
        if not isinstance(arr.serializer, BytesCodec) or arr.order != "C":
            return None
        if arr.dtype.kind not in "biuf" or (arr.dtype.itemsize > 1 and arr.dtype.byteorder == ">"):
            return None
        if getattr(arr.metadata.chunk_key_encoding, "separator", "/") != "/" or arr.ndim < 1:
            return None
        return Path(arr.store.root) / arr.path
    except Exception:  # any other zarr layout: use zarr's own reader
        return None


def read_rows_into(arr: "zarr.Array", start: int, stop: int, out: np.ndarray,
                   chunk_digests: Sequence[str] | None = None) -> None:
    """Read rows [start, stop) of an array into ``out`` (shape (stop - start, ...)).

    Uncompressed arrays on a local disk (images, as satdata writes them) are read with
    ``readinto`` straight from each chunk file into ``out``: one copy, at disk speed,
    where zarr's general path copies each chunk two more times (about 3x slower for a
    50,000-image split; bench/read.py). Anything else goes through zarr.

    A chunk file of the wrong size (truncated, or appended to) is refused with a
    StoreError naming the array, the chunk and its samples. A missing chunk file reads
    as the fill value only where ``chunk_digests`` (the array's recorded chunk digests)
    says that no file was written ("absent"); given digests that list the chunk, its
    absence is a StoreError too, never a block of zeros.
    """
    root = _plain_chunk_dir(arr)
    if root is None:
        out[...] = arr[start:stop]
        return
    step = arr.chunks[0]
    row_bytes = out.dtype.itemsize * int(np.prod(out.shape[1:], dtype=np.int64))
    chunk_bytes = step * row_bytes
    flat = out.reshape(-1).view(np.uint8) if out.size else out
    rest = "/".join("0" for _ in range(arr.ndim - 1))
    for i in range(start // step, (stop - 1) // step + 1 if stop > start else 0):
        a, b = max(start, i * step), min(stop, (i + 1) * step)
        dst = flat[(a - start) * row_bytes:(b - start) * row_bytes]
        path = root / "c" / (f"{i}/{rest}" if rest else str(i))
        where = f"{arr.store.root}: array {arr.path} chunk {i} (samples [{i * step}, {min(arr.shape[0], (i + 1) * step)}))"
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != chunk_bytes:
                    raise StoreError(f"{where}: the chunk file has {size:,} bytes, expected {chunk_bytes:,} "
                                     "(truncated or damaged; `satdata verify` locates every damaged chunk)")
                f.seek((a - i * step) * row_bytes)
                got = f.readinto(memoryview(dst))
        except FileNotFoundError:  # zarr writes no file for a chunk of fill values
            if chunk_digests is not None and (i >= len(chunk_digests) or chunk_digests[i] != "absent"):
                raise StoreError(f"{where}: the chunk file is missing ({path.name} under {arr.path}/c); "
                                 "the store is damaged") from None
            out[a - start:b - start] = arr.metadata.fill_value
            continue
        if got != len(dst):  # the file changed under us
            raise StoreError(f"{where}: read {got:,} of {len(dst):,} bytes (the chunk file changed while read)")


async def _exists_all(store: Any, keys: Sequence[str], limit: int = 64) -> list[bool]:
    """Whether each key exists in a zarr store, at most ``limit`` requests in flight.

    On an object store that lists (S3), one listing of the keys' common prefix replaces a
    request per key; over HTTP, which cannot list, each key is asked for.
    """
    import asyncio
    import os.path

    fs = getattr(store, "fs", None)
    protocol = getattr(fs, "protocol", ())
    if keys and any(p in ("s3", "s3a") for p in ((protocol,) if isinstance(protocol, str) else protocol)):
        prefix = os.path.commonpath(list(keys)) if len(keys) > 1 else keys[0].rsplit("/", 1)[0]
        try:
            found = {k async for k in store.list_prefix(prefix.rstrip("/") + "/")}
            return [k in found for k in keys]
        except Exception:  # noqa: BLE001 - a listing refused (no List permission): ask per key
            pass
    sem = asyncio.Semaphore(limit)

    async def one(k: str) -> bool:
        async with sem:
            return bool(await store.exists(k))

    return list(await asyncio.gather(*(one(k) for k in keys)))


class Store:
    """An open, validated satkit store.

    >>> store = open_store("digits.zarr")            # doctest: +SKIP
    >>> x = store.load("train", "images")            # whole array, one pass
    >>> s = store.load("train", "saliency", "ink")
    """

    def __init__(self, path: str, group: "zarr.Group", info: StoreInfo) -> None:
        self.path = path
        self.group = group
        self.info = info
        self._present_checked: set[str] = set()  # arrays whose chunk files were found present

    def __repr__(self) -> str:
        return f"Store({self.path!r}, dataset={self.info.dataset!r}, splits={self.info.splits})"

    def array(self, split: str, field_name: str, map_name: str | None = None) -> "zarr.Array":
        if split not in self.info.splits:
            raise StoreError(
                f"{self.path}: no split {split!r} (the store has: {', '.join(self.info.splits)})"
            )
        if field_name in ("saliency", TARGETS_GROUP) and map_name not in self.info.maps:
            known = ", ".join(sorted(self.info.maps)) or "none"
            raise StoreError(f"{self.path}: no saliency map {map_name!r} (maps in the store: {known})")
        if field_name == TARGETS_GROUP and not self.info.maps[map_name].targets:  # type: ignore[index]
            raise StoreError(f"{self.path}: map {map_name!r} records no target classes")
        if field_name in ("saliency", TARGETS_GROUP):
            map_name = self.info.maps[map_name].array_name  # type: ignore[index]
        p = array_path(split, field_name, map_name)
        if self._local_root is not None:
            resolve_inside(self._local_root, p)
        try:
            arr = self.group[p]
        except KeyError:
            raise StoreError(f"{self.path}: lacks array {p}") from None
        except Exception as e:  # damaged array metadata: zarr raises several types
            raise StoreError(f"{self.path}: array {p} has unreadable metadata ({type(e).__name__})") from None
        if p not in self._present_checked:
            self._check_chunks_present(p, arr)  # type: ignore[arg-type]
            if field_name == "labels":  # small: read once, so every reader gets checked labels
                self._check_labels(split, self._read_all(arr))  # type: ignore[arg-type]
            self._present_checked.add(p)
        return arr  # type: ignore[return-value]

    @property
    def _local_root(self) -> Path | None:
        """The store's directory when it is one on the local disk (not a zip or a URL)."""
        if "://" in self.path or self.path.endswith(".zip"):
            return None
        return Path(self.path)

    def _chunk_digests(self, arr: "zarr.Array") -> list[str] | None:
        """The recorded digests of ``arr``'s chunk files, or None where the record does not
        describe this array's chunking (another chunk size or count: `verify` reports that)."""
        rec = self.info.digests.get(arr.path, {})
        want = rec.get("chunks")
        if not want or rec.get("chunk_size") != (arr.chunks[0] if arr.ndim else 1):
            return None
        return want if len(want) == len(list(iter_chunks(arr))) else None

    def _check_chunks_present(self, p: str, arr: "zarr.Array") -> None:
        """Refuse an array one of whose chunk files the digests list is gone.

        zarr reads a missing chunk as its fill value (zeros, or -1 for labels): a store
        that lost a file would train and evaluate on blank images without a word. The
        digests say which chunks were written; each of those must exist (a stat per chunk).
        """
        want = self._chunk_digests(arr)
        if not want:
            return
        from zarr.core.sync import sync

        plain = _plain_chunk_dir(arr)
        chunk_bytes = arr.chunks[0] * arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
        exists: list[bool] = []
        if plain is None:  # a zip or a URL: ask for every chunk at once (one round trip each, overlapped)
            keys = [chunk_key(arr, i) for i in range(len(want))]
            exists = sync(_exists_all(arr.store, keys))
        for i, (a, b) in enumerate(iter_chunks(arr)):
            if want[i] == "absent":
                continue
            if plain is None:
                if not exists[i]:
                    size = None
                else:
                    continue
            else:  # uncompressed: the file's size is known, so a truncated file is found here too
                rest = "/".join("0" for _ in range(arr.ndim - 1))
                try:
                    size = (plain / "c" / (f"{i}/{rest}" if rest else str(i))).stat().st_size
                except FileNotFoundError:
                    size = None
                if size == chunk_bytes:
                    continue
            what = "is missing" if size is None else f"has {size:,} bytes, expected {chunk_bytes:,} (truncated or damaged)"
            raise StoreError(f"{self.path}: array {p} chunk {i} (samples [{a}, {b})) {what}; the store "
                             "is damaged (`satdata verify` lists every damaged chunk)")

    def load(self, split: str, field_name: str, map_name: str | None = None) -> np.ndarray:
        """Read a whole array into memory (sequential whole-chunk reads).

        A chunk that is missing, truncated or does not decode is a StoreError naming the
        array and the samples, never a fill value; labels are checked to be class indices
        in range (single-label) or 0/1 (multi-hot).
        """
        return self._read_all(self.array(split, field_name, map_name))

    def _read_all(self, arr: "zarr.Array") -> np.ndarray:
        """All of ``arr``, checked against its recorded chunk digests (see :meth:`load`)."""
        digests = self._chunk_digests(arr)
        try:
            if arr.dtype.kind in "biuf" and arr.shape[0]:
                out = np.empty(arr.shape, dtype=arr.dtype)
                read_rows_into(arr, 0, arr.shape[0], out, chunk_digests=digests)
                return out
            return np.asarray(arr[...])
        except StoreError:
            raise
        except Exception as e:  # a damaged compressed chunk: name the first one that fails
            raise self._decode_error(arr, e) from None

    def _decode_error(self, arr: "zarr.Array", e: Exception) -> StoreError:
        """A StoreError naming the first chunk of ``arr`` that cannot be read (and why)."""
        for i, (a, b) in enumerate(iter_chunks(arr)):
            try:
                arr[a:b]
            except Exception as ce:
                return StoreError(f"{self.path}: array {arr.path} chunk {i} (samples [{a}, {b})) cannot be read "
                                  f"({type(ce).__name__}: {str(ce)[:120]}); the store is damaged")
        return StoreError(f"{self.path}: array {arr.path} cannot be read ({type(e).__name__}: {str(e)[:120]})")

    def _check_labels(self, split: str, labels: np.ndarray) -> None:
        """Refuse label values that are not class indices (or 0/1 multi-hot entries)."""
        k = len(self.info.classes)
        if labels.dtype.kind not in "iu":
            raise StoreError(f"{self.path}: {split}/labels has dtype {labels.dtype}; labels must be integers")
        if not labels.size:
            return
        lo, hi = int(labels.min()), int(labels.max())
        top = k - 1 if self.info.label_kind == "single" else 1
        if lo < 0 or hi > top:
            bad = lo if lo < 0 else hi
            pos = int(np.flatnonzero((labels < 0) | (labels > top))[0]) // max(1, labels[:1].size)
            raise StoreError(f"{self.path}: {split}/labels holds {bad} at sample {pos}; expected "
                             + (f"a class index in [0, {k - 1}]" if top == k - 1 else "0 or 1 (multi-hot)"))

    def map_targets(self, split: str, map_name: str) -> np.ndarray | None:
        """The class index each sample's map was computed for, int64 (N,), or None.

        None when the map records no targets (maps from annotations, teacher maps added
        before satkit recorded them). A value of ``TARGET_UNKNOWN`` (-1) marks a sample
        whose target was not recorded (a split kept from such an older map).
        """
        if map_name not in self.info.maps:
            self.array(split, "saliency", map_name)  # raises, listing the maps
        if not self.info.maps[map_name].targets:
            return None
        return self.load(split, TARGETS_GROUP, map_name)

    def select_splits(self, splits: Sequence[str] | None, option: str = "--splits") -> list[str]:
        """The store's splits in canonical order, or those of ``splits`` (each must exist)."""
        order = sorted(self.info.splits, key=lambda s: SPLIT_ORDER.get(s, 99))
        for s in splits or ():
            if s not in self.info.splits:
                raise StoreError(f"{option}: {self.path} has no split {s!r} (it has: {', '.join(order)})")
        return [s for s in order if not splits or s in splits]

    def has_boxes(self, split: str) -> bool:
        return array_path(split, "boxes") in self.info.digests

    # ----------------------------------------------------------------------- readers and writers together
    # docs/store-format.md, "Readers and writers together": a reader pins the arrays it
    # uses to the digests recorded when it opened the store (``check_unchanged``), and holds
    # the store's reader lock so that `satdata gc` leaves the versions it reads in place.

    def array_key(self, split: str, field_name: str, map_name: str | None = None) -> str:
        """The path of the array that ``array(split, field_name, map_name)`` reads
        ('train/images', 'train/saliency/cam.1a2b3c4d': a map by its array name)."""
        if field_name in ("saliency", TARGETS_GROUP):
            if map_name not in self.info.maps:
                self.array(split, field_name, map_name)  # raises, listing the maps
            map_name = self.info.maps[map_name].array_name  # type: ignore[index]
        return array_path(split, field_name, map_name)

    def hold_reader_lock(self, timeout: float | None = None) -> bool:
        """Hold the store's reader lock (shared) for the life of this Store object.

        `satdata gc` refuses to remove anything while a reader holds it, so the arrays this
        reader opened stay on disk even after a map is replaced. The lock is a shared
        ``flock`` on the store's first split directory (:func:`reader_lock_dir`): it needs
        only read permission and creates no file. Waits up to ``timeout`` seconds while
        `satdata gc` is removing (default READER_LOCK_WAIT; then StoreError naming it). Returns False where no lock
        is possible (a .zip or URL store, which satkit never changes in place, or a file
        system without ``flock``): ``check_unchanged`` still stops a reader whose arrays went.
        """
        if getattr(self, "_reader_lock", None) is not None:
            return True
        root = self._local_root
        if root is None:
            return False
        lock_dir = reader_lock_dir(root, self.info)
        timeout = READER_LOCK_WAIT if timeout is None else timeout
        try:
            fd = flock_dir(lock_dir, exclusive=False, timeout=timeout)
        except LockBusy as e:
            raise StoreError(f"{self.path}: `satdata gc` is removing superseded arrays ({describe_holders(e.holders)}) "
                             f"and has not finished in {timeout:g} s; try again when it has") from None
        if fd is None:
            return False
        import weakref

        self._reader_lock = weakref.finalize(self, os.close, fd)  # closing the fd releases the lock
        return True

    def release_reader_lock(self) -> None:
        """Release the reader lock taken by ``hold_reader_lock`` (also released when the process ends)."""
        fin = getattr(self, "_reader_lock", None)
        if fin is not None:
            fin()
            self._reader_lock = None

    def check_unchanged(self, paths: Sequence[str], *, chunks: Sequence[tuple["zarr.Array", Sequence[int]]] = ()) -> None:
        """Raise StoreChangedError when an array this reader uses is no longer what it opened.

        ``paths`` are array paths (:meth:`array_key`). The store's root ``zarr.json`` is read
        afresh (not zarr's cached attributes; re-parsed only when the file changed): an array
        the attributes still name must have the content digest (``sha256``) recorded when
        this Store was opened (the same content rebuilt is no change); an array they no
        longer name (a superseded version of a replaced map) must still exist. ``chunks``:
        (array, chunk indices) just read: each chunk the digests say was written must still
        have its file, so a chunk deleted under a reader is never taken for its fill value.
        Call it after reading and before using what was read: a read that overlapped a
        change is then never used. A .zip store is read through the handle opened with it
        and is not checked.
        """
        root = self._local_root
        if root is None and "://" not in self.path:
            return  # a zip: its open handle keeps the version it opened
        current = self._current_digests()
        for p in paths:
            pinned = (self.info.digests.get(p) or {}).get("sha256")
            rec = current.get(p)
            if isinstance(rec, Mapping):
                now = rec.get("sha256")
                if pinned is not None and now != pinned:
                    raise StoreChangedError(
                        f"{self.path}: {p} changed after this process opened the store (sha256 {str(pinned)[:12]}... "
                        f"then, {str(now)[:12]}... now: the store was rebuilt or replaced); stopping rather than "
                        "mixing two versions of the data")
            elif not self._key_exists(f"{p}/zarr.json"):
                raise StoreChangedError(
                    f"{self.path}: {p} is gone since this process opened the store (the store was rebuilt or "
                    "replaced, or `satdata gc` removed a replaced map's old version); stopping rather than "
                    "reading fill values")
        if root is None:
            return
        for arr, ids in chunks:
            want = self._chunk_digests(arr) or []
            step = int(arr.chunks[0]) if arr.ndim else 1
            for i in ids:
                if 0 <= i < len(want) and want[i] != "absent" and not (root / chunk_key(arr, i)).is_file():
                    a, b = i * step, min(arr.shape[0], (i + 1) * step)
                    raise StoreChangedError(
                        f"{self.path}: array {arr.path} chunk {i} (samples [{a}, {b})) is missing: deleted after "
                        "this process opened the store; stopping rather than reading fill values "
                        "(`satdata verify` lists every damaged chunk)")

    def _current_digests(self) -> Mapping[str, Any]:
        """The 'digests' of the root zarr.json as it is on disk now (cached while the file is unchanged)."""
        root = self._local_root
        cached = getattr(self, "_pin_seen", None)
        try:
            if root is not None:
                st = os.stat(root / "zarr.json")
                sig: Any = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if cached is not None and cached[0] == sig:
                    return cached[1]
                raw = (root / "zarr.json").read_bytes()
            else:
                from zarr.core.buffer import default_buffer_prototype
                from zarr.core.sync import sync

                buf = sync((self.group.store_path / "zarr.json").get(prototype=default_buffer_prototype()))
                if buf is None:
                    raise FileNotFoundError("no zarr.json")
                raw = sig = buf.to_bytes()
                if cached is not None and cached[0] == sig:
                    return cached[1]
            digests = json.loads(raw)["attributes"][ATTR_KEY]["digests"]
            if not isinstance(digests, Mapping):
                raise TypeError("digests is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreChangedError(f"{self.path}: the store's zarr.json cannot be read any more ({type(e).__name__}: "
                                    f"{str(e)[:80]}): the store was removed or replaced after this process opened it; "
                                    "stopping") from None
        self._pin_seen = (sig, digests)
        return digests

    def _key_exists(self, key: str) -> bool:
        root = self._local_root
        if root is not None:
            return (root / key).is_file()
        from zarr.core.sync import sync

        return bool(sync((self.group.store_path / key).exists()))


# --------------------------------------------------------------------------- readers and writers together
# The reader lock (docs/store-format.md, "Readers and writers together"): readers hold a
# shared flock on the store's first split directory; `satdata gc` takes it exclusively.

# How long a reader waits for a running `satdata gc` to finish before giving up.
READER_LOCK_WAIT = 60.0


class StoreChangedError(StoreError):
    """An array a reader uses changed or went away after the reader opened the store."""


class LockBusy(Exception):
    """A lock is held by others (``holders``: their process ids, where the system says)."""

    def __init__(self, holders: list[int]) -> None:
        super().__init__(f"held by {holders}")
        self.holders = holders


def reader_lock_dir(root: str | Path, info: StoreInfo) -> Path:
    """The directory whose flock is the store's reader lock: its first split (``train/`` where present)."""
    split = sorted(info.splits, key=lambda s: SPLIT_ORDER.get(s, 99))[0]
    return Path(root) / split


def flock_dir(d: Path, *, exclusive: bool, timeout: float = 0.0) -> int | None:
    """An fd of directory ``d`` holding a shared or exclusive flock on it (closing it releases).

    None where this system cannot lock it (not POSIX, unreadable, a file system without
    flock). Raises LockBusy when others still hold a conflicting lock after ``timeout``
    seconds (0: ask once).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    import time

    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except OSError:  # e.g. ENOLCK: no locking here
            os.close(fd)
            return None
        if time.monotonic() >= deadline:
            holders = lock_holders(d)
            os.close(fd)
            raise LockBusy(holders)
        time.sleep(0.05)


def lock_holders(path: Path) -> list[int]:
    """Process ids holding a flock on ``path`` (Linux ``/proc/locks``); [] where not known."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: set[int] = set()
    for line in text.splitlines():
        parts = line.split()  # "1: FLOCK  ADVISORY  READ  1234 08:01:5678 0 EOF" ("->" marks a waiter)
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want and parts[4].isdigit():
            pids.add(int(parts[4]))
    return sorted(pids)


def describe_holders(pids: Sequence[int]) -> str:
    """'process 1234: sattrain run ...' for the first holder (and how many more), or 'another process'."""
    if not pids:
        return "another process"
    try:
        cmd = Path(f"/proc/{pids[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = ""
    if len(cmd) > 80:
        cmd = cmd[:77] + "..."
    more = f" and {len(pids) - 1} more" if len(pids) > 1 else ""
    return f"process {pids[0]}" + (f": {cmd}" if cmd else "") + more


def _open_group(path: str, mode: str, storage_options: Mapping[str, Any] | None = None) -> "zarr.Group":
    from satdata import remote

    if remote.is_url(path):
        if mode != "r":
            raise StoreError(f"{remote.redact(path)}: stores at URLs are read-only in satkit")
        return remote.open_group(path, storage_options)
    if storage_options:
        raise StoreError(f"--storage-option: {path} is a local path; storage options apply to URLs only")
    p = Path(path)
    if remote.is_zip(path):
        if not p.is_file():
            raise StoreError(f"{path}: no such store")
        if mode != "r":
            raise StoreError(f"{path}: a packed store (.zip) is read-only; unpack it to change it")
        import zipfile

        from zarr.storage import ZipStore

        try:
            return zarr.open_group(ZipStore(path, mode="r"), mode="r")
        except zipfile.BadZipFile as e:
            raise StoreError(f"{path}: not a readable zip file ({e})") from None
        except (FileNotFoundError, KeyError):
            raise StoreError(f"{path}: not a satkit store (no zarr.json in the zip)") from None
    if not p.exists():
        raise StoreError(f"{path}: no such store")
    if not (p / "zarr.json").is_file():
        raise StoreError(f"{path}: not a satkit store (no zarr.json: not a Zarr v3 group)")
    try:
        return zarr.open_group(path, mode=mode)
    except Exception as e:  # zarr raises several types for foreign or damaged metadata
        raise StoreError(f"{path}: not a satkit store ({type(e).__name__}: {e})") from None


def read_info(group: "zarr.Group", where: str) -> StoreInfo:
    attrs = dict(group.attrs)
    if ATTR_KEY not in attrs:
        raise StoreError(
            f"{where}: not a satkit store (no '{ATTR_KEY}' attribute in zarr.json; "
            "a Zarr group from another tool, or an unfinished build)"
        )
    return StoreInfo.from_json(attrs[ATTR_KEY], where)  # type-checks and checks names


def validate(group: "zarr.Group", info: StoreInfo, where: str) -> None:
    """Check that every array the attributes promise exists with consistent shapes, and
    that every name that becomes a path is a plain name (:func:`check_names`)."""
    check_names(info, where)
    if info.label_kind not in LABEL_KINDS:
        raise StoreError(f"{where}: unknown label kind {info.label_kind!r}")
    if not info.splits:
        raise StoreError(f"{where}: the store has no splits")
    h, w = info.image_size
    for m in info.maps.values():
        map_dtype(m.encoding)
    for split, n in info.splits.items():
        expect: dict[str, tuple[tuple[int, ...] | None, str | None]] = {
            array_path(split, "images"): ((n, h, w, 3), "uint8"),
            array_path(split, "ids"): ((n,), None),
            array_path(split, "labels"): (
                ((n,), "int64") if info.label_kind == "single" else ((n, len(info.classes)), "uint8")
            ),
        }
        for m in info.maps.values():
            expect[array_path(split, "saliency", m.array_name)] = (
                map_shape(m, n, info.image_size),
                str(map_dtype(m.encoding)),
            )
            if m.targets:
                expect[array_path(split, TARGETS_GROUP, m.array_name)] = ((n,), TARGETS_DTYPE)
        for p, (shape, dtype) in expect.items():
            try:
                arr = group[p]
            except KeyError:
                raise StoreError(f"{where}: lacks array {p}") from None
            except Exception as e:  # a damaged or crafted zarr.json of the array
                raise StoreError(f"{where}: array {p} has unreadable metadata ({type(e).__name__}: "
                                 f"{str(e)[:120]})") from None
            if not isinstance(arr, zarr.Array):
                raise StoreError(f"{where}: {p} is a group, not an array")
            if shape is not None and tuple(arr.shape) != shape:
                raise StoreError(f"{where}: array {p} has shape {tuple(arr.shape)}, expected {shape}")
            if dtype is not None and str(arr.dtype) != dtype:
                raise StoreError(f"{where}: array {p} has dtype {arr.dtype}, expected {dtype}")


def open_store(path: str | Path, *, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> Store:
    """Open and validate a store: a directory, a .zip, or a URL (``https://``, ``s3://``, any fsspec protocol).

    URLs and .zip files open read-only; ``storage_options`` (fsspec's: ``endpoint_url``,
    ``key``, ``secret``, ``anon``, ``headers``...) reach the URL's backend (satdata/remote.py).
    Raises StoreError naming the path and the problem: no such store, unreachable, no
    credentials, forbidden, not found, not a Zarr group, not a satkit store, a newer format
    version, or a missing or misshapen array.
    """
    from satdata import remote

    where = str(path)
    group = _open_group(where, mode, storage_options)
    shown = remote.redact(where)
    try:
        info = read_info(group, shown)
        validate(group, info, shown)
    except StoreError:
        raise
    except Exception as e:  # a network failure while reading the metadata of the arrays
        if remote.is_url(where) and remote.network_problem(e) is not None:
            raise remote.classify(e, where) from None
        raise
    return Store(where, group, info)


# --------------------------------------------------------------------------- writing


def image_compressors() -> Any:
    # Images are stored uncompressed: natural images shrink little under a fast codec,
    # and loading a split should run at disk speed (docs/store-format.md, "Compression";
    # BENCHMARKS.md section 1 times the loading).
    return None


def map_compressors() -> Any:
    # Binary and quantised maps are mostly runs: zstd shrinks them many times.
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=3)


class StoreWriter:
    """Creates a store's arrays and, last, its attributes. Used by every writer of stores.

    The writer never makes a store look complete before ``finish``: the 'satkit'
    attribute is the commit record.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        dataset: str,
        classes: list[str],
        image_size: tuple[int, int],
        label_kind: str,
        maps: dict[str, MapInfo],
        hflip: bool = True,
        _mode: str = "w-",
    ) -> None:
        if label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {LABEL_KINDS}")
        for key, m in maps.items():
            map_dtype(m.encoding)
            if not is_plain_name(key) or not is_plain_name(m.array_name):  # they become paths
                raise StoreError(f"{path}: map name {key!r} is not a plain name (letters, digits, ._+-)")
        self.path = str(path)
        self.group = zarr.open_group(self.path, mode=_mode)
        self.dataset = dataset
        self.classes = list(classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.label_kind = label_kind
        self.maps = dict(maps)
        if any(m.targets for m in self.maps.values()):
            raise ValueError("StoreWriter writes no map targets; add teacher maps with satdata.addmap")
        if not isinstance(hflip, bool):
            raise ValueError(f"hflip must be a bool, got {hflip!r}")
        self.hflip = hflip
        self.chunk = samples_per_chunk(self.image_size)
        self.counts: dict[str, int] = {}
        self.split_chunk: dict[str, int] = {}
        self.has_boxes: set[str] = set()

    @classmethod
    def reopen(cls, path: str | Path, **kw: Any) -> "StoreWriter":
        """The writer of a store still being built (arrays created by ``create_split``, no
        'satkit' attribute yet), opened again: by the tasks of a distributed build, each in
        its own process, and by the step that finishes it. ``kw``: the same arguments as the
        writer that created it. Splits are those whose images array exists."""
        self = cls(path, _mode="r+", **kw)
        for split in SPLITS:
            p = array_path(split, "images")
            try:
                arr = self.group[p]
            except KeyError:
                continue
            self.split_chunk[split] = write_unit(arr)  # type: ignore[arg-type]
            self.counts[split] = int(arr.shape[0])  # type: ignore[union-attr]
            if array_path(split, "boxes") in self.group:
                self.has_boxes.add(split)
        return self

    def create_split(self, split: str, n: int) -> None:
        """Create a split's arrays for up to n samples (shrunk by ``close_split``)."""
        if split not in SPLITS:
            raise StoreError(f"{self.path}: unknown split {split!r} (one of {', '.join(SPLITS)})")
        h, w = self.image_size
        n = max(n, 1)
        # A split smaller than one chunk gets a chunk of its own size: zarr stores boundary
        # chunks whole, so a 300-sample split in 512-sample chunks would waste 40%.
        c = self.split_chunk[split] = min(self.chunk, n)
        g = self.group
        g.create_array(array_path(split, "images"), shape=(n, h, w, 3), dtype="uint8",
                       chunks=(c, h, w, 3), compressors=image_compressors(), fill_value=0)
        if self.label_kind == "single":
            g.create_array(array_path(split, "labels"), shape=(n,), dtype="int64",
                           chunks=(max(c, 4096),), fill_value=-1)
        else:
            k = len(self.classes)
            g.create_array(array_path(split, "labels"), shape=(n, k), dtype="uint8",
                           chunks=(max(c, 4096), k), fill_value=0, compressors=map_compressors())
        g.create_array(array_path(split, "ids"), shape=(n,), dtype=str, chunks=(max(c, 4096),))
        for m in self.maps.values():
            shape = map_shape(m, n, self.image_size)
            g.create_array(array_path(split, "saliency", m.array_name), shape=shape,
                           dtype=map_dtype(m.encoding), chunks=(c,) + shape[1:],
                           compressors=map_compressors(), fill_value=0)
        self.counts[split] = 0

    def write(
        self,
        split: str,
        start: int,
        images: np.ndarray,
        labels: np.ndarray,
        ids: list[str],
        maps: Mapping[str, np.ndarray],
    ) -> None:
        """Write samples [start, start + len(images)); callers write whole chunks in order."""
        stop = start + len(images)
        g = self.group
        g[array_path(split, "images")][start:stop] = images
        g[array_path(split, "labels")][start:stop] = labels
        g[array_path(split, "ids")][start:stop] = np.asarray(ids, dtype=object).astype(str)
        for name, m in self.maps.items():
            g[array_path(split, "saliency", m.array_name)][start:stop] = maps[name]
        self.counts[split] = max(self.counts[split], stop)

    def write_boxes(self, split: str, boxes: np.ndarray) -> None:
        """Write a split's boxes: float32 (M, 6) [sample, class, x1, y1, x2, y2]."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 6)
        self.group.create_array(array_path(split, "boxes"), shape=boxes.shape, dtype="float32",
                                chunks=(max(1, min(len(boxes), 65536)), 6),
                                compressors=map_compressors(), fill_value=0)
        if len(boxes):
            self.group[array_path(split, "boxes")][...] = boxes
        self.has_boxes.add(split)

    def close_split(self, split: str, n: int) -> None:
        """Shrink a split's arrays to the n samples actually written."""
        g = self.group
        paths = [array_path(split, f) for f in ("images", "labels", "ids")]
        paths += [array_path(split, "saliency", m.array_name) for m in self.maps.values()]
        for p in paths:
            arr = g[p]
            arr.resize((n,) + tuple(arr.shape[1:]))
        self.counts[split] = n

    def finish(self, provenance: dict[str, Any], progress: Any = None) -> StoreInfo:
        """Compute digests, then write the 'satkit' attribute: the store is now complete."""
        info = StoreInfo(
            format_version=FORMAT_VERSION,
            dataset=self.dataset,
            classes=self.classes,
            image_size=self.image_size,
            label_kind=self.label_kind,
            splits=dict(sorted(self.counts.items(), key=lambda kv: SPLIT_ORDER.get(kv[0], 99))),
            maps=self.maps,
            provenance=provenance,
            digests={},
            hflip=self.hflip,
        )
        paths = all_arrays(info) + [array_path(s, "boxes") for s in sorted(self.has_boxes)]
        digests = {}
        for p in paths:
            digests[p] = digest_array(self.group[p])
            if progress is not None:
                progress(p)
        info = replace(info, digests=digests)
        validate(self.group, info, self.path)
        self.group.attrs[ATTR_KEY] = info.to_json()
        return info


def write_info(path: str | Path, info: StoreInfo) -> None:
    """Replace a local store's 'satkit' attribute atomically (write aside, then rename).

    This is the commit step of every change to a finished store (e.g. adding a map):
    arrays are written first under names the attributes do not mention yet, then this
    one rename switches the store over, so a kill at any moment leaves either the old or
    the new store, both complete and verifiable.
    """
    import os

    meta_path = Path(path) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("attributes", {})[ATTR_KEY] = info.to_json()
    tmp = meta_path.with_name(f".zarr.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
