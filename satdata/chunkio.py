"""Whole-chunk reads with bounded concurrency, for stores that are not on a local disk.

Used by ``StreamingSplit`` (sattrain/data.py) for the blocks of a store at a URL, and by
``satdata verify`` (satdata/verify.py) for every store. (Whole-split loading needs none:
zarr already fetches the chunks of a slab concurrently, and bench/remote.py measured no
gain from reading slabs here.)

Reading chunk after chunk costs one round trip each: over a network (S3, HTTP) the time
goes to waiting, not to moving bytes. Here many whole chunks are requested at once, at
most ``concurrency`` in flight, on zarr's own event loop (where the store's network
client lives), and decoded through the array's own codec pipeline, so a chunk is
fetched once and its stored bytes are at hand as well as its values (``satdata verify``
hashes both).

    chunks = read_chunks([(images, 3), (images, 7), (maps, 3)])   # values, rows [a, b)
    for arr, i, stored, values in iter_chunk_files([(images, 0), (images, 1)]):
        ...                                                         # in order, bounded window

Arrays are chunked along N only (docs/store-format.md), so chunk ``i`` holds samples
``[i * c, min(N, (i + 1) * c))``; values come back trimmed to those rows. A chunk with no
file (zarr writes none for a chunk of fill values) reads as the fill value, as zarr's
own reads do. On a local disk these functions work too, but one sequential reader is as
fast there (``is_local``: callers keep their local fast paths).
"""

from __future__ import annotations

import asyncio
import collections
import math
from concurrent.futures import Future
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
    """Sample range ``[a, b)`` of chunk ``i`` along axis 0."""
    c = int(arr.chunks[0])
    return i * c, min(int(arr.shape[0]), (i + 1) * c)


def _coords(arr: "zarr.Array", i: int) -> tuple[int, ...]:
    return (i,) + (0,) * (arr.ndim - 1)


# The most bytes a chunk of a string array (ids) may hold: its size is not known ahead.
STRING_CHUNK_LIMIT = 256 * 1024 * 1024


def chunk_limit(meta: Any) -> int:
    """The most bytes a stored chunk of an array with metadata ``meta`` can hold: its raw size
    plus what a codec may add to incompressible data (zstd adds well under 1%)."""
    try:
        dtype = meta.data_type.to_native_dtype()
        if dtype.kind in "OUST" or int(dtype.itemsize) <= 0:
            return STRING_CHUNK_LIMIT
        itemsize = int(dtype.itemsize)
    except Exception:  # noqa: BLE001 - a dtype without a fixed size
        return STRING_CHUNK_LIMIT
    raw = itemsize * math.prod(int(c) for c in meta.chunk_grid.chunk_shape)
    return raw + raw // 50 + (1 << 20)


async def _get_bytes(arr: "zarr.Array", i: int) -> Any:
    """The stored bytes of chunk ``i`` as a zarr Buffer, or None where no file exists.

    Over fsspec (URLs) it is asked for as one bounded range, ``Range: bytes=0-L`` with L
    what the chunk can hold at most (:func:`chunk_limit`): the whole file in one request,
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
        raise StoreError(f"array {arr.path} chunk {i} (samples [{a}, {b})) is more than {limit:,} bytes on the "
                         "server, more than it can hold; refusing it (a damaged or hostile server)")
    return buf


async def _decode(arr: "zarr.Array", i: int, buf: Any) -> np.ndarray:
    """Chunk ``i``'s values from its stored bytes ``buf`` (None: the fill value), rows [a, b).

    Through the array's own codec pipeline (zarr 3.1: ``codec_pipeline.decode`` with the
    chunk's ``ArraySpec``), exactly what ``arr[a:b]`` would decode.
    """
    from zarr.core.buffer import default_buffer_prototype

    aarr = arr._async_array
    spec = aarr.metadata.get_chunk_spec(_coords(arr, i), aarr.config, prototype=default_buffer_prototype())
    a, b = chunk_rows(arr, i)
    if buf is None:
        from zarr.core.codec_pipeline import fill_value_or_default

        out = np.empty((b - a,) + tuple(arr.shape[1:]), dtype=spec.dtype.to_native_dtype())
        out[...] = fill_value_or_default(spec)
        return out
    (nd,) = await aarr.codec_pipeline.decode([(buf, spec)])
    if nd is None:  # a codec that maps stored bytes to "no chunk"
        raise ValueError(f"chunk {i} decodes to nothing")
    values = nd.as_numpy_array()
    if tuple(values.shape) != tuple(spec.shape):
        raise ValueError(f"chunk {i} decodes to shape {tuple(values.shape)}, expected {tuple(spec.shape)}")
    return values[: b - a]


def _limit(concurrency: int | None) -> int:
    """``concurrency``, or the module's DEFAULT_CONCURRENCY (read at call time) when None."""
    return max(1, DEFAULT_CONCURRENCY if concurrency is None else int(concurrency))


async def _bounded(jobs: Sequence[Callable[[], Awaitable[T]]], concurrency: int | None) -> list[T]:
    sem = asyncio.Semaphore(_limit(concurrency))

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await job()

    results = await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)
    for r in results:  # every request has finished: raise the first failure
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


def read_chunks(wanted: Iterable[tuple["zarr.Array", int]], *, concurrency: int | None = None) -> list[np.ndarray]:
    """The values of each (array, chunk index) in ``wanted`` (rows ``[a, b)`` of that
    chunk), in order; at most ``concurrency`` chunks fetched and decoded at once.

    The first failure (a network error, a chunk that does not decode) is raised once
    every request has finished.
    """
    pairs = list(wanted)

    def job(arr: "zarr.Array", i: int) -> Callable[[], Awaitable[np.ndarray]]:
        async def run() -> np.ndarray:
            return await _decode(arr, i, await _get_bytes(arr, i))

        return run

    if not pairs:
        return []
    return _submit(_bounded([job(a, i) for a, i in pairs], concurrency)).result()


def take_rows(wanted: Iterable[tuple["zarr.Array", int, np.ndarray, np.ndarray]], *,
              concurrency: int | None = None,
              missing: Callable[["zarr.Array", int], None] | None = None) -> None:
    """For each ``(array, chunk index, rows, out)``: rows ``rows`` (offsets within the
    chunk) of that chunk into ``out`` (``len(rows)`` rows), each chunk copied as soon as it
    arrives, while later ones are still in flight; at most ``concurrency`` at once.

    ``missing(array, i)`` is called for a chunk that has no file, before its fill value is
    used: it raises where the chunk should exist (a store that lost it, or changed).
    The first failure is raised once every request has finished.
    """

    def job(arr: "zarr.Array", i: int, rows: np.ndarray, out: np.ndarray) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            buf = await _get_bytes(arr, i)
            if buf is None and missing is not None:
                missing(arr, i)
            values = await _decode(arr, i, buf)
            if len(rows) == len(values) and (len(rows) == 0 or (rows[0] == 0 and rows[-1] == len(rows) - 1)):
                out[...] = values  # the whole chunk (rows are sorted and distinct)
            else:
                np.take(values, rows, axis=0, out=out, mode="clip")  # rows are in range; "raise" would buffer

        return run

    jobs = [job(*w) for w in wanted]
    if jobs:
        _submit(_bounded(jobs, concurrency)).result()


def iter_chunk_files(
    wanted: Iterable[tuple["zarr.Array", int]],
    *,
    concurrency: int | None = None,
    decode: bool = True,
) -> Iterator[tuple["zarr.Array", int, bytes | None, np.ndarray | BaseException | None]]:
    """``(array, i, stored bytes or None, values)`` for each (array, chunk index) of
    ``wanted``, in that order.

    Each chunk is fetched once: its stored bytes (None where no file exists) and, with
    ``decode``, its values decoded from those same bytes (rows ``[a, b)``). Where the
    fetch or the decoding fails (a network error, a damaged chunk), the exception takes
    the place of the values (after a failed fetch the bytes are None too), so the caller
    can report the chunk and go on. Up to ``concurrency`` chunks are in flight ahead of the one being consumed
    (across arrays: ``wanted`` may span several), so the caller's work on a chunk
    (hashing) overlaps the next fetches, and memory stays bounded by that window.
    """

    async def one(arr: "zarr.Array", i: int) -> tuple["zarr.Array", int, bytes | None, np.ndarray | BaseException | None]:
        try:
            buf = await _get_bytes(arr, i)
        except Exception as e:  # reported for this chunk by the caller
            return arr, i, None, e
        values: np.ndarray | BaseException | None = None
        if decode:
            try:
                values = await _decode(arr, i, buf)
            except Exception as e:  # a damaged chunk
                values = e
        return arr, i, (None if buf is None else buf.to_bytes()), values

    window: collections.deque[Future] = collections.deque()
    try:
        for arr, i in wanted:
            window.append(_submit(one(arr, i)))
            if len(window) >= _limit(concurrency):
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:  # an early exit or an error: nothing left running for us on the loop
        for f in window:
            f.cancel()
