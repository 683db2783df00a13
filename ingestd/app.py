"""The HTTP side: a Falcon app whose ingest handler only validates, enqueues and answers.

`create_app(config, intake, health)` is the factory (falcon's `examples/look` style): the
resources are thin, the queue and health objects are injected, and domain errors are mapped to
responses in one place. Every error body is JSON `{"title", "description"}`, 404 and 405
included, whatever the client's Accept header says.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import falcon
import orjson

from .config import Config
from .health import Health, render_metrics
from .jobqueue import Admission, Intake
from .openapi import document
from .records import encode_lines, exact_dumps
from .validation import Limits, Rejection, decode_collection

log = logging.getLogger(__name__)

JSON = "application/json"


def _json(resp: falcon.Response, status: int, doc: Any) -> None:
    resp.status = status
    resp.content_type = JSON
    resp.data = orjson.dumps(doc)


class PayloadsResource:
    """POST /v1/payloads: validate, enqueue, answer 202; 503 with Retry-After when full."""

    def __init__(self, config: Config, intake: Intake, tokens: tuple[str, ...], clock: Callable[[], float]) -> None:
        h = config.http
        self.limits = Limits(h.max_body_bytes, h.max_decoded_bytes, h.max_payloads)
        self.intake = intake
        self.tokens = tuple(t.encode() for t in tokens)
        self.retry_after = h.retry_after_s
        self.clock = clock

    def _authorize(self, req: falcon.Request) -> None:
        header = req.get_header("Authorization") or ""
        scheme, _, given = header.partition(" ")
        presented = given.strip().encode()
        # compare with every token, so the time taken does not tell which one nearly matched
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(presented, token)
        if scheme.lower() != "bearer" or not ok:
            raise Rejection(401, "Unauthorized", "a valid 'Authorization: Bearer <token>' header is required")

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.tokens:
            self._authorize(req)
        limits = self.limits
        length = req.content_length
        if length is not None and length > limits.max_body_bytes:
            raise Rejection(413, "Payload too large", f"body of {length} bytes exceeds {limits.max_body_bytes} bytes")
        body = req.bounded_stream.read(limits.max_body_bytes + 1)
        collection = decode_collection(req.content_type, req.get_header("Content-Encoding"), body, limits)
        now = self.clock()
        if collection.exact:
            lines = encode_lines(now, collection.version, collection.payloads, exact_dumps)
        else:
            lines = encode_lines(now, collection.version, collection.payloads)
        count = len(collection.payloads)
        admission = self.intake.submit(now, count, lines)
        if admission is Admission.ACCEPTED:
            resp.status = 202
            resp.content_type = JSON
            resp.data = b'{"accepted":%d}' % count
            return
        if admission is Admission.DRAINING:
            raise Rejection(503, "Service unavailable", "ingestd is draining for shutdown; send again later")
        raise Rejection(503, "Service unavailable", "the queue is full; send again later")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.intake.count_rejection()
        raise falcon.HTTPMethodNotAllowed(["POST"], description="use POST to send payloads")

    on_put = on_delete = on_patch = on_head = on_options = on_get


class HealthResource:
    def __init__(self, health: Health) -> None:
        self.health = health

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        snap = self.health.snapshot()
        _json(resp, 200 if snap["ready"] else 503, snap)

    def on_get_live(self, req: falcon.Request, resp: falcon.Response) -> None:
        _json(resp, 200, {"status": "alive"})

    def on_get_ready(self, req: falcon.Request, resp: falcon.Response) -> None:
        snap = self.health.snapshot()
        _json(resp, 200 if snap["ready"] else 503, {"ready": snap["ready"], "status": snap["status"]})


class MetricsResource:
    def __init__(self, health: Health) -> None:
        self.health = health

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = render_metrics(self.health.snapshot())


class OpenApiResource:
    def __init__(self, config: Config) -> None:
        self.body = orjson.dumps(document(config))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = JSON
        resp.data = self.body


def create_app(config: Config, intake: Intake, health: Health, tokens: tuple[str, ...] = (),
               clock: Callable[[], float] = time.time) -> falcon.App:
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
        intake.count_rejection()
        if ex.status == 503:
            resp.set_header("Retry-After", str(config.http.retry_after_s))
        elif ex.status == 401:
            resp.set_header("WWW-Authenticate", 'Bearer realm="ingestd"')
        _json(resp, ex.status, {"title": ex.title, "description": ex.description})

    app.set_error_serializer(serialize_error)
    app.add_error_handler(Rejection, handle_rejection)
    health_resource = HealthResource(health)
    app.add_route("/v1/payloads", PayloadsResource(config, intake, tokens, clock))
    app.add_route("/health", health_resource)
    app.add_route("/health/live", health_resource, suffix="live")
    app.add_route("/health/ready", health_resource, suffix="ready")
    app.add_route("/metrics", MetricsResource(health))
    app.add_route("/openapi.json", OpenApiResource(config))
    return app
