"""The HTTP edge against the real daemon: auth fails closed, refusals from the headers alone,
request_timeout_s against slow clients at the connection cap, tenants' rates across listeners."""

from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest
import requests

from tests.faults import run_ingestd
from tests.harness import Daemon, payload_ids, read_directory_sink

pytestmark = pytest.mark.every_front

TOKEN = "edge-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def raw_exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send a request's bytes; return all the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def split(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, orjson.loads(body) if body else None


# -- auth fails closed --------------------------------------------------------------------------------------

def test_a_tokens_file_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# every token was commented out\n\n", encoding="utf-8")
    config = tmp_path / "c.toml"
    config.write_text(f'[http]\nlisten = "127.0.0.1:0"\n[auth]\ntokens_file = "{tokens}"\n'
                      f'[spool]\npath = "{tmp_path / "spool"}"\n', encoding="utf-8")
    done = run_ingestd(["--config", str(config)], tmp_path, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert str(tokens) in done.stderr and "holds no token" in done.stderr, done.stderr


# -- refusals from the headers, before any body byte is buffered --------------------------------------------

def test_refusals_from_the_headers_alone(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"http": {"max_body_bytes": 4096}, "auth": {"tokens": [TOKEN]}}).start()
    # no token, 1 MiB declared, not one body byte sent: 401 at once (it would wait for the body otherwise)
    status, headers, body = split(raw_exchange(d.port, b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\n"
                                               b"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"))
    assert status == 401 and headers["www-authenticate"].startswith("Bearer"), (status, headers)
    assert body["title"] == "Unauthorized" and headers["connection"] == "close"
    # with a token, a declared length one byte over the limit: 413 from the headers, in the JSON shape
    status, headers, body = split(raw_exchange(d.port, b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\n"
                                               b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                                               b"Content-Type: application/json\r\nContent-Length: 4097\r\n\r\n"))
    assert status == 413 and "http.max_body_bytes" in body["description"], body
    # a chunked body is cut at the limit as it arrives
    chunk = b"x" * 3000
    chunked = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n"
    status, _, body = split(raw_exchange(d.port, b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\n"
                                         b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", chunked))
    assert status == 413 and body["title"] == "Payload too large", body
    # a body of exactly the limit is read and judged by the app (here: valid, 202)
    pad = 4096 - len(orjson.dumps({"data": [{"id": "exact", "p": ""}]}))
    exact = orjson.dumps({"data": [{"id": "exact", "p": "p" * pad}]})
    assert len(exact) == 4096
    r = requests.post(d.url + "/v1/payloads", data=exact, headers=AUTH, timeout=10)
    assert r.status_code == 202, r.text
    # waitress' own refusals use the JSON shape too
    status, _, body = split(raw_exchange(d.port, b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"))
    assert status == 400 and set(body) == {"title", "description"}, body
    counters = d.health()["counters"]
    assert counters["rejected_requests"] >= 1 and counters["accepted_payloads"] == 1
    assert d.stop(30) == 0
    assert payload_ids(read_directory_sink(d.workdir / "objects")) == ["exact"]


# -- slow clients ------------------------------------------------------------------------------------------

def test_slow_clients_at_the_connection_cap_are_cut_within_request_timeout(daemon_factory: Callable[..., Daemon]) -> None:
    cap, timeout_s = 8, 2
    d = daemon_factory({"http": {"listeners": 1, "connection_limit": cap, "request_timeout_s": timeout_s,
                                 "channel_timeout_s": 60}}).start()
    slow: list[socket.socket] = []
    try:
        began = time.monotonic()
        for _ in range(cap):  # every slot: a request trickling a byte at a time, never idle for long
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            s.sendall(b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{")
            slow.append(s)
        cut: dict[int, float] = {}
        deadline = began + timeout_s + 10
        while len(cut) < cap and time.monotonic() < deadline:  # bounded in time
            for i, s in enumerate(slow):
                if i in cut:
                    continue
                try:
                    s.sendall(b" ")  # a trickle: channel_timeout_s (idle time) never fires
                    s.setblocking(False)
                    if s.recv(100) == b"":
                        cut[i] = time.monotonic() - began
                except BlockingIOError:
                    pass
                except OSError:
                    cut[i] = time.monotonic() - began
                finally:
                    s.setblocking(True)
            time.sleep(0.05)  # the trickle's pace, not a synchronization
        print(f"\nslow clients: {len(cut)} of {cap} (the connection cap) cut after "
              f"{min(cut.values(), default=0):.1f}-{max(cut.values(), default=0):.1f} s (request_timeout_s={timeout_s})")
        assert len(cut) == cap, f"only {len(cut)} of {cap} trickling requests were cut"
        assert min(cut.values()) >= timeout_s - 0.5, cut  # not before their time
        # waitress looks once a second, and its I/O loop wakes at least once a second
        assert max(cut.values()) <= timeout_s + 5, cut
        # the slots are free again: a good request is served
        r = requests.post(d.url + "/v1/payloads", json={"data": [{"id": "after-slow"}]}, timeout=10)
        assert r.status_code == 202
    finally:
        for s in slow:
            s.close()
    assert d.stop(30) == 0
    assert payload_ids(read_directory_sink(d.workdir / "objects")) == ["after-slow"]


# -- tenants -----------------------------------------------------------------------------------------------

def test_a_tenants_rate_holds_across_listeners_and_spares_other_tenants(daemon_factory: Callable[..., Daemon]) -> None:
    rate = 40
    d = daemon_factory({"http": {"listeners": 2},
                        "auth": {"tenants": [{"name": "noisy", "tokens": ["noisy-t"], "max_payloads_per_s": rate},
                                             {"name": "calm", "tokens": ["calm-t"]}]}}).start()
    statuses: Counter[int] = Counter()
    retry_after: set[str] = set()
    began = time.monotonic()
    sessions = [requests.Session() for _ in range(8)]  # several connections: both listeners take some
    try:
        for i in range(300):
            r = sessions[i % len(sessions)].post(d.url + "/v1/payloads", json={"data": [{"id": f"n{i}"}]},
                                                 headers={"Authorization": "Bearer noisy-t"}, timeout=10)
            statuses[r.status_code] += 1
            if r.status_code == 429:
                retry_after.add(r.headers["Retry-After"])
                assert r.json()["title"] == "Too many requests"
        elapsed = time.monotonic() - began
        calm = [requests.post(d.url + "/v1/payloads", json={"data": [{"id": f"c{i}"}]},
                              headers={"Authorization": "Bearer calm-t"}, timeout=10).status_code for i in range(20)]
    finally:
        for s in sessions:
            s.close()
    health = d.health()
    served = [x["accepted_requests"] for x in health["listeners"]]
    print(f"\ntenant rate {rate}/s over {elapsed:.1f}s: {dict(statuses)}, accepted by listener {served}, "
          f"Retry-After {sorted(retry_after)}")
    assert set(statuses) <= {202, 429} and statuses[429] > 0, statuses
    # one bucket for the host: a second's worth at once, then the rate (per-listener buckets would allow twice)
    assert statuses[202] <= rate * (1 + elapsed) + 1, (statuses, elapsed)
    assert statuses[202] >= rate, statuses
    assert all(s > 0 for s in served), f"one listener took every connection: {served}"
    assert calm == [202] * 20, calm  # the other tenant is not slowed
    tenants = health["tenants"]
    assert tenants["noisy"]["accepted_payloads"] == statuses[202]
    assert tenants["noisy"]["rate_limited_requests"] == statuses[429]
    assert tenants["calm"]["accepted_payloads"] == 20
    assert d.stop(30) == 0
    landed = payload_ids(read_directory_sink(d.workdir / "objects"))
    assert len(landed) == len(set(landed)) == statuses[202] + 20


def test_health_detail_off_over_http(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"http": {"health_detail": False}}).start()
    r = requests.get(d.url + "/health", timeout=5)
    assert r.status_code == 200 and r.json()["ready"] is True
    assert all(key not in r.text for key in ('"pid"', "rss_bytes", "cpu_percent")), r.text
    metrics = requests.get(d.url + "/metrics", timeout=5).text
    assert "ingestd_rss_bytes" not in metrics and "ingestd_ready 1.0" in metrics
    assert d.stop(30) == 0


# -- keep-alive rebalancing ------------------------------------------------------------------------------

def _exchange_on(sock: socket.socket, n: int) -> bytes:
    body = orjson.dumps({"data": [{"id": f"ka-{n}"}]})
    sock.sendall(b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def test_a_connection_is_closed_after_keepalive_requests_and_keepalive_time(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"http": {"keepalive_requests": 3, "keepalive_time_s": 1}}).start()
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        answers = [_exchange_on(s, i) for i in range(3)]
        assert [split(a)[0] for a in answers] == [202, 202, 202]
        assert [split(a)[1].get("connection") for a in answers] == [None, None, "close"]
        assert s.recv(100) == b""  # closed by the server after the third answer
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:  # by age
        opened = time.monotonic()
        first = split(_exchange_on(s, 3))
        assert first[0] == 202 and (first[1].get("connection") is None or time.monotonic() - opened >= 1)
        while time.monotonic() - opened < 1.1:  # the feature is about time: let the connection age
            time.sleep(0.05)
        second = split(_exchange_on(s, 4))
        assert second[0] == 202 and second[1].get("connection") == "close", second
        assert s.recv(100) == b""
    assert d.stop(30) == 0
    assert len(payload_ids(read_directory_sink(d.workdir / "objects"))) == 5


# -- HTTP/1.1 details every front must get right ------------------------------------------------------

def read_answers(sock: socket.socket, n: int, timeout: float = 10.0) -> list[tuple[int, dict[str, str], bytes]]:
    """`n` answers from a connection, in the order they come (each with a Content-Length)."""
    buf, out = b"", []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            length = int(headers.get("content-length", "0"))
            if len(rest) >= length:
                out.append((int(lines[0].split()[1]), headers, rest[:length]))
                buf = rest[length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return out


def _post_bytes(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_pipelined_requests_are_answered_in_order(daemon_factory: Callable[..., Daemon]) -> None:
    import gzip

    d = daemon_factory({"http": {"listeners": 1}}).start()
    plain = [orjson.dumps({"data": [{"id": f"pipe-{i}"}]}) for i in range(3)]
    zipped = gzip.compress(orjson.dumps({"data": [{"id": "pipe-gz"}, {"id": "pipe-gz-2"}]}))
    burst = (_post_bytes(plain[0]) + _post_bytes(zipped, b"Content-Encoding: gzip\r\n")
             + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + _post_bytes(plain[1])
             + b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n" + _post_bytes(plain[2]))
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(burst)  # six requests in one write: answered one after the other, in order
        answers = read_answers(s, 6)
    assert [a[0] for a in answers] == [202, 202, 404, 202, 200, 202], answers
    assert [orjson.loads(a[2]).get("accepted") for a in answers] == [1, 2, None, 1, None, 1]
    assert d.stop(30) == 0
    assert sorted(payload_ids(read_directory_sink(d.workdir / "objects"))) == sorted(
        ["pipe-0", "pipe-1", "pipe-2", "pipe-gz", "pipe-gz-2"])


def test_expect_100_continue_only_for_a_request_that_passes_its_headers(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"auth": {"tokens": [TOKEN]}}).start()
    body = orjson.dumps({"data": [{"id": "continued"}]})
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = s.recv(100 - len(interim))  # no further than the interim answer
            assert chunk, interim
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.sendall(body)
        assert [a[0] for a in read_answers(s, 1)] == [202]
    # without a token: refused from the headers, never invited to send the body
    status, _, doc = split(raw_exchange(d.port, b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                                        b"Content-Length: 100\r\n\r\n"))
    assert status == 401 and doc["title"] == "Unauthorized", (status, doc)
    assert d.stop(30) == 0


def test_malformed_http_gets_json_answers_and_the_connection_closes(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory().start()
    for head in (b"GARBAGE\r\n\r\n",
                 # both lengths (a smuggling attempt): refused, or the body read as chunked (empty: 400)
                 (b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
                 b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        status, _, doc = split(raw_exchange(d.port, head))
        assert status == 400 and set(doc) == {"title", "description"}, (head, status, doc)
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(40))  # 320 KB of headers
    status, _, doc = split(raw_exchange(d.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n"))
    assert status == 431 and set(doc) == {"title", "description"}, (status, doc)
    # an HTTP/1.0 request without keep-alive is answered, then closed
    answer = raw_exchange(d.port, b"GET /health/live HTTP/1.0\r\n\r\n")
    assert split(answer)[0] == 200
    assert requests.get(d.url + "/health", timeout=5).status_code == 200
    assert d.stop(30) == 0


def test_fsync_always_answers_concurrent_clients_with_group_commit(daemon_factory: Callable[..., Daemon]) -> None:
    import threading

    d = daemon_factory({"http": {"listeners": 1},
                        "spool": {"durability": "disk", "journal_fsync": "always"}}).start()
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(k: int) -> None:
        with requests.Session() as s:
            for i in range(25):
                r = s.post(d.url + "/v1/payloads", json={"data": [{"id": f"sync-{k}-{i}"}]}, timeout=10)
                with lock:
                    statuses[r.status_code] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == {202: 200}, statuses
    assert d.stop(30) == 0
    landed = payload_ids(read_directory_sink(d.workdir / "objects"))
    assert len(landed) == len(set(landed)) == 200
