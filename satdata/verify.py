"""Recompute a store's digests; report which array and which samples differ."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from satdata.store import Store, _canonical_bytes, chunk_file_digest, iter_chunks, read_chunk_file


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


def verify_digests(store: Store, progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Re-read every array chunk by chunk and compare with the recorded digests."""
    rep = VerifyReport(store.path)
    info = store.info
    if not info.digests:
        rep.problems.append(Problem("(store)", "records no digests"))
        return rep
    for path, rec in sorted(info.digests.items()):
        rep.checked.append(path)
        if progress:
            progress(path)
        try:
            arr = store.group[path]
        except KeyError:
            rep.problems.append(Problem(path, "array is missing"))
            continue
        whole = hashlib.sha256()
        whole.update(f"{arr.dtype}|{tuple(arr.shape)}|".encode())
        want = rec.get("chunks", [])
        found_chunk_problem = False
        chunks = list(iter_chunks(arr))
        for i, (a, b) in enumerate(chunks):
            try:
                got = chunk_file_digest(read_chunk_file(arr, i))
                whole.update(_canonical_bytes(np.asarray(arr[a:b])))
            except Exception as e:  # a damaged chunk may not even decode
                rep.problems.append(Problem(path, f"chunk {i} cannot be read ({type(e).__name__}: {e})", a, b))
                found_chunk_problem = True
                continue
            if i >= len(want):
                rep.problems.append(Problem(path, f"chunk {i} is not in the recorded digests", a, b))
                found_chunk_problem = True
            elif got != want[i]:
                what = "is missing" if got == "absent" else (
                    "appeared where none was written" if want[i] == "absent" else
                    f"digest mismatch (recorded {want[i]}, found {got})")
                rep.problems.append(Problem(path, f"chunk {i} file {what}", a, b))
                found_chunk_problem = True
        if not found_chunk_problem and len(want) != len(chunks):
            rep.problems.append(Problem(path, f"has {len(chunks)} chunks, recorded {len(want)}"))
        elif not found_chunk_problem and whole.hexdigest() != rec.get("sha256"):
            rep.problems.append(Problem(path, "sha256 mismatch (shape or dtype changed)"))
    return rep
