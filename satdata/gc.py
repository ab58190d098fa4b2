"""`satdata gc STORE`: remove what a local store holds that its attributes no longer name.

Replacing a map (``satdata saliency --overwrite``, :func:`satdata.addmap.add_map`) writes the
new map under a fresh array name and commits it, but keeps the arrays of the old version:
a training run that opened the store before the change keeps reading them
(docs/store-format.md, "Readers and writers together"). Those superseded versions, and
what an interrupted change left (arrays written but never committed, ``.zarr.json.tmp-*``
files), stay on disk until this command removes them:

* every entry of ``<split>/saliency/`` and ``<split>/map_targets/`` that no map of the
  attributes names (those two groups belong to satkit), a group left empty in a store
  without maps, and ``.zarr.json.tmp-*`` files at the root;
* each array's ``zarr.json`` is deleted before its chunks, so a reader that finds an
  array's ``zarr.json`` after reading knows the chunks it read were still there;
* it works under the store's writer lock (no map is added meanwhile) and takes the
  store's reader lock exclusively: while any reader holds it (a training run, see
  ``Store.hold_reader_lock``) it refuses, in one line naming the reader's process, or
  waits for readers to finish with ``--wait SECONDS``;
* ``--dry-run`` lists what would go and the bytes it would free, and removes nothing.

Only local directory stores are collected: a .zip or URL store is never changed in place.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from satdata.addmap import local_store_dir, refuse_links
from satdata.errors import SatkitError
from satdata.atomic import leftover_temps, store_lock
from satdata.store import (
    MAP_GROUPS,
    MAPS_GROUP,
    TARGETS_GROUP,
    LockBusy,
    StoreInfo,
    describe_holders,
    flock_dir,
    open_store,
    reader_lock_dir,
)

# The groups whose every entry belongs to satkit: anything there the attributes do not name
# is a superseded map version or a leftover of an interrupted change.
OWNED_GROUPS = MAP_GROUPS


@dataclass
class GcResult:
    """What ``collect`` removed (or, with ``dry_run``, would remove)."""

    path: str
    dry_run: bool
    removed: list[tuple[str, int]] = field(default_factory=list)  # (path relative to the store, bytes)

    @property
    def freed(self) -> int:
        return sum(n for _, n in self.removed)


def _noop(msg: str) -> None:
    pass


def local_store(path: str | Path) -> Path:
    """The store's directory, or SatkitError if it is not a local directory store."""
    return local_store_dir(path, "`satdata gc` collects local store directories only",
                           "(a .zip or URL store is never changed in place, so it holds nothing to collect)")


def unreferenced(path: Path, info: StoreInfo) -> list[Path]:
    """What the attributes ``info`` do not name, in a stable order: entries of the owned
    groups, owned groups left empty in a store without maps, ``.zarr.json.tmp-*`` files."""
    named = {
        MAPS_GROUP: {m.array_name for m in info.maps.values()},
        TARGETS_GROUP: {m.array_name for m in info.maps.values() if m.targets},
    }
    found: list[Path] = []
    for split in info.splits:
        for group, names in named.items():
            g = path / split / group
            if not g.is_dir() or g.is_symlink():
                continue
            children = sorted(g.iterdir())
            stray = [c for c in children if c.name != "zarr.json" and c.name not in names]
            found += stray
            if not names:
                found.append(g)  # a store without maps (of targets): the group itself goes too
    found += leftover_temps(path / "zarr.json")
    return found


def tree_bytes(p: Path) -> int:
    """Bytes of the files under ``p`` (``p`` itself if a file); links are not followed."""
    try:
        st = os.lstat(p)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for dirpath, _dirs, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _entry_bytes(store: Path, entry: Path) -> int:
    """An entry's bytes; a whole owned group (``<split>/<group>``) counts its own
    ``zarr.json`` only: its entries are listed, and counted, apart."""
    return tree_bytes(entry / "zarr.json" if entry.parent.parent == store else entry)


def remove_entry(p: Path) -> None:
    """Remove an array directory with its ``zarr.json`` first (then its chunks), or a file
    or link itself (never what a link points to)."""
    if p.is_dir() and not p.is_symlink():
        try:
            (p / "zarr.json").unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def collect(path: str | Path, *, dry_run: bool = False, wait: float = 0.0,
            log: Callable[[str], None] = _noop) -> GcResult:
    """Remove (or list, with ``dry_run``) what the store at ``path`` holds unnamed; see the module docstring.

    Raises SatkitError, one line, when a reader holds the store after ``wait`` seconds,
    another satdata command is changing the store, or the store is not a local directory.
    ``log`` receives one line per entry.
    """
    p = local_store(path)
    where = str(path)
    info = open_store(p).info
    refuse_links(p, info)
    result = GcResult(where, dry_run)
    if dry_run:
        for entry in unreferenced(p, info):
            result.removed.append((entry.relative_to(p).as_posix(), _entry_bytes(p, entry)))
            log(f"would remove {result.removed[-1][0]} ({format_bytes(result.removed[-1][1])})")
        return result
    if not unreferenced(p, info):
        return result
    # Readers first (waiting for them does not hold up writers), then the writer lock.
    lock_dir = reader_lock_dir(p, info)
    try:
        fd = flock_dir(lock_dir, exclusive=True, timeout=wait)
    except LockBusy as e:
        waited = f" after waiting {wait:g} s" if wait > 0 else ""
        raise SatkitError(f"{where}: {describe_holders(e.holders)} is reading the store{waited}; `satdata gc` "
                          "removes nothing while a reader may still use a replaced map's old arrays (try again "
                          "when it has finished, or pass --wait SECONDS)") from None
    try:
        with store_lock(p):
            store = open_store(p)  # again, under the lock: what is named now
            if fd is not None:
                st_fd, st_dir = os.fstat(fd), os.stat(reader_lock_dir(p, store.info))
                if (st_fd.st_dev, st_fd.st_ino) != (st_dir.st_dev, st_dir.st_ino):
                    raise SatkitError(f"{where}: the store was replaced while `satdata gc` waited; run it again")
            refuse_links(p, store.info)
            for entry in unreferenced(p, store.info):
                rel, n = entry.relative_to(p).as_posix(), _entry_bytes(p, entry)
                remove_entry(entry)
                result.removed.append((rel, n))
                log(f"removed {rel} ({format_bytes(n)})")
    finally:
        if fd is not None:
            os.close(fd)
    return result


def format_bytes(n: int) -> str:
    """1,234 bytes as '1.2 kB' (decimal units), small counts as '512 B'."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


__all__ = ["GcResult", "OWNED_GROUPS", "collect", "format_bytes", "local_store", "remove_entry", "tree_bytes",
           "unreferenced"]
