"""Hostile clients against one real daemon (module scope, tight limits): gzip bombs, deep nesting,
huge strings and numbers, invalid UTF-8, garbage, slowloris, many idle connections.

Each gets a clear answer with bounded memory, and none of it disturbs the good requests sent
alongside: the last test checks the daemon is still healthy and that every good payload of the
module landed, once, and nothing refused did.
"""

from __future__ import annotations

import gzip
import json
import random
import selectors
import signal
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from tests.faults import Ledger, check_delivery, peak_rss_bytes, settle, unique_prefix
from tests.harness import Daemon, payload_ids, read_directory_raw, read_directory_sink

pytestmark = [pytest.mark.slow, pytest.mark.every_front]

MAX_BODY = 256 * 1024
MAX_DECODED = 1024 * 1024
CHANNEL_TIMEOUT_S = 2
CONNECTION_LIMIT = 400
CLOSE_GRACE_S = 4  # how long after channel_timeout_s a stalled connection may stay open


class Hostile:
    def __init__(self, daemon: Daemon, objects: Path) -> None:
        self.d = daemon
        self.url = daemon.url
        self.objects = objects
        self.ledger = Ledger()
        self.prefix = unique_prefix("hostile")
        self.refused_requests = 0
        self.exact_ints: dict[str, int] = {}  # id -> the big integer its payload carries as "n"

    def good(self, tag: str, n: int = 2) -> None:
        """Good payloads sent between the hostile ones: they must all land."""
        ids = [f"{self.prefix}-{tag}-{i}" for i in range(n)]
        status = self.ledger.send(self.url, ids)
        assert status == 202, f"good request {tag} answered {status}"

    def raw(self, body: bytes, ctype: str = "application/json", encoding: str | None = None,
            ids: list[str] = (), timeout: float = 10.0) -> requests.Response:  # type: ignore[assignment]
        headers = {"Content-Type": ctype}
        if encoding:
            headers["Content-Encoding"] = encoding
        resp = requests.post(self.url + "/v1/payloads", data=body, headers=headers, timeout=timeout)
        self.ledger.record(resp.status_code, list(ids), resp)
        if resp.status_code != 202:
            self.refused_requests += 1
        return resp

    def expect(self, status: int, body: bytes, **kw: Any) -> requests.Response:
        resp = self.raw(body, **kw)
        assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:300]}"
        if status != 202:
            doc = resp.json()
            assert set(doc) == {"title", "description"} and doc["description"], doc
        return resp


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    tables = {
        "http": {"listen": "127.0.0.1:0", "max_body_bytes": MAX_BODY, "max_decoded_bytes": MAX_DECODED,
                 "channel_timeout_s": CHANNEL_TIMEOUT_S, "connection_limit": CONNECTION_LIMIT, "threads": 4,
                 "server": front},
        "sink": {"kind": "directory", "path": str(root / "objects"), "fsync": False},
        "spool": {"path": str(root / "spool")},
        "batch": {"max_age_ms": 100, "compression": "none"},
        "shutdown": {"drain_timeout_s": 5},
    }
    d = Daemon(root, tables)
    try:
        d.start()
        yield Hostile(d, root / "objects")
    finally:
        d.kill_group()


def gzip_stream(parts: Iterator[bytes]) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(c.compress(p) for p in parts) + c.flush()


def bomb_json(decoded_mib: int) -> bytes:
    """{"data":[{"id":"bomb","s":"AAAA…"}]}: decoded_mib MiB of valid JSON, gzipped to a few KiB."""
    head, tail, chunk = b'{"data":[{"id":"bomb","s":"', b'"}]}', b"A" * 2**20
    return gzip_stream(iter([head, *([chunk] * decoded_mib), tail]))


# -- 8. hostile bodies ---------------------------------------------------------------------------------

def test_gzip_bombs_are_413_fast_with_bounded_memory(hostile: Hostile):
    h = hostile
    pid = h.d.proc.pid  # the supervisor: it decodes the bodies
    h.good("before-bombs")
    peak_before, rss_before = peak_rss_bytes(pid), h.d.health()["rss_bytes"]
    bombs = {
        "json-50MiB": (bomb_json(50), "application/json"),
        "ndjson-50MiB": (gzip_stream(iter([b'{"id":"nd-bomb","s":"', *([b"B" * 2**20] * 50), b'"}\n'])),
                         "application/x-ndjson"),
        "zeros-64MiB": (gzip_stream(iter([b"\0" * 2**20] * 64)), "application/json"),
        # 100 gzip members of 1 MiB each: the decoded limit holds across members too
        "members-100MiB": (b"".join(gzip.compress(b" " * 2**20, 9) for _ in range(100)), "application/json"),
    }
    for name, (body, ctype) in bombs.items():
        assert len(body) < MAX_BODY, f"{name}: {len(body)} bytes raw"
        for _ in range(3):
            began = time.monotonic()
            h.expect(413, body, ctype=ctype, encoding="gzip", ids=["bomb", "nd-bomb"])
            took = time.monotonic() - began
            assert took < 2, f"{name}: 413 after {took:.1f}s"
    peak_after, rss_after = peak_rss_bytes(pid), h.d.health()["rss_bytes"]
    print(f"\ngzip bombs: supervisor RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, "
          f"peak {peak_before / 2**20:.1f} -> {peak_after / 2**20:.1f} MiB")
    assert peak_after - peak_before < 24 * 2**20, "a bomb raised the supervisor's peak RSS towards its decoded size"
    assert rss_after - rss_before < 16 * 2**20
    h.good("after-bombs")


def test_deeply_nested_json_is_400(hostile: Hostile):
    h = hostile
    depth = 100_000
    h.expect(400, b"[" * depth)
    h.expect(400, b"[" * depth + b"]" * depth)
    h.expect(400, b'{"data":[{"id":"deep-a","v":' + b"[" * depth + b"]" * depth + b"}]}", ids=["deep-a"])
    objects = b'{"data":[{"id":"deep-o","v":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}]}"
    h.expect(400, gzip.compress(objects), encoding="gzip", ids=["deep-o"])  # 600 KB decoded, under the limit
    # deep nesting on the exact-integer path (a long digit run sends the body to the stdlib parser);
    # 20,000 levels: at 100,000 the body's '[' alone are over http.max_json_values / 4 (a 413)
    exact_depth = 20_000
    h.expect(400, b'{"data":[{"id":"deep-i","n":' + b"1" * 25 + b',"v":' + b"[" * exact_depth + b"]" * exact_depth
             + b"}]}", ids=["deep-i"])
    h.expect(400, b'{"id":"deep-n","v":' + b"[" * depth + b"]" * depth + b"}\n", ctype="application/x-ndjson",
             ids=["deep-n"])
    # a million '[' may open a million arrays: refused on its count, before parsing
    h.expect(413, gzip.compress(b"[" * 1_000_000), encoding="gzip")
    # nesting that is deep but reasonable is data like any other
    ok_id = f"{h.prefix}-nested-ok"
    h.expect(202, orjson.dumps({"data": [{"id": ok_id, "v": [[[[[[[[{"x": [1]}]]]]]]]]}]}), ids=[ok_id])
    h.good("after-nesting")


def _body_of_size(size: int, ident: str) -> bytes:
    """A JSON collection of exactly `size` bytes: one payload with a long string."""
    shell = orjson.dumps({"data": [{"id": ident, "s": ""}]})
    return orjson.dumps({"data": [{"id": ident, "s": "x" * (size - len(shell))}]})


def test_huge_strings_at_the_limits(hostile: Hostile):
    h = hostile
    at, over = f"{h.prefix}-at-raw-limit", f"{h.prefix}-over-raw-limit"
    body = _body_of_size(MAX_BODY, at)
    assert len(body) == MAX_BODY
    h.expect(202, body, ids=[at])
    h.expect(413, _body_of_size(MAX_BODY + 1, over), ids=[over])

    dec_at, dec_over = f"{h.prefix}-at-decoded-limit", f"{h.prefix}-over-decoded-limit"
    gz = gzip.compress(_body_of_size(MAX_DECODED, dec_at))
    assert len(gz) < MAX_BODY
    h.expect(202, gz, encoding="gzip", ids=[dec_at])
    h.expect(413, gzip.compress(_body_of_size(MAX_DECODED + 1, dec_over)), encoding="gzip", ids=[dec_over])

    # far over the raw limit: refused on the declared length, before any body is read
    with socket.create_connection(("127.0.0.1", h.d.port), timeout=5) as s:
        s.sendall(b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (100 * MAX_BODY))
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    h.good("after-huge")


def test_invalid_utf8_is_400(hostile: Hostile):
    h = hostile
    for bad in (b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"abc\x80"):
        h.expect(400, b'{"data":[{"id":"utf8-bad","s":"' + bad + b'"}]}', ids=["utf8-bad"])
        h.expect(400, b'{"id":"utf8-bad-nd","s":"' + bad + b'"}\n', ctype="application/x-ndjson", ids=["utf8-bad-nd"])
    h.expect(400, b'{"data":[{"id":"utf8-key","\xff":1}]}', ids=["utf8-key"])
    ok_id = f"{h.prefix}-utf8-ok"
    h.expect(202, orjson.dumps({"data": [{"id": ok_id, "s": "é✓𝄞"}]}), ids=[ok_id])
    h.good("after-utf8")


def test_integers_beyond_64_bits_stay_exact_or_are_400(hostile: Hostile):
    """README: integers beyond 64 bits are kept exact (orjson would turn them into floats).
    Integers too long for Python's int parsing limit (4300 digits) are a clear 400."""
    h = hostile
    big = {f"{h.prefix}-u64-max": 2**64 - 1, f"{h.prefix}-i64-min": -(2**63), f"{h.prefix}-2e64": 2**64,
           f"{h.prefix}-below-i64": -(2**63) - 1, f"{h.prefix}-1e30": 10**30, f"{h.prefix}-m1e40": -(10**40)}
    for ident, n in big.items():
        h.expect(202, b'{"data":[{"id":"%s","n":%d,"deep":{"w":[1,%d]}}]}' % (ident.encode(), n, n), ids=[ident])
        nd = ident + "-nd"
        h.expect(202, b'{"id":"%s","n":%d}\n' % (nd.encode(), n), ctype="application/x-ndjson", ids=[nd])
        h.exact_ints[ident] = h.exact_ints[nd] = n
    digits = f"{h.prefix}-digits-in-string"
    h.expect(202, orjson.dumps({"data": [{"id": digits, "s": "1" * 40}]}), ids=[digits])
    for n_digits in (5000, 200_000):  # beyond the int parser's limit: refused, not a 500 or a hang
        began = time.monotonic()
        h.expect(400, b'{"data":[{"id":"huge-int","n":' + b"7" * n_digits + b"}]}", ids=["huge-int"])
        h.expect(400, b'{"id":"huge-int-nd","n":' + b"7" * n_digits + b"}\n", ctype="application/x-ndjson",
                 ids=["huge-int-nd"])
        assert time.monotonic() - began < 2
    h.good("after-ints")


def test_nul_bytes_and_garbage_are_400(hostile: Hostile):
    h = hostile
    rng = random.Random(4)
    garbage = [
        b"\0",
        b"\0" * 1000,
        b'{"data":[{"id":"nul-after"}]}\0',
        b'{"data":[{"id":"nul-raw","s":"a\0b"}]}',
        b"\xff\xd8\xff\xe0\0\x10JFIF",
        bytes(rng.getrandbits(8) for _ in range(4096)),
        b"GET / HTTP/1.1\r\n\r\n",
    ]
    for body in garbage:
        h.expect(400, body, ids=["nul-after", "nul-raw"])
        h.expect(400, body, ctype="application/x-ndjson", ids=["nul-after", "nul-raw"])
    h.expect(400, b"not gzip at all", encoding="gzip")
    h.expect(400, gzip.compress(b'{"data":[{"id":"trunc"}]}')[:-8], encoding="gzip", ids=["trunc"])
    h.expect(400, b"")
    # an escaped NUL is a valid JSON string
    ok_id = f"{h.prefix}-escaped-nul"
    h.expect(202, b'{"data":[{"id":"%s","s":"a\\u0000b"}]}' % ok_id.encode(), ids=[ok_id])
    h.good("after-garbage")


# -- 9. slow and idle clients ------------------------------------------------------------------------------

def _closed_by_server(sock: socket.socket) -> bool:
    """Non-blocking check: has the server closed this connection (EOF or reset)?"""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    return data == b""  # an answer (e.g. 408) followed by EOF shows up as data, then b""


def test_slowloris_is_cut_off_while_others_are_served(hostile: Hostile):
    h = hostile
    slow_id = f"{h.prefix}-slowloris"
    with socket.create_connection(("127.0.0.1", h.d.port), timeout=5) as s:
        s.sendall(b"POST /v1/payloads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 4000\r\n\r\n" + b'{"data":[{"id":"%s","s":"' % slow_id.encode())
        h.ledger.refused.append(slow_id)  # never completed: it must not land
        stalled_at = time.monotonic()
        for i in range(5):  # meanwhile, others are served
            h.good(f"during-slowloris-{i}")
        closed = settle(lambda: _closed_by_server(s), CHANNEL_TIMEOUT_S + CLOSE_GRACE_S, interval=0.05)
        after = time.monotonic() - stalled_at
    print(f"\nslowloris: {'closed' if closed else 'still open'} after {after:.1f}s "
          f"(channel_timeout_s={CHANNEL_TIMEOUT_S})")
    assert closed, (f"a client stalled mid-body was still connected {after:.1f}s later "
                    f"(http.channel_timeout_s = {CHANNEL_TIMEOUT_S})")
    h.good("after-slowloris")


def test_many_idle_connections_do_not_block_a_good_request_and_are_closed(hostile: Hostile):
    h = hostile
    n = 200
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", h.d.port), timeout=5))
        opened = time.monotonic()
        began = time.monotonic()
        h.good("during-idle-connections")
        assert time.monotonic() - began < 2, "a good request waited behind idle connections"
        assert requests.get(h.url + "/health", timeout=5).status_code == 200

        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        open_ = set(socks)
        deadline = opened + CHANNEL_TIMEOUT_S + CLOSE_GRACE_S
        while open_ and time.monotonic() < deadline:  # bounded by the deadline
            for key, _ in sel.select(timeout=max(0.0, min(0.2, deadline - time.monotonic()))):
                sock = key.fileobj
                if sock in open_ and _closed_by_server(sock):  # type: ignore[arg-type]
                    open_.discard(sock)  # type: ignore[arg-type]
                    sel.unregister(sock)
        sel.close()
        after = time.monotonic() - opened
        print(f"\nidle connections: {n - len(open_)} of {n} closed by the server after {after:.1f}s "
              f"(channel_timeout_s={CHANNEL_TIMEOUT_S})")
        assert not open_, f"{len(open_)} of {n} idle connections still open {after:.1f}s after they were opened"
    finally:
        for s in socks:
            s.close()
    h.good("after-idle-connections")


# -- 10. after all of that ---------------------------------------------------------------------------------

def test_daemon_survived_and_every_good_payload_landed(hostile: Hostile):
    h = hostile
    h.good("last")
    r = requests.get(h.url + "/health", timeout=5)
    assert r.status_code == 200, r.text
    health = r.json()
    assert health["status"] == "ok" and all(w["alive"] and w["restarts"] == 0 for w in health["workers"]), health
    assert health["counters"]["rejected_requests"] >= h.refused_requests, (health["counters"], h.refused_requests)
    acked = set(h.ledger.acked)
    settle(lambda: acked <= set(payload_ids(read_directory_sink(h.objects))), 15)
    h.d.signal(signal.SIGTERM)
    assert h.d.wait(30) == 0, h.d.log()
    objects = read_directory_sink(h.objects)
    check_delivery("hostile-module", h.ledger, payload_ids(objects), allow_duplicates=False)
    # exact integers: read the stored lines with the standard library (orjson would float them)
    raw = read_directory_raw(h.objects)
    stored = {}
    for body in raw.values():
        for line in body.splitlines():
            payload = json.loads(line)["payload"]
            stored[payload["id"]] = payload
    for ident, n in h.exact_ints.items():
        assert type(stored[ident]["n"]) is int and stored[ident]["n"] == n, (ident, stored[ident])
        if "deep" in stored[ident]:
            assert stored[ident]["deep"]["w"][1] == n
    at = f"{h.prefix}-at-raw-limit"
    if at in stored:
        assert len(stored[at]["s"]) > MAX_BODY - 100
