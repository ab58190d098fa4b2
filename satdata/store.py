"""The satkit store format, versions 1 and 2: the one module that knows array names and attributes.

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
sequential whole-file reads (see ``samples_per_chunk``). Stores of images larger than
about 100x100 (ImageNet at 224x224) put their images and maps in shards, Zarr's
sharding codec: one file of many one-sample chunks and an index (format version 2, see
``sample_layout``); smaller images keep version 1's one chunk per file. Each map records an encoding,
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

import functools
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import zarr
from zarr.storage import LocalStore

from satdata.errors import StoreError

# The newest format version this satkit reads and writes. A store says 2 where its images
# and maps are sharded (``uses_shards``), and 1 otherwise, so that stores of small images
# stay readable by every satkit that reads version 1 (docs/store-format.md, "Versioning").
FORMAT_VERSION = 2
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



def _encoding_of(info: Any) -> str:
    """An encoding name from a name, or from anything with ``.encoding`` (MapInfo, a codec)."""
    enc = info if isinstance(info, str) else getattr(info, "encoding", None)
    if enc not in ENCODINGS:
        raise StoreError(f"unknown map encoding {enc!r} (one of {', '.join(ENCODINGS)})")
    return enc


def _is_numpy(a: Any) -> bool:
    return isinstance(a, (np.ndarray, np.generic)) or not hasattr(a, "permute")


def encode_map(S: Any, encoding: str) -> Any:
    """Maps in S units to a store's integers (the inverse of ``decode_map`` up to rounding),
    numpy arrays or torch tensors alike, in the store's layout (N, H, W) or (N, H, W, C):

    binary uint8 (S > 0); unit uint8 round(255 S), S in [0, 1]; signed int8 round(127 S),
    S in [-1, 1]. Values outside the range are clipped. A numpy array is computed in
    float32; a torch tensor in its own dtype, on its own device (torch is not imported
    here: the tensor's methods do the work).
    """
    encoding = _encoding_of(encoding)
    if not _is_numpy(S):  # a torch tensor
        if encoding == "unit":
            return (S * 255).round().clamp(0, 255).byte()
        if encoding == "signed":
            return (S * 127).round().clamp(-127, 127).char()
        return (S > 0).byte()
    S = np.asarray(S)
    if S.dtype == bool or encoding == "binary":
        return (S > 0).astype(np.uint8) if S.dtype != bool else S.astype(np.uint8)
    S = S.astype(np.float32)
    if encoding == "unit":
        return np.clip(np.rint(S * 255), 0, 255).astype(np.uint8)
    return np.clip(np.rint(S * 127), -127, 127).astype(np.int8)


def decode_map(q: Any, info: Any) -> Any:
    """Stored map values q to S = scale * q + offset as float32 (``MapInfo.affine``), any layout.

    ``info``: a MapInfo, anything with ``.encoding`` (sattrain's MapCodec), or the encoding's
    name. q: a numpy array (a new float32 array) or a torch tensor (a new float32 tensor
    on q's device, computed in place after the conversion; torch is not imported here).
    """
    _, scale, offset = ENCODINGS[_encoding_of(info)]
    if not _is_numpy(q):  # a torch tensor
        return q.float().mul_(scale).add_(offset)
    return np.asarray(q).astype(np.float32) * np.float32(scale) + np.float32(offset)


# Target bytes of one chunk of images: big enough that a split is a few hundred files at
# most, small enough that a chunk decodes quickly.
CHUNK_TARGET_BYTES = 2 * 1024 * 1024
# Per-file digests are truncated: they locate corruption, the full sha256 guards content.
CHUNK_DIGEST_HEX = 16
# Sharding (format version 2). Images of more than SHARD_ABOVE_SAMPLE_BYTES (32 KiB, about
# 104x104 pixels: a 2 MiB chunk would hold fewer than 64 of them) are sharded: one-sample
# chunks inside shards of the power of two of samples nearest below SHARD_TARGET_BYTES of
# images. At 224x224 that is 512 samples, 77 MB per shard, so ImageNet's 1,281,167 training
# images are 2,503 files per array instead of 160,146 chunks; docs/store-format.md says why
# this size (a shard is the unit of writing, of streaming, of digests and of transfers).
SHARD_ABOVE_SAMPLE_BYTES = CHUNK_TARGET_BYTES // 64
SHARD_TARGET_BYTES = 128 * 1024 * 1024


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


# --------------------------------------------------------------------------- files that are not files


def special_kind(mode: int) -> str | None:
    """None for a regular file, else what the st_mode ``mode`` is ('a FIFO', 'a directory', ...)."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def not_regular(shown: str, kind: str) -> StoreError:
    """The one error for a store's file that is not a regular file (``shown`` names it)."""
    return StoreError(f"{shown} is not a regular file ({kind}); the store is damaged (`satdata verify` lists "
                      "every damaged file)")


def check_regular(path: str | os.PathLike, shown: str | None = None) -> None:
    """Refuse (StoreError naming ``shown``, default ``path``) a store file that exists and is
    not a regular file: a FIFO would block its reader forever, a device stream without end.
    A missing file (or a dangling link) passes: the caller tells absent from damaged."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    kind = special_kind(mode)
    if kind is not None:
        raise not_regular(shown or str(path), kind)


def open_regular(path: str | os.PathLike, shown: str | None = None) -> int:
    """A descriptor of the store file ``path`` opened for reading, refused (StoreError naming
    ``shown``, default ``path``) unless it is a regular file: checked before the open (a device
    is never opened) and after it, on the descriptor (the open is non-blocking: a FIFO put
    there meanwhile cannot block it). OSError (FileNotFoundError...) where it cannot be opened."""
    check_regular(path, shown)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        kind = special_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise not_regular(shown or str(path), kind)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, shown: str | None = None, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`), at most ``limit`` + 1 of them."""
    with os.fdopen(open_regular(path, shown), "rb") as f:
        return f.read() if limit is None else f.read(limit + 1)


class RegularLocalStore(LocalStore):
    """zarr's LocalStore, reading only regular files (:func:`check_regular`): zarr's own opens
    a FIFO at a chunk's or a zarr.json's path and blocks forever, reads a device without end."""

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        check_regular(self.root / key, f"{self.root}: {key}")
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            check_regular(self.root / key, f"{self.root}: {key}")
        return await super().get_partial_values(prototype, key_ranges)


def open_local_group(path: str | Path, mode: str = "r") -> "zarr.Group":
    """``zarr.open_group`` of the local directory ``path``, whose files are read only where
    they are regular files (a FIFO, a device, a directory at a file's key: a StoreError)."""
    return zarr.open_group(RegularLocalStore(path, read_only=mode == "r"), mode=mode)


# --------------------------------------------------------------------------- names


FIELDS = ("images", "labels", "ids", "boxes")  # <split>/<field>: one array per split
MAPS_GROUP = "saliency"  # <split>/saliency/<map array name>: the map's stored values
TARGETS_GROUP = "map_targets"  # <split>/map_targets/<map array name>: int64 (N,)
# The groups whose every entry belongs to satkit: one array per map (version), named by
# MapInfo.array_name; anything there the attributes do not name is a superseded version
# or a leftover of an interrupted change (satdata gc).
MAP_GROUPS = (MAPS_GROUP, TARGETS_GROUP)
TARGETS_DTYPE = "int64"
TARGET_UNKNOWN = -1  # the target class of a sample whose map came without one


def array_path(split: str, field_name: str, map_name: str | None = None) -> str:
    """The path of an array inside the store: 'train/images', 'val/saliency/mask', ...

    ``field_name`` "saliency" and "map_targets" take the map's *array* name
    (``MapInfo.array_name``): 'train/saliency/cam.1a2b3c4d', 'train/map_targets/cam.1a2b3c4d'.
    """
    if field_name in MAP_GROUPS:
        if not map_name:
            raise ValueError(f"a {field_name} array needs a map name")
        return f"{split}/{field_name}/{map_name}"
    if field_name not in FIELDS:
        raise ValueError(f"unknown store field {field_name!r}")
    return f"{split}/{field_name}"


class ArrayPath(NamedTuple):
    """An array path taken apart: ('train', 'images', None), ('val', 'saliency', 'cam.1a2b3c4d')."""

    split: str
    field: str  # one of FIELDS, or a group of MAP_GROUPS
    map_name: str | None = None  # the array name under a map group

    def __str__(self) -> str:
        return array_path(self.split, self.field, self.map_name)


def parse_array_path(path: str) -> ArrayPath | None:
    """The inverse of ``array_path``: 'train/images' -> ArrayPath('train', 'images', None),
    'val/saliency/cam' -> ArrayPath('val', 'saliency', 'cam'); None for anything that is not
    an array path (the split is not checked: see ``path_split``)."""
    parts = str(path).split("/")
    if len(parts) == 2 and parts[1] in FIELDS:
        return ArrayPath(parts[0], parts[1])
    if len(parts) == 3 and parts[1] in MAP_GROUPS:
        return ArrayPath(parts[0], parts[1], parts[2])
    return None


def path_split(path: str) -> str:
    """The split an array path (or any path inside a split's group) is under: its first part."""
    return str(path).split("/", 1)[0]


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
    """Samples per chunk (unsharded layout): a power of two near CHUNK_TARGET_BYTES of images, in [8, 1024]."""
    per_sample = max(1, image_size[0] * image_size[1] * channels)
    n = max(1, CHUNK_TARGET_BYTES // per_sample)
    return int(min(1024, max(8, 2 ** int(math.floor(math.log2(n))))))


def uses_shards(image_size: tuple[int, int]) -> bool:
    """Whether a store of images of ``image_size`` shards its images and maps (format version 2)."""
    return image_size[0] * image_size[1] * 3 > SHARD_ABOVE_SAMPLE_BYTES


def samples_per_shard(image_size: tuple[int, int]) -> int:
    """Samples per shard: the power of two nearest below SHARD_TARGET_BYTES of images."""
    per_sample = max(1, image_size[0] * image_size[1] * 3)
    return 2 ** int(math.floor(math.log2(max(1, SHARD_TARGET_BYTES // per_sample))))


@dataclass(frozen=True)
class Layout:
    """How a split's per-sample arrays (images, maps) are cut along N: chunks of ``chunk``
    samples, each its own file (``shard`` None), or inside shard files of ``shard`` samples."""

    chunk: int
    shard: int | None = None

    @property
    def unit(self) -> int:
        """Samples per file: the write unit (``ArrayWriter.split_chunk``) and the unit of
        digests, streaming and transfers."""
        return self.shard or self.chunk


def sample_layout(image_size: tuple[int, int], n: int) -> Layout:
    """The layout of a split of ``n`` samples of ``image_size`` (a split smaller than one file
    gets a file of its own size: zarr stores a boundary chunk whole)."""
    n = max(1, int(n))
    if uses_shards(image_size):
        return Layout(chunk=1, shard=min(samples_per_shard(image_size), n))
    return Layout(chunk=min(samples_per_chunk(image_size), n))


def layout_of(arr: "zarr.Array") -> Layout:
    """The layout of an existing per-sample array (a map added later copies its images')."""
    return Layout(chunk=int(arr.chunks[0]), shard=int(arr.shards[0]) if arr.shards else None)


def files_per_array(n: int, image_size: tuple[int, int]) -> int:
    """Files of a split's images array (and of each map's) for ``n`` samples of ``image_size``."""
    return math.ceil(max(1, n) / sample_layout(image_size, n).unit)


def map_shape(info: MapInfo, n: int, image_size: tuple[int, int]) -> tuple[int, ...]:
    h, w = image_size
    return (n, h, w) if info.channels == 1 else (n, h, w, info.channels)


def map_dtype(encoding: str) -> np.dtype:
    if encoding not in ENCODINGS:
        raise StoreError(f"unknown map encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    return np.dtype(ENCODINGS[encoding][0])


# --------------------------------------------------------------------------- whole-file reads
# The reader's fetching machinery lives in satdata.chunkio; these are the store's way to it
# for readers outside satdata (sattrain's streaming), looked up at each call.


def is_local(arr: "zarr.Array") -> bool:
    """Whether ``arr`` lives in a directory on the local disk (``satdata.chunkio.is_local``)."""
    from satdata import chunkio

    return chunkio.is_local(arr)


def chunk_rows(arr: "zarr.Array", i: int) -> tuple[int, int]:
    """Sample range ``[a, b)`` of file ``i`` (chunk, or shard) along axis 0."""
    from satdata import chunkio

    return chunkio.chunk_rows(arr, i)


def take_rows(wanted: Any, *, concurrency: int | None = None, missing: Any = None) -> None:
    """Rows of many files at once, a bounded number in flight (``satdata.chunkio.take_rows``)."""
    from satdata import chunkio

    chunkio.take_rows(wanted, concurrency=concurrency, missing=missing)


# --------------------------------------------------------------------------- digests


def write_unit(arr: "zarr.Array") -> int:
    """Samples per stored file along axis 0: the unit a writer writes whole (the shard of
    a sharded array, else the chunk). Distributed builds split work on this unit."""
    shards = getattr(arr, "shards", None)
    return int((shards or arr.chunks)[0]) if arr.ndim else 1


def iter_chunks(arr: "zarr.Array") -> Iterator[tuple[int, int]]:
    """(start, stop) sample ranges of the files along axis 0: the chunks, or the shards of
    a sharded array (file ``i`` is ``chunk_key(arr, i)``; ``write_unit`` samples each)."""
    n = arr.shape[0]
    step = write_unit(arr)
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _canonical_bytes(block: np.ndarray) -> bytes:
    if block.dtype.kind in ("U", "O", "T"):
        return json.dumps([str(x) for x in block.tolist()], ensure_ascii=False).encode()
    return np.ascontiguousarray(block).tobytes()


def chunk_key(arr: "zarr.Array", i: int) -> str:
    """The store key of the i-th file along axis 0 (arrays are cut along N only): chunk
    ``i``, or shard ``i`` of a sharded array (zarr keys a shard like a chunk of its grid)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}"


def read_chunk_file(arr: "zarr.Array", i: int) -> bytes | None:
    """The stored (encoded) bytes of file i (chunk, or shard), or None where none was written."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(arr.store.get(chunk_key(arr, i), prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def chunk_file_digest(data: bytes | None) -> str:
    return "absent" if data is None else hashlib.sha256(data).hexdigest()[:CHUNK_DIGEST_HEX]


def digest_array(arr: "zarr.Array") -> dict[str, Any]:
    """Two digests: the meaning of the array, and the bytes of every file.

    ``sha256`` covers the decoded values (dtype, shape, C-order contents), so it does not
    depend on the codec, the chunking or the sharding, and identifies content across
    machines (manifests use it). ``chunks`` holds a short sha256 of each file as stored
    (a chunk, or a shard of a sharded array; ``chunk_size`` samples each), so ``verify``
    catches a flipped byte anywhere in a file, including the padding zarr keeps beyond the
    last sample of a boundary chunk and a shard's index, and names the file and its
    sample range. Each file is read once: its values are decoded from the bytes hashed.
    """
    return ArrayDigest(arr).result()


class ArrayDigest:
    """:func:`digest_array` computed file by file, in order, as far as asked: a build
    written by many processes hashes each file once every file before it is final, while
    the workers still decode (satdata.ranges). The array's shape must not change meanwhile."""

    def __init__(self, arr: "zarr.Array") -> None:
        from satdata import chunkio

        self.arr = arr
        self.fmt = chunkio.file_format(arr.metadata)
        self.whole = hashlib.sha256()
        self.whole.update(f"{arr.dtype}|{tuple(arr.shape)}|".encode())
        self.chunks: list[str] = []
        self.bounds = list(iter_chunks(arr))

    def advance(self, upto: int) -> None:
        """Hash every file that ends at or before sample ``upto`` and is not hashed yet."""
        from satdata import chunkio

        arr, fmt = self.arr, self.fmt
        while len(self.chunks) < len(self.bounds) and self.bounds[len(self.chunks)][1] <= upto:
            i = len(self.chunks)
            a, b = self.bounds[i]
            data = read_chunk_file(arr, i)
            if fmt is None:
                values = np.asarray(arr[a:b])
            else:
                values = np.empty((b - a,) + fmt.sample_shape, dtype=fmt.dtype)
                if data is None:
                    values[...] = fmt.fill_value
                else:
                    chunkio.decode_rows_into(fmt, data, 0, b - a, values)
            self.whole.update(_canonical_bytes(values))
            self.chunks.append(chunk_file_digest(data))

    def result(self) -> dict[str, Any]:
        self.advance(int(self.arr.shape[0]) if self.arr.ndim else 1)
        return {"sha256": self.whole.hexdigest(), "chunk_size": write_unit(self.arr), "chunks": self.chunks}


def store_digest(info: StoreInfo) -> str:
    """One sha256 over every array's digest: identifies a store's contents."""
    h = hashlib.sha256()
    for p in sorted(info.digests):
        h.update(f"{p}={info.digests[p]['sha256']};".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


def _local_dir(arr: "zarr.Array") -> Path | None:
    """The store directory of ``arr`` when it is on the local disk (zarr's LocalStore), else None."""
    from zarr.storage import LocalStore

    return Path(arr.store.root) if isinstance(arr.store, LocalStore) else None


def _file_format(arr: "zarr.Array") -> Any:
    """``chunkio.file_format`` of ``arr``, or None (zarr decodes it) for an array not in C order."""
    from satdata import chunkio

    return chunkio.file_format(arr.metadata) if arr.ndim >= 1 and arr.order == "C" else None


# Rows a reading thread takes at once: a chunk of a small-image store is one piece, a shard
# of 224x224 images (77 MB) five, so the threads share out even a two-shard split.
READ_PIECE_BYTES = 16 * 1024 * 1024


def read_rows_into(arr: "zarr.Array", start: int, stop: int, out: np.ndarray,
                   chunk_digests: Sequence[str] | None = None) -> None:
    """Read rows [start, stop) of an array into ``out`` (shape (stop - start, ...)).

    The layouts satkit writes (raw values, zstd or blosc chunks, in chunk files or in
    shards; satdata/chunkio.py) are read and decoded here, straight into ``out``, in
    pieces of about READ_PIECE_BYTES on ``chunkio.READ_THREADS`` threads: raw images with
    ``pread`` at disk speed, where zarr's general path copies each chunk two more times
    (about 3x slower for a 50,000-image split) and decodes a shard inner chunk by inner
    chunk (16x slower for 224x224 images; bench/read.py). Sharded arrays at a URL or in a
    .zip are fetched one bounded request per shard, many at once (chunkio.take_rows).
    Anything else goes through zarr.

    A file of the wrong size, a shard whose index is damaged and a chunk that does not
    decode are refused with a StoreError naming the store, the array, the file and its
    samples. A missing file reads as the fill value only where ``chunk_digests`` (the
    array's recorded file digests) says that none was written ("absent"); given digests
    that list the file, its absence is a StoreError too, never a block of zeros.
    """
    from satdata import chunkio

    if stop <= start:
        return
    fmt = _file_format(arr)
    root = _local_dir(arr)
    shown = str(root) if root is not None else str(getattr(arr.store, "path", arr.store))
    if fmt is None or (root is None and not fmt.sharded):
        try:
            out[...] = arr[start:stop]  # zarr fetches the chunks of a URL or a zip concurrently itself
        except Exception as e:  # a file zarr cannot decode: name it (network failures stay what they are)
            from satdata.remote import network_problem

            if isinstance(e, (StoreError, MemoryError)) or network_problem(e) is not None:
                raise
            raise StoreError(f"{shown}: array {arr.path} samples [{start}, {stop}) cannot be read "
                             f"({type(e).__name__}: {str(e)[:120]}); the store is damaged (`satdata verify` "
                             "locates every damaged file)") from None
        return
    u = fmt.rows
    word = chunkio.file_word(arr)

    def where(i: int) -> str:
        return f"{shown}: array {arr.path} {word} {i} (samples [{i * u}, {min(arr.shape[0], (i + 1) * u)}))"

    def listed(i: int) -> bool:
        return chunk_digests is not None and (i >= len(chunk_digests) or chunk_digests[i] != "absent")

    if root is None:  # sharded, at a URL or in a .zip
        def missing(_arr: Any, i: int) -> None:
            if listed(i):
                raise StoreError(f"{where(i)}: the file is missing; the store is damaged")

        jobs = []
        for i in range(start // u, (stop - 1) // u + 1):
            a, b = max(start, i * u), min(stop, (i + 1) * u)
            jobs.append((arr, i, np.arange(a - i * u, b - i * u), out[a - start:b - start]))
        try:
            chunkio.take_rows(jobs, missing=missing)
        except StoreError as e:  # chunkio names the array and the file; add the store
            raise (e if str(e).startswith(shown) else StoreError(f"{shown}: {e}")) from None
        return

    def piece(i: int, a: int, b: int) -> None:
        path = root / chunk_key(arr, i)
        dst = out[a - start:b - start]
        try:
            chunkio.read_local_rows_into(fmt, path, a - i * u, b - i * u, dst)
        except FileNotFoundError:  # zarr writes no file for a chunk or shard of fill values
            if listed(i):
                raise StoreError(f"{where(i)}: the file is missing ({path.name} under {arr.path}/c); the store is "
                                 "damaged") from None
            dst[...] = fmt.fill_value
        except (ValueError, RuntimeError) as e:  # damaged: a wrong size, a bad index, a chunk that does not decode
            raise StoreError(f"{where(i)}: {str(e)[:160]}; the store is damaged (`satdata verify` locates every "
                             "damaged file)") from None

    step = max(fmt.inner, (READ_PIECE_BYTES // max(1, fmt.row_bytes)) // fmt.inner * fmt.inner)
    jobs = []
    for i in range(start // u, (stop - 1) // u + 1):
        a, b = max(start, i * u), min(stop, (i + 1) * u)
        cuts = [a] + list(range(i * u + -(-(a - i * u) // step) * step, b, step)) + [b]  # at whole chunks
        for p, q in zip(cuts, cuts[1:]):
            if q > p:
                jobs.append(functools.partial(piece, i, p, q))
    chunkio.run_parallel(jobs)


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

    def __init__(self, path: str, group: "zarr.Group", info: StoreInfo,
                 arrays: Mapping[str, "zarr.Array"] | None = None) -> None:
        self.path = path
        self.group = group
        self.info = info
        self._arrays = dict(arrays or {})  # arrays opened by validate: their metadata is not read again
        self._present_checked: set[str] = set()  # arrays whose files were found present

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
        arr = self._arrays.get(p)
        if arr is None:
            try:
                arr = self._arrays[p] = self.group[p]  # type: ignore[assignment]
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
        """The recorded digests of ``arr``'s files (chunks, or shards), or None where none are
        recorded. A record of other files (another size or count: the array's zarr.json was
        changed after the digests were taken) is a StoreError: the files it lists could not be
        checked to be present, and zarr reads a missing one as zeros."""
        rec = self.info.digests.get(arr.path, {})
        want = rec.get("chunks")
        if not want or rec.get("chunk_size") is None:
            return None
        unit, n = write_unit(arr), len(list(iter_chunks(arr)))
        if rec["chunk_size"] != unit or len(want) != n:
            from satdata.chunkio import file_word

            word = file_word(arr)
            raise StoreError(f"{self.path}: array {arr.path} has {n:,} {word}s of {unit:,} samples, but its recorded "
                             f"digests list {len(want):,} of {_short(rec['chunk_size'])} (its zarr.json was changed "
                             f"after the store was written); the store is damaged (`satdata verify` reports it)")
        return want

    def _check_chunks_present(self, p: str, arr: "zarr.Array") -> None:
        """Refuse an array one of whose files (chunks, or shards) the digests list is gone.

        zarr reads a missing file as its fill value (zeros, or -1 for labels): a store
        that lost a file would train and evaluate on blank images without a word. The
        digests say which files were written; each of those must exist (a stat per file on
        a local disk, which also finds a file whose size its layout cannot have).
        """
        want = self._chunk_digests(arr)
        if not want:
            return
        from satdata import chunkio

        root = _local_dir(arr)
        fmt = _file_format(arr)
        word = chunkio.file_word(arr)
        exists: list[bool] = []
        if root is None:  # a zip or a URL: ask for every file at once (one round trip each, overlapped)
            from zarr.core.sync import sync

            keys = [chunk_key(arr, i) for i in range(len(want))]
            exists = sync(_exists_all(arr.store, keys))
        for i, (a, b) in enumerate(iter_chunks(arr)):
            if want[i] == "absent":
                continue
            if root is None:
                if exists[i]:
                    continue
                size = None
            else:
                try:
                    st = os.stat(f"{root}/{chunk_key(arr, i)}")
                except FileNotFoundError:
                    st = None
                kind = special_kind(st.st_mode) if st is not None else None
                if kind is not None:
                    raise not_regular(f"{self.path}: array {p} {word} {i} (samples [{a}, {b})): "
                                      f"{chunk_key(arr, i)}", kind)
                size = st.st_size if st is not None else None
                if size is not None and (fmt is None or fmt.size_ok(size)):
                    continue
            if size is None:
                what = "is missing"
            elif fmt is not None and fmt.codec == "plain" and not fmt.sharded:
                what = f"has {size:,} bytes, expected {fmt.chunk_bytes:,} (truncated or damaged)"
            else:
                what = f"has {size:,} bytes, which no {word} of this array can have (truncated or damaged)"
            raise StoreError(f"{self.path}: array {p} {word} {i} (samples [{a}, {b})) {what}; the store "
                             f"is damaged (`satdata verify` lists every damaged {word})")

    def load(self, split: str, field_name: str, map_name: str | None = None) -> np.ndarray:
        """Read a whole array into memory (whole files, decoded on several threads).

        A file (chunk, or shard) that is missing, truncated or does not decode is a
        StoreError naming the array, the file and its samples, never a fill value; labels are checked to be class indices
        in range (single-label) or 0/1 (multi-hot).
        """
        return self._read_all(self.array(split, field_name, map_name))

    def _read_all(self, arr: "zarr.Array") -> np.ndarray:
        """All of ``arr``, checked against its recorded file digests (see :meth:`load`); its
        files read and decoded on several threads (``read_rows_into``)."""
        digests = self._chunk_digests(arr)
        try:
            if arr.dtype.kind in "biuf" and arr.shape[0]:
                out = np.empty(arr.shape, dtype=arr.dtype)
                read_rows_into(arr, 0, arr.shape[0], out, chunk_digests=digests)
                return out
            return np.asarray(arr[...])
        except StoreError:
            raise
        except Exception as e:  # a damaged file that zarr decodes: name the first one that fails
            raise self._decode_error(arr, e) from None

    def _decode_error(self, arr: "zarr.Array", e: Exception) -> StoreError:
        """A StoreError naming the first file (chunk, or shard) of ``arr`` that cannot be read (and why)."""
        from satdata.chunkio import file_word

        for i, (a, b) in enumerate(iter_chunks(arr)):
            try:
                arr[a:b]
            except Exception as ce:
                return StoreError(f"{self.path}: array {arr.path} {file_word(arr)} {i} (samples [{a}, {b})) cannot "
                                  f"be read ({type(ce).__name__}: {str(ce)[:120]}); the store is damaged")
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
        (array, file indices) just read (``iter_chunks`` order: chunks, or the shards of a
        sharded array): each file the digests say was written must still exist, so a file
        deleted under a reader is never taken for its fill value.
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
        from satdata.chunkio import file_word

        for arr, ids in chunks:
            want = self._chunk_digests(arr) or []
            step = write_unit(arr)
            for i in ids:
                if 0 <= i < len(want) and want[i] != "absent" and not os.path.isfile(f"{root}/{chunk_key(arr, i)}"):
                    a, b = i * step, min(arr.shape[0], (i + 1) * step)
                    raise StoreChangedError(
                        f"{self.path}: array {arr.path} {file_word(arr)} {i} (samples [{a}, {b})) is missing: deleted "
                        "after this process opened the store; stopping rather than reading fill values "
                        f"(`satdata verify` lists every damaged {file_word(arr)})")

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
                raw = read_regular(root / "zarr.json", f"{self.path}: zarr.json")
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
            from satdata.remote import METADATA_LIMIT

            with zipfile.ZipFile(path) as zf:  # zarr reads metadata whole: no zarr.json bomb
                big = next((i for i in zf.infolist() if i.filename.rsplit("/", 1)[-1] == "zarr.json"
                            and i.file_size > METADATA_LIMIT), None)
            if big is not None:
                raise StoreError(f"{path}: {big.filename} inflates to {big.file_size:,} bytes, far more than "
                                 "a store's metadata; not a satkit store (a zip bomb?)")
            return zarr.open_group(ZipStore(path, mode="r"), mode="r")
        except StoreError:
            raise
        except zipfile.BadZipFile as e:
            raise StoreError(f"{path}: not a readable zip file ({e})") from None
        except (FileNotFoundError, KeyError):
            raise StoreError(f"{path}: not a satkit store (no zarr.json in the zip)") from None
        except Exception as e:  # a crafted zarr.json in the zip: zarr raises many types
            raise StoreError(f"{path}: not a satkit store ({type(e).__name__}: {str(e)[:160]})") from None
    if not p.exists():
        raise StoreError(f"{path}: no such store")
    if not (p / "zarr.json").exists():
        raise StoreError(f"{path}: not a satkit store (no zarr.json: not a Zarr v3 group)")
    try:
        return open_local_group(path, mode=mode)
    except StoreError:
        raise
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


def validate(group: "zarr.Group", info: StoreInfo, where: str) -> dict[str, "zarr.Array"]:
    """Check that every array the attributes promise exists with consistent shapes, and
    that every name that becomes a path is a plain name (:func:`check_names`). Returns
    the arrays it opened, by path (a Store keeps them: each array's metadata read once)."""
    check_names(info, where)
    if info.label_kind not in LABEL_KINDS:
        raise StoreError(f"{where}: unknown label kind {info.label_kind!r}")
    if not info.splits:
        raise StoreError(f"{where}: the store has no splits")
    h, w = info.image_size
    for m in info.maps.values():
        map_dtype(m.encoding)
    expect: dict[str, tuple[tuple[int, ...] | None, str | None]] = {}
    for split, n in info.splits.items():
        expect[array_path(split, "images")] = ((n, h, w, 3), "uint8")
        expect[array_path(split, "ids")] = ((n,), None)
        expect[array_path(split, "labels")] = (
            ((n,), "int64") if info.label_kind == "single" else ((n, len(info.classes)), "uint8"))
        for m in info.maps.values():
            expect[array_path(split, "saliency", m.array_name)] = (
                map_shape(m, n, info.image_size),
                str(map_dtype(m.encoding)),
            )
            if m.targets:
                expect[array_path(split, TARGETS_GROUP, m.array_name)] = ((n,), TARGETS_DTYPE)
    found = _open_members(group, list(expect))
    opened: dict[str, zarr.Array] = {}
    for p, (shape, dtype) in expect.items():
        arr = found[p]
        if isinstance(arr, KeyError):
            raise StoreError(f"{where}: lacks array {p}")
        if isinstance(arr, StoreError):  # a file there that cannot be read safely (a FIFO...)
            raise arr
        if isinstance(arr, Exception):  # a damaged or crafted zarr.json of the array
            raise StoreError(f"{where}: array {p} has unreadable metadata ({type(arr).__name__}: "
                             f"{str(arr)[:120]})")
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{where}: {p} is a group, not an array")
        if shape is not None and tuple(arr.shape) != shape:
            raise StoreError(f"{where}: array {p} has shape {tuple(arr.shape)}, expected {shape}")
        if dtype is not None and str(arr.dtype) != dtype:
            raise StoreError(f"{where}: array {p} has dtype {arr.dtype}, expected {dtype}")
        opened[p] = arr
    return opened


def _open_members(group: "zarr.Group", paths: Sequence[str]) -> dict[str, Any]:
    """``group[p]`` for every path, their metadata read at once (one round trip over a
    network, not one per array); the exception instead where one cannot be opened."""
    import asyncio

    from zarr.core.array import AsyncArray
    from zarr.core.sync import sync

    async def all_of() -> list[Any]:
        return await asyncio.gather(*(group._async_group.getitem(p) for p in paths), return_exceptions=True)

    out: dict[str, Any] = {}
    for p, obj in zip(paths, sync(all_of())):
        if isinstance(obj, BaseException) and not isinstance(obj, Exception):
            raise obj
        out[p] = zarr.Array(obj) if isinstance(obj, AsyncArray) else zarr.Group(obj) if not isinstance(
            obj, Exception) else obj
    return out


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
        arrays = validate(group, info, shown)
        if remote.is_url(where):  # zarr's whole-file reads of a chunk: at most what the chunk can hold
            from satdata.chunkio import chunk_limit

            root = str(getattr(group.store, "path", "")).rstrip("/")
            remote.bound_file_reads(getattr(group.store, "fs", None),
                                    {f"{root}/{p}" if root else p: chunk_limit(a.metadata) for p, a in arrays.items()})
    except StoreError:
        raise
    except Exception as e:  # a network failure while reading the metadata of the arrays
        if remote.is_url(where) and remote.network_problem(e) is not None:
            raise remote.classify(e, where) from None
        raise
    return Store(where, group, info, arrays)


# --------------------------------------------------------------------------- writing


def image_compressors() -> Any:
    # Images are stored uncompressed: natural images shrink little under a fast codec,
    # and loading a split should run at disk speed (docs/store-format.md, "Compression";
    # BENCHMARKS.md section 1 times the loading).
    return None


def map_compressors() -> Any:
    # Maps: blosc's lz4, no shuffle. Binary masks are mostly runs and shrink 40-200x under
    # any codec, and lz4 decodes at 7-20 GB/s on one core, 2.3-3.5x faster than zstd level 3
    # (the codec of stores written before), whose decoding was most of the time to load a
    # split (BENCHMARKS.md section 1). Teacher maps (unit, signed) shrink 2-3.3x instead of
    # 3.6-4.9x: a 224x224 Grad-CAM map is about 15 KB beside its 150 KB image. Blosc is one of Zarr v3's core
    # codecs, so every Zarr v3 reader (and every satkit) reads these stores.
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1)


def table_compressors() -> Any:
    # Multi-hot labels and boxes: small, read once; zstd level 3 shrinks them most.
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=3)


def create_sample_array(group: "zarr.Group", path: str, shape: tuple[int, ...], dtype: Any, layout: Layout,
                        compressors: Any, fill_value: Any) -> "zarr.Array":
    """Create a per-sample array (images, a map) with ``layout`` along N: chunks of
    ``layout.chunk`` samples, in shards of ``layout.shard`` where sharded."""
    kw: dict[str, Any] = {"shards": (layout.shard,) + tuple(shape[1:])} if layout.shard else {}
    return group.create_array(path, shape=shape, dtype=dtype, chunks=(layout.chunk,) + tuple(shape[1:]),
                              compressors=compressors, fill_value=fill_value, **kw)


def write_rows(arr: "zarr.Array", start: int, values: np.ndarray) -> None:
    """Write rows [start, start + len(values)) of a per-sample array.

    Whole shards of a sharded array (``start`` a multiple of ``write_unit(arr)``, the end
    one too or the array's end) are encoded by ``chunkio.encode_file``, byte for byte what
    zarr writes (tests/test_sharding.py), several times faster: zarr encodes a shard inner
    chunk by inner chunk in Python, under 1,000 images of 224x224 a second on this
    project's 2-core machine, which would make it the bottleneck of a build with many
    decoding workers. Everything else goes through zarr.
    """
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from satdata import chunkio

    stop = start + len(values)
    u = write_unit(arr)
    fmt = _file_format(arr) if arr.shards else None
    if fmt is None or start % u or (stop % u and stop != arr.shape[0]) or stop > arr.shape[0]:
        arr[start:stop] = values
        return
    for i in range(start // u, -(-stop // u)):
        a, b = i * u, min(stop, (i + 1) * u)
        data = chunkio.encode_file(fmt, values[a - start:b - start])
        key = chunk_key(arr, i)
        if data is None:  # all fill values: zarr keeps no file
            sync(arr.store.delete(key))
        else:
            sync(arr.store.set(key, default_buffer_prototype().buffer.from_array_like(data)))


class ArrayWriter:
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
            raise ValueError("ArrayWriter writes no map targets; add teacher maps with satdata.addmap")
        if not isinstance(hflip, bool):
            raise ValueError(f"hflip must be a bool, got {hflip!r}")
        self.hflip = hflip
        # Samples per chunk and per shard (None: unsharded), as ``sample_layout`` gives them;
        # a split smaller than one file gets a file of its own size (``_layout``).
        default = sample_layout(self.image_size, 2**62)
        self.chunk, self.shard = default.chunk, default.shard
        self.counts: dict[str, int] = {}
        self.split_chunk: dict[str, int] = {}
        self.has_boxes: set[str] = set()

    @classmethod
    def reopen(cls, path: str | Path, **kw: Any) -> "ArrayWriter":
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

    def _layout(self, n: int) -> Layout:
        """The layout of a split of ``n`` samples: ``self.chunk`` and ``self.shard`` (a shard a
        whole number of chunks), each at most the split's size."""
        n = max(1, n)
        chunk = min(self.chunk, n)
        if not self.shard:
            return Layout(chunk=chunk)
        return Layout(chunk=chunk, shard=-(-min(self.shard, n) // chunk) * chunk)

    def create_split(self, split: str, n: int) -> None:
        """Create a split's arrays for up to n samples (shrunk by ``close_split``).

        ``split_chunk[split]`` is then the write unit of its images and maps: the samples of
        one file (the shard, where sharded, else the chunk). Writers write whole units.
        """
        if split not in SPLITS:
            raise StoreError(f"{self.path}: unknown split {split!r} (one of {', '.join(SPLITS)})")
        h, w = self.image_size
        n = max(n, 1)
        # A split smaller than one file gets a file of its own size: zarr stores boundary
        # chunks whole, so a 300-sample split in 512-sample chunks would waste 40%.
        layout = self._layout(n)
        c = self.split_chunk[split] = layout.unit
        g = self.group
        create_sample_array(g, array_path(split, "images"), (n, h, w, 3), "uint8", layout,
                            image_compressors(), 0)
        if self.label_kind == "single":
            g.create_array(array_path(split, "labels"), shape=(n,), dtype="int64",
                           chunks=(max(c, 4096),), fill_value=-1)
        else:
            k = len(self.classes)
            g.create_array(array_path(split, "labels"), shape=(n, k), dtype="uint8",
                           chunks=(max(c, 4096), k), fill_value=0, compressors=table_compressors())
        g.create_array(array_path(split, "ids"), shape=(n,), dtype=str, chunks=(max(c, 4096),))
        for m in self.maps.values():
            create_sample_array(g, array_path(split, "saliency", m.array_name), map_shape(m, n, self.image_size),
                                map_dtype(m.encoding), layout, map_compressors(), 0)
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
        """Write samples [start, start + len(images)); callers write whole units
        (``split_chunk[split]``: chunks, or shards), in any order."""
        stop = start + len(images)
        g = self.group
        write_rows(g[array_path(split, "images")], start, images)  # type: ignore[arg-type]
        g[array_path(split, "labels")][start:stop] = labels
        g[array_path(split, "ids")][start:stop] = np.asarray(ids, dtype=object).astype(str)
        for name, m in self.maps.items():
            write_rows(g[array_path(split, "saliency", m.array_name)], start, maps[name])  # type: ignore[arg-type]
        self.counts[split] = max(self.counts[split], stop)

    def write_boxes(self, split: str, boxes: np.ndarray) -> None:
        """Write a split's boxes: float32 (M, 6) [sample, class, x1, y1, x2, y2]."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 6)
        self.group.create_array(array_path(split, "boxes"), shape=boxes.shape, dtype="float32",
                                chunks=(max(1, min(len(boxes), 65536)), 6),
                                compressors=table_compressors(), fill_value=0)
        if len(boxes):
            self.group[array_path(split, "boxes")][...] = boxes
        self.has_boxes.add(split)

    def resize_split(self, split: str, n: int) -> None:
        """Resize a split's per-sample arrays (images, labels, ids, maps) to n samples."""
        paths = [array_path(split, f) for f in ("images", "labels", "ids")]
        paths += [array_path(split, "saliency", m.array_name) for m in self.maps.values()]
        for p in paths:
            arr = self.group[p]
            arr.resize((n,) + tuple(arr.shape[1:]))  # type: ignore[union-attr]

    def close_split(self, split: str, n: int) -> None:
        """Shrink a split's arrays to the n samples actually written."""
        self.resize_split(split, n)
        self.counts[split] = n

    def finish(self, provenance: dict[str, Any], progress: Any = None,
               digests: Mapping[str, "ArrayDigest"] | None = None) -> StoreInfo:
        """Compute digests, then write the 'satkit' attribute: the store is now complete.
        ``digests``: arrays whose digest was begun while they were written (finished here)."""
        sharded = any(self.group[array_path(s, "images")].shards for s in self.counts)  # type: ignore[union-attr]
        info = StoreInfo(
            format_version=2 if sharded else 1,  # version 1 readers read unsharded stores
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
        begun = dict(digests or {})
        digests = {}
        for p in paths:
            digests[p] = begun[p].result() if p in begun else digest_array(self.group[p])
            if progress is not None:
                progress(p)
        info = replace(info, digests=digests)
        validate(self.group, info, self.path)
        self.group.attrs[ATTR_KEY] = info.to_json()
        return info


def committed_map_array(path: str | Path, name: str) -> str | None:
    """The array name that a local store's ``zarr.json`` on disk gives map ``name`` right now
    (``MapInfo.array``), or None (no such map, or the file cannot be read): how a change
    interrupted around its commit tells whether the commit happened."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
        return meta["attributes"][ATTR_KEY]["maps"][name]["array"]
    except (OSError, ValueError, KeyError, TypeError):
        return None

def write_info(path: str | Path, info: StoreInfo) -> None:
    """Replace a local store's 'satkit' attribute atomically (write aside, then rename).

    This is the commit step of every change to a finished store (e.g. adding a map):
    arrays are written first under names the attributes do not mention yet, then this
    one rename switches the store over, so a kill at any moment leaves either the old or
    the new store, both complete and verifiable.
    """
    from satdata.atomic import write_bytes_atomic

    meta_path = Path(path) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("attributes", {})[ATTR_KEY] = info.to_json()
    write_bytes_atomic(meta_path, json.dumps(meta, indent=2).encode())  # .zarr.json.tmp-*, then renamed
