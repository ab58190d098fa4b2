"""A real threaded HTTP/1.1 file server on 127.0.0.1 for tests: serves one directory, read-only.

    with serve(tmp_path) as http:
        url = http.url + "/digits.zarr"          # http://127.0.0.1:PORT/digits.zarr
        store = open_store(url)
        assert ("GET", "/digits.zarr/zarr.json", None) in http.requests

What it speaks: GET and HEAD of plain files (no directory listings: a directory, a missing
file, or a path that leaves the served directory is 404), ``Content-Length`` on every
answer, keep-alive (HTTP/1.1), and ``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n``
(206 with ``Content-Range``; 416 past the end; other range forms are ignored and the whole
file is sent, as RFC 9110 allows).

Fault injection, all thread-safe and changeable while serving:

* ``interrupt_once(path_suffix, after_bytes, skip=0)``: the next GET of a path ending in
  ``path_suffix`` (after ``skip`` such GETs served whole) sends its headers (with the full
  ``Content-Length``) and ``after_bytes`` bytes of the body, then closes the connection;
  later requests are served normally.
* ``require_auth(user, password)``: every request needs HTTP Basic auth with these
  credentials, else 401 with ``WWW-Authenticate``; ``require_auth(None)`` turns it off.
* ``delay(seconds)``: sleep this long before answering each request (0 turns it off).

``requests`` is the log of every request received, in order, as ``Request(method, path,
range, status)`` tuples (``range`` is the raw ``Range`` header or None; ``path`` without the
query string, percent-decoding left as sent); ``clear_requests()`` empties it. The server
thread is stopped and its socket closed on leaving the block, also on an exception.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, NamedTuple

HOST = "127.0.0.1"
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_BLOCK = 1 << 16


class Request(NamedTuple):
    method: str
    path: str
    range: str | None
    status: int


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (a reader cancelling requests it no longer needs) is not an error."""

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class HttpServer:
    """The running server (see the module docstring); made by :func:`serve`."""

    def __init__(self, root: str | os.PathLike[str], port: int = 0) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._log: list[Request] = []
        self._interrupts: list[list] = []  # [path_suffix, after_bytes, GETs still to let through]
        self._auth: str | None = None
        self._delay = 0.0
        self._conns: dict[socket.socket, threading.Thread] = {}
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = _QuietServer((HOST, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"httpserver-{self.port}", daemon=True)

    # ------------------------------------------------------------------ control

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()
        with self._lock:  # keep-alive connections still open: their handler threads end with them
            conns, self._conns = dict(self._conns), {}
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in conns.values():
            t.join(timeout=5)

    def __enter__(self) -> "HttpServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def interrupt_once(self, path_suffix: str, after_bytes: int, skip: int = 0) -> None:
        """The next GET of a path ending in ``path_suffix`` is cut off after ``after_bytes`` body bytes.

        With ``skip``, that many matching GETs are served whole first (e.g. to cut the third
        Range request of a download).
        """
        with self._lock:
            self._interrupts.append([path_suffix, int(after_bytes), int(skip)])

    def require_auth(self, user: str | None, password: str | None = None) -> None:
        """Require HTTP Basic auth as ``user``/``password`` (401 otherwise); ``None`` turns it off."""
        with self._lock:
            if user is None:
                self._auth = None
            else:
                token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
                self._auth = f"Basic {token}"

    def delay(self, seconds: float) -> None:
        """Sleep ``seconds`` before answering each request (0: no delay)."""
        with self._lock:
            self._delay = float(seconds)

    @property
    def requests(self) -> list[Request]:
        """A copy of the request log, in arrival order."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------------ used by the handler

    def _record(self, req: Request) -> None:
        with self._lock:
            self._log.append(req)

    def _track(self, conn: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._conns[conn] = threading.current_thread()
            else:
                self._conns.pop(conn, None)

    def _take_interrupt(self, path: str) -> int | None:
        with self._lock:
            for i, item in enumerate(self._interrupts):
                suffix, after, skip = item
                if path.endswith(suffix):
                    if skip > 0:
                        item[2] -= 1
                        return None
                    del self._interrupts[i]
                    return after
        return None

    def _settings(self) -> tuple[str | None, float]:
        with self._lock:
            return self._auth, self._delay


class _Handler(BaseHTTPRequestHandler):
    owner: HttpServer
    protocol_version = "HTTP/1.1"
    server_version = "satkit-test-http/1"
    timeout = 60  # an idle keep-alive connection is closed after a minute

    def setup(self) -> None:
        super().setup()
        self.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.owner._track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # ------------------------------------------------------------------

    def _plain(self, status: int, text: str, extra: dict[str, str] | None = None, *, body: bool = True) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _file(self, path: str) -> Path | None:
        rel = urllib.parse.unquote(path).lstrip("/")
        target = (self.owner.root / rel).resolve()
        if target != self.owner.root and self.owner.root not in target.parents:
            return None
        return target if target.is_file() else None

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        rng = self.headers.get("Range")
        auth, delay = self.owner._settings()
        if delay > 0:
            time.sleep(delay)
        if auth is not None and self.headers.get("Authorization") != auth:
            self.owner._record(Request(self.command, path, rng, 401))
            self._plain(401, "authentication required\n", {"WWW-Authenticate": 'Basic realm="satkit-test"'}, body=body)
            return
        target = self._file(path)
        if target is None:
            self.owner._record(Request(self.command, path, rng, 404))
            self._plain(404, "not found\n", body=body)
            return
        size = target.stat().st_size
        start, end, status = 0, size, 200  # [start, end)
        m = _RANGE_RE.match(rng.strip()) if rng else None
        if m and (m.group(1) or m.group(2)):
            a, b = m.group(1), m.group(2)
            if a:
                start = int(a)
                end = min(size, int(b) + 1) if b else size
            else:  # suffix range: the last n bytes
                start = max(0, size - int(b))
            if start >= size or start >= end:
                self.owner._record(Request(self.command, path, rng, 416))
                self._plain(416, "range not satisfiable\n", {"Content-Range": f"bytes */{size}"}, body=body)
                return
            status = 206
        self.owner._record(Request(self.command, path, rng, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return
        cut = self.owner._take_interrupt(path)
        with open(target, "rb") as f:
            f.seek(start)
            left = end - start
            if cut is not None:
                data = f.read(min(left, max(0, cut)))
                self.wfile.write(data)
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            while left > 0:
                data = f.read(min(left, _BLOCK))
                if not data:
                    break
                self.wfile.write(data)
                left -= len(data)


@contextlib.contextmanager
def serve(root: str | os.PathLike[str], port: int = 0) -> Iterator[HttpServer]:
    """Serve ``root`` over HTTP on 127.0.0.1 (``port``, or a free one) for the duration of the block."""
    server = HttpServer(root, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class FloodServer:
    """A hostile server on 127.0.0.1 serving one directory, for the tests that check satkit
    reads bounded amounts: it ignores Range (answers every GET with the whole file, ``200``,
    as ``python -m http.server`` does), and answers a key ending in a ``flood`` suffix with
    that many zero bytes (a declared Content-Length). ``sent`` counts the body bytes it
    managed to send, by key. A context manager: serving inside the block.

    Plain HTTP here: the key is the path. A subclass speaks another protocol over HTTP by
    overriding :meth:`key` (None: refuse), :meth:`refuse` and :attr:`headers`.
    """

    headers: dict[str, str] = {}

    def __init__(self, root: str | os.PathLike[str], flood: dict[str, int] | None = None) -> None:
        self.root = Path(root).resolve()
        self.flood, self.sent = dict(flood or {}), {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                owner._answer(self, body=False)

            def do_GET(self) -> None:
                owner._answer(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def key(self, handler: BaseHTTPRequestHandler) -> str | None:
        """The served file's key (a path under the directory) of a request; None refuses it."""
        return handler.path.lstrip("/")

    def refuse(self, handler: BaseHTTPRequestHandler, status: int) -> None:
        """Answer ``status`` (403 refused, 404 no such file) with an empty body."""
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        key = self.key(handler)
        if key is None:
            return self.refuse(handler, 403)
        n = next((v for k, v in self.flood.items() if key.endswith(k)), None)
        p = (self.root / key).resolve()
        if n is None and not (p.is_file() and p.is_relative_to(self.root)):
            return self.refuse(handler, 404)
        data = bytes(1 << 20) if n is not None else p.read_bytes()
        n = len(data) if n is None else n
        handler.send_response(200)
        handler.send_header("Content-Length", str(n))
        for name, value in self.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        left = n if body else 0
        try:
            while left > 0:
                k = min(left, len(data))
                handler.wfile.write(data[:k])
                left -= k
                self.sent[key] = self.sent.get(key, 0) + k
        except OSError:  # the client hung up: what satkit should do
            handler.close_connection = True

    def __enter__(self) -> "FloodServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
