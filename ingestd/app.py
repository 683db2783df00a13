"""The HTTP side: a Falcon app whose ingest handler only validates, enqueues and answers.

`create_app(config, intake, health)` is the factory (falcon's `examples/look` style): the
resources are thin, the queue and health objects are injected, and domain errors are mapped to
responses in one place. Every error body is JSON `{"title", "description"}`, 404 and 405
included, whatever the client's Accept header says.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import falcon
import orjson

from .config import Config
from .health import Health, render_metrics
from .histograms import RequestTiming
from .histograms import render as render_histograms
from .intake import Admission, Intake
from .openapi import document
from .ratelimit import RateLimiter
from .scoreboard import Role
from .validation import Limits, Rejection, decode_collection, encode_collection

log = logging.getLogger(__name__)

JSON = "application/json"


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _json(resp: falcon.Response, status: int, doc: Any) -> None:
    resp.status = status
    resp.content_type = JSON
    resp.data = orjson.dumps(doc)


class PayloadsResource:
    """POST /v1/payloads: validate, enqueue, answer 202; 503 with Retry-After when full."""

    def __init__(self, config: Config, intake: Intake, limiter: RateLimiter | None, clock: Callable[[], float]) -> None:
        h = config.http
        self.limits = Limits.from_config(h)
        self.intake = intake
        tenancy = config.tenancy
        self.tenant_names = tenancy.names
        # tokens are looked up by their SHA-256: one dictionary probe whatever their number, and
        # no byte-by-byte comparison with a secret whose time could tell how much of it matched
        self.tokens = {_digest(t.encode()): tenant for t, tenant in tenancy.tokens}
        self.limiter = limiter if limiter is not None and any(t.max_payloads_per_s for t in tenancy.tenants) else None
        self.retry_after = h.retry_after_s
        self.clock = clock

    def _authorize(self, header: str | None) -> int:
        """The tenant of the request's bearer token."""
        scheme, _, given = (header or "").partition(" ")
        tenant = self.tokens.get(_digest(given.strip().encode()))
        if scheme.lower() != "bearer" or tenant is None:
            raise Rejection(401, "Unauthorized", "a valid 'Authorization: Bearer <token>' header is required")
        return tenant

    def _rate_limited(self, tenant: int, wait_s: int, count: int | None = None) -> Rejection:
        name = self.tenant_names[tenant]
        rate = self.limiter.rates[tenant] if self.limiter else 0
        what = f"{count} payloads" if count is not None else "more payloads"
        return Rejection(429, "Too many requests",
                         f"tenant {name!r} is over its rate of {rate} payloads/s: {what} fit in {wait_s} s",
                         retry_after=wait_s, tenant=tenant)

    def accept(self, authorization: str | None, content_type: str | None, content_encoding: str | None,
               content_length: int | None, stream: Any) -> int:
        """The whole ingest: returns the number of payloads queued, or raises Rejection."""
        tenant = self._authorize(authorization) if self.tokens else 0
        limiter = self.limiter
        limited = limiter is not None and limiter.limited(tenant)
        if limited:
            assert limiter is not None
            wait = limiter.wait_s(tenant)  # an empty bucket refuses before the body is parsed
            if wait:
                raise self._rate_limited(tenant, wait)
        limits = self.limits
        if content_length is not None and content_length > limits.max_body_bytes:
            raise Rejection(413, "Payload too large",
                            f"body of {content_length} bytes exceeds {limits.max_body_bytes} bytes")
        body = stream.read(limits.max_body_bytes + 1)
        collection = decode_collection(content_type, content_encoding, body, limits)
        now = self.clock()
        lines = encode_collection(now, collection, limits)
        count = len(collection.payloads)
        if limited:
            assert limiter is not None
            if count > limiter.rates[tenant]:
                raise Rejection(413, "Payload too large",
                                f"{count} payloads in one request can never fit tenant {self.tenant_names[tenant]!r}'s "
                                f"rate of {limiter.rates[tenant]} payloads/s (max_payloads_per_s): split the request")
            wait = limiter.take(tenant, count)
            if wait:
                raise self._rate_limited(tenant, wait, count)
        admission = self.intake.submit(now, count, lines, tenant)
        if admission is Admission.ACCEPTED:
            return count
        if limited:
            assert limiter is not None
            limiter.give_back(tenant, count)  # nothing was kept: the tenant keeps its allowance
        if admission is Admission.DRAINING:
            raise Rejection(503, "Service unavailable", "ingestd is draining for shutdown; send again later")
        if admission is Admission.SPOOL:
            raise Rejection(503, "Service unavailable",
                            f"the spool cannot take requests now ({self.intake.blocked or self.intake.others_refuse() or 'write failed'}); send again later")
        raise Rejection(503, "Service unavailable", "the queue is full; send again later")

    def gate(self, method: str, path: str, headers: dict[str, str]) -> Rejection | None:
        """The refusals decided from the request line and headers alone, before the HTTP server
        buffers a body (see front.py): no valid token (401), an empty rate bucket (429)."""
        if method != "POST" or path.rstrip("/") != "/v1/payloads":
            return None
        try:
            tenant = self._authorize(headers.get("AUTHORIZATION")) if self.tokens else 0
            limiter = self.limiter
            if limiter is not None and limiter.limited(tenant):
                wait = limiter.wait_s(tenant)
                if wait:
                    raise self._rate_limited(tenant, wait)
        except Rejection as ex:
            self.intake.count_rejection(ex.tenant)
            return ex
        return None

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        # reached through falcon only for variants of the path (a trailing slash): see FastIngest
        count = self.accept(req.get_header("Authorization"), req.content_type, req.get_header("Content-Encoding"),
                            req.content_length, req.bounded_stream)
        resp.status = 202
        resp.content_type = JSON
        resp.data = b'{"accepted":%d}' % count

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.intake.count_rejection()
        raise falcon.HTTPMethodNotAllowed(["POST"], description="use POST to send payloads")

    on_put = on_delete = on_patch = on_head = on_options = on_get


class HealthResource:
    def __init__(self, health: Health) -> None:
        self.health = health

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        snap = self.health.snapshot()
        _json(resp, 200 if snap["ready"] else 503, self.health.public(snap))

    def on_get_live(self, req: falcon.Request, resp: falcon.Response) -> None:
        _json(resp, 200, {"status": "alive"})

    def on_get_ready(self, req: falcon.Request, resp: falcon.Response) -> None:
        snap = self.health.snapshot()
        _json(resp, 200 if snap["ready"] else 503,
              {"ready": snap["ready"], "status": snap["status"], "reasons": snap["reasons"]})


class MetricsResource:
    def __init__(self, health: Health) -> None:
        self.health = health

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = render_metrics(self.health.public(self.health.snapshot())) + render_histograms(
            self.health.board.all_histograms())


class OpenApiResource:
    def __init__(self, config: Config) -> None:
        self.body = orjson.dumps(document(config))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = JSON
        resp.data = self.body


def rejection_headers(ex: Rejection, retry_after_s: int) -> list[tuple[str, str]]:
    """The headers a refusal carries besides its JSON body's."""
    if ex.status == 503:
        return [("Retry-After", str(retry_after_s))]
    if ex.status == 429:
        return [("Retry-After", str(ex.retry_after or retry_after_s))]
    if ex.status == 401:
        return [("WWW-Authenticate", 'Bearer realm="ingestd"')]
    return []


def rejection_response(ex: Rejection, retry_after_s: int) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status line, headers and JSON body of a refused ingest request (one place for every path)."""
    body = orjson.dumps({"title": ex.title, "description": ex.description})
    headers = [("Content-Type", JSON), ("Content-Length", str(len(body))), *rejection_headers(ex, retry_after_s)]
    return f"{ex.status} {HTTPStatus(ex.status).phrase}", headers, body


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


class FastIngest:
    """The WSGI entry point. POST /v1/payloads, the one path that runs thousands of times a
    second, is served straight from the WSGI environ; falcon's request and response objects
    cost about a fifth of the handler's time. Everything else goes to the falcon app."""

    def __init__(self, payloads: PayloadsResource, app: falcon.App[falcon.Request, falcon.Response], intake: Intake,
                 retry_after_s: int, timing: RequestTiming) -> None:
        self.payloads = payloads
        self.app = app
        self.intake = intake
        self.retry_after_s = retry_after_s
        self.timing = timing

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != "/v1/payloads" or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        started = self.timing.clock()
        try:
            length = environ.get("CONTENT_LENGTH")
            if length and not length.isdigit():
                raise Rejection(400, "Bad request", "Content-Length is not a number")
            count = self.payloads.accept(environ.get("HTTP_AUTHORIZATION"), environ.get("CONTENT_TYPE"),
                                         environ.get("HTTP_CONTENT_ENCODING"), int(length) if length else None,
                                         environ["wsgi.input"])
        except Rejection as ex:
            self.intake.count_rejection(ex.tenant)
            status, headers, body = rejection_response(ex, self.retry_after_s)
            start_response(status, headers)
            self.timing.observe(ex.status, started)
            return [body]
        body = b'{"accepted":%d}' % count
        start_response("202 Accepted", [("Content-Type", JSON), ("Content-Length", str(len(body)))])
        self.timing.observe(202, started)
        return [body]


def create_app(config: Config, intake: Intake, health: Health, limiter: RateLimiter | None = None,
               clock: Callable[[], float] = time.time, timing: RequestTiming | None = None) -> FastIngest:
    """`timing`: where ingest requests are timed; by default the histograms of the intake's
    listener row on the scoreboard."""
    app = falcon.App(media_type=JSON)
    app.req_options.strip_url_path_trailing_slash = True

    def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
        description = exc.description or {
            404: f"no resource at {req.path}; ingest with POST /v1/payloads",
            405: f"method {req.method} is not allowed on {req.path}",
        }.get(exc.status_code, exc.title or "")
        resp.content_type = JSON
        resp.data = orjson.dumps({"title": exc.title, "description": description})

    def handle_rejection(req: falcon.Request, resp: falcon.Response, ex: Rejection, params: dict[str, Any]) -> None:
        intake.count_rejection(ex.tenant)
        resp.status, headers, resp.data = rejection_response(ex, config.http.retry_after_s)
        resp.set_headers(headers)

    app.set_error_serializer(serialize_error)
    app.add_error_handler(Rejection, handle_rejection)
    health_resource = HealthResource(health)
    payloads = PayloadsResource(config, intake, limiter, clock)
    app.add_route("/v1/payloads", payloads)
    app.add_route("/health", health_resource)
    app.add_route("/health/live", health_resource, suffix="live")
    app.add_route("/health/ready", health_resource, suffix="ready")
    app.add_route("/metrics", MetricsResource(health))
    app.add_route("/openapi.json", OpenApiResource(config))
    timing = timing or RequestTiming(intake.board.histograms(Role.LISTENER, intake.index))
    return FastIngest(payloads, app, intake, config.http.retry_after_s, timing)
