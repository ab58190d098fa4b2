"""Add (or replace) a named saliency map in a finished local store, atomically.

The store's 'satkit' attribute is its commit record (satdata.store), so a change is:

1. take an exclusive lock on the store directory (``flock``: released by the kernel even
   when the process is killed), and remove ``.zarr.json.tmp-*`` files earlier killed runs
   left behind;
2. write the new map, for every split, under a fresh array name ``NAME.<8 hex>`` in
   ``<split>/saliency/`` (and, for a map with targets, the class each sample's map was
   computed for under the same name in ``<split>/map_targets/``): no attribute mentions
   them yet, so readers do not see them;
3. digest the new arrays and validate the would-be store;
4. commit: one atomic replace of the root ``zarr.json`` (``satdata.store.write_info``),
   whose MapInfo for NAME now points at the fresh arrays (``MapInfo.array``).

The arrays of a map it replaced are kept (superseded): a reader that opened the store
before the commit (a training run streaming the old map) keeps reading the version it
opened, and ``satdata gc`` (satdata/gc.py) removes them once no reader holds the store
(docs/store-format.md, "Readers and writers together").

A failure or Ctrl-C before the commit removes the fresh arrays; a SIGKILL at any moment
leaves the store either exactly as it was or fully switched over, and ``satdata verify``
passes on both. Leftovers of a killed run (fresh arrays never committed, a
``.zarr.json.tmp-*`` file) are unreferenced: ``<split>/saliency/`` and
``<split>/map_targets/`` belong to satkit, and anything there that the attributes do not
name is a superseded version or such a leftover, which ``satdata gc`` removes.

Only local directory stores can be changed in place (a .zip or URL store cannot be
committed atomically this way).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import zarr

from satdata.errors import SatkitError, StoreError
from satdata.atomic import leftover_temps, store_lock
from satdata.store import (
    MAP_GROUPS,
    MAPS_GROUP,
    SPLIT_ORDER,
    TARGET_UNKNOWN,
    TARGETS_DTYPE,
    TARGETS_GROUP,
    MapInfo,
    Store,
    StoreInfo,
    array_path,
    committed_map_array,
    create_sample_array,
    digest_array,
    layout_of,
    map_compressors,
    map_dtype,
    map_shape,
    open_store,
    read_rows_into,
    validate,
    write_info,
    write_rows,
    write_unit,
)

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# split -> consecutive blocks covering the split, in sample order: stored values, or for a
# map with targets (NewMap.targets) (stored values, target classes) pairs
Producer = Callable[[str], Iterable["np.ndarray | tuple[np.ndarray, np.ndarray]"]]


@dataclass(frozen=True)
class NewMap:
    """What a new map is: its name, encoding, kind, channels and provenance."""

    name: str
    encoding: str
    kind: str
    channels: int = 1
    provenance: dict[str, Any] = field(default_factory=dict)
    # Whether the producer also yields each sample's target class (stored with the map
    # under <split>/map_targets/, see satdata.store.MapInfo.targets).
    targets: bool = False


def _noop(msg: str) -> None:
    pass


def check_map_name(name: str) -> str:
    """A map name is 1-64 letters, digits, '_' or '-' (array names add '.<hex>')."""
    if not NAME_RE.fullmatch(name or ""):
        raise SatkitError(f"--name: {name!r} is not a valid map name (1-64 letters, digits, '_' or '-')")
    return name


def local_store_dir(path: str | Path, doing: str = "maps can only be added to a local store directory",
                    remote_hint: str = "(not a .zip or URL); unpack or copy it first") -> Path:
    """The store's directory, or SatkitError if it is not a local directory store.

    ``doing`` says what needs a local directory; ``remote_hint`` what to do about a .zip or URL.
    """
    s = str(path)
    if "://" in s or s.endswith(".zip"):
        raise SatkitError(f"{s}: {doing} {remote_hint}")
    p = Path(s)
    if not p.exists():
        raise StoreError(f"{s}: no such store")
    if not p.is_dir():
        raise SatkitError(f"{s}: {doing}, and this is a file")
    return p


def cleanup_strays(path: Path, info: StoreInfo) -> list[str]:
    """Remove everything under <split>/saliency/ and <split>/map_targets/ that no map of
    ``info`` names (superseded map versions, arrays of killed changes), such a group left
    empty in a store without maps, and ``.zarr.json.tmp-*`` files; each array's
    ``zarr.json`` goes before its chunks.

    Call with the store lock held, and only where no reader may still use a superseded
    version: ``satdata gc`` (``satdata.gc.collect``) takes both locks and calls the same
    code. Returns the removed paths (relative to the store).
    """
    from satdata.gc import remove_entry, unreferenced

    refuse_links(path, info)  # never follow a link out of the store to clean "there"
    removed: list[str] = []
    for entry in unreferenced(path, info):
        remove_entry(entry)
        removed.append(entry.relative_to(path).as_posix())
    return removed


def remove_tmp_files(path: Path) -> list[str]:
    """Remove the ``.zarr.json.tmp-*`` files of killed commits (call with the store lock held)."""
    removed = []
    for tmp in leftover_temps(path / "zarr.json"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


def resolve_splits(info: StoreInfo, name: str, new: NewMap | None, splits: Sequence[str] | None,
                   overwrite: bool, where: str) -> list[str]:
    """The splits to compute, after checking NAME, --overwrite and --splits.

    Every map must cover every split (the store format requires it), so a subset of splits
    is only possible when replacing a map of the same kind, encoding and channels: the
    other splits keep the old map's values.
    """
    if name in info.maps and not overwrite:
        raise SatkitError(f"{where}: already has a map {name!r} (pass --overwrite to replace it)")
    order = sorted(info.splits, key=lambda s: SPLIT_ORDER.get(s, 99))
    if not splits:
        return order
    for s in splits:
        if s not in info.splits:
            raise SatkitError(f"--splits: {where} has no split {s!r} (it has: {', '.join(order)})")
    chosen = [s for s in order if s in splits]
    if len(chosen) < len(order):
        old = info.maps.get(name)
        rest = ", ".join(s for s in order if s not in chosen)
        if old is None:
            raise SatkitError(f"--splits: a map must cover every split of {where}, and there is no map "
                              f"{name!r} to keep for {rest}; leave --splits out")
        if new is not None and (old.encoding, old.channels, old.kind) != (new.encoding, new.channels, new.kind):
            raise SatkitError(f"--splits: the existing map {name!r} is {old.kind} ({old.encoding}, "
                              f"{old.channels} channels), so its {rest} values cannot be kept for a "
                              f"{new.kind} map; leave --splits out")
    return chosen


def check_can_add(path: str | Path, name: str, *, splits: Sequence[str] | None = None,
                  overwrite: bool = False, new: NewMap | None = None) -> tuple[Store, list[str]]:
    """Check, before any work, that NAME can be added: (open store, splits to compute)."""
    p = local_store_dir(path)
    check_map_name(name)
    store = open_store(p)
    refuse_links(p, store.info)
    return store, resolve_splits(store.info, name, new, splits, overwrite, str(path))


def refuse_links(path: Path, info: StoreInfo) -> None:
    """Refuse to change a store whose groups are symbolic links (they may lead anywhere:
    cleaning up "inside" them could delete someone else's files)."""
    for split in info.splits:
        for d in (path / split, *(path / split / g for g in MAP_GROUPS)):
            if d.is_symlink():
                raise StoreError(f"{path}: {d.relative_to(path)} is a symbolic link; satdata does not change "
                                 "a store whose groups lead outside it")


def _fresh_array_name(name: str, info: StoreInfo, path: Path) -> str:
    """``NAME.<8 hex>``: named by no map, and on disk in no split (superseded versions and
    leftovers stay until `satdata gc`, and a reader may still use them)."""
    taken = {m.array_name for m in info.maps.values()}
    while True:
        a = f"{name}.{secrets.token_hex(4)}"
        if a not in taken and not any(os.path.lexists(path / s / g / a) for s in info.splits
                                      for g in MAP_GROUPS):
            return a


def _write_split(arr: zarr.Array, blocks: Iterable[Any], n: int, tail: tuple[int, ...],
                 dtype: np.dtype, where: str, targets: zarr.Array | None = None) -> None:
    """Write consecutive blocks into arr in whole files (chunks, or shards: one writer per file).

    With ``targets`` (an int64 (n,) array), every block is a pair (stored values, target
    classes) and the targets are written alongside, row for row.
    """
    chunk = write_unit(arr)
    pending: list[np.ndarray] = []
    pending_t: list[np.ndarray] = []
    have = 0
    written = 0

    def flush(k: int) -> None:
        nonlocal pending, pending_t, have, written
        buf = np.concatenate(pending)
        write_rows(arr, written, buf[:k])
        rest = [buf[k:]] if k < len(buf) else []
        if targets is not None:
            tbuf = np.concatenate(pending_t)
            targets[written:written + k] = tbuf[:k]
            pending_t = [tbuf[k:]] if k < len(tbuf) else []
        pending = rest
        written += k
        have -= k

    for item in blocks:
        if targets is not None:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise SatkitError(f"{where}: a map with targets needs (values, targets) blocks, got {type(item).__name__}")
            block, tblock = np.asarray(item[0]), np.asarray(item[1])
            if tblock.shape != (len(block),) or tblock.dtype.kind not in "iu":
                raise SatkitError(f"{where}: targets of shape {tblock.shape} {tblock.dtype} do not fit "
                                  f"a block of {len(block)} maps (expected ({len(block)},) integers)")
            pending_t.append(tblock.astype(TARGETS_DTYPE))
        else:
            block = np.asarray(item)
        if block.shape[1:] != tail or block.dtype != dtype:
            raise SatkitError(f"{where}: a block of shape {block.shape} {block.dtype} does not fit "
                              f"a map of shape (N,) + {tail} {dtype}")
        if written + have + len(block) > n:
            raise SatkitError(f"{where}: more than the split's {n} samples were produced")
        pending.append(block)
        have += len(block)
        if have >= chunk:
            flush((have // chunk) * chunk)
    if have:
        flush(have)
    if written != n:
        raise SatkitError(f"{where}: {written} maps were produced for a split of {n} samples")


def _committed(path: Path, name: str, array: str) -> bool:
    """Whether the store's attributes on disk already name ``array`` for map ``name``."""
    return committed_map_array(path, name) == array


def add_map(path: str | Path, new: NewMap, produce: Producer, *, splits: Sequence[str] | None = None,
            overwrite: bool = False, log: Callable[[str], None] = _noop) -> StoreInfo:
    """Add map ``new.name`` to the local store at ``path``; returns the committed StoreInfo.

    ``produce(split)`` yields the stored values of the split's samples in order, in
    blocks of any size: (n, H, W) for one channel, (n, H, W, C) otherwise, in the
    encoding's dtype; with ``new.targets`` each block is a pair (values, target classes
    (n,) ints), and the targets are written with the map, committed in the same step
    (``<split>/map_targets/``, see ``satdata.store.MapInfo.targets``). Splits kept from
    a replaced map keep its targets, or get ``TARGET_UNKNOWN`` where it had none.
    ``new.provenance`` is read after every split is written, so a producer may add to it. ``splits`` limits which splits are computed (see
    ``resolve_splits``); ``overwrite`` allows replacing an existing map of that name.
    See the module docstring for how the change is made atomic.
    """
    p = local_store_dir(path)
    check_map_name(new.name)
    dtype = map_dtype(new.encoding)
    if new.channels < 1:
        raise SatkitError(f"map {new.name!r}: channels must be positive, got {new.channels}")
    where = str(path)
    with store_lock(p):
        store = open_store(p)
        info = store.info
        refuse_links(p, info)
        for item in remove_tmp_files(p):
            log(f"{where}: removed {item} (left by an interrupted change)")
        compute = resolve_splits(info, new.name, new, splits, overwrite, where)
        old = info.maps.get(new.name)
        array = _fresh_array_name(new.name, info, p)
        mi = MapInfo(name=new.name, encoding=new.encoding, kind=new.kind, channels=new.channels, array=array,
                     targets=new.targets)
        created: list[Path] = []
        made_groups: list[Path] = []
        try:
            digests = dict(info.digests)
            root = zarr.open_group(str(p), mode="r+")
            for split in sorted(info.splits, key=lambda s: SPLIT_ORDER.get(s, 99)):
                n = info.splits[split]
                shape = map_shape(mi, n, info.image_size)
                images = store.array(split, "images")
                chunk = write_unit(images)  # maps are laid out like their images (chunks, or shards)
                sal = p / split / MAPS_GROUP
                if not sal.exists():
                    made_groups.append(sal)
                apath = array_path(split, "saliency", array)
                created.append(p / apath)
                arr = create_sample_array(root, apath, shape, dtype, layout_of(images), map_compressors(), 0)
                tarr = None
                if new.targets:
                    tgroup = p / split / TARGETS_GROUP
                    if not tgroup.exists():
                        made_groups.append(tgroup)
                    tpath = array_path(split, TARGETS_GROUP, array)
                    created.append(p / tpath)
                    tarr = root.create_array(tpath, shape=(n,), dtype=TARGETS_DTYPE, chunks=(max(chunk, 4096),),
                                             compressors=map_compressors(), fill_value=TARGET_UNKNOWN)
                if split in compute:
                    _write_split(arr, produce(split), n, shape[1:], dtype, f"{where}: {apath}", targets=tarr)
                else:
                    src = store.array(split, "saliency", new.name)
                    for a in range(0, n, chunk):
                        block = np.empty((min(n, a + chunk) - a,) + shape[1:], dtype=dtype)
                        read_rows_into(src, a, a + len(block), block, store._chunk_digests(src))
                        write_rows(arr, a, block)
                    if tarr is not None:
                        old_t = store.map_targets(split, new.name)
                        tarr[...] = old_t if old_t is not None else np.full(n, TARGET_UNKNOWN, TARGETS_DTYPE)
                digests[apath] = digest_array(arr)
                if tarr is not None:
                    digests[array_path(split, TARGETS_GROUP, array)] = digest_array(tarr)
                if old is not None:
                    digests.pop(array_path(split, "saliency", old.array_name), None)
                    digests.pop(array_path(split, TARGETS_GROUP, old.array_name), None)
            # Read only now, so a producer may add what it learnt (e.g. teacher accuracy).
            provenance = dict(new.provenance)
            provenance["splits_computed"] = list(compute)
            kept = [s for s in info.splits if s not in compute]
            if kept and old is not None:
                provenance["splits_kept"] = kept
                provenance["previous"] = old.provenance
            mi = replace(mi, provenance=provenance)
            new_info = replace(info, maps={**info.maps, new.name: mi}, digests=digests)
            validate(zarr.open_group(str(p), mode="r"), new_info, where)
            write_info(p, new_info)  # the commit
        except BaseException:
            if _committed(p, new.name, array):
                # interrupted (e.g. SIGTERM) after the rename but before returning: the
                # new map is the store's now, so keep it
                raise
            for c in created:
                shutil.rmtree(c, ignore_errors=True)
            for g in made_groups:
                shutil.rmtree(g, ignore_errors=True)
            raise
        if old is not None:
            # The replaced map's arrays stay: a reader that opened the store before this
            # commit keeps reading them; `satdata gc` removes them when no reader holds it.
            log(f"{where}: kept the replaced map {new.name!r} ({old.array_name}) for readers that opened it; "
                "`satdata gc` removes it")
        return new_info


__all__ = ["NewMap", "Producer", "add_map", "check_can_add", "check_map_name", "cleanup_strays",
           "local_store_dir", "remove_tmp_files", "resolve_splits", "store_lock"]
