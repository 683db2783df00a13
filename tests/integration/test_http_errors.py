"""Every error answer of the HTTP API, over real HTTP, against one running daemon.

The module's daemon (auth on, small limits, directory sink) takes every bad request in turn;
the last test checks that it is still up, that a good request still lands, that nothing of a
refused request was kept, and that `/health` counted exactly the refusals sent. The queue-full
503 needs a sink that hangs, so it gets a daemon of its own.
"""

from __future__ import annotations

import gzip
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
import requests

from tests.harness import Daemon, merge, read_directory_sink, spool_lines, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.every_front]

TOKEN = "s3cret-token"
OTHER_TOKEN = "second-token"
MAX_BODY = 64 * 1024
MAX_DECODED = 256 * 1024
MAX_PAYLOADS = 100
INGEST = "/v1/payloads"


class Target:
    """The shared daemon plus a tally of what the tests sent it."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.rejected = 0  # requests to the ingest path that were refused (4xx, 503)
        self.by_status: Counter[int] = Counter()  # the same, by status
        self.accepted_ids: list[str] = []
        self.refused_ids: list[str] = []  # ids inside refused requests: none may ever land

    @property
    def url(self) -> str:
        return self.d.url

    def request(self, method: str, body: bytes = b"", content_type: str | None = "application/json",
                path: str = INGEST, token: str | None = TOKEN, headers: dict[str, str] | None = None,
                ) -> requests.Response:
        h: dict[str, str] = {}
        if content_type is not None:
            h["Content-Type"] = content_type
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        h.update(headers or {})
        return requests.request(method, self.url + path, data=body, headers=h, timeout=10)

    def post(self, body: bytes | dict[str, Any], **kw: Any) -> requests.Response:
        return self.request("POST", orjson.dumps(body) if isinstance(body, dict) else body, **kw)

    def refused(self, resp: requests.Response, status: int, ids: Sequence[str] = (), path: str = INGEST,
                mentions: str = "") -> dict[str, Any]:
        """Check an error answer: its status and its JSON body {"title", "description"}."""
        if path == INGEST:
            self.rejected += 1
            self.by_status[status] += 1
        self.refused_ids += list(ids)
        assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:300]}"
        assert resp.headers.get("Content-Type", "").split(";")[0].strip() == "application/json", resp.headers
        doc = resp.json()
        assert set(doc) == {"title", "description"}, doc
        assert isinstance(doc["title"], str) and doc["title"], doc
        assert isinstance(doc["description"], str) and doc["description"], doc
        if mentions:
            assert mentions.lower() in doc["description"].lower(), f"{doc['description']!r} does not name {mentions!r}"
        return doc

    def accepted(self, resp: requests.Response, ids: list[str]) -> None:
        assert resp.status_code == 202, f"{resp.status_code}: {resp.text[:300]}"
        assert resp.json() == {"accepted": len(ids)}
        self.accepted_ids += ids


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("http-errors")
    tables = {
        "http": {"listen": "127.0.0.1:0", "max_body_bytes": MAX_BODY, "max_decoded_bytes": MAX_DECODED,
                 "max_payloads": MAX_PAYLOADS, "retry_after_s": 3, "server": front},
        "auth": {"tokens": [TOKEN, OTHER_TOKEN]},
        "sink": {"kind": "directory", "path": str(root / "objects")},
        "spool": {"path": str(root / "spool")},
        "batch": {"max_age_ms": 200},
        "shutdown": {"drain_timeout_s": 5},
    }
    d = Daemon(root, tables)
    try:
        d.start()
        yield Target(d)
    finally:
        d.kill_group()


def exact_json(size: int, pid: str) -> bytes:
    """A valid collection of exactly `size` bytes (padding inside one payload)."""
    head, tail = b'{"data":[{"id":"' + pid.encode() + b'","pad":"', b'"}]}'
    pad = size - len(head) - len(tail)
    assert pad >= 0
    body = head + b"p" * pad + tail
    assert len(body) == size
    return body


def ids(tag: str, n: int) -> list[str]:
    return [f"{tag}-{i}" for i in range(n)]


def data(pids: list[str]) -> list[dict[str, Any]]:
    return [{"id": p} for p in pids]


# -- 400 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, mentions", [
    (b'{"data": [{"id": "mal-0"}', "json"),  # truncated
    (b"{'data': [{'id': 'mal-1'}]}", "json"),  # single quotes
    (b'{"data": [{"id": "mal-2"}]} trailing', "json"),
    (b'{"data": [{"id": "mal-3\xff"}]}', "json"),  # not UTF-8
], ids=["truncated", "single-quotes", "trailing-garbage", "invalid-utf8"])
def test_400_malformed_json(target, body, mentions):
    target.refused(target.post(body), 400, ["mal-0", "mal-1", "mal-2"], mentions=mentions)


@pytest.mark.parametrize("doc, mentions", [
    ([{"id": "shape-0"}], "data"),  # an array, not an object
    ({"data": {"id": "shape-1"}}, "data"),  # data not an array
    ({"version": "1", "payloads": [{"id": "shape-2"}]}, "data"),  # no data
    ("just a string", "data"),
    ({"token": 5, "data": [{"id": "shape-3"}]}, "token"),
], ids=["top-level-array", "data-object", "no-data", "top-level-string", "token-not-string"])
def test_400_wrong_shape(target, doc, mentions):
    target.refused(target.post(orjson.dumps(doc)), 400, [f"shape-{i}" for i in range(4)], mentions=mentions)


def test_400_empty_data(target):
    target.refused(target.post({"version": "1", "data": []}), 400, mentions="data")


@pytest.mark.parametrize("bad", [5, None, "str", ["list"], True], ids=["number", "null", "string", "array", "bool"])
def test_400_payload_not_an_object_and_nothing_kept(target, bad):
    # the first payload is fine: all or nothing means it must not land either
    pid = f"notobj-{type(bad).__name__}"
    target.refused(target.post({"data": [{"id": pid}, bad]}), 400, [pid], mentions="object")


def test_400_too_many_payloads_json_and_ndjson(target):
    over = ids("many-json", MAX_PAYLOADS + 1)
    target.refused(target.post({"data": data(over)}), 400, over, mentions="payloads")
    lines = ids("many-nd", MAX_PAYLOADS + 1)
    body = b"".join(orjson.dumps(p) + b"\n" for p in data(lines))
    target.refused(target.post(body, content_type="application/x-ndjson"), 400, lines, mentions="payloads")
    at_limit = ids("at-limit", MAX_PAYLOADS)
    target.accepted(target.post({"data": data(at_limit)}), at_limit)


@pytest.mark.parametrize("body, ctype, gz", [
    (b"", "application/json", False),
    (b"", "application/x-ndjson", False),
    (b"\n\n  \n", "application/x-ndjson", False),
    (b"", "application/json", True),  # a valid gzip stream of nothing
], ids=["json", "ndjson", "ndjson-blank-lines", "gzip-of-nothing"])
def test_400_empty_body(target, body, ctype, gz):
    headers = {"Content-Encoding": "gzip"} if gz else {}
    target.refused(target.post(gzip.compress(body) if gz else body, content_type=ctype, headers=headers), 400)


@pytest.mark.parametrize("version", [123, 1.5, ["1"], {"v": 1}, True], ids=["int", "float", "list", "object", "bool"])
def test_400_version_not_a_string(target, version):
    target.refused(target.post({"version": version, "data": [{"id": "badversion"}]}), 400, ["badversion"],
                   mentions="version")


def test_400_ndjson_with_one_bad_line_keeps_nothing(target):
    good = ids("nd-mixed", 3)
    body = orjson.dumps({"id": good[0]}) + b"\n" + orjson.dumps({"id": good[1]}) + b"\n{nope\n" + \
        orjson.dumps({"id": good[2]}) + b"\n"
    target.refused(target.post(body, content_type="application/x-ndjson"), 400, good, mentions="line 3")
    body = orjson.dumps({"id": "nd-array-line"}) + b"\n[1, 2]\n"
    target.refused(target.post(body, content_type="application/x-ndjson"), 400, ["nd-array-line"], mentions="object")


def test_400_gzip_label_on_a_body_that_is_not_gzip(target):
    plain = orjson.dumps({"data": [{"id": "not-gzip"}]})
    target.refused(target.post(plain, headers={"Content-Encoding": "gzip"}), 400, ["not-gzip"], mentions="gzip")
    truncated = gzip.compress(orjson.dumps({"data": [{"id": "torn-gzip"}]}))[:-12]
    target.refused(target.post(truncated, headers={"Content-Encoding": "gzip"}), 400, ["torn-gzip"], mentions="gzip")


# -- 401 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x",
                                           f"Bearer {TOKEN[:-1]}"],
                         ids=["missing", "wrong", "basic-scheme", "no-token", "longer", "prefix"])
def test_401_without_a_valid_bearer_token(target, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    pid = f"noauth-{authorization}"
    body = {"token": TOKEN, "data": [{"id": pid}]}  # a token in the body is not authentication
    r = target.post(body, token=None, headers=headers)
    target.refused(r, 401, [pid])
    assert r.headers.get("WWW-Authenticate", "").lower().startswith("bearer"), r.headers


@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN])
def test_401_off_for_a_configured_token(target, token):
    pid = ids(f"auth-ok-{token}", 2)
    target.accepted(target.post({"data": data(pid)}, token=token), pid)


# -- 404, 405 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, accept", [
    ("GET", "/nope", None),
    ("POST", "/v1/payload", None),
    ("POST", "/v2/payloads", None),
    ("GET", "/v1", "text/html"),
], ids=["get-nope", "post-typo", "post-v2", "html-accept"])
def test_404_unknown_path_answers_json(target, method, path, accept):
    headers = {"Accept": accept} if accept else {}
    body = orjson.dumps({"data": [{"id": f"404-{path}"}]}) if method == "POST" else b""
    r = target.request(method, body, path=path, headers=headers)
    target.refused(r, 404, [f"404-{path}"], path=path)


def test_405_wrong_method_on_the_ingest_path(target):
    before = target.d.health()["counters"]["rejected_requests"]
    for method in ("PUT", "DELETE"):
        r = target.request(method, orjson.dumps({"data": [{"id": f"405-{method}"}]}))
        target.refused(r, 405, [f"405-{method}"])
        assert [m.strip() for m in r.headers.get("Allow", "").split(",")] == ["POST"], r.headers
    r = target.request("GET", content_type=None)
    target.refused(r, 405)
    assert "POST" in r.headers.get("Allow", ""), r.headers
    after = target.d.health()["counters"]["rejected_requests"]
    assert after - before == 3, f"rejected_requests grew by {after - before} for 3 requests refused with 405"


# -- 413 ---------------------------------------------------------------------------------------------

def test_413_raw_body_over_max_body_bytes(target):
    target.refused(target.post(exact_json(MAX_BODY + 1, "raw-over")), 413, ["raw-over"])
    target.accepted(target.post(exact_json(MAX_BODY, "raw-at-limit")), ["raw-at-limit"])


def test_413_chunked_body_over_max_body_bytes(target):
    body = exact_json(MAX_BODY + 1, "chunked-over")

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    r = requests.post(target.url + INGEST, data=chunks(), timeout=10,
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert "Content-Length" not in r.request.headers
    target.refused(r, 413, ["chunked-over"])


def test_413_gzip_body_decoding_over_max_decoded_bytes(target):
    over = gzip.compress(exact_json(MAX_DECODED + 1, "gz-over"))
    assert len(over) < MAX_BODY
    target.refused(target.post(over, headers={"Content-Encoding": "gzip"}), 413, ["gz-over"])
    at = gzip.compress(exact_json(MAX_DECODED, "gz-at-limit"))
    target.accepted(target.post(at, headers={"Content-Encoding": "gzip"}), ["gz-at-limit"])


def test_413_gzip_bomb(target):
    doc = b'{"data":[{"id":"bomb","pad":"' + b" " * (16 * 1024 * 1024) + b'"}]}'
    bomb = gzip.compress(doc, compresslevel=9)
    assert len(bomb) < MAX_BODY
    target.refused(target.post(bomb, headers={"Content-Encoding": "gzip"}), 413, ["bomb"])


# -- 415 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "multipart/form-data; boundary=x"])
def test_415_unsupported_content_type(target, ctype):
    pid = f"ctype-{ctype}"
    target.refused(target.post({"data": [{"id": pid}]}, content_type=ctype), 415, [pid])


@pytest.mark.parametrize("encoding", ["br", "deflate", "zstd"])
def test_415_unsupported_content_encoding(target, encoding):
    pid = f"enc-{encoding}"
    target.refused(target.post({"data": [{"id": pid}]}, headers={"Content-Encoding": encoding}), 415, [pid])


# -- after all of it ---------------------------------------------------------------------------------

def test_still_serving_after_the_bad_requests_and_counted_them(target):
    d = target.d
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    good = ids("good-after", 5)
    target.accepted(target.post({"version": "after", "data": data(good)}), good)
    root = d.workdir / "objects"

    def landed() -> list[str]:
        return [line["payload"]["id"] for lines in read_directory_sink(root).values() for line in lines]

    wait_for(lambda: Counter(landed()) == Counter(target.accepted_ids), 10, "the accepted payloads to land")
    stored = landed()
    assert not set(stored) & set(target.refused_ids), "payloads of refused requests were kept"
    health = requests.get(d.url + "/health", timeout=5)
    assert health.status_code == 200, health.text
    counters = health.json()["counters"]
    assert counters["rejected_requests"] == target.rejected, (
        f"rejected_requests {counters['rejected_requests']}, refused on {INGEST}: {target.rejected} "
        f"by status {dict(target.by_status)}")
    assert counters["accepted_payloads"] == len(target.accepted_ids), counters


# -- 503, queue full -----------------------------------------------------------------------------------

def test_503_with_retry_after_when_the_queue_is_full(daemon_factory, stalled_s3_tables, stalled_sink, tmp_path):
    max_items = 3
    d = daemon_factory(merge(stalled_s3_tables, {
        "queue": {"max_items": max_items}, "workers": {"count": 1},
        "batch": {"max_payloads": 1}, "shutdown": {"drain_timeout_s": 1}, "http": {"retry_after_s": 2},
    })).start()
    d.wait_uploaders_running()

    def send(pid: str) -> requests.Response:
        return requests.post(d.url + INGEST, data=orjson.dumps({"data": [{"id": pid}]}),
                             headers={"Content-Type": "application/json"}, timeout=10)

    assert send("held").status_code == 202
    # the only uploader took it and now hangs on the sink ...
    wait_for(lambda: stalled_sink.accepted > 0, 10, "the uploader to reach the hanging sink")
    # ... it takes one more batch while the first upload is in flight, then waits for it ...
    assert send("next").status_code == 202
    wait_for(lambda: d.health()["queue"]["depth"] == 0, 10, "the uploader to take its second batch")
    # ... so the queue alone holds what follows
    accepted = ["held", "next"]
    for i in range(max_items):
        r = send(f"queued-{i}")
        assert r.status_code == 202, r.text
        accepted.append(f"queued-{i}")
    refused = [f"over-{i}" for i in range(5)]
    for pid in refused:
        r = send(pid)
        assert r.status_code == 503, r.text
        assert r.headers.get("Retry-After") == "2", r.headers
        assert set(r.json()) == {"title", "description"}, r.text
    health = requests.get(d.url + "/health", timeout=5)
    assert health.status_code == 503, health.text
    snap = health.json()
    assert snap["status"] == "degraded", snap
    assert snap["queue"] == {**snap["queue"], "depth": max_items, "capacity": max_items}, snap["queue"]
    assert snap["counters"]["rejected_requests"] == len(refused), snap["counters"]
    assert requests.get(d.url + "/health/ready", timeout=5).status_code == 503
    assert requests.get(d.url + "/health/live", timeout=5).status_code == 200

    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0, d.log()
    kept = [line["payload"]["id"] for line in spool_lines(tmp_path)]
    assert Counter(kept) == Counter(accepted), f"spool holds {sorted(kept)}, accepted {accepted}"
