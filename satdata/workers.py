"""A small process pool for decoding that ends in an error, never a hang, when a worker dies.

``multiprocessing.Pool`` and ``concurrent.futures.ProcessPoolExecutor`` share one result
pipe among all workers. A worker killed while it writes a result (the OOM killer, a crash
in an image decoder, a stray ``kill -9``) leaves half a message in that pipe, and the
reader waits for the rest forever (the executor's manager thread blocks in ``recv``; the
pool silently replaces the worker and loses the task). Here each worker has its own
duplex pipe and the parent holds no copy of the worker's end, so a worker's death is an
end-of-file on its own pipe or its process sentinel turning ready, whichever comes first:
:class:`WorkerDied`, at once.

Work goes out in chunks, one chunk in flight per worker (a worker blocked on sending a
large result while the parent blocks on sending it more work would deadlock otherwise),
and results come back in input order.
"""

from __future__ import annotations

import signal
from multiprocessing.connection import wait
from typing import Any, Callable, Iterator, Sequence


class WorkerDied(RuntimeError):
    """A worker process ended while it had work (its exit code, when known)."""


def _serve(conn: Any, fn: Callable[[Any], Any], initializer: Callable[..., None] | None,
           initargs: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        try:
            conn.send(("ok", [fn(x) for x in chunk]))
        except Exception as e:  # fn is meant not to raise: report it rather than die
            conn.send(("error", f"{type(e).__name__}: {e}"))


class DecodePool:
    """``n`` worker processes from ``ctx`` running ``fn`` over chunks of a sequence."""

    def __init__(self, n: int, ctx: Any, fn: Callable[[Any], Any], initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = ()) -> None:
        self.workers: list[tuple[Any, Any]] = []
        try:
            for _ in range(n):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_serve, args=(child, fn, initializer, initargs), daemon=True)
                proc.start()
                child.close()  # only the worker holds its end: its death is EOF here
                self.workers.append((proc, parent))
        except (OSError, EOFError) as e:  # the process starter lost a worker while starting it
            self.terminate()
            raise WorkerDied(f"while starting: {type(e).__name__}") from None
        except BaseException:
            self.terminate()
            raise

    def imap(self, items: Sequence[Any], chunksize: int) -> Iterator[Any]:
        """fn(item) for every item, in order. Raises WorkerDied if a worker dies meanwhile."""
        chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
        done: dict[int, list[Any]] = {}
        busy: dict[int, int] = {}  # worker index -> chunk index it is working on
        sent = 0
        nxt = 0

        def give(w: int) -> None:
            nonlocal sent
            if sent < len(chunks):
                self._send(w, chunks[sent])
                busy[w] = sent
                sent += 1

        for w in range(len(self.workers)):
            give(w)
        while nxt < len(chunks):
            if nxt in done:
                yield from done.pop(nxt)
                nxt += 1
                continue
            conns = {self.workers[w][1]: w for w in busy}
            sentinels = {self.workers[w][0].sentinel: w for w in busy}
            for ready in wait(list(conns) + list(sentinels)):
                if ready in conns:
                    w = conns[ready]
                    try:
                        status, payload = ready.recv()
                    except (EOFError, OSError):
                        raise self._died(w) from None
                    if status != "ok":
                        raise WorkerDied(f"a worker failed: {payload}")
                    done[busy.pop(w)] = payload
                    give(w)
                elif sentinels[ready] in busy and not self.workers[sentinels[ready]][1].poll():
                    raise self._died(sentinels[ready])

    def _send(self, w: int, chunk: Any) -> None:
        try:
            self.workers[w][1].send(chunk)
        except (BrokenPipeError, ConnectionError, OSError):
            raise self._died(w) from None

    def _died(self, w: int) -> WorkerDied:
        proc = self.workers[w][0]
        proc.join(timeout=1)
        code = proc.exitcode
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit code {code}" if code is not None else "gone")
        return WorkerDied(how)

    def close(self) -> None:
        """Ask the workers to finish and wait for them."""
        for proc, conn in self.workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, _ in self.workers:
            proc.join(timeout=30)
        self.terminate()  # reaps any that did not finish, closes the pipes

    def terminate(self) -> None:
        """Stop every worker now (failure, Ctrl-C, SIGTERM) and reap it."""
        for proc, _ in self.workers:
            if proc.is_alive():
                proc.terminate()
        for proc, conn in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            try:
                conn.close()
            except OSError:
                pass
        self.workers = []


__all__ = ["DecodePool", "WorkerDied"]
