"""Recompute a store's digests; report which array, which file and which samples differ.

A file is a chunk, or a shard of a sharded array (format version 2): each is fetched
once, its stored bytes hashed against the recorded file digest and its decoded values
fed to the array's sha256 (docs/store-format.md, "Digests")."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from satdata.chunkio import file_word, iter_chunk_files
from satdata.errors import StoreError
from satdata.store import (Store, _canonical_bytes, all_arrays, chunk_file_digest, chunk_key, iter_chunks, special_kind,
                           write_unit)


@dataclass
class Problem:
    array: str
    what: str
    start: int | None = None
    stop: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.start is not None and self.stop is not None:
            where = f" samples [{self.start}, {self.stop})"
        return f"{self.array}{where}: {self.what}"


@dataclass
class VerifyReport:
    path: str
    checked: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "checked": self.checked,
            "problems": [p.__dict__ | {"message": str(p)} for p in self.problems],
        }


def verify_digests(store: Store, progress: Callable[[str], None] | None = None, *,
                   concurrency: int | None = None) -> VerifyReport:
    """Re-read every array file by file (chunks, or shards) and compare with the recorded digests.

    Each file is fetched once (satdata/chunkio.py): its stored bytes give the file
    digest, and the same bytes, decoded, feed the array's sha256. Up to ``concurrency``
    files (across arrays; default ``satdata.chunkio.DEFAULT_CONCURRENCY``, and about
    ``IN_FLIGHT_BYTES``) are fetched while earlier ones are hashed,
    so a store over the network is not read one round trip at a time; the report is the
    same as a sequential pass would give.
    """
    rep = VerifyReport(store.path)
    info = store.info
    if not info.digests:
        rep.problems.append(Problem("(store)", "records no digests"))
        return rep
    # an array the store holds but records no digest of would go unchecked: its data could be
    # anything, so the store is not "OK" (pack and fetch refuse it too)
    for path in all_arrays(info):
        if path not in info.digests:
            rep.checked.append(path)
            rep.problems.append(Problem(path, "records no digest, so its data cannot be checked (the store's "
                                              "attributes were edited, or an older satkit wrote it: rebuild it)"))
    plan: list[tuple[str, dict[str, Any], Any]] = []
    for path, rec in sorted(info.digests.items()):
        try:
            plan.append((path, rec, store.group[path]))
        except KeyError:
            plan.append((path, rec, None))
    spans = {path: list(iter_chunks(arr)) for path, _, arr in plan if arr is not None}
    wanted = [(arr, i) for path, _, arr in plan if arr is not None for i in range(len(spans[path]))]
    fetched = _skip_special(store, wanted, concurrency)
    try:
        for path, rec, arr in plan:
            rep.checked.append(path)
            if progress:
                progress(path)
            if arr is None:
                rep.problems.append(Problem(path, "array is missing"))
                continue
            _check_array(rep, path, rec, arr, spans[path], fetched)
    finally:
        fetched.close()
    return rep


def _skip_special(store: Store, wanted: list[tuple[Any, int]], concurrency: int | None) -> Iterator[Any]:
    """``iter_chunk_files(wanted)``, where a file that cannot be read safely is reported, never
    opened: in a local directory a file that is not a regular file (a FIFO would block the
    read forever; a directory, a device), in a local .zip an entry that inflates to more
    than its chunk can hold (a zip bomb: 2.5 MB of zip made verify hold 1.3 GB)."""
    root = store._local_root
    odd: dict[tuple[int, int], str] = {}
    if store.path.lower().endswith(".zip") and "://" not in store.path:
        odd = _zip_bombs(store.path, wanted)
    elif root is not None:
        for arr, i in wanted:
            try:
                kind = special_kind(os.stat(root / chunk_key(arr, i)).st_mode)
            except OSError:
                continue  # missing (zarr reads it as absent), or a dangling link: reported as missing
            if kind is not None:
                odd[(id(arr), i)] = f"{chunk_key(arr, i)} is {kind}, not a file"
    fetched = iter_chunk_files(((arr, i) for arr, i in wanted if (id(arr), i) not in odd), concurrency=concurrency)
    try:
        for arr, i in wanted:
            why = odd.get((id(arr), i))
            yield (arr, i, None, StoreError(why)) if why else next(fetched)
    finally:
        fetched.close()


def _zip_bombs(path: str, wanted: list[tuple[Any, int]]) -> dict[tuple[int, int], str]:
    """The entries of the zip ``path`` among ``wanted`` whose declared size is more than their
    file can hold (read from the zip's directory, before anything is inflated)."""
    import zipfile

    from satdata.chunkio import chunk_limit

    odd: dict[tuple[int, int], str] = {}
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return odd  # the store opened: zarr reports it
    with zf:
        for arr, i in wanted:
            try:
                size, limit = zf.getinfo(chunk_key(arr, i)).file_size, chunk_limit(arr.metadata)
            except KeyError:
                continue
            if size > limit:
                odd[(id(arr), i)] = (f"{chunk_key(arr, i)} inflates to {size:,} bytes, more than this "
                                     f"{file_word(arr)} can hold ({limit:,}); not inflated (a zip bomb?)")
    return odd


def _check_array(rep: VerifyReport, path: str, rec: dict[str, Any], arr: Any,
                 chunks: list[tuple[int, int]], fetched: Iterator[tuple[Any, int, bytes | None, Any]]) -> None:
    """Compare one array's files (the next ``len(chunks)`` items of ``fetched``) with ``rec``."""
    whole = hashlib.sha256()
    whole.update(f"{arr.dtype}|{tuple(arr.shape)}|".encode())
    want = rec.get("chunks", [])
    word = file_word(arr)  # "chunk", or "shard"
    found_chunk_problem = False
    for i, (a, b) in enumerate(chunks):
        _, _, stored, values = next(fetched)
        if isinstance(values, BaseException):  # a damaged file may not even decode
            e = values
            rep.problems.append(Problem(path, f"{word} {i} cannot be read ({type(e).__name__}: {e})", a, b))
            found_chunk_problem = True
            continue
        got = chunk_file_digest(stored)
        whole.update(_canonical_bytes(np.asarray(values)))
        if i >= len(want):
            rep.problems.append(Problem(path, f"{word} {i} is not in the recorded digests", a, b))
            found_chunk_problem = True
        elif got != want[i]:
            what = "is missing" if got == "absent" else (
                "appeared where none was written" if want[i] == "absent" else
                f"digest mismatch (recorded {want[i]}, found {got})")
            rep.problems.append(Problem(path, f"{word} {i} file {what}", a, b))
            found_chunk_problem = True
    if not found_chunk_problem and (len(want) != len(chunks) or rec.get("chunk_size") not in (None, write_unit(arr))):
        rep.problems.append(Problem(path, f"has {len(chunks)} {word}s of {write_unit(arr)} samples, recorded "
                                          f"{len(want)} of {rec.get('chunk_size')}"))
    elif not found_chunk_problem and whole.hexdigest() != rec.get("sha256"):
        rep.problems.append(Problem(path, "sha256 mismatch (shape or dtype changed)"))
