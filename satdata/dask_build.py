"""Run a build's ranges (satdata.ranges) as Dask tasks: ``--dask local:N`` or a scheduler.

Dask's distributed scheduler places the tasks, retries those of a worker that died and
reports every failure; satkit only cuts the work into ranges and commits the result. Each
task decodes its records in its worker process (one thread per worker: parallelism comes
from the workers) and writes whole write units of its range straight into the prepared
store, which therefore has to be on a file system that every worker mounts at the same
path (always true for ``local:N``).

On any failure (a task's error, a bad sample without --skip-bad, Ctrl-C) the remaining
tasks are cancelled and, before the caller removes the prepared directory, this waits
until none of them is still running, so no late write can bring a half store back.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from satdata.errors import SatkitError
from satdata.ranges import Range, RangeResult, write_range
from satdata.sources import Record, Source

LOCAL_PREFIX = "local:"


def _need_dask() -> Any:
    try:
        import distributed
    except ImportError:
        raise SatkitError("--dask: Dask's distributed scheduler is not installed "
                          "(pip install \"satkit[dask]\")") from None
    return distributed


def check_address(address: str) -> None:
    """Refuse a --dask value that is neither local:N nor a scheduler address, before any work."""
    if address.startswith(LOCAL_PREFIX):
        n = address[len(LOCAL_PREFIX):]
        if not n.isdigit() or not 1 <= int(n) <= 512:
            raise SatkitError(f"--dask: {address!r}: expected local:N with N workers between 1 and 512")
    elif not address or any(c.isspace() for c in address):
        raise SatkitError(f"--dask: {address!r}: expected local:N or a scheduler address such as tcp://host:8786")


@contextmanager
def _environ_kept() -> Iterator[None]:
    """Put this process's environment back as it was. Dask's nannies set OMP_NUM_THREADS=1
    and others (``distributed.nanny.pre-spawn-environ``) in their own process's environment
    before they start workers; a LocalCluster's nannies live in this process, so without
    this every later subprocess of the caller (a library user's, a test's) would run with
    one thread."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k not in before]:
            del os.environ[k]
        for k, v in before.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


@contextmanager
def client_for(address: str, *, quiet: bool = True) -> Iterator[Any]:
    """A Dask client: a LocalCluster of N one-thread worker processes on 127.0.0.1 for
    ``local:N``, else a connection to the scheduler at ``address``."""
    check_address(address)
    distributed = _need_dask()
    level = logging.ERROR if quiet else logging.WARNING
    if address.startswith(LOCAL_PREFIX):
        with _environ_kept():
            with _local_client(address, int(address[len(LOCAL_PREFIX):]), level) as client:
                yield client
        return
    try:
        client = distributed.Client(address, timeout="15s")
    except (OSError, TimeoutError) as e:
        raise SatkitError(f"--dask: cannot reach the scheduler at {address} ({type(e).__name__}: {e})") from None
    try:
        yield client
    finally:
        client.close()


@contextmanager
def _local_client(address: str, n: int, level: int) -> Iterator[Any]:
    """A Client of a LocalCluster of ``n`` one-thread worker processes on 127.0.0.1."""
    distributed = _need_dask()
    try:
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                           dashboard_address=None, silence_logs=level)
    except (RuntimeError, OSError, TimeoutError) as e:
        raise SatkitError(f"--dask {address}: could not start {n} local workers ({type(e).__name__}: {e})") from None
    try:
        with distributed.Client(cluster) as client:
            yield client
    finally:
        cluster.close()  # its worker processes end here: no task outlives the build


def _task(path: str, args: Mapping[str, Any], rng: Range, records: list[Record], source: Source,
          size: tuple[int, int], fit: str, reduced_decode: bool, stop_at_bad: bool) -> RangeResult:
    """One range, in a Dask worker: decode, transform, write whole units."""
    from satdata import build as b

    b.init_decoder(source, size, fit, reduced_decode)
    return write_range(path, args, rng, records, map(b._process, records), stop_at_bad=stop_at_bad)


def worker_threads(client: Any) -> int:
    """How many tasks the cluster runs at once."""
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:
        return 1


def run_ranges(client: Any, path: Path, args: Mapping[str, Any], ranges: Sequence[Range],
               records: Mapping[str, Sequence[Record]], source: Source, *, size: tuple[int, int], fit: str,
               reduced_decode: bool, stop_at_bad: bool, progress: Any = None,
               on_result: Any = None) -> list[RangeResult]:
    """Every range as one task on ``client``'s workers; their results, or a SatkitError.
    ``progress``: a context manager factory giving a tqdm-like bar; ``on_result(result)``
    runs here for each range done, while the others go on."""
    distributed = _need_dask()
    with (progress() if progress else nullcontext()) as bar:
        src = client.scatter(source, broadcast=True)  # once per worker, not once per task
        where = str(Path(path).resolve())  # workers run elsewhere: never a path relative to here
        build_id = uuid.uuid4().hex  # task keys unique on a scheduler that other builds share
        futures = {}
        for i, r in enumerate(ranges):
            fut = client.submit(_task, where, args, r, list(records[r.split][r.start:r.stop]), src, size, fit,
                                reduced_decode, stop_at_bad, key=f"satdata-build-{build_id}-{i}", pure=False)
            futures[fut] = r
        results: list[RangeResult] = []
        try:
            for fut in distributed.as_completed(list(futures)):
                r = futures[fut]
                if fut.status == "error":
                    e = fut.exception()
                    if isinstance(e, SatkitError):
                        raise SatkitError(str(e)) from None
                    raise SatkitError(f"--dask: the task writing {r} failed ({type(e).__name__}: {e})") from None
                res = fut.result()
                results.append(res)
                if bar is not None:
                    bar.update(r.stop - r.start)
                if stop_at_bad and res.bad:
                    return results  # the caller reports the bad sample; the rest are cancelled below
                if on_result is not None:
                    on_result(res)
        except distributed.client.FutureCancelledError as e:
            raise SatkitError(f"--dask: a task was cancelled ({e})") from None
        finally:
            pending = [f for f in futures if not f.done()]
            if pending:
                client.cancel(pending)
                wait_stopped(client, [f.key for f in futures])
        return results


def wait_stopped(client: Any, keys: Sequence[str], timeout: float = 60.0) -> None:
    """Wait until no worker runs any of ``keys`` (a cancelled task runs on to its end)."""
    end = time.monotonic() + timeout
    want = set(keys)
    while time.monotonic() < end:
        try:
            busy = {k for ks in client.processing().values() for k in ks}
        except Exception:
            return
        if not busy & want:
            return
        time.sleep(0.2)


__all__ = ["check_address", "client_for", "run_ranges", "wait_stopped", "worker_threads"]
