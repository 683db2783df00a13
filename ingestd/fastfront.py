"""The fast HTTP front (`http.server = "uvloop"`, `pip install 'ingestd[fast]'`): ingestd's own
HTTP/1.1 server on uvloop's event loop (libuv, in C) with httptools' request parser (llhttp, in
C), run in one thread of each listener process, on the listener's own SO_REUSEPORT socket.

Why its own server on those two C cores rather than a ready-made one (measured on a minimal
app; the README's "Choosing a front" has the figures): bjoern (C) spent as little CPU per request
and granian (Rust) twice as much, but both own the connection in native code, where the
contract below cannot be added (bjoern buffers any body whole, with no size limit and no
timeout; granian has no body limit or request timeout, and runs on our socket only through its
private API); uvicorn takes our socket and runs on the same two C cores, but its ASGI machinery
more than doubles the CPU per request, and its protocol class would still need patching for
most of the contract. What ingestd adds on top of the two cores is one `asyncio.Protocol`.

The contract is waitress' front's (front.py), piece by piece:

- **From the request line and headers alone**, before one body byte is kept: `gate` (401
  without a valid token, 429 for an empty rate bucket), then a declared `Content-Length` over
  `http.max_body_bytes` (413); a chunked body is cut at the limit as it arrives (413); headers
  over 256 KiB are 431. Each of these answers in the JSON shape and closes the connection
  (after a FIN, what the client still sends is read and dropped for up to `LINGER_S`, so that
  it reads the answer instead of a reset). `Expect: 100-continue` is answered only for a
  request that passed these checks.
- **Malformed HTTP** (what llhttp refuses: a bad request line, header, `Content-Length` or
  chunk; both `Content-Length` and `Transfer-Encoding`) is a JSON 400, and the connection closes.
- **Keep-alive rebalancing**: a connection is closed after `http.keepalive_requests` requests or
  `http.keepalive_time_s` seconds, its last answer saying `Connection: close`.
- **Timeouts**, checked every second: a request not whole within `http.request_timeout_s` of
  its first byte is cut (the connection closed), however slowly it trickles; a connection silent
  for `http.channel_timeout_s` (between requests or in the middle of one) is closed.
- **`http.connection_limit`**: at that many open connections the listener stops accepting (the
  listening socket leaves the event loop); new connections wait in the kernel's backlog.
- **Bounded memory**: only a request that passed the checks above buffers its body, at most
  `max_body_bytes`; while a request is handled off the loop (or the client does not read its
  answers) the connection stops reading, so at most one read (256 KiB) of pipelined requests
  waits behind it.
- **Answers** are the app's: `POST /v1/payloads` goes straight to `PayloadsResource.accept`, as
  `FastIngest` does; every other request goes to the same WSGI app (falcon) with a WSGI
  environ, so 404, 405, /health, /metrics and /openapi.json answer exactly as under waitress.
- **Threads**: an ingest request with a small, unencoded body runs on the event loop (that is
  the speed); requests that may take long run on `http.threads` worker threads, in order per
  connection: gzip or large bodies (up to `max_decoded_bytes` of decoding), the WSGI app, and
  every ingest request when `spool.journal_fsync = "always"` (the group commit needs requests
  waiting together).
- **Stop**: `stop()` (the listener at EXIT) stops accepting, lets the requests being handled
  finish and send their answers (up to a grace), then closes every connection.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import httptools
import orjson
import uvloop

from .app import FastIngest, rejection_response
from .config import Config
from .front import INGEST_PATH, Gate, RejectionHeaders
from .validation import Rejection

log = logging.getLogger(__name__)

MAINTENANCE_S = 1.0  # how often idle connections and requests over their time are looked for
LINGER_S = 2.0  # after a refusal: how long what the client still sends is read and dropped
MAX_HEADER_BYTES = 262144  # request line and headers (waitress' default limit)
INLINE_BODY_BYTES = 65536  # larger (or encoded) ingest bodies are handled on a worker thread
STOP_GRACE_S = 0.5

_FAST_URL = INGEST_PATH.encode()
_JSON = "application/json"
_STATUS: dict[int, bytes] = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_TITLES = {400: "Bad request", 413: "Payload too large", 431: "Request header fields too large",
           500: "Internal server error"}


class Refusal(Exception):
    """An answer decided while parsing (from the headers, or a body over the limit): raised in a
    parser callback to stop parsing; the connection closes after it."""

    def __init__(self, status: int, title: str, description: str, headers: list[tuple[str, str]] | None = None,
                 counted: bool = False) -> None:
        super().__init__(description)
        self.status = status
        self.title = title
        self.description = description
        self.headers = headers or []
        self.counted = counted  # already counted as a refused request (the gate counts its own)


class Request:
    """One request as received; `answer` is set for one refused while parsing."""

    __slots__ = ("answer", "body", "headers", "http10", "keep_alive", "method", "peer", "size", "started", "url")

    def __init__(self, started: float, peer: str) -> None:
        self.started = started
        self.peer = peer
        self.url = b""
        self.headers: dict[str, str] = {}  # upper case, "-" as "_" (waitress' keys): AUTHORIZATION
        self.method = b""
        self.keep_alive = True
        self.http10 = False
        self.body: list[bytes] = []
        self.size = 0  # body bytes received
        self.answer: bytes | None = None

    def body_bytes(self) -> bytes:
        body = self.body
        return body[0] if len(body) == 1 else b"".join(body)


_KEYS: dict[bytes, str | None] = {}  # header names as sent -> waitress' keys (None: dropped)


def _header_key(name: bytes) -> str | None:
    """ "Content-Type" -> "CONTENT_TYPE"; a name with "_" -> None. Remembered for the names seen
    most (a few hundred at most, so that a client cannot grow the table)."""
    key = _KEYS.get(name, "")
    if key == "":
        upper = name.decode("latin-1").upper()
        key = None if "_" in upper else upper.replace("-", "_")
        if len(_KEYS) < 512:
            _KEYS[name] = key
    return key


def _headers_too_large() -> Refusal:
    return Refusal(431, _TITLES[431], f"request line and headers exceed {MAX_HEADER_BYTES} bytes")


class _Body:
    """The body as the app's `stream.read(n)` expects it (it is never over the limit here)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        data, self.data = self.data, b""
        return data


class Connection(asyncio.Protocol):
    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.req: Request | None = None  # being received
        self.waiting: deque[Request] = deque()  # received whole, not yet answered (pipelining)
        self.busy = False  # a request is being handled on a worker thread
        self.write_paused = False
        self.reading_paused = False
        self.closing = False  # the last answer is written: nothing more is read or answered
        self.lingering = False
        self.client_eof = False
        self.header_bytes = 0
        self.created = self.last_activity = time.monotonic()
        self.served = 0  # requests received whole
        self.peer = ""

    # -- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport (not a subclass)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.forget(self)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if self.closing or parser is None:
            return  # lingering after a refusal: dropped
        self.last_activity = time.monotonic()
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self.refuse(cause if isinstance(cause, Refusal) else self.broken(e))
        except httptools.HttpParserUpgrade:
            # ingestd speaks HTTP/1.1 only: a request that asked for an upgrade is answered as
            # such, and the connection closes after it
            if self.waiting and self.req is None:
                self.waiting[-1].keep_alive = False
                self.parser = None  # nothing more is parsed
            else:
                self.refuse(Refusal(400, "Bad request", "protocol upgrades are not supported"))
        except httptools.HttpParserError as e:
            self.refuse(self.broken(e))
        self.advance()

    def eof_received(self) -> bool | None:
        if self.busy or self.waiting:
            self.client_eof = True
            return True  # half-closed by the client: the answers still go out, then close
        return None  # close

    def pause_writing(self) -> None:
        self.write_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.update_reading()

    # -- httptools callbacks -----------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.req = Request(self.last_activity, self.peer)  # its first bytes came in this read
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.url += url
        self.header_bytes += len(url)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _headers_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _headers_too_large()
        key = _header_key(name)
        if key is None:
            return  # as waitress: HTTP_FOO_BAR may not be faked by "Foo_Bar"
        headers = self.req.headers  # type: ignore[union-attr]
        text = value.decode("latin-1")
        headers[key] = headers[key] + ", " + text if key in headers else text

    def on_headers_complete(self) -> None:
        req = self.req
        parser = self.parser
        assert req is not None and parser is not None
        req.method = parser.get_method()
        req.keep_alive = parser.should_keep_alive()
        req.http10 = parser.get_http_version() == "1.0"
        self.server.check_headers(req)  # raises a Refusal
        expect = req.headers.get("EXPECT")
        if (expect is not None and expect.lower() == "100-continue" and not req.http10 and not self.busy
                and not self.waiting and self.transport is not None):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        req.size += len(body)
        if req.size > self.server.max_body_bytes:
            raise self.server.too_large(req)
        req.body.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        self.served += 1
        server = self.server
        if self.served >= server.keepalive_requests or self.last_activity - self.created >= server.keepalive_time_s:
            req.keep_alive = False  # answered, then closed: the client reconnects
        self.waiting.append(req)

    # -- answering --------------------------------------------------------------------------------------
    def broken(self, error: Exception) -> Refusal:
        """Malformed HTTP: llhttp's reason, in the JSON shape."""
        reason = str(error).strip() or type(error).__name__
        return Refusal(400, "Bad request", f"malformed HTTP request: {reason}")

    def refuse(self, refusal: Refusal) -> None:
        """Answer `refusal` after what is waiting, then close: nothing more is parsed."""
        req = self.req or Request(time.monotonic(), self.peer)
        self.req = None
        self.parser = None
        if not refusal.counted and req.url.split(b"?", 1)[0].rstrip(b"/") == _FAST_URL:
            self.server.count_refusal()  # as the app counts its own refusals of ingest requests
        req.keep_alive = False
        req.answer = self.server.error_answer(refusal)
        self.waiting.append(req)

    def advance(self) -> None:
        """Answer what is waiting, in order; one request at a time goes to a worker thread."""
        server = self.server
        while self.waiting and not self.busy and not self.closing:
            req = self.waiting.popleft()
            if req.answer is not None:
                self.send(req.answer, req, linger=True)
            elif server.runs_inline(req):
                self.send(server.answer(req), req)
            else:
                self.busy = True
                future = server.loop.run_in_executor(server.executor, server.answer, req)
                future.add_done_callback(partial(self.handled, req))
        self.update_reading()

    def handled(self, req: Request, future: asyncio.Future[bytes]) -> None:
        self.busy = False
        if self.closing:
            return  # the client left, or the server stops
        if future.cancelled():
            self.close()
            return
        self.send(future.result(), req)  # closes the connection if the server stops
        self.advance()

    def send(self, data: bytes, req: Request, linger: bool = False) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(data)
        self.last_activity = time.monotonic()
        if req.keep_alive and not self.server.stopping and not (self.client_eof and not self.waiting):
            return
        self.closing = True
        self.waiting.clear()
        if linger and transport.can_write_eof():
            # a FIN after the answer, and what the client still sends is read and dropped for a
            # while: closing with unread bytes would send a reset, which can destroy the answer
            # before the client reads it
            self.lingering = True
            transport.write_eof()
            self.server.loop.call_later(LINGER_S, self.close)
            self.update_reading()
        else:
            transport.close()

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = (self.write_paused or self.busy or bool(self.waiting)) and not self.lingering
        if pause and not self.reading_paused:
            transport.pause_reading()
            self.reading_paused = True
        elif not pause and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def expired(self, now: float, request_cutoff: float, idle_cutoff: float) -> str | None:
        """Why this connection is to be closed now, if it is."""
        if self.busy or self.lingering:
            return None
        if self.req is not None and self.req.started < request_cutoff:
            return "request"
        if self.last_activity < idle_cutoff:
            return "idle"
        return None


def _status_line(status: str) -> bytes:
    """ "202 Accepted" -> the status line."""
    code = int(status[:3])
    known = _STATUS.get(code)
    return known if known is not None and status[4:] == HTTPStatus(code).phrase else f"HTTP/1.1 {status}\r\n".encode()


class FastServer:
    """The HTTP server of one listener: run `run()` in a thread; `stop()` from another."""

    def __init__(self, app: FastIngest, config: Config, sock: socket.socket, gate: Gate,
                 headers_of: RejectionHeaders, count_refusal: Callable[[], None]) -> None:
        h = config.http
        self.app = app
        self.accept = app.payloads.accept
        self.count_rejection = app.intake.count_rejection
        self.timing = app.timing
        self.retry_after_s = h.retry_after_s
        self.sock = sock
        self.gate = gate
        self.headers_of = headers_of
        self.count_refusal = count_refusal
        self.max_body_bytes = h.max_body_bytes
        self.connection_limit = h.connection_limit
        self.channel_timeout_s = float(h.channel_timeout_s)
        self.request_timeout_s = float(h.request_timeout_s)
        self.keepalive_requests = h.keepalive_requests
        self.keepalive_time_s = float(h.keepalive_time_s)
        sp = config.spool
        self.inline_ingest = not (sp.on_disk and sp.journal_fsync == "always")
        self.executor = ThreadPoolExecutor(h.threads, thread_name_prefix="http")
        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        self.connections: set[Connection] = set()
        self.open = 0  # accepted connections, until they are gone
        self.accepting = False
        self.stopping = False
        self.cut_requests = 0
        self.date = b""
        host, port = sock.getsockname()[:2]
        self.environ_base: dict[str, Any] = {
            "SERVER_NAME": host, "SERVER_PORT": str(port), "SCRIPT_NAME": "", "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": True, "wsgi.run_once": False,
        }
        self._stopped = threading.Event()

    # -- the loop's thread ----------------------------------------------------------------------------
    def run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        self.sock.setblocking(False)
        self.maintain()
        self.start_accepting()
        try:
            loop.run_forever()
        except BaseException:
            log.exception("the HTTP front's event loop failed")
        finally:
            self._stopped.set()
        if not self.stopping:
            # a listener that does not serve must not stay up: the supervisor restarts it
            log.critical("the HTTP front stopped serving; the listener exits")
            os._exit(1)

    def start_accepting(self) -> None:
        if not self.accepting and not self.stopping:
            self.loop.add_reader(self.sock.fileno(), self.accept_connections)
            self.accepting = True

    def stop_accepting(self) -> None:
        if self.accepting:
            self.loop.remove_reader(self.sock.fileno())
            self.accepting = False

    def accept_connections(self) -> None:
        while self.open < self.connection_limit:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept connections (%s): trying again in a second", e)
                    self.stop_accepting()
                    self.loop.call_later(1.0, self.start_accepting)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that one client is gone
                raise
            self.open += 1
            conn.setblocking(False)
            self.loop.create_task(self.connect(conn))
        self.stop_accepting()  # at the connection limit: new ones wait in the kernel's backlog

    async def connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: Connection(self), conn)
        except OSError:
            conn.close()
            self.open -= 1
            self.start_accepting()

    def forget(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.open -= 1
            if self.open < self.connection_limit:
                self.start_accepting()

    def maintain(self) -> None:
        """Every second: the Date header, and connections over their time."""
        now = time.monotonic()
        self.date = formatdate(usegmt=True).encode()
        request_cutoff, idle_cutoff = now - self.request_timeout_s, now - self.channel_timeout_s
        for conn in list(self.connections):
            why = conn.expired(now, request_cutoff, idle_cutoff)
            if why == "request":
                self.cut_requests += 1
                log.info("cut a request from %s: not whole after %d s (http.request_timeout_s)",
                         conn.peer or "?", self.request_timeout_s)
            if why is not None:
                conn.close()
        self.loop.call_later(MAINTENANCE_S, self.maintain)

    # -- decisions from the headers ------------------------------------------------------------------
    def check_headers(self, req: Request) -> None:
        """The refusals decided before the body: the gate's (401, 429), then the declared length."""
        path = req.url.split(b"?", 1)[0].decode("latin-1")
        try:
            refused = self.gate(req.method.decode("latin-1"), path, req.headers)
        except Exception:  # a bug here must not take the event loop down
            log.exception("refusing a request from its headers failed")
            refused = None
        if refused is not None:
            raise Refusal(refused.status, refused.title, refused.description, self.headers_of(refused), counted=True)
        length = req.headers.get("CONTENT_LENGTH")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise self.too_large(req)

    def too_large(self, req: Request) -> Refusal:
        return Refusal(413, _TITLES[413], f"body exceeds {self.max_body_bytes} bytes (http.max_body_bytes)")

    def runs_inline(self, req: Request) -> bool:
        return (self.inline_ingest and req.method == b"POST" and req.url == _FAST_URL
                and req.size <= INLINE_BODY_BYTES and "CONTENT_ENCODING" not in req.headers)

    # -- answers (on the loop, or on a worker thread) -------------------------------------------------------
    def answer(self, req: Request) -> bytes:
        try:
            if req.method == b"POST" and req.url == _FAST_URL:
                return self.ingest(req)
            return self.call_app(req)
        except Exception:
            log.exception("answering %s %s failed", req.method.decode("latin-1"), req.url[:200].decode("latin-1"))
            req.keep_alive = False
            return self.error_answer(Refusal(500, _TITLES[500], "the request could not be handled; see the log"))

    def ingest(self, req: Request) -> bytes:
        """POST /v1/payloads, as `FastIngest` serves it (Content-Length was checked by llhttp)."""
        h = req.headers
        length = h.get("CONTENT_LENGTH")
        timing = self.timing
        started = timing.clock()
        try:
            count = self.accept(h.get("AUTHORIZATION"), h.get("CONTENT_TYPE"), h.get("CONTENT_ENCODING"),
                                int(length) if length else None, _Body(req.body_bytes()))
        except Rejection as ex:
            self.count_rejection(ex.tenant)
            status, headers, body = rejection_response(ex, self.retry_after_s)
            timing.observe(ex.status, started)
            return self.response(_status_line(status), headers, body, req)
        timing.observe(202, started)
        body = b'{"accepted":%d}' % count
        return self.response(_STATUS[202], [("Content-Type", _JSON), ("Content-Length", str(len(body)))], body, req)

    def call_app(self, req: Request) -> bytes:
        """Any other request, through the WSGI app (falcon): answers exactly as under waitress."""
        try:
            url = httptools.parse_url(req.url)
        except httptools.HttpParserInvalidURLError:
            req.keep_alive = False
            return self.error_answer(Refusal(400, "Bad request", "malformed request target"))
        environ = dict(self.environ_base)
        environ["REQUEST_METHOD"] = req.method.decode("latin-1")
        environ["PATH_INFO"] = unquote_to_bytes(url.path or b"/").decode("latin-1")
        environ["QUERY_STRING"] = (url.query or b"").decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/1.0" if req.http10 else "HTTP/1.1"
        environ["REMOTE_ADDR"] = req.peer
        environ["wsgi.input"] = io.BytesIO(req.body_bytes())
        for key, value in req.headers.items():
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = value
            else:
                environ["HTTP_" + key] = value
        if req.body and "CONTENT_LENGTH" not in environ:  # a chunked body, whole now
            environ["CONTENT_LENGTH"] = str(req.size)
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            started[:] = [status, headers]
            return lambda data: None

        result: Iterable[bytes] = self.app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
        headers.append(("Content-Length", str(len(body))))
        return self.response(_status_line(status), headers, b"" if req.method == b"HEAD" else body, req)

    def response(self, status_line: bytes, headers: list[tuple[str, str]], body: bytes, req: Request) -> bytes:
        head = [status_line, b"Server: ingestd\r\nDate: ", self.date, b"\r\n"]
        head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
        if not req.keep_alive or self.stopping:
            head.append(b"Connection: close\r\n")
        elif req.http10:
            head.append(b"Connection: keep-alive\r\n")
        head += [b"\r\n", body]
        return b"".join(head)

    def error_answer(self, refusal: Refusal) -> bytes:
        body = orjson.dumps({"title": refusal.title, "description": refusal.description})
        headers = [("Content-Type", _JSON), ("Content-Length", str(len(body))), *refusal.headers]
        head = [_STATUS[refusal.status], b"Server: ingestd\r\nDate: ", self.date, b"\r\n"]
        head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
        head += [b"Connection: close\r\n\r\n", body]
        return b"".join(head)

    # -- stopping (from the listener's main thread) ------------------------------------------------------
    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop accepting, let the requests being handled answer (up to `grace_s`), close the rest."""
        if self._stopped.is_set() or not self.loop.is_running():
            return
        done = asyncio.run_coroutine_threadsafe(self._stop(grace_s), self.loop)
        try:
            done.result(grace_s + 2)
        except Exception:  # a stuck worker thread: the process exits anyway
            log.exception("stopping the HTTP front")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._stopped.wait(2)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _stop(self, grace_s: float) -> None:
        self.stopping = True
        self.stop_accepting()
        self.sock.close()
        for conn in list(self.connections):
            if not conn.busy and not conn.waiting:
                conn.close()  # idle, or in the middle of receiving a request that gets no answer
        deadline = time.monotonic() + grace_s
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()


def create_server(app: FastIngest, config: Config, sock: socket.socket, gate: Gate, headers_of: RejectionHeaders,
                  count_refusal: Callable[[], None]) -> FastServer:
    return FastServer(app, config, sock, gate, headers_of, count_refusal)
