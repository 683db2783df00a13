"""app.create_app through falcon's TestClient, over a real in-process scoreboard, queue, request
log, intake and health: what a listener process serves, without the process."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pytest
from falcon import testing

from ingestd.app import WSGIApp, create_app
from ingestd.config import AuthConfig, Config, HttpConfig, QueueConfig, TenantConfig, WorkersConfig, resolve_tenancy
from ingestd.health import Health, shared_refusals
from ingestd.histograms import parse as parse_histograms
from ingestd.intake import Intake
from ingestd.ratelimit import RateLimiter
from ingestd.records import encode_lines, request_record
from ingestd.refqueue import Ref, RefQueue
from ingestd.requestlog import Part, RequestLog, read_record, segment_path
from ingestd.scoreboard import (
    ChildField,
    Control,
    ListenerField,
    Phase,
    Role,
    Scoreboard,
    UploaderField,
    now_ms,
)
from ingestd.states import ChildState

NOW = 1764299045.125  # 2025-11-28T03:04:05.125Z
NOW_TEXT = "2025-11-28T03:04:05.125Z"
MAX_BODY = 4096
MAX_DECODED = 16384
MAX_PAYLOADS = 20
RETRY_AFTER = 7
INGEST = "/v1/payloads"
LISTENERS = 2  # the intake under test is listener 0; listener 1 exists only on the scoreboard
UPLOADERS = 2


class Stored(NamedTuple):
    """A request as an uploader finds it: its reference, and the record read back from the log."""

    ref: Ref
    received_at: float
    lines: bytes


class Kept(NamedTuple):
    """Everything an answer could have kept: the queue, the log's bytes, its undelivered parts."""

    depth: int
    log_bytes: int
    files: dict[str, bytes]
    parts: list[Part]


@dataclass
class Daemon:
    app: WSGIApp
    client: testing.TestClient
    config: Config
    queue: RefQueue
    log: RequestLog
    intake: Intake
    board: Scoreboard
    health: Health

    def post(self, body: Any = None, *, raw: bytes | None = None, content_type: str | None = "application/json",
             headers: dict[str, str] | None = None, path: str = INGEST) -> testing.Result:
        data = raw if raw is not None else orjson.dumps(body)
        h = dict(headers or {})
        if content_type is not None:
            h["Content-Type"] = content_type
        return self.client.simulate_post(path, body=data, headers=h)

    def taken(self) -> Stored:
        refs = self.queue.take(1, 1.0)
        assert refs, "nothing on the queue"
        [ref] = refs
        fd = os.open(segment_path(self.log.logs_dir, ref.listener, ref.segment), os.O_RDONLY)
        try:
            got = read_record(fd, ref)
        finally:
            os.close(fd)
        assert got is not None, f"the record of {ref} fails its checksum"
        return Stored(ref, got.received_at, got.lines)

    def kept(self) -> Kept:
        assert self.intake.writer.wait_flushed(5), "the listener's references never reached the queue"
        files = {p.name: p.read_bytes() for p in sorted(self.log.dir.glob("*.log"))} if self.log.dir.exists() else {}
        return Kept(self.queue.depth(), self.log.total_bytes, files, self.log.uncovered({}, None, self.intake.lock))

    def snapshot(self) -> dict[str, Any]:
        return self.client.simulate_get("/health").json  # type: ignore[no-any-return]

    def counters(self) -> dict[str, int]:
        return self.snapshot()["counters"]  # type: ignore[no-any-return]


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    ctx = multiprocessing.get_context("spawn")
    opened: list[tuple[Intake, RefQueue, RequestLog]] = []

    def make(max_items: int = 10, tokens: tuple[str, ...] = (), queue_max_bytes: int = 1 << 20,
             intake_max_items: int | None = None, tenants: tuple[TenantConfig, ...] = (),
             health_detail: bool = True) -> Daemon:
        auth = AuthConfig(tokens=tokens, tenants=tenants)
        config = Config(
            http=HttpConfig(max_body_bytes=MAX_BODY, max_decoded_bytes=MAX_DECODED, max_payloads=MAX_PAYLOADS,
                            retry_after_s=RETRY_AFTER, listeners=LISTENERS, health_detail=health_detail),
            auth=auth,
            queue=QueueConfig(max_items=max_items, max_bytes=queue_max_bytes),
            workers=WorkersConfig(count=UPLOADERS),
            tenancy=resolve_tenancy(auth),
        )
        board = Scoreboard(ctx, LISTENERS, UPLOADERS, len(config.tenancy.tenants))
        board.control[Control.STARTED_MS] = now_ms()
        board.control[Control.EPOCH] = 1
        pid = os.getpid()
        for i in range(UPLOADERS):  # as the supervisor and a booted uploader publish it
            board.child(Role.UPLOADER, i)[ChildField.PID] = pid
            board.child(Role.UPLOADER, i)[ChildField.STATE] = list(ChildState).index(ChildState.RUNNING)
            board.uploader(i)[UploaderField.BOOTED_PID] = pid
        for i in range(LISTENERS):
            board.child(Role.LISTENER, i)[ChildField.PID] = pid
            board.child(Role.LISTENER, i)[ChildField.STATE] = list(ChildState).index(ChildState.RUNNING)
            board.listener(i)[ListenerField.SERVING_PID] = pid
        queue = RefQueue(max_items, ctx=ctx)
        log = RequestLog(tmp_path / f"logs-{len(opened)}", 0, "none", 1 << 20)
        intake = Intake(0, log, queue, board, intake_max_items or max_items, queue_max_bytes, always_sync=False)
        opened.append((intake, queue, log))
        health = Health(board, queue, config, intake, supervisor_pid=pid)
        limiter = RateLimiter(board, config.tenancy, tmp_path / f"rates-{len(opened)}")
        app = create_app(config, intake, health, limiter, clock=lambda: NOW)
        return Daemon(app, testing.TestClient(app), config, queue, log, intake, board, health)

    try:
        yield make
    finally:
        for intake, queue, log in opened:
            intake.writer.close()
            queue.close()
            log.close()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


def envelope(payload: bytes, version: bytes = b"null") -> bytes:
    return b'{"received_at":"' + NOW_TEXT.encode() + b'","version":' + version + b',"payload":' + payload + b"}\n"


def payloads(stored: Stored) -> list[Any]:
    assert stored.lines.endswith(b"\n")
    return [orjson.loads(ln)["payload"] for ln in stored.lines.split(b"\n")[:-1]]


def record_size(payload: dict[str, Any]) -> int:
    """Bytes a one-payload request without version takes in the request log."""
    return len(request_record(NOW, 1, encode_lines(NOW, None, [payload])))


def assert_error(result: testing.Result, status: int) -> dict[str, Any]:
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    assert set(body) == {"title", "description"}
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["description"], str) and body["description"]
    return body  # type: ignore[no-any-return]


def assert_503(result: testing.Result) -> dict[str, Any]:
    body = assert_error(result, 503)
    assert result.headers["retry-after"] == str(RETRY_AFTER)
    return body


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def fill_the_pipe(queue: RefQueue) -> int:
    """Write references until the queue's pipe refuses more; returns how many went in."""
    filler = Ref(1, 1, 999, 0, 24, 0, 1)
    written = queue.put_many([filler] * (queue.pipe_bytes // 24 + 1000))
    assert not queue.try_put(filler)
    return written


# -- 202 -----------------------------------------------------------------------------------------


def test_accepted_request_is_logged_and_queued_with_its_exact_envelope_lines(daemon: Daemon) -> None:
    r = daemon.post(raw='{"version": "3.1", "token": "t", "data": [{"a":1}, {"b": {"c": [1, 2]}}, {"s": "é"}]}'.encode())
    assert r.status_code == 202
    assert r.json == {"accepted": 3}
    stored = daemon.taken()
    assert (stored.ref.listener, stored.ref.epoch, stored.ref.first_line, stored.ref.count) == (0, 1, 0, 3)
    assert stored.received_at == NOW
    assert stored.lines == (envelope(b'{"a":1}', b'"3.1"') + envelope(b'{"b":{"c":[1,2]}}', b'"3.1"')
                            + envelope('{"s":"é"}'.encode(), b'"3.1"'))


def test_ndjson_gzip_request_is_stored_one_line_per_payload(daemon: Daemon) -> None:
    body = gzip.compress(b'{"a":1}\n\n{"b":2}\n')
    r = daemon.post(raw=body, content_type="application/x-ndjson", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 202 and r.json == {"accepted": 2}
    assert daemon.taken().lines == envelope(b'{"a":1}') + envelope(b'{"b":2}')


def test_trailing_slash_is_the_same_path(daemon: Daemon) -> None:
    assert daemon.post({"data": [{"n": 1}]}, path=INGEST + "/").status_code == 202
    assert payloads(daemon.taken()) == [{"n": 1}]
    assert_error(daemon.post(raw=b"{bad", path=INGEST + "/"), 400)
    assert daemon.counters()["rejected_requests"] == 1


def test_big_integers_are_kept_exactly(daemon: Daemon) -> None:
    raw = b'{"data": [{"id": 123456789012345678901234567890, "neg": -9223372036854775809, "s": "\xc3\xa9"}]}'
    r = daemon.post(raw=raw)
    assert r.status_code == 202, r.text
    [line] = daemon.taken().lines.splitlines()
    assert json.loads(line)["payload"] == {"id": 123456789012345678901234567890, "neg": -9223372036854775809,
                                           "s": "\u00e9"}


def test_bad_request_between_two_good_ones_keeps_only_the_good_ones_in_order(daemon: Daemon) -> None:
    assert daemon.post({"version": "a", "data": [{"n": 1}]}).status_code == 202
    assert_error(daemon.post(raw=b'{"data": [{"n": 2}, 3]}'), 400)
    assert daemon.post({"version": "c", "data": [{"n": 3}, {"n": 4}]}).status_code == 202
    first, second = daemon.taken(), daemon.taken()
    assert first.ref.segment == second.ref.segment
    assert second.ref.offset == first.ref.offset + first.ref.length  # nothing of the bad one in between
    assert payloads(first) == [{"n": 1}]
    assert [(d["version"], d["payload"]) for d in map(orjson.loads, second.lines.splitlines())] == [
        ("c", {"n": 3}), ("c", {"n": 4})]
    counters = daemon.counters()
    assert (counters["accepted_payloads"], counters["accepted_requests"], counters["rejected_requests"]) == (3, 2, 1)


def test_a_request_after_an_epoch_bump_carries_the_new_epoch(daemon: Daemon) -> None:
    assert daemon.post({"data": [{"n": 1}]}).status_code == 202
    daemon.board.control[Control.EPOCH] = 2
    assert daemon.post({"data": [{"n": 2}]}).status_code == 202
    first, second = daemon.taken(), daemon.taken()
    assert (first.ref.epoch, second.ref.epoch) == (1, 2)
    assert daemon.intake.cut == (second.ref.segment, second.ref.offset)  # where the new epoch begins


# -- 4xx -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"{nope", "JSON"),
        (b"[1]", "object"),
        (b'{"data": []}', "empty"),
        (b'{"data": {}}', "data"),
        (b'{"version": 1, "data": [{}]}', "version"),
        (b'{"token": 1, "data": [{}]}', "token"),
        (b'{"data": [{}, "x"]}', "data[1]"),
        (b"", "empty"),
    ],
)
def test_malformed_or_misshapen_bodies_are_400_and_keep_nothing(daemon: Daemon, raw: bytes, words: str) -> None:
    before = daemon.kept()
    body = assert_error(daemon.post(raw=raw), 400)
    assert words in body["description"]
    assert daemon.kept() == before


def test_payload_count_exactly_at_the_limit_is_accepted_and_one_over_is_400(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}] * MAX_PAYLOADS}).status_code == 202
    before = daemon.kept()
    body = assert_error(daemon.post({"data": [{}] * (MAX_PAYLOADS + 1)}), 400)
    assert "too many" in body["description"]
    assert daemon.kept() == before


def test_ndjson_with_one_payload_over_the_limit_is_400(daemon: Daemon) -> None:
    raw = b"{}\n" * (MAX_PAYLOADS + 1)
    body = assert_error(daemon.post(raw=raw, content_type="application/x-ndjson"), 400)
    assert "too many" in body["description"]
    assert daemon.queue.depth() == 0


def test_gzip_label_on_a_plain_body_is_400(daemon: Daemon) -> None:
    assert_error(daemon.post({"data": [{}]}, headers={"Content-Encoding": "gzip"}), 400)
    assert daemon.queue.depth() == 0


def test_content_length_that_is_not_a_number_is_400(daemon: Daemon) -> None:
    # falcon's TestClient validates the environ itself, so this one goes to the WSGI app by hand
    environ = testing.create_environ(INGEST, method="POST", body=b'{"data": [{}]}',
                                     headers={"Content-Type": "application/json"})
    environ["CONTENT_LENGTH"] = "12x"
    answers: list[tuple[str, list[tuple[str, str]]]] = []
    body = b"".join(daemon.app(environ, lambda status, headers: answers.append((status, headers))))
    [(status, headers)] = answers
    assert status.startswith("400 ") and ("Content-Type", "application/json") in headers
    assert set(orjson.loads(body)) == {"title", "description"}
    assert daemon.kept() == Kept(0, 0, {}, [])
    assert daemon.counters()["rejected_requests"] == 1


def test_body_exactly_at_the_raw_limit_is_accepted(daemon: Daemon) -> None:
    base = len(orjson.dumps({"data": [{"p": ""}]}))
    r = daemon.post({"data": [{"p": "x" * (MAX_BODY - base)}]})
    assert r.status_code == 202
    assert payloads(daemon.taken())[0]["p"] == "x" * (MAX_BODY - base)


def test_body_one_byte_over_the_raw_limit_is_413(daemon: Daemon) -> None:
    base = len(orjson.dumps({"data": [{"p": ""}]}))
    body = assert_error(daemon.post({"data": [{"p": "x" * (MAX_BODY + 1 - base)}]}), 413)
    assert str(MAX_BODY) in body["description"]
    assert daemon.kept() == Kept(0, 0, {}, [])


def test_content_length_over_the_limit_is_413_before_reading(daemon: Daemon) -> None:
    r = daemon.post({"data": [{}]}, headers={"Content-Length": str(10**9)})
    body = assert_error(r, 413)
    assert str(10**9) in body["description"]
    assert daemon.counters()["rejected_requests"] == 1


def test_decoded_body_exactly_at_the_limit_is_accepted(daemon: Daemon) -> None:
    base = len(orjson.dumps({"data": [{"p": ""}]}))
    raw = gzip.compress(orjson.dumps({"data": [{"p": "y" * (MAX_DECODED - base)}]}))
    assert len(raw) < MAX_BODY
    assert daemon.post(raw=raw, headers={"Content-Encoding": "gzip"}).status_code == 202
    assert len(payloads(daemon.taken())[0]["p"]) == MAX_DECODED - base


def test_decoded_body_one_byte_over_the_limit_is_413(daemon: Daemon) -> None:
    base = len(orjson.dumps({"data": [{"p": ""}]}))
    raw = gzip.compress(orjson.dumps({"data": [{"p": "y" * (MAX_DECODED + 1 - base)}]}))
    assert len(raw) < MAX_BODY
    body = assert_error(daemon.post(raw=raw, headers={"Content-Encoding": "gzip"}), 413)
    assert str(MAX_DECODED) in body["description"]
    assert daemon.kept() == Kept(0, 0, {}, [])


@pytest.mark.parametrize(
    "content_type, encoding",
    [(None, None), ("text/plain", None), ("application/json; charset=latin-1", None), ("application/json", "br")],
)
def test_unsupported_content_type_or_encoding_is_415(daemon: Daemon, content_type: str | None,
                                                      encoding: str | None) -> None:
    headers = {"Content-Encoding": encoding} if encoding else {}
    assert_error(daemon.post({"data": [{}]}, content_type=content_type, headers=headers), 415)
    assert daemon.kept() == Kept(0, 0, {}, [])


def test_charset_utf8_is_accepted(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}]}, content_type="application/json; charset=utf-8").status_code == 202


def test_unknown_path_is_a_json_404(daemon: Daemon) -> None:
    body = assert_error(daemon.client.simulate_get("/nope"), 404)
    assert "/nope" in body["description"]
    assert_error(daemon.client.simulate_post("/v2/payloads", body=b"{}", headers={"Accept": "text/html"}), 404)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET", "PATCH"])
def test_other_methods_on_the_ingest_path_are_a_json_405_with_allow_post(daemon: Daemon, method: str) -> None:
    r = daemon.client.simulate_request(method, INGEST, body=b'{"data":[{}]}',
                                       headers={"Content-Type": "application/json", "Accept": "application/xml"})
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    assert daemon.kept() == Kept(0, 0, {}, [])
    assert daemon.counters()["rejected_requests"] == 1


def test_post_on_health_is_a_json_405(daemon: Daemon) -> None:
    r = daemon.client.simulate_post("/health", body=b"{}")
    assert_error(r, 405)
    assert "GET" in r.headers["allow"]


# -- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer wrong", "Basic s3cret", "Bearer s3cret-and-more", "s3cret"]
)
def test_missing_or_wrong_token_is_401_and_keeps_nothing(make_daemon: Callable[..., Daemon],
                                                         authorization: str | None) -> None:
    d = make_daemon(tokens=("s3cret", "other"))
    headers = {} if authorization is None else {"Authorization": authorization}
    r = d.post({"data": [{}]}, headers=headers)
    assert_error(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert d.kept() == Kept(0, 0, {}, [])
    assert d.counters()["rejected_requests"] == 1


@pytest.mark.parametrize("authorization", ["Bearer s3cret", "bearer other", "Bearer  s3cret "])
def test_valid_token_is_accepted(make_daemon: Callable[..., Daemon], authorization: str) -> None:
    d = make_daemon(tokens=("s3cret", "other"))
    r = d.post({"data": [{"x": 1}]}, headers={"Authorization": authorization})
    assert r.status_code == 202 and r.json == {"accepted": 1}
    assert payloads(d.taken()) == [{"x": 1}]


def test_non_ascii_authorization_is_401(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(tokens=("s3cret",))
    assert_error(d.post({"data": [{}]}, headers={"Authorization": "Bearer s3cr\xe9t"}), 401)


def test_auth_is_checked_before_the_body(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(tokens=("s3cret",))
    assert_error(d.post(raw=b"{broken", content_type="text/plain"), 401)


def test_no_auth_when_no_tokens(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}]}, headers={"Authorization": "Bearer anything"}).status_code == 202


# -- tenants and their rates -------------------------------------------------------------------------

ACME = TenantConfig(name="acme", tokens=("acme-token",), max_payloads_per_s=10)
BETA = TenantConfig(name="beta", tokens=("beta-token",))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tenant_counters(d: Daemon, name: str) -> dict[str, int]:
    return d.snapshot()["tenants"][name]  # type: ignore[no-any-return]


def test_each_token_counts_for_its_tenant(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(tokens=("flat",), tenants=(ACME, BETA))
    assert d.post({"data": [{}, {}]}, headers=bearer("acme-token")).status_code == 202
    assert d.post({"data": [{}]}, headers=bearer("beta-token")).status_code == 202
    assert d.post({"data": [{}]}, headers=bearer("flat")).status_code == 202
    assert_error(d.post({"data": [{}]}, headers=bearer("acme-token-not")), 401)
    assert tenant_counters(d, "acme") == {"accepted_requests": 1, "accepted_payloads": 2, "rate_limited_requests": 0}
    assert tenant_counters(d, "beta")["accepted_payloads"] == 1
    assert tenant_counters(d, "default")["accepted_payloads"] == 1
    text = d.client.simulate_get("/metrics").text
    assert re.search(r'^ingestd_tenant_accepted_payloads_total\{tenant="acme"\} 2\.0$', text, re.MULTILINE), text


def test_a_tenant_over_its_rate_gets_429_with_retry_after_and_keeps_nothing(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=100, tenants=(ACME, BETA))
    assert d.post({"data": [{}] * 6}, headers=bearer("acme-token")).status_code == 202
    before = d.kept()
    r = d.post({"data": [{}] * 5}, headers=bearer("acme-token"))  # 6 + 5 > 10: all or nothing
    body = assert_error(r, 429)
    assert int(r.headers["retry-after"]) >= 1
    assert "acme" in body["description"] and "10 payloads/s" in body["description"]
    assert d.kept() == before
    assert d.post({"data": [{}] * 4}, headers=bearer("acme-token")).status_code == 202  # what is left fits
    assert_error(d.post({"data": [{}]}, headers=bearer("acme-token")), 429)  # empty: refused before parsing
    assert_error(d.post(raw=b"{not json", headers=bearer("acme-token")), 429)
    for _ in range(5):  # another tenant is not slowed
        assert d.post({"data": [{}] * 10}, headers=bearer("beta-token")).status_code == 202
    c = tenant_counters(d, "acme")
    assert (c["accepted_payloads"], c["rate_limited_requests"]) == (10, 3)
    assert tenant_counters(d, "beta")["rate_limited_requests"] == 0


def test_a_request_bigger_than_one_second_of_its_rate_is_413(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(tenants=(ACME,))
    body = assert_error(d.post({"data": [{}] * 11}, headers=bearer("acme-token")), 413)
    assert "max_payloads_per_s" in body["description"] and "11 payloads" in body["description"]
    assert d.post({"data": [{}] * 10}, headers=bearer("acme-token")).status_code == 202  # exactly one second's worth


def test_a_request_refused_with_503_gives_its_rate_back(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=1, tenants=(ACME,))
    assert d.post({"data": [{}] * 2}, headers=bearer("acme-token")).status_code == 202  # fills the queue
    assert d.intake.writer.wait_flushed(5)  # its reference is in the pipe (not between deque and pipe)
    for _ in range(3):
        assert_503(d.post({"data": [{}] * 8}, headers=bearer("acme-token")))
    d.taken()  # room again
    r = d.post({"data": [{}] * 8}, headers=bearer("acme-token"))
    assert r.status_code == 202, r.text


def test_health_detail_off_hides_pids_rss_and_cpu(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(health_detail=False)
    r = d.client.simulate_get("/health")
    assert r.status_code == 200 and r.json["status"] == "ok"
    text = r.text
    assert all(k not in text for k in ('"pid"', "rss_bytes", "cpu_percent")), text
    assert len(r.json["workers"]) == UPLOADERS and all("alive" in w for w in r.json["workers"])
    metrics = d.client.simulate_get("/metrics").text
    assert "ingestd_rss_bytes" not in metrics and "ingestd_queue_depth" in metrics
    shown = make_daemon().client.simulate_get("/health").json  # the default shows them
    assert shown["workers"][0]["pid"] == os.getpid() and shown["rss_bytes"] > 0


# -- 503 -----------------------------------------------------------------------------------------


def test_queue_one_below_its_bound_accepts_and_at_its_bound_is_503_keeping_nothing(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=2)
    assert d.post({"data": [{"n": 1}]}).status_code == 202
    assert d.post({"data": [{"n": 2}]}).status_code == 202  # depth 1 < 2: the last one that fits
    before = d.kept()
    body = assert_503(d.post({"data": [{"n": 3}]}))
    assert "full" in body["description"]
    assert d.kept() == before
    counters = d.counters()
    assert (counters["accepted_payloads"], counters["overload_rejections"], counters["rejected_requests"]) == (2, 1, 1)
    assert [payloads(d.taken()) for _ in range(2)] == [[{"n": 1}], [{"n": 2}]]


def test_logged_bytes_exactly_at_queue_max_bytes_are_accepted_then_503(make_daemon: Callable[..., Daemon]) -> None:
    a, b = {"p": "x" * 100}, {"p": "y" * 50}
    d = make_daemon(queue_max_bytes=record_size(a) + record_size(b))
    assert d.post({"data": [a]}).status_code == 202
    assert d.post({"data": [b]}).status_code == 202
    assert d.log.total_bytes == d.config.queue.max_bytes
    before = d.kept()
    body = assert_503(d.post({"data": [{}]}))
    assert "full" in body["description"]
    assert d.kept() == before
    assert d.counters()["overload_rejections"] == 1


def test_request_well_over_queue_max_bytes_is_503_and_keeps_nothing(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(queue_max_bytes=300)
    assert d.post({"data": [{"p": "x" * 100}]}).status_code == 202
    before = d.kept()
    assert_503(d.post({"data": [{"p": "x" * 200}]}))
    assert d.kept() == before
    assert payloads(d.taken()) == [{"p": "x" * 100}]


def test_request_whose_record_would_take_the_logs_one_byte_over_queue_max_bytes_is_503(
        make_daemon: Callable[..., Daemon]) -> None:
    a, b = {"p": "x" * 100}, {"p": "y" * 50}
    d = make_daemon(queue_max_bytes=record_size(a) + record_size(b) - 1)
    assert d.post({"data": [a]}).status_code == 202
    before = d.kept()
    assert_503(d.post({"data": [b]}))
    assert d.kept() == before
    assert d.log.total_bytes <= d.config.queue.max_bytes


def test_bytes_of_the_other_listeners_count_against_queue_max_bytes(make_daemon: Callable[..., Daemon]) -> None:
    a = {"p": "x" * 100}
    d = make_daemon(queue_max_bytes=2 * record_size(a))
    d.intake.others_bytes = record_size(a)  # as the keeper publishes it
    assert d.post({"data": [a]}).status_code == 202
    assert_503(d.post({"data": [a]}))
    d.intake.others_bytes = 0
    assert d.post({"data": [a]}).status_code == 202


@pytest.mark.parametrize("how", ["phase", "intake"])
def test_draining_is_503_with_retry_after_and_keeps_nothing(daemon: Daemon, how: str) -> None:
    assert daemon.post({"data": [{}]}).status_code == 202
    if how == "phase":
        daemon.board.control[Control.PHASE] = Phase.DRAINING  # every listener sees it on its next submit
    else:
        daemon.intake.begin_drain()  # the listener's keeper following the drain
    before = daemon.kept()
    body = assert_503(daemon.post({"data": [{}]}))
    assert "drain" in body["description"]
    assert daemon.kept() == before
    counters = daemon.counters()
    assert (counters["rejected_requests"], counters["overload_rejections"]) == (1, 0)


def test_a_blocked_spool_is_503_naming_the_cause_and_keeps_nothing(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}]}).status_code == 202
    daemon.intake.blocked = "spool.max_bytes (1000) reached"
    before = daemon.kept()
    body = assert_503(daemon.post({"data": [{}]}))
    assert "spool.max_bytes (1000) reached" in body["description"]
    assert daemon.kept() == before
    assert daemon.counters()["overload_rejections"] == 1
    daemon.intake.blocked = None
    assert daemon.post({"data": [{}]}).status_code == 202


def test_another_listener_at_the_spool_cap_is_503_here_at_once_not_at_the_next_tick(daemon: Daemon) -> None:
    other = daemon.board.listener(1)
    other[ListenerField.CAP_BLOCKED] = 1
    other[ListenerField.HEARTBEAT_MS] = now_ms()
    before = daemon.kept()
    body = assert_503(daemon.post({"data": [{}]}))  # this listener's keeper has not looked since
    assert "spool.max_bytes reached (seen by listener 1)" in body["description"]
    assert daemon.kept() == before
    other[ListenerField.HEARTBEAT_MS] = now_ms() - 10_000  # that listener is gone: its flag no longer counts
    assert daemon.post({"data": [{}]}).status_code == 202


def test_an_uploader_that_cannot_write_dead_letters_is_503_here_at_once(daemon: Daemon) -> None:
    daemon.board.uploader(0)[UploaderField.DEAD_LETTER_BLOCKED] = 1
    body = assert_503(daemon.post({"data": [{}]}))
    assert "dead letters cannot be written" in body["description"]
    daemon.board.uploader(0)[UploaderField.DEAD_LETTER_BLOCKED] = 0
    assert daemon.post({"data": [{}]}).status_code == 202


def test_a_reference_waits_in_the_writer_while_the_pipe_is_full_then_reaches_the_queue(
        make_daemon: Callable[..., Daemon]) -> None:
    # the intake's bound is above what the pipe holds: the request is logged, so it is accepted,
    # and its reference waits in the listener's writer until uploaders make room
    d = make_daemon(max_items=10, intake_max_items=10**6)
    filled = fill_the_pipe(d.queue)
    assert d.post({"data": [{"n": 2}, {"n": 3}]}).status_code == 202
    assert not d.intake.writer.wait_flushed(0.05) and d.intake.writer.backlog == 1
    assert d.queue.depth() == filled
    found: list[Ref] = []
    deadline = time.monotonic() + 5
    while not found and time.monotonic() < deadline:  # an uploader taking: the writer gets room
        found = [r for r in d.queue.take(4096, 0.1) if r.listener == 0]
    assert len(found) == 1 and d.intake.writer.wait_flushed(5)
    fd = os.open(segment_path(d.log.logs_dir, 0, found[0].segment), os.O_RDONLY)
    try:
        got = read_record(fd, found[0])
    finally:
        os.close(fd)
    assert got is not None and [orjson.loads(ln)["payload"] for ln in got.lines.splitlines()] == [{"n": 2}, {"n": 3}]
    assert d.counters()["accepted_payloads"] == 2 and d.counters()["overload_rejections"] == 0


# -- health --------------------------------------------------------------------------------------


def test_health_ok_has_the_spec_fields(daemon: Daemon) -> None:
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 200
    snap = r.json
    assert (snap["status"], snap["ready"], snap["reasons"], snap["epoch"]) == ("ok", True, [], 1)
    assert isinstance(snap["uptime_s"], int | float) and 0 <= snap["uptime_s"] < 60
    assert snap["queue"] == {"depth": 0, "capacity": 10, "bytes": 0, "max_bytes": 1 << 20}
    assert len(snap["workers"]) == UPLOADERS and len(snap["listeners"]) == LISTENERS
    for w in snap["workers"]:
        assert (w["pid"], w["alive"], w["restarts"], w["booted"], w["state"]) == (os.getpid(), True, 0, True, "running")
        assert w["rss_bytes"] > 0 and isinstance(w["cpu_percent"], int | float)
    for x in snap["listeners"]:
        assert (x["pid"], x["alive"], x["serving"]) == (os.getpid(), True, True)
    assert set(snap["counters"]) >= {"accepted_payloads", "uploaded_payloads", "uploaded_objects", "failed_uploads",
                                     "dead_lettered_payloads", "rejected_requests", "accepted_requests",
                                     "overload_rejections"}
    assert all(v == 0 for v in snap["counters"].values())
    assert snap["rss_bytes"] > 0 and isinstance(snap["cpu_percent"], int | float)


def test_health_queue_depth_counts_requests(daemon: Daemon) -> None:
    daemon.post({"data": [{}, {}]})
    daemon.post({"data": [{}]})
    snap = daemon.snapshot()
    assert snap["queue"]["depth"] == 2
    assert (snap["counters"]["accepted_payloads"], snap["counters"]["accepted_requests"]) == (3, 2)


def _draining(d: Daemon) -> str:
    d.board.control[Control.PHASE] = Phase.DRAINING
    return "draining"


def _no_uploader_booted(d: Daemon) -> str:
    for i in range(UPLOADERS):
        d.board.uploader(i)[UploaderField.BOOTED_PID] = 0
    return "no uploader has booted"


def _uploader_rows_of_dead_processes(d: Daemon) -> str:
    for i in range(UPLOADERS):  # booted once, then replaced: the new processes have not booted yet
        d.board.child(Role.UPLOADER, i)[ChildField.PID] = os.getpid() + 1 + i
    return "no uploader has booted"


def _a_listener_not_serving(d: Daemon) -> str:
    d.board.listener(1)[ListenerField.SERVING_PID] = 0
    return "not every listener has started"


def _queue_full(d: Daemon) -> str:
    d.queue.put_many([Ref(0, 1, 1, 0, 24, 0, 1)] * d.config.queue.max_items)
    return "queue full"


def _logs_full(d: Daemon) -> str:
    d.board.listener(1)[ListenerField.LOG_BYTES] = d.config.queue.max_bytes
    return "queue full"


def _dead_letters_blocked(d: Daemon) -> str:
    d.board.uploader(1)[UploaderField.DEAD_LETTER_BLOCKED] = 1  # whatever this listener's intake thinks
    return "dead letters cannot be written"


def _spool_cap_seen_by_another_listener(d: Daemon) -> str:
    other = d.board.listener(1)
    other[ListenerField.SPOOL_USED] = d.config.spool.max_bytes
    other[ListenerField.HEARTBEAT_MS] = now_ms()  # a live listener's look counts; a stale one's would not
    return f"spool.max_bytes ({d.config.spool.max_bytes}) reached"


@pytest.mark.parametrize("make_unready", [_draining, _no_uploader_booted, _uploader_rows_of_dead_processes,
                                          _a_listener_not_serving, _queue_full, _logs_full, _dead_letters_blocked,
                                          _spool_cap_seen_by_another_listener])
def test_health_is_503_and_names_the_reason_it_is_not_ready(daemon: Daemon, make_unready: Callable[[Daemon], str]) -> None:
    assert daemon.client.simulate_get("/health").status_code == 200
    reason = make_unready(daemon)
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 503
    assert (r.json["ready"], r.json["reasons"]) == (False, [reason])
    ready = daemon.client.simulate_get("/health/ready")
    assert ready.status_code == 503 and ready.json["ready"] is False
    assert daemon.client.simulate_get("/health/live").status_code == 200


def test_a_stale_listener_row_does_not_hold_the_spool_cap(daemon: Daemon) -> None:
    other = daemon.board.listener(1)
    other[ListenerField.SPOOL_USED] = daemon.config.spool.max_bytes
    other[ListenerField.HEARTBEAT_MS] = now_ms() - 10_000  # a listener that died ten seconds ago
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 200, r.json


def test_health_is_degraded_when_the_queue_is_full(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=2)
    d.post({"data": [{}]})
    assert d.client.simulate_get("/health").status_code == 200
    d.post({"data": [{}]})
    r = d.client.simulate_get("/health")
    assert r.status_code == 503
    assert r.json["status"] == "degraded" and r.json["queue"]["depth"] == 2


def test_health_says_draining_while_draining(daemon: Daemon) -> None:
    daemon.board.control[Control.PHASE] = Phase.DRAINING
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 503 and r.json["status"] == "draining"
    ready = daemon.client.simulate_get("/health/ready")
    assert ready.status_code == 503 and ready.json == {"ready": False, "status": "draining", "reasons": ["draining"]}


def test_health_503_without_a_live_uploader_reports_their_restarts(daemon: Daemon) -> None:
    for i, restarts in enumerate([3, 1]):
        view = daemon.board.child(Role.UPLOADER, i)
        view[ChildField.PID] = 0
        view[ChildField.STATE] = list(ChildState).index(ChildState.BACKOFF)
        view[ChildField.RESTARTS] = restarts
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 503
    assert [(w["restarts"], w["alive"], w["pid"], w["state"]) for w in r.json["workers"]] == [
        (3, False, None, "backoff"), (1, False, None, "backoff")]
    assert r.json["reasons"] == ["no uploader has booted"]


def test_one_dead_uploader_is_degraded_but_ready(daemon: Daemon) -> None:
    daemon.board.child(Role.UPLOADER, 1)[ChildField.PID] = 0
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 200 and r.json["status"] == "degraded"


def test_failing_sink_is_degraded_but_ready(daemon: Daemon) -> None:
    daemon.board.uploader(0)[UploaderField.LAST_OK_MS] = 1000
    daemon.board.uploader(0)[UploaderField.LAST_FAIL_MS] = 2000
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "degraded" and r.json["sink"] == {"failing": True}
    assert daemon.client.simulate_get("/health/ready").status_code == 200
    assert daemon.post({"data": [{}]}).status_code == 202
    daemon.board.uploader(0)[UploaderField.LAST_OK_MS] = 3000
    assert daemon.snapshot()["status"] == "ok"


def test_health_live_and_ready_answer_json(daemon: Daemon) -> None:
    live = daemon.client.simulate_get("/health/live")
    assert live.status_code == 200 and live.headers["content-type"].startswith("application/json")
    ready = daemon.client.simulate_get("/health/ready")
    assert ready.status_code == 200 and ready.json == {"ready": True, "status": "ok", "reasons": []}


def test_health_sums_the_counters_of_every_row(daemon: Daemon) -> None:
    b = daemon.board
    b.uploader(0).add(UploaderField.UPLOADED_PAYLOADS, 5)
    b.uploader(1).add(UploaderField.UPLOADED_PAYLOADS, 7)
    b.uploader(1).add(UploaderField.UPLOADED_OBJECTS, 2)
    b.uploader(0).add(UploaderField.FAILED_UPLOADS, 3)
    b.uploader(1).add(UploaderField.DEAD_LETTERED_PAYLOADS, 4)
    b.listener(1).add(ListenerField.ACCEPTED_PAYLOADS, 9)
    b.listener(1).add(ListenerField.REJECTED_REQUESTS, 2)
    daemon.post({"data": [{}]})
    c = daemon.counters()
    assert (c["uploaded_payloads"], c["uploaded_objects"], c["failed_uploads"], c["dead_lettered_payloads"]) == (
        12, 2, 3, 4)
    assert (c["accepted_payloads"], c["rejected_requests"]) == (10, 2)


def test_uptime_follows_the_injected_clock(daemon: Daemon) -> None:
    times = [100.0]
    daemon.board.control[Control.STARTED_MS] = 100_000  # the supervisor's start, as it publishes it
    health = Health(daemon.board, daemon.queue, daemon.config, daemon.intake, supervisor_pid=os.getpid(),
                    clock=lambda: times[-1])
    assert health.snapshot()["uptime_s"] == 0
    times.append(112.5)
    assert health.snapshot()["uptime_s"] == 12.5


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_agree_with_health(daemon: Daemon) -> None:
    daemon.post({"data": [{}, {}, {}]})
    daemon.post({"data": [{}]})
    daemon.post(raw=b"{bad")
    daemon.post({"data": [{}]}, content_type="text/plain")
    daemon.board.uploader(1).add(UploaderField.UPLOADED_PAYLOADS, 2)
    daemon.board.uploader(0).add(UploaderField.UPLOADED_OBJECTS, 1)
    daemon.board.listener(0)[ListenerField.LOG_BYTES] = 123
    r = daemon.client.simulate_get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    snap = daemon.snapshot()
    counters = snap["counters"]
    assert (counters["accepted_payloads"], counters["rejected_requests"], counters["uploaded_payloads"]) == (4, 2, 2)
    for name, value in counters.items():
        assert metric(text, f"ingestd_{name}_total") == value, name
    assert metric(text, "ingestd_queue_depth") == snap["queue"]["depth"] == 2
    assert metric(text, "ingestd_queue_capacity") == 10
    assert metric(text, "ingestd_queue_bytes") == snap["queue"]["bytes"] == 123
    assert metric(text, "ingestd_ready") == 1
    assert metric(text, "ingestd_draining") == 0
    assert metric(text, "ingestd_epoch") == 1
    assert metric(text, "ingestd_uploaders_alive") == UPLOADERS
    assert metric(text, "ingestd_listeners_alive") == LISTENERS


def test_metrics_follow_readiness_and_draining(daemon: Daemon) -> None:
    daemon.board.control[Control.PHASE] = Phase.DRAINING
    daemon.board.child(Role.UPLOADER, 0)[ChildField.PID] = 0
    text = daemon.client.simulate_get("/metrics").text
    assert metric(text, "ingestd_ready") == 0
    assert metric(text, "ingestd_draining") == 1
    assert metric(text, "ingestd_uploaders_alive") == UPLOADERS - 1


def test_rejected_requests_counts_every_refused_ingest_and_overload_only_the_503s(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=1, tokens=("t",))
    auth = {"Authorization": "Bearer t"}
    assert d.post({"data": [{}]}).status_code == 401
    assert d.post(raw=b"[]", headers=auth).status_code == 400
    assert d.post({"data": [{}]}, content_type="text/csv", headers=auth).status_code == 415
    assert d.post(raw=b" " * (MAX_BODY + 1), headers=auth).status_code == 413
    assert d.post({"data": [{}, {}]}, headers=auth).status_code == 202
    assert d.post({"data": [{}]}, headers=auth).status_code == 503
    counters = d.counters()
    assert (counters["rejected_requests"], counters["overload_rejections"]) == (5, 1)
    assert (counters["accepted_requests"], counters["accepted_payloads"]) == (1, 2)
    text = d.client.simulate_get("/metrics").text
    assert metric(text, "ingestd_rejected_requests_total") == 5
    assert metric(text, "ingestd_overload_rejections_total") == 1


def test_metrics_time_every_ingest_request_by_status_class(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=1, health_detail=False)  # histograms are not per-process detail: they stay
    assert d.post({"data": [{}, {}]}).status_code == 202
    assert d.post(raw=b"{bad").status_code == 400
    assert d.post({"data": [{}]}, content_type="text/csv").status_code == 415
    assert d.post({"data": [{}]}).status_code == 503
    d.client.simulate_get("/health")  # other paths are not timed
    seen = parse_histograms(d.client.simulate_get("/metrics").text)["ingestd_request_seconds"]
    assert {labels[0][1]: o.observations for labels, o in seen.items()} == {"2xx": 1, "4xx": 2, "5xx": 1}
    for o in seen.values():
        assert o.buckets[-1] == (float("inf"), o.observations) and 0 <= o.sum < 5 * o.observations
    assert {"ingestd_landing_seconds", "ingestd_put_seconds", "ingestd_object_bytes",
            "ingestd_object_payloads"} <= set(parse_histograms(d.client.simulate_get("/metrics").text))


@pytest.mark.parametrize(("used_share", "held", "refused"), [
    (1.0, False, True),   # at the cap
    (0.95, True, True),   # still above the low-water mark since refusing began
    (0.95, False, False),  # above it, but nobody was refusing: not reached yet
    (0.85, True, False),  # below the low-water mark: refusing ends
])
def test_the_spool_cap_refuses_with_a_low_water_mark(daemon: Daemon, used_share: float, held: bool,
                                                     refused: bool) -> None:
    cap = daemon.config.spool.max_bytes
    for i, row in enumerate(daemon.board.rows(Role.LISTENER)):
        row[ListenerField.HEARTBEAT_MS] = now_ms()
        row[ListenerField.SPOOL_USED] = int(cap * used_share) if i == 1 else 0
        row[ListenerField.CAP_BLOCKED] = int(held and i == 1)
    reasons = shared_refusals(daemon.board, cap)
    assert (f"spool.max_bytes ({cap}) reached" in reasons) is refused
    assert (daemon.client.simulate_get("/health").status_code == 503) is refused
