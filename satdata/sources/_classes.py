"""Class lists a user chooses (``--classes auto|FILE``) and the files a split needs.

VOC and COCO sources take their classes from the dataset by default (PASCAL's 20, COCO's
categories sorted by id). ``--classes`` replaces that list:

* ``auto``: the class names the annotations use, sorted by Unicode code point (Python's
  ``sorted``: ``"Mug" < "cat-toy" < "mug"``), so the order never depends on which file or
  object came first, nor on ``--splits`` (every split on disk is read);
* ``FILE``: a UTF-8 text file, one class name per line, in class-index order; blank lines
  and lines whose first non-space character is ``#`` are ignored, names are stripped of
  surrounding spaces. A duplicate, a name holding ``#`` or a control character, a name
  longer than MAX_NAME_CHARS or more than MAX_CLASSES names is an error naming the file
  and line.

An object whose class the list lacks is a bad sample (an error naming its annotation file,
the class and the list; ``--skip-bad`` skips its image) unless ``--skip-unknown-classes``,
which leaves such objects out and counts them in the store's notes. How the list was made
is recorded in the store's provenance (``classes``: from, order, file and its sha256).

A declared split whose files are missing is an error naming the missing file and the names
nearby that look like it (``missing_split_file``): a misnamed ``instances_Train2017.json``
must never turn into a val-only store.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from satdata.errors import SatkitError, SourceError
from satdata.sources._base import decode_text, read_bytes, short

MAX_CLASSES = 10_000  # LVIS has 1,203; a multi-hot label row is one byte per class
MAX_NAME_CHARS = 256
MAX_CLASS_FILE_BYTES = 16 * 1024 * 1024
AUTO = "auto"
AUTO_ORDER = "sorted by Unicode code point"
FILE_ORDER = "as listed in the file"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ClassList:
    """The classes of a build, in index order, and where they came from."""

    names: tuple[str, ...]
    origin: str  # "dataset" (the source's own list), "auto" or "file"
    path: str | None = None  # the --classes file, as given
    resolved: str | None = None  # ... as an absolute path (recorded in the provenance)
    sha256: str | None = None  # of the file's bytes
    scanned: tuple[str, ...] = ()  # auto: what was read to find the names
    lines: tuple[int, ...] = ()  # file: the line of each name

    @property
    def custom(self) -> bool:
        return self.origin != "dataset"

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def provenance(self) -> dict[str, Any] | None:
        """What the store's provenance records under ``classes`` (None for the dataset's own list)."""
        if self.origin == "auto":
            return {"from": "auto", "order": AUTO_ORDER, "scanned": list(self.scanned)}
        if self.origin == "file":
            return {"from": "file", "file": self.resolved, "sha256": self.sha256, "order": FILE_ORDER}
        return None

    def unknown(self, name: str, default_list: str) -> str:
        """The problem of an object of class ``name``, which the list lacks."""
        if self.origin == "file":
            return (f"unknown class {short(name)} (not in {self.path}, the --classes list; add it there, "
                    "or pass --skip-unknown-classes to leave such objects out)")
        if self.origin == "auto":
            return f"unknown class {short(name)} (not found by --classes auto)"
        return f"unknown class {short(name)} (not one of {default_list})"


def check_classes_option(value: str | None) -> str | None:
    """None, "auto" or the file path of a --classes value (an empty value is an error)."""
    if value is None:
        return None
    if not str(value).strip():
        raise SatkitError("--classes: expected auto or a file of class names, got an empty value")
    return AUTO if str(value).strip() == AUTO else str(value)


def read_class_file(path: str | Path) -> ClassList:
    """The class list of a --classes FILE (module docstring), or a SatkitError naming file and line."""
    p = Path(path)
    raw = read_bytes(p, "class list (--classes)", missing="missing class list (--classes FILE)",
                     max_bytes=MAX_CLASS_FILE_BYTES)
    text = decode_text(raw, p, "class list (--classes)")
    names: list[str] = []
    lines: list[int] = []
    first: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        where = f"line {n}"
        if "#" in name:
            raise SourceError(p, f"{where}: {short(name)} holds '#' (comments go on their own line)")
        if _CONTROL.search(name):
            raise SourceError(p, f"{where}: {short(name)} holds a tab or control character")
        if len(name) > MAX_NAME_CHARS:
            raise SourceError(p, f"{where}: class name is {len(name):,} characters long (at most {MAX_NAME_CHARS})")
        if name in first:
            raise SourceError(p, f"{where}: class {short(name)} is listed twice (first on line {first[name]})")
        first[name] = n
        names.append(name)
        lines.append(n)
        if len(names) > MAX_CLASSES:
            raise SourceError(p, f"{where}: more than {MAX_CLASSES:,} classes (is this a list of class names?)")
    if not names:
        raise SourceError(p, "class list (--classes) names no class (blank lines and # comments only)")
    return ClassList(tuple(names), "file", path=str(p), resolved=str(p.resolve()), sha256=hashlib.sha256(raw).hexdigest(),
                     lines=tuple(lines))


def auto_classes(found: Iterable[str], scanned: Sequence[str], where: str | Path) -> ClassList:
    """The --classes auto list of the class names found (``where``: what was scanned, for errors)."""
    names = tuple(sorted(set(found)))
    if not names:
        raise SourceError(where, "--classes auto: the annotations name no class")
    if len(names) > MAX_CLASSES:
        raise SourceError(where, f"--classes auto: the annotations name {len(names):,} classes, more than "
                                 f"{MAX_CLASSES:,}")
    return ClassList(names, "auto", scanned=tuple(scanned))


def refuse_names(classes: ClassList, refused: Callable[[str], str | None]) -> None:
    """Raise, naming the list (and the line of a file), for the first class ``refused`` explains."""
    for i, name in enumerate(classes.names):
        why = refused(name)
        if why:
            if classes.origin == "file":
                raise SourceError(classes.path, f"line {classes.lines[i]}: class {short(name)}: {why}")
            raise SatkitError(f"--classes auto: class {short(name)}: {why}")


# --------------------------------------------------------------------------- split files

_SEPARATORS = re.compile(r"[\s._-]+")


def _norm(name: str) -> str:
    return _SEPARATORS.sub("", name.casefold())


def similar_names(folder: Path, want: str, ignore: Callable[[str], bool] = lambda n: False,
                  limit: int = 5) -> list[str]:
    """Names in ``folder`` that look like ``want``: the same but for case, spaces or separators,
    or close to it (difflib ratio >= 0.8 on those normalised names), closest first."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    target = _norm(want)
    scored = []
    for n in names:
        if n == want or ignore(n):
            continue
        r = 1.0 if _norm(n) == target else difflib.SequenceMatcher(None, _norm(n), target).ratio()
        if r >= 0.8:
            scored.append((-r, n))
    return [n for _, n in sorted(scored)[:limit]]


def missing_split_file(path: Path, what: str, split: str, present: Sequence[str] = (),
                       ignore: Callable[[str], bool] = lambda n: False,
                       hide: Callable[[str], bool] = lambda n: False) -> SourceError:
    """The error for split ``split`` whose ``what`` (a file or folder) is missing at ``path``.

    It names the file and the names beside it that look like it (but those ``ignore`` or
    ``hide`` says are something else), or, if none does, what is there (but what ``hide``
    says is noise); ``present``: the splits whose files are all there, for a --splits hint.
    """
    folder = path.parent
    near = similar_names(folder, path.name, lambda n: ignore(n) or hide(n))
    if near:
        found = "found instead: " + ", ".join(repr(n) for n in near)
    else:
        try:
            held = sorted(n for n in os.listdir(folder) if not hide(n))
        except OSError:
            held = None
        if held is None:
            found = f"{folder} is not a readable folder"
        elif not held:
            found = f"nothing similar; {folder.name}/ holds nothing else"
        else:
            shown = ", ".join(repr(n) for n in held[:8]) + (f", ... ({len(held)} in all)" if len(held) > 8 else "")
            found = f"nothing similar; {folder.name}/ holds {shown}"
    todo = ["rename it" if near else "add it"]
    if present:
        todo.append(f"pass --splits {','.join(present)} to build only the splits present")
    return SourceError(path, f"missing {what} of split {split!r} ({found}): " + ", or ".join(todo))
