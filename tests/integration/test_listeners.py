"""Several listener processes sharing the supervisor's socket (http.listeners > 1): real processes."""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest
import requests

from tests.harness import payload_ids, read_bucket, read_directory_sink, wait_for
from tests.integration.test_supervision import Load, check_delivery

pytestmark = pytest.mark.every_front


def listener_pids(d) -> dict[int, int | None]:
    try:
        return {x["index"]: x["pid"] for x in d.health()["listeners"]}
    except requests.ConnectionError:  # a connection queued on a listener as it was killed is reset
        return {}


def test_two_listeners_share_the_port_and_a_drain_under_load_loses_nothing(daemon_factory, s3_tables, s3, bucket):
    d = daemon_factory({**s3_tables, "http": {"listen": "127.0.0.1:0", "listeners": 2},
                        "batch": {"max_payloads": 100, "max_age_ms": 100}}).start()
    wait_for(lambda: len(listener_pids(d)) == 2 and all(listener_pids(d).values()), 30, "both listeners up")
    # many short-lived connections: the kernel spreads them over both sockets
    load = Load(d.url, threads=4, requests_per_thread=200, payloads=3, fresh_connections=True).start()
    wait_for(lambda: load.done >= 200, 60, "load")
    served = {x["index"]: x["accepted_requests"] for x in d.health()["listeners"]}
    assert all(n > 0 for n in served.values()), served  # both processes answered
    d.signal(signal.SIGTERM)  # mid-load: the rest get 503 or connection errors
    load.join()
    assert d.wait(60) == 0, d.log()
    figures = check_delivery(load, payload_ids(read_bucket(s3, bucket)))
    print("two-listener drain under load:", figures, dict(load.statuses), served)
    assert load.statuses[202] > 0 and figures["duplicates"] == 0
    assert "listener 1: exiting" in d.log()


def test_a_killed_listener_is_restarted_and_health_agrees_across_processes(daemon_factory, tmp_path):
    d = daemon_factory({"http": {"listen": "127.0.0.1:0", "listeners": 2}}).start()
    wait_for(lambda: len(listener_pids(d)) == 2 and all(listener_pids(d).values()), 30, "both listeners up")
    child = listener_pids(d)[1]
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: listener_pids(d).get(1) not in (None, child), 30, "the listener to be restarted")
    ids = [f"after-{i}" for i in range(60)]
    session_less = [requests.post(d.url + "/v1/payloads", json={"data": [{"id": x}]}, timeout=10,
                                  headers={"Connection": "close"}) for x in ids]
    assert all(r.status_code == 202 for r in session_less)
    # whichever process answers /health, it reads the same board
    snaps = [requests.get(d.url + "/health", headers={"Connection": "close"}, timeout=5).json() for _ in range(10)]
    wait_for(lambda: d.health()["counters"]["uploaded_payloads"] >= 60, 20, "uploads")
    for snap in snaps:
        assert snap["counters"]["accepted_payloads"] == 60  # summed over both listeners' rows
        assert {w["index"] for w in snap["workers"]} == {0, 1} and all(w["alive"] for w in snap["workers"])
        assert snap["rss_bytes"] > 1_000_000
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    assert Counter(payload_ids(read_directory_sink(tmp_path / "objects"))) == Counter(ids)
    assert "listener 1 stopped by signal 9" in d.log()
