"""The ingest pipeline, end to end: real daemons, real HTTP, real signals, real sinks.

Every test starts `ingestd` as a process (tests.harness.Daemon), talks to it over HTTP on
127.0.0.1, stops it with a signal and reads back what landed in the sink (moto's S3 server or a
directory) or in the spool. Payload ids are compared as multisets: nothing missing, nothing
extra, nothing twice.
"""

from __future__ import annotations

import calendar
import gzip
import math
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

import ingestd
from tests.harness import (
    RECEIVED_AT_RE,
    Daemon,
    hidden_files,
    ingestd_command,
    post,
    read_bucket_raw,
    read_directory_raw,
    read_directory_sink,
    spool_lines,
    wait_for,
)

pytestmark = pytest.mark.slow

S3_KEY_RE = re.compile(r"^telemetry/dt=(\d{4}-\d\d-\d\d)/hour=(\d\d)/([^/]+)\.ndjson\.gz$")
DIR_KEY_RE = re.compile(r"^dt=(\d{4}-\d\d-\d\d)/hour=(\d\d)/([^/.][^/]*)\.ndjson(\.gz)?$")
# a zone far from UTC with a non-whole-hour offset: a partition computed in local time shows
NON_UTC_ENV = {"TZ": "Asia/Kathmandu"}


# -- helpers ----------------------------------------------------------------------------------------

Request = tuple[str | None, list[dict[str, Any]]]  # (version, payloads)


def make_requests(tag: str, n_requests: int, seed: int, lo: int = 1, hi: int = 20, pad: tuple[int, int] = (0, 40)
                  ) -> list[Request]:
    """`n_requests` collections of lo..hi payloads, each payload with a unique "id"."""
    rng = random.Random(seed)
    versions = ["1.0", "2.3-beta", None, "ü-7"]
    out: list[Request] = []
    for r in range(n_requests):
        payloads = []
        for i in range(rng.randint(lo, hi)):
            payloads.append({
                "id": f"{tag}-r{r}-p{i}",
                "n": rng.randint(-10**9, 10**9),
                "x": rng.random(),
                "ok": rng.random() < 0.5,
                "none": None,
                "text": "é\"\\\n\t✓ " + "z" * rng.randint(*pad),
                "nested": {"list": [1, "two", {"three": [3.5]}], "empty": {}},
            })
        out.append((versions[r % len(versions)], payloads))
    return out


def expected_from(reqs: Iterable[Request]) -> dict[str, tuple[str | None, dict[str, Any]]]:
    return {p["id"]: (version, p) for version, payloads in reqs for p in payloads}


def collection(version: str | None, payloads: list[dict[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {"data": payloads}
    if version is not None:
        doc["version"] = version
    return doc


def post_all(url: str, reqs: list[Request], threads: int = 1) -> None:
    """Send every request, `threads` clients at once; each must be answered 202 {"accepted": n}."""
    errors: list[str] = []
    lock = threading.Lock()
    shares = [reqs[i::threads] for i in range(threads)]

    def client(share: list[Request]) -> None:
        with requests.Session() as s:
            for version, payloads in share:
                try:
                    r = s.post(url + "/v1/payloads", data=orjson.dumps(collection(version, payloads)),
                               headers={"Content-Type": "application/json"}, timeout=10)
                    if r.status_code != 202 or r.json() != {"accepted": len(payloads)}:
                        with lock:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                except requests.RequestException as e:
                    with lock:
                        errors.append(repr(e))

    workers = [threading.Thread(target=client, args=(share,)) for share in shares]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers), "client threads did not finish"
    assert not errors, f"{len(errors)} requests not accepted, first: {errors[:3]}"


def epoch_ms(received_at: str) -> int:
    base, frac = received_at[:-1].split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) * 1000 + int(frac)


def check_objects(raw: dict[str, bytes], key_re: re.Pattern[str],
                  expected: dict[str, tuple[str | None, dict[str, Any]]], t0: float, t1: float) -> None:
    """Keys, envelopes and payloads of every object against what was sent between t0 and t1."""
    stored: list[str] = []
    lo, hi = int(t0 * 1000) - 1, int(t1 * 1000) + 1
    for key, body in raw.items():
        m = key_re.match(key)
        assert m, f"key {key!r} does not match {key_re.pattern}"
        assert body.endswith(b"\n"), f"{key}: body does not end in a newline"
        lines = [orjson.loads(ln) for ln in body.split(b"\n")[:-1]]
        assert lines, f"{key}: empty object"
        for line in lines:
            assert set(line) == {"received_at", "version", "payload"}, f"{key}: line keys {sorted(line)}"
            assert RECEIVED_AT_RE.match(line["received_at"]), f"{key}: received_at {line['received_at']!r}"
            assert lo <= epoch_ms(line["received_at"]) <= hi, f"{key}: received_at {line['received_at']} not in the test"
            pid = line["payload"]["id"]
            assert pid in expected, f"{key}: payload {pid!r} was never sent"
            version, payload = expected[pid]
            assert line["version"] == version, f"{key}: {pid} version {line['version']!r}, sent {version!r}"
            assert line["payload"] == payload, f"{key}: {pid} payload differs from what was sent"
            stored.append(pid)
        # the partition is the UTC date and hour of the object's earliest payload
        oldest = min(line["received_at"] for line in lines)
        assert (m.group(1), m.group(2)) == (oldest[:10], oldest[11:13]), f"{key}: partition vs received_at {oldest}"
    assert len(set(m.group(3) for m in map(key_re.match, raw) if m)) == len(raw), "object names repeat"
    assert Counter(stored) == Counter(list(expected)), describe_diff(stored, expected)


def describe_diff(stored: list[str], expected: Iterable[str]) -> str:
    got, want = Counter(stored), Counter(list(expected))
    missing, extra = want - got, got - want
    twice = [k for k, v in got.items() if v > 1]
    return f"missing {len(missing)} {list(missing)[:5]}, extra {len(extra)} {list(extra)[:5]}, twice {twice[:5]}"


def drain_and_exit(d: Daemon, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    d.signal(sig)
    assert d.wait(timeout) == 0, d.log()


# -- S3 sink ----------------------------------------------------------------------------------------

def test_s3_concurrent_clients_every_payload_once(daemon_factory, s3_tables, s3, bucket):
    # max_age_ms at the product default: see test_a_backlog_older_than_max_age_is_still_batched for 200
    d = daemon_factory({**s3_tables, "batch": {"max_age_ms": 1000}}, env=NON_UTC_ENV).start()
    d.wait_uploaders_running()  # else requests queue up behind booting uploaders: see test_a_backlog_older_than_max_age_is_still_batched
    reqs = make_requests("s3", 300, seed=1)
    t0 = time.time()
    post_all(d.url, reqs, threads=6)
    t1 = time.time()
    drain_and_exit(d)

    raw = read_bucket_raw(s3, bucket)
    check_objects(raw, S3_KEY_RE, expected_from(reqs), t0, t1)
    for key in raw:
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head.get("ContentEncoding") == "gzip", f"{key}: ContentEncoding {head.get('ContentEncoding')!r}"


def test_s3_objects_bounded_by_max_payloads(daemon_factory, s3_tables, s3, bucket):
    # Each uploader owns a Batcher that closes a batch exactly at max_payloads (items are cut at
    # line boundaries). With max_age far away, the only short objects are each uploader's last
    # flush at drain: at most `workers` of them, so objects <= ceil(total / 50) + workers - 1.
    workers, cap = 2, 50
    d = daemon_factory({**s3_tables, "batch": {"max_payloads": cap, "max_age_ms": 60000},
                        "workers": {"count": workers}}).start()
    reqs = make_requests("cap", 120, seed=2)
    total = sum(len(p) for _, p in reqs)
    t0 = time.time()
    post_all(d.url, reqs, threads=4)
    t1 = time.time()
    drain_and_exit(d)

    raw = read_bucket_raw(s3, bucket)
    check_objects(raw, S3_KEY_RE, expected_from(reqs), t0, t1)
    counts = [body.count(b"\n") for body in raw.values()]
    assert max(counts) <= cap, f"an object holds {max(counts)} payloads"
    short = [c for c in counts if c < cap]
    assert len(short) <= workers, f"{len(short)} objects below {cap} payloads: {sorted(short)}"
    assert math.ceil(total / cap) <= len(raw) <= math.ceil(total / cap) + workers - 1, (len(raw), total)


def test_one_object_per_payload_without_compression(daemon_factory, s3_tables, s3, bucket):
    tables = {**s3_tables, "batch": {"max_payloads": 1, "compression": "none"}}
    d = daemon_factory(tables).start()
    reqs = make_requests("one", 25, seed=3, lo=1, hi=6)
    t0 = time.time()
    post_all(d.url, reqs, threads=3)
    t1 = time.time()
    drain_and_exit(d)

    raw = read_bucket_raw(s3, bucket)
    key_re = re.compile(r"^telemetry/dt=(\d{4}-\d\d-\d\d)/hour=(\d\d)/([^/]+)\.ndjson$")
    check_objects(raw, key_re, expected_from(reqs), t0, t1)
    assert all(body.count(b"\n") == 1 for body in raw.values())
    for key in list(raw)[:5]:
        assert s3.head_object(Bucket=bucket, Key=key).get("ContentEncoding") in (None, ""), key


def test_a_backlog_older_than_max_age_is_still_batched(daemon_factory, tmp_path):
    """Items that waited in the queue longer than max_age must not each become their own object.

    The uploaders are frozen (SIGSTOP) while requests queue up, and thawed once every queued
    payload is older than max_age: the backlog is all there, ready to be packed into objects of
    max_payloads. Writing one object per request instead multiplies the PUTs by the request
    count exactly when the sink is behind, so a backlog never catches up.
    """
    workers, cap, max_age_ms = 2, 50, 100
    d = daemon_factory({"batch": {"max_payloads": cap, "max_age_ms": max_age_ms},
                        "workers": {"count": workers}}).start()
    d.wait_uploaders_running()
    pids = d.uploader_pids()
    assert len(pids) == workers
    reqs = [(None, [{"id": f"backlog-r{r}-p{i}"} for i in range(5)]) for r in range(200)]
    total = sum(len(p) for _, p in reqs)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        post_all(d.url, reqs, threads=4)
        t1 = time.time()
        assert d.health()["queue"]["depth"] == len(reqs), "the frozen uploaders took items"
        # the precondition is about wall-clock age, not about the daemon's state
        wait_for(lambda: time.time() > t1 + max_age_ms / 1000 + 0.05, 2, "the backlog to be older than max_age")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    drain_and_exit(d)

    raw = read_directory_raw(tmp_path / "objects")
    check_objects(raw, DIR_KEY_RE, expected_from(reqs), t0, t1)
    counts = sorted(body.count(b"\n") for body in raw.values())
    assert len(raw) <= 2 * math.ceil(total / cap), (
        f"{total} payloads of {len(reqs)} requests became {len(raw)} objects (max_payloads {cap}); "
        f"payloads per object: {Counter(counts).most_common(5)}")


# -- batch bounds on the directory sink ---------------------------------------------------------------

def test_max_bytes_bounds_the_uncompressed_body(daemon_factory, tmp_path):
    workers, max_bytes = 2, 4096
    d = daemon_factory({"batch": {"max_bytes": max_bytes, "max_age_ms": 60000},
                        "workers": {"count": workers}}).start()
    reqs = make_requests("mb", 60, seed=4, lo=1, hi=12, pad=(20, 300))
    big = {"id": "mb-big", "text": "B" * (max_bytes + 500)}  # one line larger than max_bytes travels alone
    reqs.insert(30, ("big", [big]))
    t0 = time.time()
    post_all(d.url, reqs, threads=1)
    t1 = time.time()
    drain_and_exit(d)

    raw = read_directory_raw(tmp_path / "objects")
    check_objects(raw, DIR_KEY_RE, expected_from(reqs), t0, t1)
    longest_line = max(len(ln) + 1 for body in raw.values() for ln in body.split(b"\n")[:-1]
                       if b'"mb-big"' not in ln)
    oversized = {k: b for k, b in raw.items() if len(b) > max_bytes}
    assert [b.count(b"\n") for b in oversized.values()] == [1], "only the one big line may exceed max_bytes, alone"
    assert b'"mb-big"' in next(iter(oversized.values()))
    # a batch is closed early only when the next line does not fit, so all but each uploader's
    # last flush (and the batch closed in front of the big line) are nearly full
    short = [len(b) for b in raw.values() if len(b) <= max_bytes - longest_line]
    assert len(short) <= workers + 1, f"{len(short)} objects far below max_bytes: {sorted(short)}"
    assert len(raw) > 5, "max_bytes never cut a batch"


def test_max_age_flushes_without_shutdown(daemon_factory, tmp_path):
    d = daemon_factory({"batch": {"max_age_ms": 300}}).start()
    assert post(d.url, {"version": "v", "data": [{"id": "lonely"}]}).status_code == 202
    objects = wait_for(lambda: read_directory_sink(tmp_path / "objects"), 5, "the lone payload to be flushed by age")
    assert d.proc is not None and d.proc.poll() is None, "the daemon stopped"
    assert [line["payload"] for lines in objects.values() for line in lines] == [{"id": "lonely"}]
    assert d.health()["counters"]["uploaded_payloads"] == 1
    drain_and_exit(d)
    assert len(read_directory_sink(tmp_path / "objects")) == 1, "the drain wrote the payload again"


# -- directory sink, request encodings ----------------------------------------------------------------

def test_directory_sink_json_ndjson_and_gzip_requests(daemon_factory, tmp_path):
    d = daemon_factory(env=NON_UTC_ENV).start()
    expected: dict[str, tuple[str | None, dict[str, Any]]] = {}
    t0 = time.time()

    def send(kind: str, body: bytes, content_type: str, gz: bool, payloads: list[dict[str, Any]],
             version: str | None) -> None:
        headers = {"Content-Type": content_type}
        if gz:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        r = post(d.url, body, headers)
        assert r.status_code == 202, f"{kind}: {r.status_code} {r.text}"
        assert r.json() == {"accepted": len(payloads)}, kind
        expected.update({p["id"]: (version, p) for p in payloads})

    for round_ in range(5):
        for kind, ctype, gz in [("json", "application/json", False), ("json-gz", "application/json", True),
                                ("json-charset", "application/json; charset=utf-8", False),
                                ("ndjson", "application/x-ndjson", False), ("ndjson-gz", "application/x-ndjson", True)]:
            payloads = [{"id": f"{kind}-{round_}-{i}", "k": kind, "s": "ü✓"} for i in range(round_ + 1)]
            if kind.startswith("ndjson"):
                body = b"".join(orjson.dumps(p) + b"\n" for p in payloads)
                send(kind, body, ctype, gz, payloads, None)
            else:
                send(kind, orjson.dumps({"version": f"v{round_}", "data": payloads}), ctype, gz, payloads, f"v{round_}")
    # NDJSON without a final newline and with blank lines
    tail = [{"id": "ndjson-tail-0"}, {"id": "ndjson-tail-1"}]
    send("ndjson-tail", b"\n" + orjson.dumps(tail[0]) + b"\n\n" + orjson.dumps(tail[1]), "application/x-ndjson",
         False, tail, None)
    t1 = time.time()
    drain_and_exit(d)

    root = tmp_path / "objects"
    raw = read_directory_raw(root)
    check_objects(raw, DIR_KEY_RE, expected, t0, t1)
    assert all(k.endswith(".ndjson.gz") for k in raw)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert all(re.fullmatch(r"dt=\d{4}-\d\d-\d\d/hour=\d\d", p.parent.relative_to(root).as_posix()) for p in files)
    assert hidden_files(root) == [], "temp files left in the directory sink"
    # a clean drain leaves nothing to deliver again
    assert spool_lines(tmp_path) == []


# -- signals and drain -------------------------------------------------------------------------------

def test_sigint_to_the_group_drains_like_sigterm(daemon_factory, tmp_path):
    # Ctrl-C in a terminal signals the whole foreground group: uploaders must not die of it
    d = daemon_factory({"batch": {"max_age_ms": 60000}}).start()
    d.wait_uploaders_running()  # Ctrl-C while they boot: test_sigint_while_uploaders_boot_kills_none
    reqs = make_requests("int", 60, seed=5)
    t0 = time.time()
    post_all(d.url, reqs, threads=3)
    t1 = time.time()
    assert d.proc is not None
    os.killpg(d.proc.pid, signal.SIGINT)
    assert d.wait(30) == 0, d.log()
    check_objects(read_directory_raw(tmp_path / "objects"), DIR_KEY_RE, expected_from(reqs), t0, t1)
    log = d.log()
    assert "received SIGINT" in log
    # each uploader left by draining, none died of the Ctrl-C and was replaced
    assert log.count("exited after draining") == 4 and "restarting in" not in log, log  # 2 uploaders, 2 listeners
    assert spool_lines(tmp_path) == []


def test_sigint_while_uploaders_boot_kills_none(daemon_factory, tmp_path):
    """Ctrl-C right after start: a booting uploader must not die of it (and be respawned)."""
    d = daemon_factory().start(ready=False)
    wait_for(lambda: "spawned uploader 1 " in d.log(), 10, "the uploaders to be spawned")
    assert d.proc is not None
    os.killpg(d.proc.pid, signal.SIGINT)
    assert d.wait(30) == 0, d.log()
    log = d.log()
    assert "stopped by signal 2" not in log and "KeyboardInterrupt" not in log, log


def test_sigterm_under_load_keeps_every_acknowledged_payload(daemon_factory, tmp_path):
    """Clients keep sending while the daemon drains: 202 means stored, 503 means not stored."""
    d = daemon_factory().start()
    acked: list[str] = []
    refused: list[str] = []
    unknown: list[str] = []  # the connection broke: the request may or may not have been kept
    odd: list[str] = []  # answers other than 202, or 503 with Retry-After
    lock = threading.Lock()
    started = threading.Barrier(5)

    def client(n: int) -> None:
        started.wait(10)
        with requests.Session() as s:
            for r in range(400):  # bounded; each client stops at its first 503 or broken connection
                ids = [f"load-c{n}-r{r}-p{i}" for i in range(5)]
                try:
                    resp = s.post(d.url + "/v1/payloads", data=orjson.dumps({"data": [{"id": x} for x in ids]}),
                                  headers={"Content-Type": "application/json"}, timeout=10)
                except requests.RequestException:
                    with lock:
                        unknown.extend(ids)
                    return
                with lock:
                    if resp.status_code == 202:
                        acked.extend(ids)
                        continue
                    refused.extend(ids)
                    if resp.status_code != 503 or not resp.headers.get("Retry-After"):
                        odd.append(f"{resp.status_code} {resp.headers} {resp.text[:200]}")
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    started.wait(10)
    wait_for(lambda: len(acked) >= 200, 10, "some requests to be acknowledged")
    d.signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert d.wait(30) == 0, d.log()
    assert not any(t.is_alive() for t in threads), "client threads did not finish"
    assert refused, "no request was refused while draining"
    assert not odd, f"under drain the only answers are 202 and 503 with Retry-After: {odd[:3]}"

    stored = [line["payload"]["id"] for lines in read_directory_sink(tmp_path / "objects").values() for line in lines]
    counts = Counter(stored)
    assert not [k for k, v in counts.items() if v > 1], "payloads stored twice"
    assert not set(acked) - set(stored), describe_diff(stored, acked)
    assert not set(stored) & set(refused), "a payload answered 503 was stored"
    assert not set(stored) - set(acked) - set(unknown), "payloads stored that were never sent"


def test_drain_with_a_hanging_sink_spills_to_the_spool(daemon_factory, stalled_s3_tables, stalled_sink, tmp_path):
    drain_timeout = 2.0
    d = daemon_factory({**stalled_s3_tables, "shutdown": {"drain_timeout_s": drain_timeout},
                        "http": {"retry_after_s": 7}}).start()
    reqs = make_requests("hang", 30, seed=6, lo=1, hi=10)
    post_all(d.url, reqs, threads=2)
    wait_for(lambda: stalled_sink.accepted > 0, 10, "an upload attempt to reach the hanging sink")
    health = d.health()
    assert health["status"] == "degraded" or health["counters"]["failed_uploads"] == 0, health

    d.signal(signal.SIGTERM)
    began = time.monotonic()

    def draining() -> tuple[requests.Response] | None:
        r = requests.get(d.url + "/health", timeout=5)
        return (r,) if r.json()["status"] == "draining" else None  # a 503 Response is falsy itself

    (r,) = wait_for(draining, 5, "/health to report draining")
    assert r.status_code == 503, r.text
    # the uploaders hang on the sink, so "not ready" comes from the drain alone
    assert any(w["alive"] for w in r.json()["workers"]), r.text
    r = requests.get(d.url + "/health/ready", timeout=5)
    assert r.status_code == 503, r.text
    assert r.json()["status"] == "draining", r.text
    assert requests.get(d.url + "/health/live", timeout=5).status_code == 200
    r = post(d.url, {"data": [{"id": "too-late"}]})
    assert r.status_code == 503, r.text
    assert r.headers.get("Retry-After") == "7"
    assert set(r.json()) == {"title", "description"}

    assert d.wait(drain_timeout + 15) == 0, d.log()
    elapsed = time.monotonic() - began
    assert elapsed >= drain_timeout - 0.5, f"exited after {elapsed:.1f}s, before the drain deadline"
    assert elapsed < drain_timeout + 2, f"exited after {elapsed:.1f}s: the SPEC allows drain_timeout_s + 2 s"
    lines = spool_lines(tmp_path)
    stored = [line["payload"]["id"] for line in lines]
    assert Counter(stored) == Counter(list(expected_from(reqs))), describe_diff(stored, expected_from(reqs))
    expected = expected_from(reqs)
    for line in lines:
        version, payload = expected[line["payload"]["id"]]
        assert (line["version"], line["payload"]) == (version, payload)
        assert RECEIVED_AT_RE.match(line["received_at"])


def test_each_failed_attempt_is_one_request_to_the_store(daemon_factory, tmp_path):
    """The uploader owns the retries (backoff, jitter, drain deadline, `failed_uploads`).

    So every attempt it counts must be exactly one request to the store: a client library
    retrying underneath doubles the load on a store that is already throttling, and makes
    counters.failed_uploads ("each retry counts") undercount what the store saw.
    """
    from tests.harness import FailingS3Server

    with FailingS3Server() as store:
        d = daemon_factory({"sink": {"kind": "s3", "bucket": "throttled", "endpoint_url": store.url,
                                     "region": "us-east-1", "retry_base_ms": 20, "retry_max_ms": 50},
                            "shutdown": {"drain_timeout_s": 1}}).start()
        assert post(d.url, {"data": [{"id": "retried"}]}).status_code == 202
        wait_for(lambda: d.health()["counters"]["failed_uploads"] >= 4, 10, "some failed upload attempts")
        seen = store.requests
        counted = d.health()["counters"]["failed_uploads"]
        assert d.health()["status"] == "degraded"
        # at most one attempt may be under way between the two readings
        assert seen <= counted + 1, f"the store saw {seen} requests for {counted} counted attempts"
        drain_and_exit(d)
    assert [line["payload"]["id"] for line in spool_lines(tmp_path)] == ["retried"]


# -- restarts on the same port -------------------------------------------------------------------------

def _close_from_server_side(d: Daemon, n: int = 3) -> None:
    # "Connection: close" makes the server close first, leaving TIME_WAIT sockets on its port
    for i in range(n):
        r = post(d.url, {"data": [{"id": f"first-{i}"}]}, headers={"Connection": "close"})
        assert r.status_code == 202, r.text


@pytest.mark.parametrize("how", ["sigterm", "sigkill-group"])
def test_restart_on_the_same_port(daemon_factory, tmp_path, how):
    first = daemon_factory().start()
    port = first.port
    _close_from_server_side(first)
    if how == "sigterm":
        drain_and_exit(first)
    else:
        first.kill_group()
    second = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}}).start(timeout=15)
    assert second.port == port
    r = post(second.url, {"data": [{"id": "second"}]})
    assert r.status_code == 202, r.text
    drain_and_exit(second)
    stored = [line["payload"]["id"] for lines in read_directory_sink(tmp_path / "objects").values() for line in lines]
    assert "second" in stored
    if how == "sigterm":
        assert Counter(stored) == Counter(["first-0", "first-1", "first-2", "second"])


# -- commands ----------------------------------------------------------------------------------------

def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ingestd_command() + args, cwd=cwd, capture_output=True, text=True, timeout=30)


def test_version_command(tmp_path):
    p = _run(["--version"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"ingestd {ingestd.__version__}"


def test_check_config_prints_the_effective_config(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text('[http]\nlisten = "127.0.0.1:9999"\n\n[batch]\nmax_payloads = 7\n')
    p = _run(["check-config", "--config", str(path)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert re.search(r'^listen = "127\.0\.0\.1:9999"', p.stdout, re.M), p.stdout
    assert re.search(r"^max_payloads = 7\b", p.stdout, re.M), p.stdout
    assert re.search(r'^kind = "directory"', p.stdout, re.M), "defaults missing from the effective config"
    assert not (tmp_path / "data").exists(), "check-config created the data folders"


@pytest.mark.parametrize("text, key", [
    ("[batch]\nmax_payloads = 0\n", "max_payloads"),
    ("[http]\nlisten = \"127.0.0.1:0\"\nbogus_key = 1\n", "bogus_key"),
    ("[batch]\ncompression = \"brotli\"\n", "compression"),
    ("[queue]\nmax_items = \"many\"\n", "max_items"),
    ("[nosuchtable]\nx = 1\n", "nosuchtable"),
])
def test_check_config_refuses_a_bad_file_naming_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    p = _run(["check-config", "--config", str(path)], tmp_path)
    assert p.returncode != 0, p.stdout
    assert key in p.stderr, p.stderr
    assert str(path) in p.stderr, p.stderr


def test_daemon_refuses_a_bad_config_at_start(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[shutdown]\ndrain_timeout_s = -1\n")
    p = subprocess.run(ingestd_command() + ["--config", str(path)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode != 0
    assert "drain_timeout_s" in p.stderr and str(path) in p.stderr, p.stderr
