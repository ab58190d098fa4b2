"""Stores that are not local directories: URLs (http(s)://, s3://, anything fsspec serves) and .zip files.

satkit reads such stores **read-only**, through fsspec, the file-system layer zarr itself
uses for URLs (``zarr.storage.FsspecStore``): aiohttp for HTTP(S), s3fs for S3 and
S3-compatible object stores (``pip install "satkit[remote]"``). Writing goes to local
directories only; a URL or a ``.zip`` given where satkit would write is refused up front
(:func:`refuse_remote_output`), never turned into a local directory named ``s3:``.

Endpoint and credentials come from ``--storage-option KEY=VALUE`` (parsed by
``satdata.clikit.parse_storage_options`` into fsspec's
``storage_options``: for s3:// ``key``, ``secret``, ``endpoint_url``, ``anon``,
``client_kwargs``...; for http(s):// ``headers``, ``client_kwargs``...), or from the
usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ~/.aws/credentials), which s3fs honours itself.

Network failures are told apart from "not a satkit store": :func:`classify` turns what
fsspec, aiohttp and botocore raise into one-line StoreErrors that say unreachable, no
credentials, forbidden or not found, and name the URL.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from satdata.errors import SatkitError, StoreError

EXTRA = 'pip install "satkit[remote]"'
# scheme -> the package that serves it (beyond fsspec itself), for the missing-extra error
_BACKENDS = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "s3a": "s3fs"}
# The most bytes of a root zarr.json satkit accepts from a server (it lists every chunk's
# digest; a million-sample store needs a few MB).
METADATA_LIMIT = 64 * 1024 * 1024
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and _URL_RE.match(path) is not None


def scheme(url: str) -> str:
    m = _URL_RE.match(url)
    return m.group(1).lower() if m else ""


def is_zip(path: Any) -> bool:
    """Whether ``path`` names a packed store (a ``.zip``), local or remote."""
    return str(path).lower().rstrip("/").endswith(".zip")


def redact(url: str) -> str:
    """``url`` without a password in it (``https://user:secret@host`` -> ``https://user:***@host``)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/:@]*):[^/@]*@", r"\1:***@", url)


# --------------------------------------------------------------------------- options


def refuse_remote_output(path: Any, option: str, *, what: str = "a store") -> None:
    """Refuse a URL or a ``.zip`` where satkit would write ``what``: writes go to local directories only."""
    text = str(path)
    if is_url(text):
        raise SatkitError(
            f"{option} {redact(text)}: satkit writes {what} to a local directory only, not to a URL; "
            "write it locally, then share it: `satdata pack STORE STORE.zip` and upload the .zip "
            "(or copy the directory) to the server")
    if is_zip(text) and what == "a store":
        raise SatkitError(
            f"{option} {text}: satkit writes a store as a directory, not a .zip; write NAME.zarr, "
            "then `satdata pack NAME.zarr NAME.zip`")


# --------------------------------------------------------------------------- errors


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, Mapping):
        code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    return None


def network_problem(e: BaseException) -> str | None:
    """What went wrong talking to a server, in a few words, or None when ``e`` is not a network error.

    One of: unreachable, no credentials, forbidden, not found, a server error (with its
    status). Recognised by class name, so neither botocore nor aiohttp is imported here.
    """
    names = _names(e)
    text = str(e)
    status = _status(e)
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "NoAuthTokenError", "ProfileNotFound"}:
        return ("no credentials (pass --storage-option key=... --storage-option secret=..., or set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; --storage-option anon=true for a public bucket)")
    if isinstance(e, PermissionError) or status in (401, 403) or names & {"ClientAuthenticationError"}:
        why = text.strip() or "access denied"
        return (f"forbidden: the server refused the credentials or they lack read permission ({why[:80]})")
    if isinstance(e, FileNotFoundError) or status == 404 or "NoSuchBucket" in text or "NoSuchKey" in text:
        return "not found on the server"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                "ClientConnectionError", "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
                "ConnectionError", "TimeoutError", "gaierror", "InvalidURL", "ClientPayloadError",
                "ConnectionClosedError"} or isinstance(e, (ConnectionError, TimeoutError)):
        return f"unreachable ({type(e).__name__}: {text.strip()[:120] or 'no answer'})"
    if isinstance(status, int) and status >= 400:
        return f"the server answered HTTP {status} ({text.strip()[:120]})"
    return None


def classify(e: BaseException, url: str) -> StoreError:
    """A one-line StoreError for a failure reading ``url`` (see :func:`network_problem`)."""
    problem = network_problem(e)
    m = re.search(r"unexpected keyword argument '([^']+)'", str(e)) if isinstance(e, TypeError) else None
    if m:  # s3fs and aiohttp take their options late, on the first request
        return StoreError(f"--storage-option {m.group(1)}: the {scheme(url)}:// backend does not take this option "
                          f"(reading {redact(url)})")
    if problem is None:
        return StoreError(f"{redact(url)}: cannot be read ({type(e).__name__}: {str(e).strip()[:160]})")
    return StoreError(f"{redact(url)}: {problem}")


def _missing_backend(url: str, e: ImportError) -> StoreError:
    pkg = _BACKENDS.get(scheme(url), "a backend for this protocol")
    return StoreError(f"{redact(url)}: reading {scheme(url)}:// stores needs {pkg} "
                      f"(satkit's remote extra): {EXTRA}  ({str(e).strip()[:100]})")


# --------------------------------------------------------------------------- opening


def backend_options(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``storage_options`` with satkit's defaults for the URL's backend (the user's values win).

    s3fs answers a whole-object read with a HEAD (for the size) and then the GET unless
    ``max_concurrency`` is 1; a store is read in whole chunk files of a few MB, many at a
    time, so the HEAD only doubles the round trips: satkit sets it to 1. botocore's pool
    of 10 connections is raised to 32 (``config_kwargs.max_pool_connections``), as many as
    satkit keeps requests in flight (BENCHMARKS.md, section 2c).
    """
    opts = dict(storage_options or {})
    if scheme(url) in ("s3", "s3a"):
        # botocore keeps 10 connections; satkit has 16 to 32 chunk requests in flight
        cfg = opts.get("config_kwargs")
        if cfg is None or isinstance(cfg, dict):
            opts["config_kwargs"] = {"max_pool_connections": 32, **(cfg or {})}
    if scheme(url) in ("s3", "s3a") and "max_concurrency" not in opts:
        try:
            import inspect

            import s3fs

            if "max_concurrency" in inspect.signature(s3fs.S3FileSystem.__init__).parameters:
                opts["max_concurrency"] = 1
        except ImportError:
            pass  # filesystem() names the missing extra
    return opts


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None, *, asynchronous: bool = False) -> tuple[Any, str]:
    """(fsspec file system, path in it) for ``url``; a missing backend names the extra to install."""
    try:
        import fsspec.core
    except ImportError as e:
        raise _missing_backend(url, e) from None
    opts = backend_options(url, storage_options)
    if asynchronous:
        opts.setdefault("asynchronous", True)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        raise _missing_backend(url, e) from None
    except ValueError as e:  # fsspec: "Protocol not known"
        raise StoreError(f"{redact(url)}: cannot read this kind of URL ({e})") from None
    except TypeError as e:  # an option the backend does not take
        raise StoreError(f"--storage-option: {scheme(url)}:// does not take these options "
                         f"({', '.join(sorted(opts)) or 'none'}): {e}") from None
    return fs, path.rstrip("/")


class RangeIgnored(StoreError):
    """The server answered a request for a range not starting at byte 0 with the whole file."""


_BLOCK = 1 << 20  # the most bytes of an HTTP answer read at once


def is_http(fs: Any) -> bool:
    try:
        from fsspec.implementations.http import HTTPFileSystem
    except ImportError:  # pragma: no cover - no aiohttp: not an HTTP file system
        return False
    return isinstance(fs, HTTPFileSystem)


def is_s3(fs: Any) -> bool:
    """Whether ``fs`` is s3fs's file system (S3 and S3-compatible servers)."""
    protocol = getattr(fs, "protocol", ())
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol or ())
    return "s3" in protocols and hasattr(fs, "_call_s3") and hasattr(fs, "split_path")


def is_bounded(fs: Any) -> bool:
    """Whether reads through ``fs`` can be stopped where satkit wants (:func:`bounded_get`): HTTP(S) and S3."""
    return is_http(fs) or is_s3(fs)


def bounded_get(fs: Any, path: str, start: int, end: int, write: Callable[[bytes], Any], *, cap: int,
                whole_cap: int | None) -> bool:
    """GET bytes [start, end) of ``path`` from the HTTP(S) or S3 file system ``fs``
    (:func:`is_bounded`), its body passed to ``write`` block by block; returns whether the
    server answered with the range (206).

    fsspec and s3fs read a whole answer into memory before cutting it to the range asked for,
    so a server that ignores Range (``python -m http.server``) or sends more than it declared
    could make a reader hold gigabytes. Here at most ``cap`` bytes of a ranged answer are
    read, and of an answer with the whole file (200) at most ``whole_cap`` -- or none, with
    RangeIgnored, where ``whole_cap`` is None: the bytes would not be the ones asked for.
    """
    from fsspec.asyn import sync

    return sync(fs.loop, _getter(fs), fs, path, start, end, write, cap, whole_cap)


def _getter(fs: Any) -> Callable[..., Any]:
    """The coroutine of :func:`bounded_get` for ``fs``: _http_get or _s3_get."""
    return _http_get if is_http(fs) else _s3_get


async def _http_get(fs: Any, path: str, start: int, end: int, write: Callable[[bytes], Any], cap: int,
                    whole_cap: int | None) -> bool:
    """:func:`bounded_get` over HTTP(S), in ``fs``'s event loop."""
    kw = dict(fs.kwargs)
    headers = dict(kw.pop("headers", None) or {})
    headers["Range"] = f"bytes={start}-{end - 1}"
    session = await fs.set_session()
    async with session.get(fs.encode_url(path), headers=headers, **kw) as r:
        fs._raise_not_found_for_status(r, path)
        ranged = r.status == 206
        limit = cap if ranged else whole_cap
        if limit is None:
            raise RangeIgnored(f"{redact(path)}: asked for bytes {start:,} to {end - 1:,}, the server sent the "
                               "whole file: it does not answer HTTP Range requests")
        await _copy_at_most(r.content.read, write, limit)
        return ranged


async def _copy_at_most(read: Callable[[int], Any], write: Callable[[bytes], Any], limit: int) -> None:
    """Pass at most ``limit`` bytes of an answer's body (``await read(n)``) to ``write``, a
    block of at most _BLOCK bytes at a time; the rest is never read."""
    n = 0
    while n < limit:
        block = await read(min(_BLOCK, limit - n))
        if not block:
            break
        n += len(block)
        write(block)


def _url_of(fs: Any, path: str) -> str:
    """The URL of ``path`` in ``fs`` (s3fs's paths lack their ``s3://``; HTTP's are URLs already)."""
    try:
        return path if is_url(path) else str(fs.unstrip_protocol(path))
    except Exception:  # noqa: BLE001 - a file system without it
        return path


async def _s3_get(fs: Any, path: str, start: int, end: int, write: Callable[[bytes], Any], cap: int,
                  whole_cap: int | None) -> bool:
    """:func:`bounded_get` for s3fs's file system ``fs``, in its event loop.

    s3fs reads a whole answer into memory (``await Body.read()``), so an S3 server that
    ignores Range or sends more than an object it declared made a reader hold all it sent.
    Here the answer's body is read block by block, at most ``cap`` bytes of a ranged (206)
    answer, ``whole_cap`` of a whole-object (200) one, and the connection is dropped there.
    """
    bucket, key, version = fs.split_path(path)
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                             **({"VersionId": version} if version else {}))
    body = resp["Body"]
    try:
        ranged = resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 206 or "ContentRange" in resp
        limit = cap if ranged else whole_cap
        if limit is None:
            raise RangeIgnored(f"{redact(_url_of(fs, path))}: asked for bytes {start:,} to {end - 1:,}, the server "
                               "sent the whole object: it does not answer Range requests")
        await _copy_at_most(body.read, write, limit)
        return ranged
    finally:
        body.close()  # unread bytes are never read: the connection is closed, not reused


def bound_metadata_reads(fs: Any) -> None:
    """Make zarr's reads through the async HTTP or S3 file system ``fs`` bounded.

    zarr reads metadata whole (``fs._cat_file(path)``, no range), and fsspec takes the whole
    answer into memory: a server that floods an array's zarr.json made opening the store hold
    gigabytes. Here such a read takes at most METADATA_LIMIT + 1 bytes, and more is refused.
    Over S3, a ranged read (a chunk or shard, ``chunkio``'s ``Range: bytes=0-L``) takes at
    most the bytes asked for too: s3fs would hold a whole object a server sent instead.
    """
    if not is_bounded(fs) or getattr(fs, "_satkit_bounded", False):
        return
    plain = fs._cat_file
    get = _getter(fs)
    s3 = get is _s3_get

    async def cat_file(path: str, *args: Any, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        if (not args and not kw and s3 and start is not None and end is not None
                and 0 <= start < end):
            buf = bytearray()  # a whole object from byte 0 holds the bytes asked for first
            await _s3_get(fs, path, start, end, buf.extend, end - start, end if start == 0 else None)
            return bytes(buf)
        if args or kw or start is not None or end is not None:
            return await plain(path, *args, start=start, end=end, **kw)
        if str(path).rstrip("/").endswith("zarr.json"):
            limit, too_much = METADATA_LIMIT, f"larger than {METADATA_LIMIT:,} bytes, far more than a store's metadata"
        else:
            found = _file_limit(fs, str(path))
            if found is None:
                return await plain(path)
            limit, too_much = found, f"more than {found:,} bytes on the server, more than a file of its array can hold"
        buf = bytearray()
        await get(fs, path, 0, limit + 1, buf.extend, limit + 1, limit + 1)
        if len(buf) > limit:
            raise StoreError(f"{redact(_url_of(fs, str(path)))}: {too_much}; refusing it (a damaged or hostile server)")
        return bytes(buf)

    fs._cat_file = cat_file
    fs._satkit_bounded = True


def bound_file_reads(fs: Any, limits: Mapping[str, int]) -> None:
    """Bound zarr's whole-file reads of the arrays' files through ``fs`` too (once
    :func:`bound_metadata_reads` is in place): ``limits`` maps an array's path in ``fs`` to
    the most bytes one of its files (chunks, or shards) can hold (``chunkio.chunk_limit``);
    a read of ``<array>/c/...`` takes at most that + 1 bytes, and more is refused."""
    if getattr(fs, "_satkit_bounded", False):
        known = getattr(fs, "_satkit_file_limits", {})
        fs._satkit_file_limits = {**known, **{k.rstrip("/"): int(v) for k, v in limits.items()}}


def _file_limit(fs: Any, path: str) -> int | None:
    """The most bytes the file ``path`` of an array with a recorded limit can hold (:func:`bound_file_reads`)."""
    array, sep, _ = path.rpartition("/c/")
    return getattr(fs, "_satkit_file_limits", {}).get(array) if sep else None


def cat_range(fs: Any, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of ``path``, and at most one byte more where the server sends more
    than asked (the caller's sign of a file larger than it may be), whatever the server
    sends: over HTTP(S) and S3 the answer is read only that far (:func:`bounded_get`)."""
    if not is_bounded(fs):
        return bytes(fs.cat_file(path, start=start, end=end))
    buf = bytearray()
    bounded_get(fs, path, start, end, buf.extend, cap=end - start + 1, whole_cap=end + 1 if start == 0 else None)
    return bytes(buf)


def probe(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of ``url``'s root ``zarr.json`` (or, for a .zip URL, its first bytes), or a classified StoreError.

    This one small request tells unreachable, no credentials, forbidden and not found
    apart before zarr, whose own errors would all read "not a store".
    """
    fs, path = filesystem(url, storage_options)
    key = path if is_zip(url) else f"{path}/zarr.json"
    try:
        if is_zip(url):
            with fs.open(key, "rb") as f:
                return f.read(4)
        head = cat_range(fs, key, 0, METADATA_LIMIT + 1)  # bounded: a server cannot flood memory
    except FileNotFoundError:
        if is_zip(url):
            raise StoreError(f"{redact(url)}: not found on the server") from None
        raise StoreError(f"{redact(url)}: not found on the server (no {redact(url.rstrip('/'))}/zarr.json); "
                         "check the URL, or the store was never uploaded") from None
    except Exception as e:  # noqa: BLE001 - every backend raises its own types
        raise classify(e, url) from None
    if len(head) > METADATA_LIMIT:
        raise StoreError(f"{redact(url)}: its zarr.json is larger than {METADATA_LIMIT:,} bytes, far more than a "
                         "store's metadata; refusing it (a damaged or hostile server)")
    return head


def open_group(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The zarr group at ``url`` (a store directory, or a .zip, over any fsspec protocol), read-only."""
    import zarr

    head = probe(url, storage_options)
    try:
        from zarr.storage import FsspecStore
        from zarr.storage._fsspec import _make_async

        if is_zip(url):
            if head[:2] != b"PK":
                raise StoreError(f"{redact(url)}: not a zip file (it starts with {head[:4]!r})")
            import fsspec

            fs, path = filesystem(url, storage_options)
            zfs = fsspec.filesystem("zip", fo=fs.open(path, "rb", block_size=1 << 20))
            big = next((i for i in zfs.zip.infolist() if i.filename.rsplit("/", 1)[-1] == "zarr.json"
                        and i.file_size > METADATA_LIMIT), None)
            if big is not None:  # zarr reads metadata whole: no zarr.json bomb
                raise StoreError(f"{redact(url)}: {big.filename} inflates to {big.file_size:,} bytes, far more "
                                 "than a store's metadata; not a satkit store (a zip bomb?)")
            store = FsspecStore(fs=_make_async(zfs), path="", read_only=True)
        else:
            store = FsspecStore.from_url(url, storage_options=backend_options(url, storage_options), read_only=True)
            bound_metadata_reads(store.fs)
        return zarr.open_group(store, mode="r")
    except StoreError:
        raise
    except ImportError as e:
        raise _missing_backend(url, e) from None
    except Exception as e:  # noqa: BLE001
        if network_problem(e) is not None:
            raise classify(e, url) from None
        if "range requests" in str(e):  # fsspec's HTTP file: the server ignores Range
            raise StoreError(f"{redact(url)}: the server does not answer HTTP Range requests, which reading a "
                             "packed store in place needs (nginx, Apache and S3 do; python -m http.server does "
                             "not); download it instead: satdata fetch URL --out NAME.zarr") from None
        raise StoreError(f"{redact(url)}: not a satkit store ({type(e).__name__}: {str(e).strip()[:160]})") from None
