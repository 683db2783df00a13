"""The HTTP front: waitress, with what ingestd needs at the edge before a body is buffered.

waitress reads a request's whole body before the WSGI app sees it. For an ingest daemon on an
open port that is the wrong order: a client without a token could make every connection buffer
a body. So ingestd's waitress server has its own request parser and channel:

- **From the request line and headers alone** (the parser's `received`, on waitress' I/O
  thread, before one body byte is kept): a POST to the ingest path without a valid bearer token
  is answered 401, a tenant whose rate bucket is empty 429, a declared `Content-Length` over
  `http.max_body_bytes` 413, and the connection is closed. A chunked body is cut at the limit
  as it arrives (waitress counts it). So only authenticated clients can make a listener buffer
  a body, and at most `http.max_body_bytes` per connection: the listener's buffered request
  bytes are bounded by `http.connection_limit x (max_body_bytes + 8 KiB of headers)`.
- **JSON errors**: waitress' own refusals (400 unparsable request, 413, 431 headers too large,
  501) get the same `{"title", "description"}` body as the app's.
- **Keep-alive rebalancing**: a connection is closed after `http.keepalive_requests` requests
  or `http.keepalive_time_s` seconds (its last answer says `Connection: close`), as nginx's
  `keepalive_requests` / `keepalive_time` do. The kernel spreads *new* connections over the
  listeners' SO_REUSEPORT sockets, so without this a load balancer's long-lived connections
  would stay on whichever listeners were up when they were opened, and a listener that starts
  or restarts late would get none of them.
- **`http.request_timeout_s`**: a request not whole within that time of its first byte is cut
  (the connection closed), however slowly it trickles; `channel_timeout_s` stays the limit for
  idle keep-alive connections. Checked every second by the server's maintenance pass.

Beyond `http.connection_limit` open connections, waitress stops accepting: new connections
wait in the kernel's listen backlog (2048) until a slot frees, and beyond the backlog the
kernel drops their SYNs (clients retry). Slow clients hold a slot at most `request_timeout_s`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher
from waitress.utilities import Error

from .config import Config
from .validation import Rejection

log = logging.getLogger(__name__)

INGEST_PATH = "/v1/payloads"
MAINTENANCE_S = 1  # how often waitress looks for idle connections and requests over their time


class JsonError(Error):  # type: ignore[misc]  # waitress is untyped
    """An error answer in ingestd's JSON shape, written by waitress itself (the connection closes)."""

    def __init__(self, status: int, title: str, description: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(description)
        self.code = status
        self.reason = HTTPStatus(status).phrase
        self.title = title
        self.extra_headers = headers or []

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        body = orjson.dumps({"title": self.title, "description": self.body})
        return f"{self.code} {self.reason}", [("Content-Type", "application/json"), *self.extra_headers], body


def as_json(error: Error, max_body_bytes: int) -> JsonError:
    """One of waitress' own refusals, in ingestd's shape."""
    if error.code == 413:
        description = f"body exceeds {max_body_bytes} bytes (http.max_body_bytes)"
    else:
        description = str(error.body)
    return JsonError(error.code, _TITLES.get(error.code, error.reason), description)


_TITLES = {400: "Bad request", 413: "Payload too large", 431: "Request header fields too large", 501: "Not implemented"}


# decides from the request line and headers: None to go on, or the refusal (a Rejection)
Gate = Callable[[str, str, dict[str, str]], Rejection | None]
RejectionHeaders = Callable[[Rejection], list[tuple[str, str]]]


def make_parser(gate: Gate, headers_of: RejectionHeaders, max_body_bytes: int,
                count_refusal: Callable[[], None]) -> type[HTTPRequestParser]:
    class IngestParser(HTTPRequestParser):  # type: ignore[misc]
        gated = False
        counted = False
        channel: IngestChannel | None = None

        def received(self, data: bytes) -> int:
            n: int = super().received(data)
            if getattr(self, "completed", False) and not self.counted and not self.empty and self.channel is not None:
                self.counted = True
                if self.channel.served_enough():
                    self.headers["CONNECTION"] = "close"  # answered, then closed: the client reconnects
            error: Error | None = getattr(self, "error", None)
            if self.headers_finished and not self.gated:
                self.gated = True
                if error is None or error.code == 413:  # an unauthenticated client learns no limit
                    try:
                        refused = gate(self.command or "", self.path or "", self.headers)
                    except Exception:  # a bug here must not take the I/O thread down
                        log.exception("refusing a request from its headers failed")
                        refused = None
                    if refused is not None:
                        self.error = JsonError(refused.status, refused.title, refused.description, headers_of(refused))
                        self.completed = True
                        self.expect_continue = False  # no "100 Continue" for a body that is refused
            error = getattr(self, "error", None)
            if error is not None and not isinstance(error, JsonError):
                self.error = as_json(error, max_body_bytes)
                if (getattr(self, "path", None) or "").rstrip("/") == INGEST_PATH:
                    count_refusal()  # as the app counts its own refusals of ingest requests
            return n

    return IngestParser


class IngestChannel(HTTPChannel):  # type: ignore[misc]
    request_started = 0.0  # when the request being received (self.request) began to arrive
    served = 0  # requests received whole on this connection
    keepalive_requests = 1000
    keepalive_time_s = 60.0
    parser_type: Any = HTTPRequestParser

    def parser_class(self, adj: Adjustments) -> Any:
        """waitress calls `self.parser_class(adj)` for each request: hand the parser its channel."""
        parser = self.parser_type(adj)
        parser.channel = self
        return parser

    def served_enough(self) -> bool:
        """One more request received whole: is it this connection's last?"""
        self.served += 1
        return self.served >= self.keepalive_requests or time.time() - self.creation_time >= self.keepalive_time_s

    def received(self, data: bytes) -> bool:
        before = self.request
        done: bool = super().received(data)
        if self.request is not None and self.request is not before:
            self.request_started = time.time()
        return done


class IngestServer(TcpWSGIServer):  # type: ignore[misc]
    request_timeout_s = 30.0
    cut_requests = 0  # requests cut for taking longer than request_timeout_s

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections (channel_timeout)
        cutoff = now - self.request_timeout_s
        for channel in list(self.active_channels.values()):
            if channel.request is not None and not channel.will_close and channel.request_started < cutoff:
                channel.will_close = True  # closed by the I/O loop: the request never reaches the app
                self.cut_requests += 1
                log.info("cut a request from %s: not whole after %d s (http.request_timeout_s)",
                         channel.addr[0] if channel.addr else "?", self.request_timeout_s)


def create_server(app: Any, config: Config, sock: socket.socket, gate: Gate, headers_of: RejectionHeaders,
                  count_refusal: Callable[[], None]) -> IngestServer:
    h = config.http
    adj = Adjustments(
        sockets=[sock],
        threads=h.threads,
        connection_limit=h.connection_limit,
        channel_timeout=h.channel_timeout_s,
        cleanup_interval=MAINTENANCE_S,
        # waitress refuses a Content-Length >= this from the headers and cuts a chunked body at it
        max_request_body_size=h.max_body_bytes + 1,
        # a body up to the limit stays in memory (no temporary files on disk)
        inbuf_overflow=h.max_body_bytes + 1,
        asyncore_use_poll=True,
        ident="ingestd",
        expose_tracebacks=False,
        backlog=2048,
    )
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    server = IngestServer(app, {}, True, sock, dispatcher=dispatcher, adj=adj, bind_socket=False,
                          sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))
    server.request_timeout_s = float(h.request_timeout_s)
    channel = type("Channel", (IngestChannel,), {
        "parser_type": make_parser(gate, headers_of, h.max_body_bytes, count_refusal),
        "keepalive_requests": h.keepalive_requests,
        "keepalive_time_s": float(h.keepalive_time_s),
    })
    server.channel_class = channel
    return server
