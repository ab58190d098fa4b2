"""Writing aside, then renaming into place: nothing is ever half-written or lost (one job).

Every write in satkit that must not be seen half-done goes through here, in both halves:

* :func:`atomic_write` (and :func:`write_json_atomic`, :func:`write_text_atomic`) -- a
  file is written into a temporary file created exclusively beside it (``O_CREAT |
  O_EXCL | O_NOFOLLOW``, a random name), flushed to disk, then renamed onto its name with
  ``os.replace``: a kill leaves the old file or the new one, a symbolic link planted at
  the name or at a temporary name cannot redirect the write, and a write that fails
  (disk full, Ctrl-C) leaves no temporary file behind. Checkpoints, run-directory JSON,
  a store's ``zarr.json`` (``satdata.store.write_info``), shard bookkeeping, fetched files.

Commands that write a new store or file under a name the user gave (``satdata build
--out``, ``satdata export --out``, ``satdata pack``, ``satdata fetch``) claim, check and
commit that output here:

* :func:`resolve_out` -- a symlink given as the output is followed to the store or file
  it names, and that target is what gets replaced (``--overwrite``); a dangling link or
  a link to something else is refused.
* :func:`probe_writable` -- the output directory is checked writable before long work
  starts (a temporary file is created and removed), so a read-only or full disk is one
  line at the start, not at the end.
* :func:`output_lock` -- an exclusive lock per output name (``flock`` on a hidden
  ``.NAME.lock`` beside it, removed on release): of two commands writing one output, the
  second exits at once with a message naming the first one's process.
* :func:`identity` and :func:`commit_path` -- what was at the output when the command
  started is recorded; the commit refuses (and discards only its own work) if something
  else appeared there or changed it meanwhile, and otherwise moves the finished work in
  with one atomic rename (``RENAME_NOREPLACE`` onto a free name, ``RENAME_EXCHANGE`` with
  an existing store), so a kill at any moment leaves the old or the new output, never
  neither.
* :func:`store_lock` -- the lock ``satdata saliency``/``add_map`` hold while changing a
  finished store; a build replacing that store takes it too.
* :func:`remove_stale`, :func:`remove_partial` -- leftovers ``.NAME.partial-PID`` of
  killed commands, and a command's own partial directory on failure.
* :func:`sigterm_as_interrupt` -- SIGTERM raised as KeyboardInterrupt, so the cleanup of
  a ``try``/``finally`` runs when a job scheduler stops the command.

Cleanup only ever removes paths this process created (its partial directory, the old
store it swapped out), or partial directories of dead builds that are plain directories
owned by this user: it never follows a symlink.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from satdata.errors import SatkitError

# renameat2(2) flags (Linux >= 3.15)
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _one_line_os(e: OSError) -> str:
    return e.strerror or type(e).__name__


# --------------------------------------------------------------------------- files


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")


def _open_exclusive(path: Path, mode: int = 0o666) -> tuple[int, Path]:
    """A new temporary file beside ``path``, created exclusively: (fd, its path).

    ``O_EXCL`` fails on anything already at the name (a symbolic link included, dangling or
    not), and the name is random, so the write cannot be redirected outside the directory.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a temporary file", str(path.parent))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, sync: bool = True,
                 mode: int = 0o666) -> None:
    """Write ``path`` through ``write(file)`` into an exclusive temporary file, then rename it.

    The temporary file is ``.NAME.tmp-PID-<random>`` beside ``path``, created with ``mode``
    (less the umask) and, with ``sync``, flushed to disk before the rename. On any failure
    (an OSError such as a full disk, KeyboardInterrupt, an error in ``write``) the
    temporary file is removed and the destination is left as it was.
    """
    path = Path(path)
    fd, tmp = _open_exclusive(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # the one-line error names the file being written
        raise


def leftover_temps(path: str | Path) -> list[Path]:
    """The temporary files ``atomic_write`` calls left beside ``path`` when they were killed
    (``.NAME.tmp-*``), sorted; remove them only where no such write can be running."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def write_bytes_atomic(path: str | Path, data: bytes, **kw: Any) -> None:
    """Write ``data`` as the whole of ``path``, aside then renamed (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(data), **kw)


def write_json_atomic(path: str | Path, obj: Any, *, allow_nan: bool = True) -> None:
    """Write a run directory's JSON file aside, then rename it into place (no torn files)."""
    data = (json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) aside, then rename it into place."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


# --------------------------------------------------------------------------- naming the output


def resolve_out(out: Path, *, overwrite: bool) -> Path:
    """The path to write: ``out`` itself, or the target a symlink ``out`` names.

    Without ``overwrite`` an existing ``out`` (a link included) is left to the caller's
    "already exists" check. With it, a link is followed to its final target, which must
    exist (a dangling link is refused: it would create a store wherever the link points).
    """
    if not out.is_symlink() or not overwrite:
        return out
    try:
        target = out.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        reason = "a symlink loop" if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP \
            else f"a symlink to {os.readlink(out)!r}, which does not exist"
        raise SatkitError(f"{out}: is {reason}; refusing to write through it "
                          "(remove the link or give the real path)") from None
    return target


def make_parents(d: Path, what: str = "--out") -> list[Path]:
    """Create ``d`` and its missing parents; returns the ones created (deepest last)."""
    missing = []
    p = d
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    made = []
    for m in reversed(missing):
        try:
            m.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            remove_empty(made)
            raise SatkitError(f"{what}: cannot create the directory {m} ({_one_line_os(e)})") from None
        made.append(m)
    if not d.is_dir():
        raise SatkitError(f"{what}: {d} is not a directory")
    return made


def remove_empty(dirs: list[Path]) -> None:
    """Remove directories this process created, deepest first, if they are still empty."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            pass


def probe_writable(directory: Path, what: str = "--out", nbytes: int = 1 << 16, *, kind: str = "") -> None:
    """Fail now, in one line naming ``directory``, if ``nbytes`` cannot be written in it.

    A file ``.write-probe-*`` is created exclusively (never through a planted link),
    filled and synced, then removed: an empty file would still fit on a full disk, and a
    read-only or full file system should stop a command before its long work, not after.
    ``kind`` says what the directory is in the message ("the run directory ").
    """
    def refuse(e: OSError) -> SatkitError:
        return SatkitError(f"{what}: cannot write in {kind}{directory} ({_one_line_os(e).lower()})")

    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    except OSError as e:
        raise refuse(e) from None
    try:
        os.write(fd, bytes(nbytes))
        os.fsync(fd)
    except OSError as e:
        raise refuse(e) from None
    finally:
        os.close(fd)
        os.unlink(name)


# --------------------------------------------------------------------------- locks


def check_file_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing output file unless ``overwrite``; never replace a directory or other non-file."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise SatkitError(f"{out}: already exists (pass --overwrite to replace it)")
        if not out.is_file():
            raise SatkitError(f"{out}: exists and is not a file; refusing to replace it")


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output name ``out`` for the life of the block.

    The lock file ``.NAME.lock`` beside ``out`` is created with O_NOFOLLOW (a planted
    symlink cannot redirect it), locked with ``flock`` (the kernel releases it when the
    process dies, even by SIGKILL) and removed on release. After locking, the file is
    checked to still be the one at that path (a racing release may have unlinked it),
    the usual pattern for lock files that are removed.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    path = _lock_path(out)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SatkitError(f"{path}: is a symlink where satdata keeps its lock; remove it") from None
            raise SatkitError(f"{out}: cannot create the lock {path.name} beside it ({_one_line_os(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                holder = f" (process {int(text)})" if text.isdigit() else ""
            except (OSError, ValueError):
                pass
            os.close(fd)
            raise SatkitError(f"{out}: another satdata command is writing it{holder}; "
                              "try again when it has finished") from None
        try:
            st_fd, st_path = os.fstat(fd), os.lstat(path)
            same = (st_fd.st_dev, st_fd.st_ino) == (st_path.st_dev, st_path.st_ino)
        except FileNotFoundError:
            same = False
        if not same or not stat.S_ISREG(st_fd.st_mode):
            os.close(fd)  # released and unlinked by its holder meanwhile: take the new one
            if stat.S_ISREG(st_fd.st_mode):
                continue
            raise SatkitError(f"{path}: is not a regular file; remove it")
        break
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
        os.close(fd)


@contextmanager
def store_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on a store directory (no file is created)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SatkitError(f"{path}: another satdata command is changing this store; "
                              "try again when it has finished") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --------------------------------------------------------------------------- what is there


Identity = tuple  # what identity() returns: compared, never looked into


def identity(out: Path) -> Identity | None:
    """What is at ``out`` now, without following links: None when nothing is.

    A directory is identified by its inode and by its ``zarr.json`` (inode, size, mtime):
    adding a map to a store replaces that file, so any change to a store shows.
    """
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    ident: tuple = (stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if stat.S_ISDIR(st.st_mode):
        try:
            z = os.lstat(out / "zarr.json")
            ident = ident[:3] + (z.st_ino, z.st_size, z.st_mtime_ns)
        except OSError:
            ident = ident[:3] + (None,)
    return ident


def check_unchanged(out: Path, before: Identity | None) -> None:
    if identity(out) != before:
        what = "appeared" if before is None else ("was removed" if identity(out) is None else "changed")
        raise SatkitError(f"{out}: {what} while this command ran (another process wrote it); "
                          "left it as it is and discarded this command's output")


# --------------------------------------------------------------------------- atomic renames


def _renameat2(a: Path, b: Path, flag: int) -> int:
    """0 on success, else the errno (ENOSYS where renameat2 is not available)."""
    if not sys.platform.startswith("linux"):
        return errno.ENOSYS
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return errno.ENOSYS
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag)
    return 0 if rc == 0 else ctypes.get_errno()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to the free name ``dst``; SatkitError if something is there (never replaced)."""
    err = _renameat2(src, dst, _RENAME_NOREPLACE)
    if err == 0:
        return
    if err == errno.EEXIST:
        raise SatkitError(f"{dst}: appeared while this command ran (another process wrote it); "
                          "left it as it is and discarded this command's output")
    if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise SatkitError(f"{dst}: could not move the finished output into place ({os.strerror(err)})")
    # no renameat2 here: check, then rename (not atomic; the output lock keeps satdata
    # commands apart)
    if os.path.lexists(dst):
        raise SatkitError(f"{dst}: appeared while this command ran (another process wrote it); "
                          "left it as it is and discarded this command's output")
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE) == 0


def commit_path(tmp: Path, out: Path, before: Identity | None, *, remove_old) -> None:
    """Move the finished ``tmp`` onto ``out``, which must still be what it was (``before``).

    A free name is taken with RENAME_NOREPLACE; an existing output is swapped out in one
    atomic step where the OS allows (a kill at any moment leaves the old or the new one
    at ``out``) and then removed with ``remove_old`` (which receives the path now holding
    it: this process's own temporary name).
    """
    check_unchanged(out, before)
    if before is None:
        rename_noreplace(tmp, out)
        return
    if exchange(tmp, out):
        remove_old(tmp)  # tmp now holds the old output
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    rename_noreplace(out, old)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    remove_old(old)


def partial_path(out: Path) -> Path:
    """Where a command builds ``out`` before its commit: the hidden ``.NAME.partial-PID`` beside it."""
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def make_private_dir(path: Path) -> None:
    """Create ``path`` (must not exist in any form: never reuses a planted directory or link)."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        raise SatkitError(f"{path}: is in the way (satdata did not make it in this process); "
                          "remove it and run the command again") from None
    except OSError as e:
        raise SatkitError(f"{path}: cannot create it ({_one_line_os(e)})") from None


def is_own_plain_dir(path: Path) -> bool:
    """A real directory (not a link) owned by this user: safe for this user to remove."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and (not hasattr(os, "geteuid") or st.st_uid == os.geteuid())



# --------------------------------------------------------------------------- leftovers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path, kinds: Sequence[str] = ("partial", "old")) -> list[Path]:
    """Remove leftovers ``.NAME.<kind>-PID`` of builds into ``out`` whose process is gone
    (killed with SIGKILL).

    Call with the output lock held (no live build of ``out`` can own a leftover then, not
    even one with this process's id from before a restart), or for kinds that only this
    process's own code makes. Only plain directories owned by this user are removed: a
    link or someone else's entry under such a name is left.
    """
    removed = []
    for pattern in (f".{out.name}.{kind}-*" for kind in kinds):
        for p in out.parent.glob(pattern):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if (pid == os.getpid() or not _pid_alive(pid)) and is_own_plain_dir(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def remove_partial(tmp: Path) -> None:
    """Remove a build's directory, its zarr.json first: a task of a distributed build
    still running checks for it before each write and stops (satdata.ranges)."""
    try:
        (tmp / "zarr.json").unlink()
    except OSError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- signals


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    prev = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)

__all__ = ["atomic_write", "check_file_out", "check_unchanged", "commit_path", "exchange", "identity",
           "is_own_plain_dir", "leftover_temps", "make_parents", "make_private_dir", "output_lock", "partial_path",
           "probe_writable", "remove_empty", "remove_partial", "remove_stale", "rename_noreplace", "resolve_out",
           "sigterm_as_interrupt", "store_lock", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]
