"""app.create_app through falcon's TestClient, over real in-process board, queue, intake and health."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from falcon import testing

from ingestd.app import create_app
from ingestd.board import Board, GlobalField, SlotField
from ingestd.config import Config, HttpConfig, QueueConfig
from ingestd.health import Health, WorkerView
from ingestd.jobqueue import Intake, JobQueue
from ingestd.records import Item

NOW = 1764299045.125  # 2025-11-28T03:04:05.125Z
NOW_TEXT = "2025-11-28T03:04:05.125Z"
MAX_BODY = 4096
MAX_DECODED = 16384
MAX_PAYLOADS = 20
RETRY_AFTER = 7
INGEST = "/v1/payloads"


@dataclass
class Daemon:
    client: testing.TestClient
    queue: JobQueue
    intake: Intake
    board: Board
    health: Health
    workers: list[WorkerView] = field(default_factory=list)

    def post(self, body: Any = None, *, raw: bytes | None = None, content_type: str | None = "application/json",
             headers: dict[str, str] | None = None, path: str = INGEST) -> testing.Result:
        data = raw if raw is not None else orjson.dumps(body)
        h = dict(headers or {})
        if content_type is not None:
            h["Content-Type"] = content_type
        return self.client.simulate_post(path, body=data, headers=h)

    def taken(self) -> Item:
        item: Item = self.queue.get(timeout=5)
        return item

    def snapshot(self) -> dict[str, Any]:
        return self.client.simulate_get("/health").json  # type: ignore[no-any-return]


@pytest.fixture
def make_daemon() -> Iterator[Callable[..., Daemon]]:
    ctx = multiprocessing.get_context("spawn")
    queues: list[JobQueue] = []

    def make(max_items: int = 10, tokens: tuple[str, ...] = (), queue_max_bytes: int = 1 << 20) -> Daemon:
        config = Config(
            http=HttpConfig(max_body_bytes=MAX_BODY, max_decoded_bytes=MAX_DECODED, max_payloads=MAX_PAYLOADS,
                            retry_after_s=RETRY_AFTER),
            queue=QueueConfig(max_items=max_items, max_bytes=queue_max_bytes),
        )
        board = Board(ctx, 2)
        queue = JobQueue(max_items, ctx=ctx)
        queues.append(queue)
        intake = Intake(queue, board, queue_max_bytes)
        workers = [WorkerView(0, os.getpid(), True, 0, "running"), WorkerView(1, os.getpid(), True, 0, "running")]
        health = Health(board, intake, max_items, queue_max_bytes, workers=lambda: list(workers))
        app = create_app(config, intake, health, tokens=tokens, clock=lambda: NOW)
        return Daemon(testing.TestClient(app), queue, intake, board, health, workers)

    try:
        yield make
    finally:
        for q in queues:
            q.cancel_join_thread()
            q.close()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


def lines(item: Item) -> list[dict[str, Any]]:
    assert item.lines.endswith(b"\n")
    return [orjson.loads(ln) for ln in item.lines.split(b"\n")[:-1]]


def assert_error(result: testing.Result, status: int) -> dict[str, Any]:
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    assert set(body) == {"title", "description"}
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["description"], str) and body["description"]
    return body  # type: ignore[no-any-return]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


# -- 202 -----------------------------------------------------------------------------------------


def test_accepted_request_is_queued_with_its_lines(daemon: Daemon) -> None:
    data = [{"a": 1}, {"b": {"c": [1, 2]}}, {"s": "é"}]
    r = daemon.post({"version": "3.1", "token": "t", "data": data})
    assert r.status_code == 202
    assert r.json == {"accepted": 3}
    item = daemon.taken()
    assert (item.seq, item.received_at, item.count) == (1, NOW, 3)
    assert lines(item) == [{"received_at": NOW_TEXT, "version": "3.1", "payload": p} for p in data]


def test_ndjson_gzip_request(daemon: Daemon) -> None:
    body = gzip.compress(b'{"a":1}\n\n{"b":2}\n')
    r = daemon.post(raw=body, content_type="application/x-ndjson", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 202 and r.json == {"accepted": 2}
    assert lines(daemon.taken()) == [{"received_at": NOW_TEXT, "version": None, "payload": {"a": 1}},
                                     {"received_at": NOW_TEXT, "version": None, "payload": {"b": 2}}]


def test_trailing_slash_is_the_same_path(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}]}, path=INGEST + "/").status_code == 202


def test_body_at_the_raw_limit_is_accepted(daemon: Daemon) -> None:
    base = len(orjson.dumps({"data": [{"p": ""}]}))
    r = daemon.post({"data": [{"p": "x" * (MAX_BODY - base)}]})
    assert r.status_code == 202
    assert lines(daemon.taken())[0]["payload"]["p"] == "x" * (MAX_BODY - base)


def test_big_integers_are_kept_exactly(daemon: Daemon) -> None:
    raw = b'{"data": [{"id": 123456789012345678901234567890, "neg": -9223372036854775809, "s": "\xc3\xa9"}]}'
    r = daemon.post(raw=raw)
    assert r.status_code == 202, r.text
    [line] = daemon.taken().lines.splitlines()
    assert json.loads(line)["payload"] == {"id": 123456789012345678901234567890, "neg": -9223372036854775809,
                                           "s": "\u00e9"}


def test_bad_request_between_two_good_ones(daemon: Daemon) -> None:
    assert daemon.post({"version": "a", "data": [{"n": 1}]}).status_code == 202
    assert_error(daemon.post(raw=b'{"data": [{"n": 2}, 3]}'), 400)
    assert daemon.post({"version": "c", "data": [{"n": 3}, {"n": 4}]}).status_code == 202
    first, second = daemon.taken(), daemon.taken()
    assert (first.seq, second.seq) == (1, 2)
    assert [d["payload"] for d in lines(first)] == [{"n": 1}]
    assert [(d["version"], d["payload"]) for d in lines(second)] == [("c", {"n": 3}), ("c", {"n": 4})]
    counters = daemon.snapshot()["counters"]
    assert counters["accepted_payloads"] == 3
    assert counters["accepted_requests"] == 2
    assert counters["rejected_requests"] == 1


# -- 4xx -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"{nope", "JSON"),
        (b"[1]", "object"),
        (b'{"data": []}', "empty"),
        (b'{"data": {}}', "data"),
        (b'{"version": 1, "data": [{}]}', "version"),
        (b'{"data": [{}, "x"]}', "data[1]"),
        (b"", "empty"),
    ],
)
def test_400s(daemon: Daemon, raw: bytes, words: str) -> None:
    body = assert_error(daemon.post(raw=raw), 400)
    assert words in body["description"]
    assert daemon.intake.depth() == 0


def test_too_many_payloads_is_400(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}] * MAX_PAYLOADS}).status_code == 202
    body = assert_error(daemon.post({"data": [{}] * (MAX_PAYLOADS + 1)}), 400)
    assert "too many" in body["description"]


def test_gzip_label_on_plain_body_is_400(daemon: Daemon) -> None:
    assert_error(daemon.post({"data": [{}]}, headers={"Content-Encoding": "gzip"}), 400)


def test_raw_body_over_the_limit_is_413(daemon: Daemon) -> None:
    base = len(orjson.dumps({"data": [{"p": ""}]}))
    body = assert_error(daemon.post({"data": [{"p": "x" * (MAX_BODY + 1 - base)}]}), 413)
    assert str(MAX_BODY) in body["description"]
    assert daemon.intake.depth() == 0


def test_content_length_over_the_limit_is_413_before_reading(daemon: Daemon) -> None:
    r = daemon.post({"data": [{}]}, headers={"Content-Length": str(10**9)})
    body = assert_error(r, 413)
    assert str(10**9) in body["description"]
    assert daemon.snapshot()["counters"]["rejected_requests"] == 1


def test_decoded_body_over_the_limit_is_413(daemon: Daemon) -> None:
    raw = gzip.compress(orjson.dumps({"data": [{"p": " " * MAX_DECODED}]}))
    assert len(raw) < MAX_BODY
    assert_error(daemon.post(raw=raw, headers={"Content-Encoding": "gzip"}), 413)


@pytest.mark.parametrize(
    "content_type, encoding",
    [(None, None), ("text/plain", None), ("application/json; charset=latin-1", None), ("application/json", "br")],
)
def test_415s(daemon: Daemon, content_type: str | None, encoding: str | None) -> None:
    headers = {"Content-Encoding": encoding} if encoding else {}
    assert_error(daemon.post({"data": [{}]}, content_type=content_type, headers=headers), 415)


def test_charset_utf8_is_accepted(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}]}, content_type="application/json; charset=utf-8").status_code == 202


def test_404_is_json(daemon: Daemon) -> None:
    body = assert_error(daemon.client.simulate_get("/nope"), 404)
    assert "/nope" in body["description"]
    assert_error(daemon.client.simulate_post("/v2/payloads", body=b"{}", headers={"Accept": "text/html"}), 404)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET", "PATCH"])
def test_405_on_ingest_path(daemon: Daemon, method: str) -> None:
    r = daemon.client.simulate_request(method, INGEST, body=b'{"data":[{}]}',
                                       headers={"Content-Type": "application/json", "Accept": "application/xml"})
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    assert daemon.intake.depth() == 0


def test_405_on_health_is_json(daemon: Daemon) -> None:
    r = daemon.client.simulate_post("/health", body=b"{}")
    assert_error(r, 405)
    assert "GET" in r.headers["allow"]


# -- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer wrong", "Basic s3cret", "Bearer s3cret-and-more", "s3cret"]
)
def test_401_without_a_valid_token(make_daemon: Callable[..., Daemon], authorization: str | None) -> None:
    d = make_daemon(tokens=("s3cret", "other"))
    headers = {} if authorization is None else {"Authorization": authorization}
    r = d.post({"data": [{}]}, headers=headers)
    assert_error(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert d.intake.depth() == 0
    assert d.snapshot()["counters"]["rejected_requests"] == 1


@pytest.mark.parametrize("authorization", ["Bearer s3cret", "bearer other", "Bearer  s3cret "])
def test_valid_token_is_accepted(make_daemon: Callable[..., Daemon], authorization: str) -> None:
    d = make_daemon(tokens=("s3cret", "other"))
    r = d.post({"data": [{"x": 1}]}, headers={"Authorization": authorization})
    assert r.status_code == 202 and r.json == {"accepted": 1}


def test_non_ascii_authorization_is_401(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(tokens=("s3cret",))
    assert_error(d.post({"data": [{}]}, headers={"Authorization": "Bearer s3cr\xe9t"}), 401)


def test_auth_is_checked_before_the_body(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(tokens=("s3cret",))
    assert_error(d.post(raw=b"{broken", content_type="text/plain"), 401)


def test_no_auth_when_no_tokens(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}]}, headers={"Authorization": "Bearer anything"}).status_code == 202


# -- 503 -----------------------------------------------------------------------------------------


def test_full_queue_is_503_with_retry_after(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=2)
    assert d.post({"data": [{"n": 1}]}).status_code == 202
    assert d.post({"data": [{"n": 2}]}).status_code == 202
    r = d.post({"data": [{"n": 3}]})
    body = assert_error(r, 503)
    assert r.headers["retry-after"] == str(RETRY_AFTER)
    assert "full" in body["description"]
    snap = d.snapshot()
    assert snap["counters"]["accepted_payloads"] == 2
    assert snap["counters"]["overload_rejections"] == 1
    assert [lines(d.taken())[0]["payload"] for _ in range(2)] == [{"n": 1}, {"n": 2}]


def test_queue_full_by_bytes_is_503(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(queue_max_bytes=300)
    assert d.post({"data": [{"p": "x" * 100}]}).status_code == 202
    r = d.post({"data": [{"p": "x" * 200}]})
    assert_error(r, 503)
    assert r.headers["retry-after"] == str(RETRY_AFTER)


def test_draining_is_503_with_retry_after(daemon: Daemon) -> None:
    assert daemon.post({"data": [{}]}).status_code == 202
    daemon.intake.begin_drain()
    r = daemon.post({"data": [{}]})
    body = assert_error(r, 503)
    assert r.headers["retry-after"] == str(RETRY_AFTER)
    assert "drain" in body["description"]
    assert daemon.intake.depth() == 1


# -- health --------------------------------------------------------------------------------------


def test_health_ok_has_the_spec_fields(daemon: Daemon) -> None:
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 200
    snap = r.json
    assert snap["status"] == "ok"
    assert isinstance(snap["uptime_s"], int | float) and snap["uptime_s"] >= 0
    assert snap["queue"]["depth"] == 0 and snap["queue"]["capacity"] == 10
    assert len(snap["workers"]) == 2
    for w in snap["workers"]:
        assert w["pid"] == os.getpid() and w["alive"] is True and w["restarts"] == 0
        assert w["rss_bytes"] > 0 and isinstance(w["cpu_percent"], int | float)
    assert set(snap["counters"]) >= {"accepted_payloads", "uploaded_payloads", "uploaded_objects", "failed_uploads",
                                     "dead_lettered_payloads", "rejected_requests"}
    assert all(v == 0 for v in snap["counters"].values())
    assert snap["rss_bytes"] > 0 and isinstance(snap["cpu_percent"], int | float)


def test_health_queue_depth_counts_requests(daemon: Daemon) -> None:
    daemon.post({"data": [{}, {}]})
    daemon.post({"data": [{}]})
    snap = daemon.snapshot()
    assert snap["queue"]["depth"] == 2
    assert snap["counters"]["accepted_payloads"] == 3


def test_health_503_when_queue_full(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=2)
    d.post({"data": [{}]})
    assert d.client.simulate_get("/health").status_code == 200
    d.post({"data": [{}]})
    r = d.client.simulate_get("/health")
    assert r.status_code == 503
    assert r.json["status"] == "degraded" and r.json["queue"]["depth"] == 2
    assert d.client.simulate_get("/health/ready").status_code == 503


def test_health_503_when_draining(daemon: Daemon) -> None:
    daemon.intake.begin_drain()
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 503 and r.json["status"] == "draining"
    ready = daemon.client.simulate_get("/health/ready")
    assert ready.status_code == 503 and ready.json["status"] == "draining"
    assert daemon.client.simulate_get("/health/live").status_code == 200


def test_health_503_without_a_live_worker(daemon: Daemon) -> None:
    daemon.workers[:] = [WorkerView(0, None, False, 3, "backoff"), WorkerView(1, None, False, 1, "backoff")]
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 503
    assert [w["restarts"] for w in r.json["workers"]] == [3, 1]
    assert all(w["alive"] is False for w in r.json["workers"])
    assert daemon.client.simulate_get("/health/ready").status_code == 503


def test_one_dead_worker_is_degraded_but_ready(daemon: Daemon) -> None:
    daemon.workers[1] = WorkerView(1, None, False, 1, "backoff")
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 200 and r.json["status"] == "degraded"


def test_failing_sink_is_degraded_but_ready(daemon: Daemon) -> None:
    daemon.board.set(0, SlotField.LAST_OK_MS, 1000)
    daemon.board.set(0, SlotField.LAST_FAIL_MS, 2000)
    r = daemon.client.simulate_get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "degraded"
    assert daemon.client.simulate_get("/health/ready").status_code == 200
    assert daemon.post({"data": [{}]}).status_code == 202
    daemon.board.set(0, SlotField.LAST_OK_MS, 3000)
    assert daemon.snapshot()["status"] == "ok"


def test_health_live_and_ready(daemon: Daemon) -> None:
    live = daemon.client.simulate_get("/health/live")
    assert live.status_code == 200 and live.headers["content-type"].startswith("application/json")
    ready = daemon.client.simulate_get("/health/ready")
    assert ready.status_code == 200 and ready.json["ready"] is True and ready.json["status"] == "ok"


def test_health_reports_uploader_counters(daemon: Daemon) -> None:
    daemon.board.add(0, SlotField.UPLOADED_PAYLOADS, 5)
    daemon.board.add(1, SlotField.UPLOADED_PAYLOADS, 7)
    daemon.board.add(1, SlotField.UPLOADED_OBJECTS, 2)
    daemon.board.add(0, SlotField.FAILED_UPLOADS, 3)
    daemon.board.add(1, SlotField.DEAD_LETTERED_PAYLOADS, 4)
    c = daemon.snapshot()["counters"]
    assert (c["uploaded_payloads"], c["uploaded_objects"], c["failed_uploads"], c["dead_lettered_payloads"]) == (
        12, 2, 3, 4)


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_agree_with_health(daemon: Daemon) -> None:
    daemon.post({"data": [{}, {}, {}]})
    daemon.post({"data": [{}]})
    daemon.post(raw=b"{bad")
    daemon.post({"data": [{}]}, content_type="text/plain")
    daemon.board.add(1, SlotField.UPLOADED_PAYLOADS, 2)
    daemon.board.add(0, SlotField.UPLOADED_OBJECTS, 1)
    r = daemon.client.simulate_get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    counters = daemon.snapshot()["counters"]
    assert counters["accepted_payloads"] == 4 and counters["rejected_requests"] == 2
    for name, value in counters.items():
        assert metric(text, f"ingestd_{name}_total") == value, name
    assert metric(text, "ingestd_queue_depth") == 2
    assert metric(text, "ingestd_queue_capacity") == 10
    assert metric(text, "ingestd_ready") == 1
    assert metric(text, "ingestd_uploaders_alive") == 2


def test_rejected_requests_counts_every_refused_ingest(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(max_items=1, tokens=("t",))
    auth = {"Authorization": "Bearer t"}
    d.post({"data": [{}]})  # 401
    d.post(raw=b"[]", headers=auth)  # 400
    d.post({"data": [{}]}, content_type="text/csv", headers=auth)  # 415
    d.post(raw=b" " * (MAX_BODY + 1), headers=auth)  # 413
    assert d.post({"data": [{}]}, headers=auth).status_code == 202
    d.post({"data": [{}]}, headers=auth)  # 503 full
    snap = d.snapshot()
    assert snap["counters"]["rejected_requests"] == 5
    assert metric(d.client.simulate_get("/metrics").text, "ingestd_rejected_requests_total") == 5


def test_uptime_follows_the_injected_clock(daemon: Daemon) -> None:
    times = [100.0]
    daemon.board.gset(GlobalField.STARTED_MS, 100_000)  # the supervisor's start, as it publishes it
    health = Health(daemon.board, daemon.intake, 10, 1 << 20, workers=lambda: list(daemon.workers),
                    clock=lambda: times[-1])
    assert health.snapshot()["uptime_s"] == 0
    times.append(112.5)
    assert health.snapshot()["uptime_s"] == 12.5
