"""Sharing stores: pack one into a single deterministic .zip, fetch one from a server.

* :func:`pack` writes a local store directory as one ``.zip`` (docs/store-format.md,
  "Packed stores"): exactly the files the store's attributes name (every array's
  ``zarr.json`` and recorded files -- chunks, or the shards of a sharded array -- the
  groups' ``zarr.json``, the root ``zarr.json`` last), stored uncompressed, sorted, with
  fixed timestamps and permissions, so one store packs to the same bytes anywhere. Every
  file is checked against its recorded digest on the way in: a damaged store is refused,
  naming the file.
* :func:`fetch` downloads a store from a URL (a store directory over http(s)://, s3:// or
  any fsspec protocol, or a packed ``.zip``) into a local directory (or, for a ``.zip``
  to a ``--out`` ending in ``.zip``, keeps the archive). A store directory on a server
  has no listing: the files to fetch are enumerated from the root ``zarr.json``'s
  ``satkit`` attribute. Downloads run concurrently (one bounded GET per file, at most
  about ``chunkio.IN_FLIGHT_BYTES`` held at once); each file is checked against
  its recorded digest as it arrives, the whole store is verified (``satdata verify``'s
  check of the decoded content) before anything is committed, and the root ``zarr.json``
  -- the commit record -- is written last. The download lives in a hidden directory
  beside ``--out`` named after it (``.NAME.fetch-partial``; a ``.zip`` downloads to
  ``.NAME.fetch-partial.zip``), which a failed or killed run leaves behind on purpose:
  the same command run again keeps every file there that matches its recorded digest
  (a ``.zip`` resumes with a Range request from the bytes already there, then compares
  its end -- the root ``zarr.json`` and the central directory -- with the server's, and
  starts over when they differ: the file changed since) and fetches only the rest.

Both write their output like every satdata command (satdata/atomic.py): an existing
output is refused unless ``overwrite``, work happens beside it under a hidden name, and
one rename moves the finished output into place.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import threading
import time
import zipfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping

from satdata.errors import SatkitError, StoreError
from satdata.chunkio import IN_FLIGHT_BYTES, chunk_limit, file_word
from satdata.remote import METADATA_LIMIT  # the most bytes of a zarr.json taken from a server

DEFAULT_JOBS = 16  # downloads in flight
DEFAULT_RETRIES = 2  # further attempts per file after a network error (not after 404/401/403)
ZIP_PIECE = 8 << 20  # a .zip downloads in Range requests of this many bytes
# Fixed metadata of every zip entry: what makes a pack deterministic.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold
ZIP_MODE = 0o100644  # a regular file, rw-r--r--
ZIP_UNIX = 3  # "created on Unix": the mode above is meaningful
ROOT_KEY = "zarr.json"
# A key that may become a path: plain names joined by '/', never '..' (checked again on writing)
_KEY_RE = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")


# --------------------------------------------------------------------------- what a store holds


@dataclass(frozen=True)
class Entry:
    """One file of a store: a metadata ``zarr.json``, or file ``index`` of ``array`` (a chunk,
    or a shard of a sharded array: ``word``)."""

    key: str
    array: str | None = None
    index: int = -1
    digest: str | None = None  # the recorded file digest (None for metadata)
    start: int = 0
    stop: int = 0
    limit: int = 0  # the most bytes this file may hold (0: METADATA_LIMIT); a larger one is refused
    word: str = "chunk"

    def describe(self) -> str:
        if self.array is None:
            return self.key
        return f"{self.array} {self.word} {self.index} (samples [{self.start}, {self.stop}))"


# The most bytes satkit takes from a server (or a downloaded zip) for one file, before it
# knows the file's digest (METADATA_LIMIT, chunkio.chunk_limit): a crafted or broken server
# cannot make fetch hold gigabytes.
def _too_large(name: str, limit: int) -> StoreError:
    return StoreError(f"{name}: the server sent more than {limit:,} bytes, more than this file can hold; "
                      "refusing it (a damaged or hostile server)")


def _check_key(key: str, where: str) -> str:
    if not _KEY_RE.fullmatch(key) or ".." in key.split("/"):
        raise StoreError(f"{where}: the store names the file {key[:80]!r}, which is not a plain relative path")
    return key


def array_paths(info: Any, where: str) -> list[str]:
    """Every array the attributes name (``all_arrays`` and the digests' keys), sorted."""
    from satdata.store import all_arrays

    paths = sorted(set(all_arrays(info)) | set(info.digests))
    for p in paths:
        if p not in info.digests:
            raise StoreError(f"{where}: records no digest for array {p}; it cannot be shared verifiably "
                             "(rebuild the store with this satkit)")
    return paths


def metadata_keys(info: Any, where: str) -> list[str]:
    """The ``zarr.json`` of every group above an array (root excluded) and of every array, sorted."""
    keys = set()
    for p in array_paths(info, where):
        parts = p.split("/")
        for i in range(1, len(parts)):
            keys.add("/".join(parts[:i]) + "/zarr.json")
        keys.add(f"{p}/zarr.json")
    return sorted(_check_key(k, where) for k in keys)


def chunk_entries(path: str, meta_bytes: bytes, rec: Mapping[str, Any], where: str) -> list[Entry]:
    """The files (chunks, or shards) of array ``path`` whose digests record a file (not "absent").

    Keys come from the array's own metadata (``store.chunk_key``) and the count from the
    digests; an array whose metadata disagrees with its digests is refused. The metadata's
    chunk grid is the file grid: a sharded array's grid is its shards.
    """
    from zarr.core.metadata.v3 import ArrayV3Metadata

    from satdata.store import chunk_key

    try:
        meta = ArrayV3Metadata.from_dict(json.loads(meta_bytes))
        shape, cshape = tuple(meta.shape), tuple(meta.chunk_grid.chunk_shape)
    except Exception as e:  # noqa: BLE001 - zarr raises many types for crafted metadata
        raise StoreError(f"{where}: {path}/zarr.json is not valid array metadata "
                         f"({type(e).__name__}: {str(e)[:120]})") from None
    chunks = rec.get("chunks", [])
    n = math.ceil(shape[0] / cshape[0]) if shape and cshape and cshape[0] > 0 else -1
    if (not shape or len(cshape) != len(shape) or cshape[1:] != shape[1:] or n != len(chunks)
            or rec.get("chunk_size") != cshape[0]):
        raise StoreError(f"{where}: array {path} has shape {shape} in chunks of {cshape}, which does not match "
                         f"its recorded digests ({len(chunks)} chunks of {rec.get('chunk_size')}); the store is "
                         "damaged (`satdata verify` names the difference)")
    arr = SimpleNamespace(path=path, metadata=meta, ndim=len(shape))
    word = file_word(meta)
    out = []
    for i, d in enumerate(chunks):
        if d == "absent":
            continue
        a, b = i * cshape[0], min(shape[0], (i + 1) * cshape[0])
        out.append(Entry(_check_key(chunk_key(arr, i), where), path, i, d, a, b,  # type: ignore[arg-type]
                         chunk_limit(meta), word))
    return out


def _absent_keys(path: str, meta_bytes: bytes, rec: Mapping[str, Any]) -> list[str]:
    from zarr.core.metadata.v3 import ArrayV3Metadata

    from satdata.store import chunk_key

    meta = ArrayV3Metadata.from_dict(json.loads(meta_bytes))
    arr = SimpleNamespace(path=path, metadata=meta, ndim=len(meta.shape))
    return [chunk_key(arr, i) for i, d in enumerate(rec.get("chunks", [])) if d == "absent"]  # type: ignore[arg-type]


def _digest(data: bytes) -> str:
    from satdata.store import chunk_file_digest

    return chunk_file_digest(data)


def _mismatch(entry: Entry, got: str) -> str:
    return f"{entry.describe()} does not match its recorded digest (recorded {entry.digest}, found {got})"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _bar(total: int | None, desc: str, enabled: bool, initial: int = 0) -> Any:
    from satdata.clikit import progress_bar

    return progress_bar(total, desc, "B", enabled=enabled, initial=initial, unit_scale=True)


# --------------------------------------------------------------------------- pack


@dataclass
class PackResult:
    path: Path
    files: int
    bytes: int
    store_digest: str


def _zipinfo(key: str, size: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(key, date_time=ZIP_DATE)
    zi.compress_type = zipfile.ZIP_STORED
    zi.create_system = ZIP_UNIX
    zi.external_attr = ZIP_MODE << 16
    zi.file_size = size
    return zi


def pack(store: str | Path, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> PackResult:
    """Write the local store directory ``store`` as the packed store ``out`` (a new ``.zip``).

    Raises SatkitError (one line) for a store that is not a local directory store, a
    chunk file that does not match its recorded digest (naming the array, chunk and
    samples), or an output that exists (unless ``overwrite``) or cannot be written; the
    zip is written beside ``out`` and renamed into place only when complete.
    """
    from satdata import remote
    from satdata.atomic import (commit_path, identity, make_parents, output_lock, partial_path, probe_writable,
                                 remove_empty, resolve_out, sigterm_as_interrupt)
    from satdata.store import open_store, resolve_inside, store_digest

    text = str(store)
    if remote.is_url(text):
        raise SatkitError(f"STORE {remote.redact(text)}: pack reads a local store directory; "
                          f"fetch it first (`satdata fetch {remote.redact(text)} --out NAME.zarr`)")
    if remote.is_zip(text):
        raise SatkitError(f"STORE {text}: is already a packed store (.zip)")
    remote.refuse_remote_output(out, "OUT", what="a packed store")
    if not remote.is_zip(out):
        raise SatkitError(f"OUT {out}: a packed store's name must end in .zip (that is how satkit recognises one)")
    root, where = Path(text), text
    # the commit record is read once, first: the zip holds exactly the version it describes
    # (even if a map is replaced meanwhile), and it goes in last, as read
    root_bytes = _read_local(root, ROOT_KEY, where) if (root / ROOT_KEY).is_file() else b""
    st = open_store(text)
    st.hold_reader_lock()  # `satdata gc` removes no array this pack reads
    info = st.info
    if _info_of(root_bytes, where) != info:
        raise SatkitError(f"{where}: changed while pack opened it (a map was added or replaced); run pack again")
    out = resolve_out(Path(out), overwrite=overwrite)
    try:
        inside = out.resolve().is_relative_to(root.resolve())
    except OSError:
        inside = False
    if inside:
        raise SatkitError(f"OUT {out}: is inside the store {root}; write the .zip elsewhere")
    check_zip_out(out, overwrite)

    # what goes in, in order: every metadata file and recorded chunk, sorted; the root last
    entries: list[Entry] = [Entry(k) for k in metadata_keys(info, where)]
    absent: list[tuple[str, str]] = []
    for p in array_paths(info, where):
        meta = _read_local(root, f"{p}/zarr.json", where)
        entries += chunk_entries(p, meta, info.digests[p], where)
        absent += [(p, k) for k in _absent_keys(p, meta, info.digests[p])]
    for p, k in absent:
        if os.path.lexists(root / k):
            raise StoreError(f"{where}: {k}: a chunk file of {p} appeared where the digests record none; the store "
                             "is damaged, not packed (`satdata verify` names the samples)")
    entries.sort(key=lambda e: e.key)
    entries.append(Entry(ROOT_KEY))
    sizes = []
    for e in entries:
        try:
            sizes.append(resolve_inside(root, e.key).stat().st_size)
        except FileNotFoundError:
            raise StoreError(f"{where}: {e.describe()} is missing ({e.key}); the store is damaged, not packed "
                             "(`satdata verify` lists every damaged chunk)") from None

    made = make_parents(out.parent, "OUT")
    try:
        probe_writable(out.parent, "OUT")
        with output_lock(out), sigterm_as_interrupt():  # a job scheduler's SIGTERM removes the partial zip too
            before = identity(out)
            check_zip_out(out, overwrite)
            _remove_stale_zips(out)
            tmp = partial_path(out)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileExistsError:
                raise SatkitError(f"{tmp}: is in the way; remove it") from None
            try:
                with os.fdopen(fd, "wb") as f, _bar(sum(sizes), "pack", progress) as bar:
                    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                        for e in entries:
                            data = root_bytes if e.key == ROOT_KEY else _read_local(root, e.key, where, e.limit)
                            if e.digest is not None and _digest(data) != e.digest:
                                raise StoreError(f"{where}: {_mismatch(e, _digest(data))}; the store is damaged, "
                                                 "not packed (`satdata verify` lists every damaged chunk)")
                            zf.writestr(_zipinfo(e.key, len(data)), data)
                            bar.update(len(data))
                    f.flush()
                    os.fsync(f.fileno())
                commit_path(tmp, out, before, remove_old=lambda p: p.unlink(missing_ok=True))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    finally:
        remove_empty(made)
    return PackResult(out, len(entries), out.stat().st_size, store_digest(info))


def _remove_stale_zips(out: Path) -> None:
    """Remove the partial zips ``.OUT.zip.partial-PID`` of packs into ``out`` that were killed
    (SIGKILL: no cleanup ran), whose process is gone. Called with the output lock held: no
    live pack into ``out`` owns one then. Only regular files of this user are removed."""
    import glob

    from satdata.atomic import _pid_alive

    for p in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            st = os.lstat(p)
        except (ValueError, OSError):
            continue
        mine = not hasattr(os, "geteuid") or st.st_uid == os.geteuid()
        if stat.S_ISREG(st.st_mode) and mine and (pid == os.getpid() or not _pid_alive(pid)):
            p.unlink(missing_ok=True)


def _info_of(root_bytes: bytes, where: str) -> Any:
    from satdata.store import ATTR_KEY, StoreInfo

    try:
        return StoreInfo.from_json(json.loads(root_bytes)["attributes"][ATTR_KEY], where)
    except (ValueError, KeyError, TypeError, StoreError):
        return None


def packed_store_problem(path: Path) -> str | None:
    """Why the existing file ``path`` is not a packed satkit store (None where it is one): a
    zip holding a root zarr.json (of at most METADATA_LIMIT bytes) with satkit's attributes."""
    from satdata.store import open_regular

    try:
        with os.fdopen(open_regular(path), "rb") as f, zipfile.ZipFile(f) as zf:
            try:
                entry = zf.getinfo(ROOT_KEY)
            except KeyError:
                return f"a zip without a store's {ROOT_KEY}"
            if entry.file_size > METADATA_LIMIT:
                return f"its {ROOT_KEY} declares {entry.file_size:,} bytes, more than a store's metadata"
            with zf.open(entry) as member:
                root_bytes = member.read(METADATA_LIMIT + 1)
    except StoreError as e:  # not a regular file
        return str(e).split("; ")[0].removeprefix(f"{path} ")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
        return "not a zip file"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except Exception as e:  # noqa: BLE001 - an encrypted entry, an unknown method, a crafted deflate stream
        return f"a zip that cannot be read ({type(e).__name__})"
    if _info_of(root_bytes, str(path)) is None:
        return f"its {ROOT_KEY} has no satkit attributes"
    return None


def check_zip_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing output .zip unless ``overwrite``, and even then unless it is a packed
    satkit store or an empty file: a mistyped --out never costs an unrelated file."""
    from satdata.atomic import check_file_out

    check_file_out(out, overwrite)
    if not overwrite:
        return
    try:
        if os.stat(out).st_size == 0:
            return
    except FileNotFoundError:
        return  # nothing there (or gone meanwhile): nothing to replace
    except OSError as e:
        raise SatkitError(f"{out}: cannot be checked ({e.strerror}); refusing to replace it") from None
    why = packed_store_problem(out)
    if why is not None:
        raise SatkitError(f"{out}: exists and is not a packed satkit store ({why}); --overwrite replaces only "
                          "a packed store or an empty file: remove it yourself, or choose another name")


def _read_local(root: Path, key: str, where: str, limit: int = 0) -> bytes:
    """The bytes of the store's file ``key``: a regular file (a FIFO would block the read
    forever, a directory fail it: ``store.open_regular``) of at most ``limit`` bytes (0: METADATA_LIMIT)."""
    from satdata.store import open_regular, resolve_inside

    limit = limit or METADATA_LIMIT
    try:
        fd = open_regular(resolve_inside(root, key), f"{where}: {key}")
    except FileNotFoundError:
        raise StoreError(f"{where}: {key} is missing; the store is damaged") from None
    except OSError as e:
        raise StoreError(f"{where}: {key} cannot be read ({e.strerror}); the store is damaged") from None
    try:
        st = os.fstat(fd)
        if st.st_size > limit:
            raise StoreError(f"{where}: {key} holds {st.st_size:,} bytes, more than this file can ({limit:,}); "
                             "the store is damaged, not packed (`satdata verify` names the samples)")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read(limit + 1)


# --------------------------------------------------------------------------- fetch: sources


class _Retry(Exception):
    """A failure worth another attempt (a dropped connection, a timeout, a server error)."""


class _FsSource:
    """Files of a store directory at a URL, through fsspec."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None) -> None:
        from satdata import remote

        self.url = url.rstrip("/")
        self.fs, self.path = remote.filesystem(self.url, storage_options)

    def name(self, key: str) -> str:
        from satdata.remote import redact

        return redact(f"{self.url}/{key}")

    def get(self, key: str, limit: int = 0) -> bytes:
        """The file's bytes, at most ``limit`` (METADATA_LIMIT when 0): one ranged GET, so a
        server cannot send more than that; a larger file is refused."""
        from satdata import remote

        limit = limit or METADATA_LIMIT
        try:
            data = remote.cat_range(self.fs, f"{self.path}/{key}", 0, limit + 1)
            if len(data) > limit:
                raise _too_large(self.name(key), limit)
            return data
        except StoreError:
            raise
        except FileNotFoundError:
            raise StoreError(f"{self.name(key)}: not found on the server") from None
        except Exception as e:  # noqa: BLE001 - every backend raises its own types
            err = remote.classify(e, f"{self.url}/{key}")
            problem = remote.network_problem(e) or ""
            if problem.startswith(("unreachable", "the server answered HTTP 5")):
                raise _Retry(str(err)) from None
            raise err from None


class _ZipSource:
    """Files of a packed store downloaded to a local .zip."""

    def __init__(self, path: Path, url: str) -> None:
        self.url = url
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise StoreError(f"{url}: not a readable zip file ({e})") from None
        self.lock = threading.Lock()

    def name(self, key: str) -> str:
        from satdata.remote import redact

        return f"{redact(self.url)} (entry {key})"

    def get(self, key: str, limit: int = 0) -> bytes:
        limit = limit or METADATA_LIMIT
        with self.lock:
            try:
                if self.zf.getinfo(key).file_size > limit:  # checked before inflating: no zip bomb
                    raise _too_large(self.name(key), limit)
                return self.zf.read(key)
            except KeyError:
                raise StoreError(f"{self.name(key)}: not in the zip") from None
            except (zipfile.BadZipFile, OSError, ValueError) as e:  # a damaged entry (CRC) or file
                raise StoreError(f"{self.name(key)}: cannot be read ({e})") from None

    def close(self) -> None:
        self.zf.close()


# --------------------------------------------------------------------------- fetch


@dataclass
class FetchResult:
    path: Path
    files: int  # files in the fetched store
    downloaded: int  # files downloaded by this run
    bytes: int  # bytes downloaded by this run
    reused: int  # files (or, for a .zip, bytes) kept from an earlier, interrupted run
    seconds: float
    info: Any = field(default=None, repr=False)


def fetch_partial(out: Path) -> Path:
    """Where ``fetch`` keeps the download of ``out`` until it is verified: ``.NAME.fetch-partial``.

    Named after ``out`` (not the process) so that the same command run again resumes it.
    """
    return out.parent / f".{out.name}.fetch-partial"


def fetch_partial_zip(out: Path) -> Path:
    """Where ``fetch`` downloads a packed store for ``out``: ``.NAME.fetch-partial.zip``."""
    return out.parent / f".{out.name}.fetch-partial.zip"


def fetch(url: str, out: str | Path, *, storage_options: Mapping[str, Any] | None = None,
          overwrite: bool = False, jobs: int = DEFAULT_JOBS, retries: int = DEFAULT_RETRIES,
          progress: bool = True, zip_piece: int = ZIP_PIECE) -> FetchResult:
    """Download the store at ``url`` to ``out``, verify it, and only then move it into place.

    ``url`` is a store directory (``https://host/x.zarr``, ``s3://bucket/x.zarr``, any
    fsspec URL) or a packed store (``.../x.zip``). ``out`` is a new local directory; for a
    ``.zip`` URL, an ``out`` ending in ``.zip`` keeps the archive as it is (verified)
    instead of unpacking it. Raises SatkitError (one line naming the URL) for a server
    that cannot be reached, refuses the credentials or lacks a file, for a file that
    does not match its recorded digest, and for a store that does not verify; ``out`` is
    then untouched, and what was downloaded and verified stays in the hidden partial
    directory for the next run to resume.
    """
    from satdata import remote
    from satdata.build import check_out
    from satdata.atomic import make_parents, output_lock, probe_writable, remove_empty, resolve_out

    t0 = time.time()
    url = str(url)
    if not remote.is_url(url):
        raise SatkitError(f"URL {url}: not a URL (https://..., s3://..., file://...); a local store needs no "
                          "fetching (copy it, or `satdata pack` it)")
    zip_in = remote.is_zip(url)
    keep_zip = remote.is_zip(out)
    if keep_zip and zip_in:
        remote.refuse_remote_output(out, "--out", what="a packed store")
    else:
        remote.refuse_remote_output(out, "--out")  # a URL, or a .zip from a store directory
    if jobs < 1:
        raise SatkitError(f"--jobs: must be at least 1, got {jobs}")
    out = resolve_out(Path(out), overwrite=overwrite)
    checker = (lambda: check_zip_out(out, overwrite)) if keep_zip else (lambda: check_out(out, overwrite))
    checker()
    source = None if zip_in else _FsSource(url, storage_options)
    made = make_parents(out.parent)
    try:
        probe_writable(out.parent)
        with output_lock(out):
            from satdata.atomic import identity, sigterm_as_interrupt

            before = identity(out)
            checker()
            with sigterm_as_interrupt():
                if not zip_in:
                    res = _fetch_dir(source, url, out, before, jobs=jobs, retries=retries, progress=progress)
                else:
                    zpart = fetch_partial_zip(out)
                    for attempt in (1, 2):
                        reused, got = _download_zip(url, zpart, storage_options, retries=retries,
                                                    progress=progress, piece=zip_piece)
                        try:
                            res = _unpack_zip(url, zpart, out, before, keep_zip=keep_zip, progress=progress)
                            break
                        except StoreError:
                            # bytes kept from an earlier run may belong to an older version of the
                            # file (or another URL): the download was removed, so fetch it afresh once
                            if not reused or attempt == 2:
                                raise
                    res.downloaded, res.bytes, res.reused = (1 if got else 0), got, reused
    finally:
        remove_empty(made)
    res.seconds = time.time() - t0
    return res


def _unpack_zip(url: str, zpart: Path, out: Path, before: Any, *, keep_zip: bool, progress: bool) -> FetchResult:
    """Verify the downloaded ``zpart`` and commit it to ``out``, kept as a .zip or unpacked into a
    directory; a zip whose content is damaged is removed (StoreError)."""
    if keep_zip:
        return _commit_zip(url, zpart, out, before)
    try:
        zsrc = _ZipSource(zpart, url)
        try:
            res = _fetch_dir(zsrc, url, out, before, jobs=1, retries=0, progress=progress)
        finally:
            zsrc.close()
    except StoreError as e:  # the zip's content is damaged: download it afresh next time
        zpart.unlink(missing_ok=True)
        raise StoreError(f"{e}; removed the download") from None
    zpart.unlink(missing_ok=True)
    return res


def _commit_zip(url: str, zpart: Path, out: Path, before: Any) -> FetchResult:
    """Verify a downloaded .zip, then rename it onto ``out``; a .zip that fails is removed."""
    from satdata.atomic import commit_path
    from satdata.store import open_store
    from satdata.verify import verify_digests

    try:
        st = open_store(str(zpart))
        rep = verify_digests(st)
    except SatkitError as e:
        zpart.unlink(missing_ok=True)
        raise StoreError(f"{url}: the downloaded zip is not a valid satkit store ({e}); removed it") from None
    if not rep.ok:
        zpart.unlink(missing_ok=True)
        raise StoreError(f"{url}: the downloaded zip does not verify: {_problems(rep)}; nothing was written to "
                         f"{out}, and the download was removed (the server's copy is damaged)")
    with zipfile.ZipFile(zpart) as zf:
        n = len(zf.namelist())
    commit_path(zpart, out, before, remove_old=lambda p: p.unlink(missing_ok=True))
    return FetchResult(out, n, 0, 0, 0, 0.0, st.info)


def _problems(rep: Any, limit: int = 3) -> str:
    items = [str(p) for p in rep.problems[:limit]]
    more = len(rep.problems) - limit
    return "; ".join(items) + (f"; and {more} more" if more > 0 else "")


def _download_zip(url: str, zpart: Path, storage_options: Mapping[str, Any] | None, *, retries: int,
                  progress: bool, piece: int) -> tuple[int, int]:
    """Download ``url`` to ``zpart``, resuming after the bytes already there; (reused, downloaded) bytes."""
    from satdata import remote

    fs, path = remote.filesystem(url, storage_options)

    def call(fn: Callable[[], Any]) -> Any:
        for attempt in range(retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise StoreError(f"{remote.redact(url)}: not found on the server") from None
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001
                problem = remote.network_problem(e) or ""
                if attempt < retries and problem.startswith(("unreachable", "the server answered HTTP 5")):
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise remote.classify(e, url) from None

    size = call(lambda: fs.size(path))
    if not isinstance(size, int) or size < 0:
        raise StoreError(f"{remote.redact(url)}: the server does not say how large the file is; cannot download it")
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    try:
        st = os.lstat(zpart)
        if not stat.S_ISREG(st.st_mode):
            raise SatkitError(f"{zpart}: is in the way (not a file satdata made); remove it")
        have = st.st_size
    except FileNotFoundError:
        have = 0
    if have > size:  # the file on the server changed: start over
        os.truncate(zpart, 0)
        have = 0
    reused = have
    try:
        fd = os.open(zpart, flags, 0o644)
    except OSError as e:
        raise SatkitError(f"{zpart}: cannot write it ({e.strerror})") from None
    bounded = remote.is_bounded(fs)

    def piece_into(f: Any, start: int, end: int) -> tuple[int, bool]:
        """Append bytes [start, end) to ``f`` (from a server that answers with the whole file: all
        of it, at most ``size`` + 1 bytes); (bytes appended, whether the answer was the range)."""
        try:
            if bounded:  # HTTP(S) or S3: read only as far as asked, never a whole answer in memory
                ranged = remote.bounded_get(fs, path, start, end, f.write, cap=end - start + 1,
                                            whole_cap=size + 1 if start == 0 else None)
            else:
                data = fs.cat_file(path, start=start, end=end)
                ranged = len(data) <= end - start
                if not ranged and start != 0:
                    raise remote.RangeIgnored(f"{remote.redact(url)}: asked for bytes {start:,} to {end - 1:,}, "
                                              f"the server sent {len(data):,} bytes: it does not honour Range "
                                              "requests")
                f.write(data)
            f.flush()
        except BaseException:
            f.truncate(start)  # a piece lands whole or not at all
            f.seek(start)
            raise
        return f.tell() - start, ranged

    with os.fdopen(fd, "ab") as f, _bar(size, "fetch", progress, initial=have) as bar:
        while have < size:
            end = min(size, have + piece)
            try:
                got, ranged = call(lambda: piece_into(f, have, end))
            except remote.RangeIgnored:
                if have == 0:  # pragma: no cover - a whole answer from byte 0 is taken
                    raise
                # the server sends whole files only: a download cannot resume there; start over
                f.truncate(0)
                f.seek(0)
                have = reused = 0
                continue
            want = end - have if ranged else size
            if got != want and not (ranged and 0 < got < want):
                f.truncate(have)
                f.seek(have)
                what = "no data" if got == 0 else f"{got:,} bytes" + (" or more" if got > want else "")
                raise StoreError(f"{remote.redact(url)}: asked for bytes {have:,} to {end - 1:,} of a file of "
                                 f"{size:,} bytes, the server sent {what}; refusing it (a damaged or hostile server)")
            have += got
            bar.update(got)
        os.fsync(f.fileno())
    if reused and not _same_tail(zpart, size, lambda a, b: call(lambda: remote.cat_range(fs, path, a, b))):
        # the bytes kept from an earlier run are not the start of this file: the file on the
        # server changed since (or they came from another URL); start over
        os.truncate(zpart, 0)
        return _download_zip(url, zpart, storage_options, retries=retries, progress=progress, piece=piece)
    return reused, size - reused


def _same_tail(zpart: Path, size: int, get: Callable[[int, int], bytes]) -> bool:
    """Whether the end of the downloaded zip is the server's: from the root ``zarr.json`` entry
    (the digest of every file) to the end of the file (the central directory: every entry's
    offset, size and CRC). When it is, verifying the zip checks it against the server's
    current version; an older download of the same size would otherwise verify against itself."""
    try:
        with zipfile.ZipFile(zpart) as zf:
            start = zf.getinfo(ROOT_KEY).header_offset
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, EOFError):
        return False
    if not 0 <= start < size or size - start > 2 * METADATA_LIMIT:
        return False
    with open(zpart, "rb") as f:
        f.seek(start)
        mine = f.read(size - start)
    try:
        return bytes(get(start, size)) == mine
    except StoreError:  # a server that answers whole files only cannot be compared: start over
        return False


def _fetch_dir(source: Any, url: str, out: Path, before: Any, *, jobs: int, retries: int,
               progress: bool) -> FetchResult:
    """Fetch the store directory ``source`` serves into ``fetch_partial(out)``, verify, commit."""
    from satdata import remote
    from satdata.atomic import is_own_plain_dir, make_private_dir
    from satdata.store import StoreInfo, ATTR_KEY

    shown = remote.redact(url)
    partial = fetch_partial(out)
    # the commit record first: fetched, parsed, checked; written into the partial directory last
    root_bytes = _with_retries(lambda: source.get(ROOT_KEY), retries)
    try:
        root_meta = json.loads(root_bytes)
        attrs = root_meta.get("attributes", {}) if isinstance(root_meta, dict) else None
        if root_meta.get("node_type") != "group" or not isinstance(attrs, dict):
            raise ValueError("not a Zarr v3 group")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:160]
        raise StoreError(f"{shown}: not a satkit store (its zarr.json is not a Zarr group's metadata: {why})") from None
    if ATTR_KEY not in attrs:
        raise StoreError(f"{shown}: not a satkit store (no '{ATTR_KEY}' attribute in zarr.json; a Zarr group from "
                         "another tool, or an unfinished upload)")
    info = StoreInfo.from_json(attrs[ATTR_KEY], shown)
    meta_keys = metadata_keys(info, shown)

    if os.path.lexists(partial):
        if not is_own_plain_dir(partial):
            raise SatkitError(f"{partial}: is in the way (not a directory satdata made); remove it")
        for name in os.listdir(partial):  # never a root zarr.json before everything verified
            if name == ROOT_KEY or name.startswith(".zarr.json"):
                _remove(partial / name)
    else:
        make_private_dir(partial)

    # array and group metadata: small, fetched every time (they carry no digest of their own)
    metas = _run_all([(k, k) for k in meta_keys], lambda k: _with_retries(lambda: source.get(k), retries),
                     jobs, None)
    entries: list[Entry] = []
    for p in array_paths(info, shown):
        entries += chunk_entries(p, metas[f"{p}/zarr.json"], info.digests[p], shown)
    wanted = {e.key: e for e in entries}
    for k in meta_keys:
        wanted[k] = Entry(k)
    kept = _keep_verified(partial, wanted)
    for k in meta_keys:
        _write_file(partial, k, metas[k])
    todo = [e for e in entries if e.key not in kept]
    total_bytes = 0

    def one(e: Entry) -> int:
        data = _with_retries(lambda: source.get(e.key, e.limit), retries)
        got = _digest(data)
        if got != e.digest:
            raise StoreError(f"{source.name(e.key)}: {_mismatch(e, got)}: the copy on the server is damaged; "
                             f"nothing was written to {out}")
        _write_file(partial, e.key, data)
        return len(data)

    # at most about IN_FLIGHT_BYTES held at once: 16 shards of 224x224 images would be 1.2 GB
    jobs = max(1, min(jobs, IN_FLIGHT_BYTES // max([e.limit for e in todo] or [1])))
    with _bar(None, f"fetch {len(todo)} files" + (f" ({len(kept)} kept)" if kept else ""), progress) as bar:
        sizes = _run_all([(e.key, e) for e in todo], one, jobs, bar)
    total_bytes = sum(sizes.values())

    # everything is here and matches its chunk digest: now the full check of the decoded content
    _verify_partial(partial, root_meta, info, shown, out)
    _write_file(partial, ROOT_KEY, root_bytes)  # the commit record, last
    try:
        from satdata.build import commit

        commit(partial, out, before)
    except BaseException:
        (partial / ROOT_KEY).unlink(missing_ok=True)  # a hidden leftover never opens as a store
        raise
    return FetchResult(out, len(wanted) + 1, len(todo), total_bytes, len(kept), 0.0, info)


def _with_retries(fn: Callable[[], bytes], retries: int) -> bytes:
    for attempt in range(retries + 1):
        try:
            return fn()
        except _Retry as e:
            if attempt >= retries:
                raise StoreError(str(e)) from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _run_all(items: Iterable[tuple[str, Any]], fn: Callable[[Any], Any], jobs: int, bar: Any) -> dict[str, Any]:
    """``{key: fn(item)}`` with at most ``jobs`` calls in flight; the first failure stops the rest."""
    items = list(items)
    results: dict[str, Any] = {}
    if not items:
        return results
    pool = ThreadPoolExecutor(max_workers=min(jobs, len(items)), thread_name_prefix="satdata-fetch")
    interrupted = False
    try:
        futures = {pool.submit(fn, item): key for key, item in items}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for fut in done:
                results[futures[fut]] = fut.result()  # raises the first failure
                if bar is not None:
                    v = results[futures[fut]]
                    bar.update(v if isinstance(v, int) else 0)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        # on a failure: no new downloads; those in flight finish (or, on Ctrl-C, are left to)
        pool.shutdown(wait=not interrupted, cancel_futures=True)
    return results


def _write_file(root: Path, key: str, data: bytes) -> None:
    """Write ``root/key`` whole (beside it, then renamed): a kill leaves the old file or the new one."""
    from satdata.atomic import write_bytes_atomic
    from satdata.store import resolve_inside

    target = root / key
    target.parent.mkdir(parents=True, exist_ok=True)
    resolve_inside(root, key)  # no link inside the partial directory leads out of it
    # not synced file by file (a fetch writes thousands): the commit renames the directory
    write_bytes_atomic(target, data, sync=False, mode=0o644)


def _remove(p: Path) -> None:
    """Remove ``p`` from the partial directory: a file or link itself, a directory with what it holds."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _keep_verified(partial: Path, wanted: Mapping[str, Entry]) -> set[str]:
    """Tidy an earlier run's partial directory: keep the chunk files that match their digest.

    Everything else there (files the store does not name, temporary files of a killed
    run, links, chunk files that do not match) is removed. Returns the keys kept.
    """
    kept: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(partial, followlinks=False):
        base = Path(dirpath)
        for d in list(dirnames):
            if (base / d).is_symlink() or (base / d).relative_to(partial).as_posix() in wanted:
                _remove(base / d)  # a link, or a directory where a file belongs
                dirnames.remove(d)
        for name in filenames:
            p = base / name
            key = p.relative_to(partial).as_posix()
            e = wanted.get(key)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if e is None or not stat.S_ISREG(st.st_mode):
                p.unlink()
                continue
            if e.digest is None:
                continue  # metadata: rewritten below
            if st.st_size > e.limit:  # more than the file can hold: never read whole
                p.unlink()
                continue
            with open(p, "rb") as f:
                data = f.read()
            if _digest(data) == e.digest:
                kept.add(key)
            else:
                p.unlink()
    return kept


def _verify_partial(partial: Path, root_meta: dict, info: Any, shown: str, out: Path) -> None:
    """``verify`` of the fetched store, opened with a root zarr.json that lacks the commit record."""
    import zarr

    from satdata.store import ATTR_KEY, Store, validate
    from satdata.verify import verify_digests

    bare = dict(root_meta)
    bare["attributes"] = {k: v for k, v in root_meta.get("attributes", {}).items() if k != ATTR_KEY}
    _write_file(partial, ROOT_KEY, json.dumps(bare, indent=2).encode())
    try:
        try:
            group = zarr.open_group(str(partial), mode="r")
            validate(group, info, shown)
            rep = verify_digests(Store(str(partial), group, info))
        except StoreError as e:
            rep = SimpleNamespace(ok=False, problems=[str(e).removeprefix(f"{shown}: ")])
        except Exception as e:  # noqa: BLE001 - damaged metadata: zarr raises many types
            rep = SimpleNamespace(ok=False, problems=[f"cannot be opened ({type(e).__name__}: {str(e)[:120]})"])
    finally:
        (partial / ROOT_KEY).unlink(missing_ok=True)
    if not rep.ok:
        shutil.rmtree(partial, ignore_errors=True)  # its metadata disagrees with its digests: start over
        raise StoreError(f"{shown}: the fetched store does not verify: {_problems(rep)}; nothing was written to "
                         f"{out} (the copy on the server is damaged)")


__all__ = ["DEFAULT_JOBS", "DEFAULT_RETRIES", "Entry", "FetchResult", "PackResult", "array_paths", "chunk_entries",
           "fetch", "fetch_partial", "fetch_partial_zip", "metadata_keys", "pack"]
