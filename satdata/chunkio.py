"""Whole-file reads: fetching with bounded concurrency, and decoding without zarr's overhead.

A stored file is a chunk of an array, or, in arrays written with Zarr's sharding codec
(format version 2, docs/store-format.md), a shard: many inner chunks and an index in one
file. Arrays are cut along N only, so file ``i`` holds samples ``[i * u, min(N, (i + 1) * u))``
with ``u = satdata.store.write_unit(arr)``. The two halves of this module:

* **Fetching** (``read_chunks``, ``take_rows``, ``iter_chunk_files``), for stores that are
  not on a local disk: used by ``StreamingSplit`` (sattrain/data.py) for the blocks of a
  store at a URL, by ``satdata verify`` (satdata/verify.py) for every store, and by
  ``satdata.store.read_rows_into`` for sharded arrays at a URL or in a .zip. Reading file
  after file costs one round trip each: over a network (S3, HTTP) the time goes to
  waiting, not to moving bytes. Here many whole files are requested at once, at most
  ``concurrency`` and about IN_FLIGHT_BYTES in flight, on zarr's own event loop (where the
  store's network client lives), each as one bounded ranged GET, so a file is fetched once
  and its stored bytes are at hand as well as its values (``satdata verify`` hashes both).
* **Decoding** (``file_format``, ``decode_rows_into``, ``read_local_rows_into``,
  ``encode_file``): the layouts satkit writes (raw values, or zstd or blosc per chunk, in
  plain chunk files or in shards) are read straight into the caller's array, a shard's
  index parsed and its crc32c checked here. Zarr's general pipeline decodes a shard inner
  chunk by inner chunk in Python (about 0.3 GB/s for 224x224 images, 1 sample per inner
  chunk; bench/read.py), which would make a sharded split 20 times slower to load than
  its raw bytes. Anything else (another codec, a filter, a foreign layout) goes through
  zarr's own pipeline, as before.

    chunks = read_chunks([(images, 3), (images, 7), (maps, 3)])   # values, rows [a, b)
    for arr, i, stored, values in iter_chunk_files([(images, 0), (images, 1)]):
        ...                                                         # in order, bounded window

A file that does not exist (zarr writes none for a chunk or shard of fill values) reads
as the fill value, as zarr's own reads do; so does an inner chunk that a shard's index
marks empty. On a local disk the fetching functions work too, but one sequential reader
is as fast there (``is_local``: callers keep their local fast paths).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

if TYPE_CHECKING:
    import zarr

T = TypeVar("T")

# Requests in flight at once. Over a network the time of a chunk is mostly latency, so
# more in flight means proportionally more bytes per second, until the link, the server
# or the client's CPU saturates (bench/remote.py: with 20 ms per request, 32 in flight
# fetch a store about 1.5x faster than 10). Memory: at most 32 chunks of at most 2 MiB
# of images (docs/store-format.md) beyond what the caller keeps. An S3 client may hold
# fewer connections than this: s3fs keeps botocore's max_pool_connections, 10 unless
# storage_options={"config_kwargs": {"max_pool_connections": N}}; requests beyond its
# pool wait for a connection.
DEFAULT_CONCURRENCY = 32
# Bytes in flight at once, on top of the count: a shard of 224x224 images is 77 MB
# (docs/store-format.md), so 32 of them would hold 2.5 GB. Each request counts the most
# its file can hold (chunk_limit); at least one is always in flight.
IN_FLIGHT_BYTES = 512 * 1024 * 1024


def is_local(arr: "zarr.Array") -> bool:
    """Whether ``arr`` lives in a directory on the local disk (zarr's LocalStore)."""
    from zarr.storage import LocalStore

    return isinstance(arr.store, LocalStore)


def _loop() -> asyncio.AbstractEventLoop:
    """zarr's I/O event loop (one background thread per process): the store's client
    (aiohttp sessions of s3fs/fsspec) is bound to it, so every request runs there."""
    from zarr.core.sync import _get_loop

    return _get_loop()


def _submit(coro: Awaitable[T]) -> "Future[T]":
    return asyncio.run_coroutine_threadsafe(coro, _loop())  # type: ignore[arg-type]


def chunk_rows(arr: "zarr.Array", i: int) -> tuple[int, int]:
    """Sample range ``[a, b)`` of file ``i`` (chunk, or shard) along axis 0."""
    from satdata.store import write_unit

    c = write_unit(arr)
    return i * c, min(int(arr.shape[0]), (i + 1) * c)


def file_word(arr: Any) -> str:
    """What a file of ``arr`` is called in messages: "shard" (sharded arrays) or "chunk"."""
    return "shard" if getattr(arr, "shards", None) else "chunk"


def _coords(arr: "zarr.Array", i: int) -> tuple[int, ...]:
    return (i,) + (0,) * (arr.ndim - 1)


# The most bytes a chunk of a string array (ids) may hold: its size is not known ahead.
STRING_CHUNK_LIMIT = 256 * 1024 * 1024


def chunk_limit(meta: Any) -> int:
    """The most bytes a stored file (chunk, or shard) of an array with metadata ``meta`` can
    hold: its raw size plus what a codec may add to incompressible data (zstd and blosc add
    well under 1%), and for a shard its index and a header per inner chunk."""
    try:
        dtype = meta.data_type.to_native_dtype()
        if dtype.kind in "OUST" or int(dtype.itemsize) <= 0:
            return STRING_CHUNK_LIMIT
        itemsize = int(dtype.itemsize)
    except Exception:  # noqa: BLE001 - a dtype without a fixed size
        return STRING_CHUNK_LIMIT
    shape = [int(c) for c in meta.chunk_grid.chunk_shape]  # the file's shape: a shard, where sharded
    raw = itemsize * math.prod(shape)
    inner = getattr(meta.codecs[0], "chunk_shape", None) if len(meta.codecs) == 1 else None
    extra = 0
    if inner is not None:  # sharded: 16 bytes of index and at most 64 of codec header per inner chunk
        extra = 80 * math.prod(max(1, s // max(1, int(c))) for s, c in zip(shape, inner)) + 4
    return raw + raw // 50 + (1 << 20) + extra


async def _get_bytes(arr: "zarr.Array", i: int) -> Any:
    """The stored bytes of file ``i`` (chunk, or shard) as a zarr Buffer, or None where no file exists.

    Over fsspec (URLs) it is asked for as one bounded range, ``Range: bytes=0-L`` with L
    what the file can hold at most (:func:`chunk_limit`): the whole file in one request,
    and never more than that from a damaged or hostile server (a longer answer is a
    StoreError). A plain whole-object read through s3fs would first ask for the object's
    size (a HEAD, to split large objects into parallel ranges), which doubles the round
    trips and the per-request work for chunk-sized objects (bench/remote.py).
    """
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import FsspecStore

    key = f"{arr.path}/{arr.metadata.encode_chunk_key(_coords(arr, i))}"
    if not isinstance(arr.store, FsspecStore):
        return await arr.store.get(key, prototype=default_buffer_prototype())
    limit = chunk_limit(arr.metadata)
    buf = await arr.store.get(key, prototype=default_buffer_prototype(), byte_range=RangeByteRequest(0, limit + 1))
    if buf is not None and len(buf) > limit:
        from satdata.errors import StoreError

        a, b = chunk_rows(arr, i)
        raise StoreError(f"array {arr.path} {file_word(arr)} {i} (samples [{a}, {b})) is more than {limit:,} bytes "
                         "on the server, more than it can hold; refusing it (a damaged or hostile server)")
    return buf


async def _decode(arr: "zarr.Array", i: int, buf: Any) -> np.ndarray:
    """File ``i``'s values from its stored bytes ``buf`` (None: the fill value), rows [a, b).

    The layouts satkit writes are decoded here (:func:`decode_rows_into`, in a worker
    thread so that the event loop keeps serving other requests); anything else through the
    array's own codec pipeline (zarr 3.1: ``codec_pipeline.decode`` with the file's
    ``ArraySpec``), exactly what ``arr[a:b]`` would decode.
    """
    from zarr.core.buffer import default_buffer_prototype

    a, b = chunk_rows(arr, i)
    fmt = file_format(arr.metadata)
    if fmt is not None:
        out = np.empty((b - a,) + fmt.sample_shape, dtype=fmt.dtype)
        if buf is None:
            out[...] = fmt.fill_value
        else:
            await asyncio.to_thread(decode_rows_into, fmt, buf.as_numpy_array(), 0, b - a, out)
        return out
    aarr = arr._async_array
    spec = aarr.metadata.get_chunk_spec(_coords(arr, i), aarr.config, prototype=default_buffer_prototype())
    if buf is None:
        from zarr.core.codec_pipeline import fill_value_or_default

        out = np.empty((b - a,) + tuple(arr.shape[1:]), dtype=spec.dtype.to_native_dtype())
        out[...] = fill_value_or_default(spec)
        return out
    (nd,) = await aarr.codec_pipeline.decode([(buf, spec)])
    if nd is None:  # a codec that maps stored bytes to "no chunk"
        raise ValueError(f"{file_word(arr)} {i} decodes to nothing")
    values = nd.as_numpy_array()
    if tuple(values.shape) != tuple(spec.shape):
        raise ValueError(f"{file_word(arr)} {i} decodes to shape {tuple(values.shape)}, expected {tuple(spec.shape)}")
    return values[: b - a]


async def _decode_rows(arr: "zarr.Array", i: int, buf: Any, rows: np.ndarray, out: np.ndarray) -> None:
    """Rows ``rows`` (offsets within file ``i``, sorted) of the file with stored bytes ``buf`` into ``out``."""
    fmt = file_format(arr.metadata)
    contiguous = len(rows) > 0 and int(rows[-1]) - int(rows[0]) + 1 == len(rows)
    if fmt is not None and contiguous and out.flags.c_contiguous:  # straight into place
        if buf is None:
            out[...] = fmt.fill_value
        else:
            await asyncio.to_thread(decode_rows_into, fmt, buf.as_numpy_array(), int(rows[0]), int(rows[-1]) + 1, out)
        return
    values = await _decode(arr, i, buf)
    if len(rows) == len(values) and (len(rows) == 0 or (rows[0] == 0 and rows[-1] == len(rows) - 1)):
        out[...] = values  # the whole file (rows are sorted and distinct)
    else:
        np.take(values, rows, axis=0, out=out, mode="clip")  # rows are in range; "raise" would buffer


def _limit(concurrency: int | None) -> int:
    """``concurrency``, or the module's DEFAULT_CONCURRENCY (read at call time) when None."""
    return max(1, DEFAULT_CONCURRENCY if concurrency is None else int(concurrency))


def _weights() -> Callable[["zarr.Array"], int]:
    """``weight(arr)``: the most bytes a file of ``arr`` holds (chunk_limit), computed once per array."""
    seen: dict[int, tuple[Any, int]] = {}

    def weight(arr: "zarr.Array") -> int:
        got = seen.get(id(arr))
        if got is None or got[0] is not arr:
            got = seen[id(arr)] = (arr, chunk_limit(arr.metadata))
        return got[1]

    return weight


async def _bounded(jobs: Sequence[tuple[int, Callable[[], Awaitable[T]]]], concurrency: int | None) -> list[T]:
    """Run ``(weight, job)`` pairs in order, at most ``concurrency`` and about IN_FLIGHT_BYTES
    (the sum of the weights) at once, at least one; after a failure no new job starts.
    Raises the first failure (in job order) once every started job has finished."""
    limit, cap = _limit(concurrency), max(1, int(IN_FLIGHT_BYTES))
    tasks: list[asyncio.Future] = []
    running: dict[asyncio.Future, int] = {}
    used = 0
    failed = False
    for weight, job in jobs:
        while running and (len(running) >= limit or used + weight > cap):
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                used -= running.pop(t)
                failed = failed or t.exception() is not None
        if failed:
            break
        t = asyncio.ensure_future(job())
        tasks.append(t)
        running[t] = weight
        used += weight
    if running:
        await asyncio.wait(running)
    for t in tasks:  # every started request has finished: raise the first failure
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]


def read_chunks(wanted: Iterable[tuple["zarr.Array", int]], *, concurrency: int | None = None) -> list[np.ndarray]:
    """The values of each (array, file index) in ``wanted`` (rows ``[a, b)`` of that
    file), in order; at most ``concurrency`` files (and about IN_FLIGHT_BYTES) fetched and
    decoded at once.

    The first failure (a network error, a file that does not decode) is raised once
    every request has finished.
    """
    pairs = list(wanted)
    weight = _weights()

    def job(arr: "zarr.Array", i: int) -> tuple[int, Callable[[], Awaitable[np.ndarray]]]:
        async def run() -> np.ndarray:
            return await _decode(arr, i, await _get_bytes(arr, i))

        return weight(arr), run

    if not pairs:
        return []
    return _submit(_bounded([job(a, i) for a, i in pairs], concurrency)).result()


def take_rows(wanted: Iterable[tuple["zarr.Array", int, np.ndarray, np.ndarray]], *,
              concurrency: int | None = None,
              missing: Callable[["zarr.Array", int], None] | None = None) -> None:
    """For each ``(array, file index, rows, out)``: rows ``rows`` (offsets within the
    file, sorted) of that file into ``out`` (``len(rows)`` rows), each file decoded into
    place as soon as it arrives, while later ones are still in flight; at most
    ``concurrency`` (and about IN_FLIGHT_BYTES) at once.

    ``missing(array, i)`` is called for a file that does not exist, before its fill value is
    used: it raises where the file should exist (a store that lost it, or changed).
    The first failure is raised once every request has finished.
    """
    weight = _weights()

    def job(arr: "zarr.Array", i: int, rows: np.ndarray, out: np.ndarray) -> tuple[int, Callable[[], Awaitable[None]]]:
        async def run() -> None:
            buf = await _get_bytes(arr, i)
            if buf is None and missing is not None:
                missing(arr, i)
            try:
                await _decode_rows(arr, i, buf, rows, out)
            except (ValueError, RuntimeError) as e:  # a damaged file: name it
                from satdata.errors import StoreError

                a, b = chunk_rows(arr, i)
                raise StoreError(f"array {arr.path} {file_word(arr)} {i} (samples [{a}, {b})) cannot be read "
                                 f"({str(e)[:160]}); the store is damaged (`satdata verify` lists every damaged "
                                 "file)") from None

        return weight(arr), run

    jobs = [job(*w) for w in wanted]
    if jobs:
        _submit(_bounded(jobs, concurrency)).result()


def iter_chunk_files(
    wanted: Iterable[tuple["zarr.Array", int]],
    *,
    concurrency: int | None = None,
    decode: bool = True,
) -> Iterator[tuple["zarr.Array", int, bytes | None, np.ndarray | BaseException | None]]:
    """``(array, i, stored bytes or None, values)`` for each (array, file index) of
    ``wanted``, in that order.

    Each file (chunk, or shard) is fetched once: its stored bytes (None where no file
    exists) and, with ``decode``, its values decoded from those same bytes (rows
    ``[a, b)``). Where the fetch or the decoding fails (a network error, a damaged file),
    the exception takes the place of the values (after a failed fetch the bytes are None
    too), so the caller can report the file and go on. Up to ``concurrency`` files, and
    about IN_FLIGHT_BYTES of stored and decoded bytes, are in flight ahead of the one being
    consumed (across arrays: ``wanted`` may span several), so the caller's work on a file
    (hashing) overlaps the next fetches, and memory stays bounded by that window.
    """

    async def one(arr: "zarr.Array", i: int) -> tuple["zarr.Array", int, bytes | None, np.ndarray | BaseException | None]:
        try:
            buf = await _get_bytes(arr, i)
        except Exception as e:  # reported for this file by the caller
            return arr, i, None, e
        values: np.ndarray | BaseException | None = None
        if decode:
            try:
                values = await _decode(arr, i, buf)
            except Exception as e:  # a damaged file
                values = e
        return arr, i, (None if buf is None else buf.to_bytes()), values

    weight = _weights()
    window: collections.deque[tuple[Future, int]] = collections.deque()
    in_flight = 0
    try:
        for arr, i in wanted:
            w = weight(arr) * (2 if decode else 1)  # the stored bytes, and the values decoded from them
            while window and (len(window) >= _limit(concurrency) or in_flight + w > IN_FLIGHT_BYTES):
                f, fw = window.popleft()
                in_flight -= fw
                yield f.result()
            window.append((_submit(one(arr, i)), w))
            in_flight += w
        while window:
            yield window.popleft()[0].result()
    finally:  # an early exit or an error: nothing left running for us on the loop
        for f, _ in window:
            f.cancel()


# --------------------------------------------------------------------------- decoding files

MAX_UINT64 = 2**64 - 1  # offset and length of an empty inner chunk in a shard's index


@dataclass(frozen=True)
class FileFormat:
    """What the bytes of an array's files hold, for the layouts satkit decodes itself.

    Every file holds ``rows`` samples along N (the last file of an array fewer, its chunks
    padded to full size with the fill value), cut into chunks of ``inner`` samples; a chunk
    is the C-order little-endian values (``codec`` "plain"), or those compressed as one
    zstd frame or one blosc buffer. Unsharded, a file is one chunk. Sharded (Zarr's
    ``sharding_indexed`` codec, index at the end): the stored inner chunks one after another,
    then the index, per inner chunk (offset, length) as little-endian uint64 (both 2**64-1
    for an inner chunk of fill values only, which is not stored), then the crc32c of the
    index, 4 bytes little-endian.
    """

    rows: int
    inner: int
    sample_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    codec: str  # "plain", "zstd" or "blosc"
    codec_config: tuple[tuple[str, Any], ...]  # what builds the numcodecs codec, as zarr builds it
    sharded: bool

    @property
    def row_bytes(self) -> int:
        return int(self.dtype.itemsize) * math.prod(self.sample_shape)

    @property
    def chunk_bytes(self) -> int:
        return self.inner * self.row_bytes

    @property
    def per_file(self) -> int:
        """Chunks per file."""
        return self.rows // self.inner

    @property
    def index_bytes(self) -> int:
        return 16 * self.per_file + 4 if self.sharded else 0

    def size_ok(self, size: int) -> bool:
        """Whether a file of ``size`` bytes can be one of this format (checked without reading it)."""
        if not self.sharded:
            return size == self.chunk_bytes if self.codec == "plain" else size > 0
        data = size - self.index_bytes
        if self.codec == "plain":
            return 0 < data <= self.per_file * self.chunk_bytes and data % self.chunk_bytes == 0
        return data > 0


def _endian(codec: Any) -> str | None:
    e = getattr(codec, "endian", None)
    return getattr(e, "value", e)


def file_format(meta: Any) -> FileFormat | None:
    """The FileFormat of the files of an array with metadata ``meta`` (``arr.metadata``), or
    None where satkit leaves the decoding to zarr: another codec or a filter, big-endian or
    non-numeric values, chunks that cut a sample, an index at the start of a shard."""
    try:
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
        from zarr.codecs.sharding import ShardingCodecIndexLocation
        from zarr.core.chunk_grids import RegularChunkGrid

        dtype = np.dtype(meta.data_type.to_native_dtype())
        shape = tuple(int(x) for x in meta.shape)
        if not shape or dtype.kind not in "biuf" or (dtype.itemsize > 1 and dtype.byteorder == ">"):
            return None
        if not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        outer = tuple(int(x) for x in meta.chunk_grid.chunk_shape)
        if outer[1:] != shape[1:] or outer[0] < 1:
            return None
        codecs = tuple(meta.codecs)
        inner, sharded = outer[0], False
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sc = codecs[0]
            cs = tuple(int(x) for x in sc.chunk_shape)
            ic = tuple(sc.index_codecs)
            if (sc.index_location != ShardingCodecIndexLocation.end or cs[1:] != outer[1:] or cs[0] < 1
                    or outer[0] % cs[0] or len(ic) != 2 or not isinstance(ic[0], BytesCodec)
                    or _endian(ic[0]) != "little" or not isinstance(ic[1], Crc32cCodec)):
                return None
            inner, sharded, codecs = cs[0], True, tuple(sc.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        if dtype.itemsize > 1 and _endian(codecs[0]) != "little":
            return None
        rest = codecs[1:]
        config: tuple[tuple[str, Any], ...] = ()
        if not rest:
            name = "plain"
        elif len(rest) == 1 and isinstance(rest[0], ZstdCodec):
            name, config = "zstd", (("level", int(rest[0].level)), ("checksum", bool(rest[0].checksum)))
        elif len(rest) == 1 and isinstance(rest[0], BloscCodec):
            b = rest[0]
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[str(getattr(b.shuffle, "value", b.shuffle))]
            name, config = "blosc", (("cname", str(getattr(b.cname, "value", b.cname))), ("clevel", int(b.clevel)),
                                     ("shuffle", shuffle), ("blocksize", int(b.blocksize)), ("typesize", int(b.typesize)))
        else:
            return None
        fill = np.asarray(meta.fill_value, dtype=dtype)
        return FileFormat(rows=outer[0], inner=inner, sample_shape=shape[1:], dtype=dtype, fill_value=fill[()],
                          codec=name, codec_config=config, sharded=sharded)
    except Exception:  # noqa: BLE001 - metadata of a kind this module does not know: zarr decodes it
        return None


@functools.lru_cache(maxsize=16)
def _numcodec(name: str, config: tuple[tuple[str, Any], ...]) -> Any:
    """The numcodecs codec that zarr's ZstdCodec or BloscCodec uses, built as zarr 3.1 builds it."""
    if name == "zstd":
        from numcodecs import Zstd

        return Zstd.from_config(dict(config))
    import numcodecs
    from numcodecs import Blosc

    cfg = dict(config)
    if tuple(int(x) for x in numcodecs.__version__.split(".")[:2]) < (0, 16):  # zarr passes typesize from 0.16 on
        cfg.pop("typesize")
    return Blosc.from_config(cfg)


def _zstd_content_size(head: bytes) -> int | None:
    """The decompressed size a zstd frame declares in its header, or None where it declares none."""
    if len(head) < 6 or int.from_bytes(head[:4], "little") != 0xFD2FB528:
        raise ValueError("not a zstd frame")
    fhd = head[4]
    single = (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    size = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    if size == 0:
        return None
    if len(head) < pos + size:
        raise ValueError("a truncated zstd frame header")
    v = int.from_bytes(head[pos:pos + size], "little")
    return v + 256 if size == 2 else v


def _decompress_into(fmt: FileFormat, src: Any, dst: np.ndarray) -> None:
    """Decode one stored chunk ``src`` into ``dst`` (uint8, exactly ``fmt.chunk_bytes``), checking
    that it declares exactly that many bytes (a decoder writes less into a larger buffer silently)."""
    head = bytes(src[:18])
    codec = _numcodec(fmt.codec, fmt.codec_config)
    if fmt.codec == "blosc":
        if len(src) < 16:
            raise ValueError(f"a blosc chunk of {len(src)} bytes, shorter than its header")
        declared, cbytes = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
        if cbytes != len(src):
            raise ValueError(f"a blosc chunk of {len(src):,} bytes says it has {cbytes:,}")
    else:
        declared = _zstd_content_size(head)
    if declared is None:  # a zstd frame without its size: decode aside, then check
        got = np.frombuffer(codec.decode(src), dtype=np.uint8)
        if len(got) != len(dst):
            raise ValueError(f"a chunk decodes to {len(got):,} bytes, expected {len(dst):,}")
        dst[:] = got
        return
    if declared != len(dst):
        raise ValueError(f"a chunk decodes to {declared:,} bytes, expected {len(dst):,}")
    codec.decode(src, out=dst)


class _Bytes:
    """A file's bytes in memory, read by offset."""

    def __init__(self, data: Any) -> None:
        self.mv = memoryview(np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8)))
        self.size = len(self.mv)

    def read(self, off: int, n: int) -> Any:
        if off < 0 or off + n > self.size:
            raise ValueError(f"bytes [{off:,}, {off + n:,}) of a file of {self.size:,}")
        return self.mv[off:off + n]

    def read_into(self, off: int, dst: np.ndarray) -> None:
        dst[:] = np.frombuffer(self.read(off, len(dst)), dtype=np.uint8)


class _File:
    """A local file, read by offset (``pread``), straight into the caller's memory."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    def read(self, off: int, n: int) -> Any:
        buf = np.empty(n, dtype=np.uint8)
        self.read_into(off, buf)
        return memoryview(buf)

    def read_into(self, off: int, dst: np.ndarray) -> None:
        if off < 0 or off + len(dst) > self.size:
            raise ValueError(f"bytes [{off:,}, {off + len(dst):,}) of a file of {self.size:,}")
        mv, done = memoryview(dst), 0
        while done < len(dst):
            got = os.preadv(self.fd, [mv[done:]], off + done)
            if got <= 0:
                raise ValueError(f"read {done:,} of {len(dst):,} bytes (the file changed while read)")
            done += got


def shard_index(fmt: FileFormat, tail: Any, data_end: int) -> np.ndarray:
    """A shard's index, (chunks per file, 2) uint64 (offset, length), from its last
    ``fmt.index_bytes`` bytes; its crc32c and every entry checked against the ``data_end``
    bytes of stored chunks before it (ValueError naming what is wrong)."""
    import google_crc32c

    tail = bytes(tail)
    body, crc = tail[:-4], tail[-4:]
    if google_crc32c.value(body) != int.from_bytes(crc, "little"):
        raise ValueError("its shard index fails its crc32c check")
    idx = np.frombuffer(body, dtype="<u8").reshape(fmt.per_file, 2)
    off, ln = idx[:, 0], idx[:, 1]
    empty = off == MAX_UINT64
    if ((ln == MAX_UINT64) != empty).any():
        raise ValueError("its shard index marks an inner chunk half empty")
    o, n = off[~empty], ln[~empty]
    if (o > data_end).any() or (n > data_end - np.minimum(o, data_end)).any():
        raise ValueError("its shard index points past the stored chunks")
    if fmt.codec == "plain" and (n != fmt.chunk_bytes).any():
        raise ValueError(f"its shard index gives an inner chunk of raw values a size other than {fmt.chunk_bytes:,} bytes")
    return idx


def _chunk_rows_into(fmt: FileFormat, data: Any, c0: int, r0: int, r1: int, flat: np.ndarray) -> None:
    """The rows of [r0, r1) that the chunk holding file rows [c0, c0 + inner) has, from its
    stored bytes ``data`` (None: fill value), into ``flat`` (uint8, rows [r0, r1))."""
    rb = fmt.row_bytes
    a, b = max(r0, c0), min(r1, c0 + fmt.inner)
    if a >= b:
        return
    dst = flat[(a - r0) * rb:(b - r0) * rb]
    if data is None:
        dst.view(fmt.dtype)[...] = fmt.fill_value
    elif fmt.codec == "plain":
        if len(data) != fmt.chunk_bytes:
            raise ValueError(f"a chunk of raw values has {len(data):,} bytes, expected {fmt.chunk_bytes:,}")
        dst[:] = np.frombuffer(data[(a - c0) * rb:(b - c0) * rb], dtype=np.uint8)
    elif (a, b) == (c0, c0 + fmt.inner):
        _decompress_into(fmt, data, dst)
    else:
        tmp = np.empty(fmt.chunk_bytes, dtype=np.uint8)
        _decompress_into(fmt, data, tmp)
        dst[:] = tmp[(a - c0) * rb:(b - c0) * rb]


def _rows_into(fmt: FileFormat, src: Any, r0: int, r1: int, flat: np.ndarray) -> None:
    """Rows [r0, r1) of one file (counted from its first sample) from ``src`` into ``flat``."""
    rb = fmt.row_bytes
    if not fmt.sharded:
        if fmt.codec == "plain":
            if src.size != fmt.chunk_bytes:
                raise ValueError(f"the file has {src.size:,} bytes, expected {fmt.chunk_bytes:,} (truncated or damaged)")
            src.read_into(r0 * rb, flat)
        else:
            _chunk_rows_into(fmt, src.read(0, src.size), 0, r0, r1, flat)
        return
    if src.size < fmt.index_bytes:
        raise ValueError(f"the file has {src.size:,} bytes, fewer than its shard index ({fmt.index_bytes:,})")
    data_end = src.size - fmt.index_bytes
    index = shard_index(fmt, src.read(data_end, fmt.index_bytes), data_end)
    j0, j1 = r0 // fmt.inner, -(-r1 // fmt.inner)
    off, ln = index[j0:j1, 0], index[j0:j1, 1]
    present = off != MAX_UINT64
    if fmt.codec == "plain" and present.all() and (off[1:] == off[:-1] + np.uint64(fmt.chunk_bytes)).all():
        src.read_into(int(off[0]) + (r0 - j0 * fmt.inner) * rb, flat)  # consecutive raw chunks: one read
        return
    lo = int(off[present].min()) if present.any() else 0
    span = src.read(lo, int((off[present] + ln[present]).max()) - lo) if present.any() else None
    for k in range(j1 - j0):
        data = span[int(off[k]) - lo:int(off[k]) - lo + int(ln[k])] if present[k] else None
        _chunk_rows_into(fmt, data, (j0 + k) * fmt.inner, r0, r1, flat)


def _flat(out: np.ndarray) -> np.ndarray:
    if not out.flags.c_contiguous:
        raise ValueError("the output rows are not contiguous")
    return out.reshape(-1).view(np.uint8)


def decode_rows_into(fmt: FileFormat, data: Any, r0: int, r1: int, out: np.ndarray) -> None:
    """Rows [r0, r1) of a file (counted from its first sample) from its stored bytes
    ``data`` into ``out`` (C-contiguous, ``r1 - r0`` rows). Raises ValueError (what is
    wrong) for a damaged file, RuntimeError where a codec finds its data corrupt."""
    _rows_into(fmt, _Bytes(data), r0, r1, _flat(out))


def read_local_rows_into(fmt: FileFormat, path: str | os.PathLike, r0: int, r1: int, out: np.ndarray) -> None:
    """Rows [r0, r1) of the local file ``path`` into ``out``, as :func:`decode_rows_into`,
    reading only what they need: a shard's index, then its chunks, raw values straight
    into ``out`` (``pread``). FileNotFoundError where there is no file."""
    from satdata.store import open_regular

    flat = _flat(out)
    with os.fdopen(open_regular(path), "rb", buffering=0) as f:
        _rows_into(fmt, _File(f.fileno(), os.fstat(f.fileno()).st_size), r0, r1, flat)


def encode_file(fmt: FileFormat, values: np.ndarray) -> np.ndarray | None:
    """The stored bytes (uint8) of a whole file whose first ``len(values)`` samples are
    ``values`` and the rest the fill value, byte for byte what zarr 3.1 writes for that
    file (with ``write_empty_chunks`` off, zarr's default): a chunk of fill values only is
    not stored, and a file of nothing but such chunks is not written (None).

    The same values give the same bytes whichever process writes them, and in whatever
    order the files are written. tests/test_sharding.py compares with zarr's own writes.
    """
    rows, inner = fmt.rows, fmt.inner
    if len(values) > rows or tuple(values.shape[1:]) != fmt.sample_shape:
        raise ValueError(f"{values.shape} does not fit a file of {rows} samples of {fmt.sample_shape}")
    full = np.asarray(values, dtype=fmt.dtype)
    if len(full) < rows:
        pad = np.empty((rows - len(full),) + fmt.sample_shape, dtype=fmt.dtype)
        pad[...] = fmt.fill_value
        full = np.concatenate([full, pad])
    full = np.ascontiguousarray(full)
    raw = full.reshape(fmt.per_file, inner * math.prod(fmt.sample_shape))
    stored = (raw != fmt.fill_value).any(axis=1)
    flat = full.reshape(-1).view(np.uint8).reshape(fmt.per_file, fmt.chunk_bytes)
    codec = None if fmt.codec == "plain" else _numcodec(fmt.codec, fmt.codec_config)
    parts = [(flat[j] if codec is None else np.frombuffer(codec.encode(flat[j]), dtype=np.uint8)) if stored[j] else None
             for j in range(fmt.per_file)]
    if not stored.any():
        return None
    if not fmt.sharded:
        return np.ascontiguousarray(parts[0])
    index = np.full((fmt.per_file, 2), MAX_UINT64, dtype="<u8")
    pos = 0
    for j, p in enumerate(parts):  # morton order of an (n, 1, ..., 1) grid is plain order
        if p is not None:
            index[j] = (pos, len(p))
            pos += len(p)
    import google_crc32c

    out = np.empty(pos + fmt.index_bytes, dtype=np.uint8)
    pos = 0
    for p in parts:
        if p is not None:
            out[pos:pos + len(p)] = p
            pos += len(p)
    body = index.tobytes()
    out[pos:pos + len(body)] = np.frombuffer(body, dtype=np.uint8)
    out[pos + len(body):] = np.frombuffer(int(google_crc32c.value(body)).to_bytes(4, "little"), dtype=np.uint8)
    return out


# --------------------------------------------------------------------------- decoding threads

# Threads that read and decode the files of a local array at once (Store.load, load_split):
# preadv, memcpy and the zstd and blosc decoders release the GIL, so on 2 cores a split
# loads about twice as fast as from one thread (bench/read.py).
READ_THREADS = min(8, os.cpu_count() or 1)
_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():  # a forked child cannot use its parent's threads
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="satdata-read"))
        return _POOL[1]


def run_parallel(jobs: Sequence[Callable[[], None]]) -> None:
    """Run ``jobs`` on the reading threads and wait for all of them; after a failure the
    jobs not yet started are dropped, and the first failure (in job order) is raised once
    none is running (so none writes into the caller's memory after this returns)."""
    if len(jobs) <= 1 or READ_THREADS <= 1 or threading.current_thread().name.startswith("satdata-read"):
        for job in jobs:
            job()
        return
    futures = [_pool().submit(job) for job in jobs]
    error: BaseException | None = None
    for f in futures:
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below, once nothing runs
            if error is None:
                error = e
                for g in futures:
                    g.cancel()
        # a cancelled future raises CancelledError here, which the first error already covers
    if error is not None:
        raise error
