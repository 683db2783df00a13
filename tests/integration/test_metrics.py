"""The histograms of /metrics against a real daemon: what was sent, answered, landed and stored
is what they count, summed over every listener and uploader, and across a child's restart."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import requests

from ingestd.histograms import Observed, parse
from tests.harness import Daemon, post, wait_for

LABELS_2XX = (("status", "2xx"),)
LABELS_4XX = (("status", "4xx"),)


def histograms(d: Daemon) -> dict[str, dict[tuple[tuple[str, str], ...], Observed]]:
    return parse(requests.get(d.url + "/metrics", timeout=5).text)


def stored_objects(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.ndjson*") if not p.name.startswith(".")]


def send(d: Daemon, requests_: int, first: int) -> int:
    """`requests_` requests of 1 to 5 payloads; returns the payloads sent."""
    sent = 0
    for i in range(requests_):
        n = 1 + (first + i) % 5
        r = post(d.url, {"data": [{"id": f"{first + i}-{k}"} for k in range(n)]})
        assert r.status_code == 202, r.text
        sent += n
    return sent


def landed(d: Daemon, payloads: int) -> dict[str, dict[tuple[tuple[str, str], ...], Observed]] | None:
    h = histograms(d)
    return h if h["ingestd_object_payloads"][()].sum == payloads else None


def check(h: dict[str, dict[tuple[tuple[str, str], ...], Observed]], objects: list[Path], requests_: int,
          bad: int, payloads: int, max_age_s: float) -> None:
    request = h["ingestd_request_seconds"]
    assert request[LABELS_2XX].observations == requests_
    assert request[LABELS_4XX].observations == bad
    assert 0 < request[LABELS_2XX].sum < requests_ * 1.0  # each well under a second
    landing = h["ingestd_landing_seconds"][()]
    assert landing.observations == payloads  # one sample per payload
    assert 0 < landing.sum / payloads <= max_age_s + 5  # at most max_age, then the PUT (on a busy machine, more)
    assert (landing.quantile(1.0) or 0) <= 10
    sizes = h["ingestd_object_bytes"][()]
    counts = h["ingestd_object_payloads"][()]
    puts = h["ingestd_put_seconds"]
    assert counts.sum == payloads
    assert counts.observations == sizes.observations == puts[(("outcome", "ok"),)].observations == len(objects)
    assert puts[(("outcome", "error"),)].observations == 0
    assert sizes.sum == sum(p.stat().st_size for p in objects)  # as stored
    for series in h.values():
        for o in series.values():
            cumulative = [n for _, n in o.buckets]
            assert cumulative == sorted(cumulative) and cumulative[-1] == o.observations


def test_histograms_count_what_was_answered_landed_and_stored(daemon_factory: Any, tmp_path: Path) -> None:
    max_age_s = 0.2
    d = daemon_factory({"http": {"listeners": 2}, "workers": {"count": 2},
                        "batch": {"max_payloads": 20, "max_age_ms": int(max_age_s * 1000)}}).start()
    payloads = send(d, 60, 0)
    assert post(d.url, b"{not json").status_code == 400
    h = wait_for(lambda: landed(d, payloads), 30, f"{payloads} payloads to land")
    check(h, stored_objects(tmp_path / "objects"), 60, 1, payloads, max_age_s)
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0


def test_histograms_go_on_counting_across_restarts_of_children(daemon_factory: Any, tmp_path: Path) -> None:
    max_age_s = 0.2
    d = daemon_factory({"http": {"listeners": 2}, "workers": {"count": 2},
                        "batch": {"max_payloads": 20, "max_age_ms": int(max_age_s * 1000)}}).start()
    payloads = send(d, 40, 0)
    before = wait_for(lambda: landed(d, payloads), 30, f"{payloads} payloads to land")
    health = d.health()
    victims = {("listeners", 0): health["listeners"][0]["pid"], ("workers", 1): health["workers"][1]["pid"]}
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        try:
            now = d.health()
        except requests.RequestException:  # a connection that reached the killed listener's socket
            return False
        return all(now[group][i]["alive"] and now[group][i]["pid"] != pid and now[group][i]["state"] == "running"
                   for (group, i), pid in victims.items())

    wait_for(restarted, 30, "the killed listener and uploader to be back")
    wait_for(d.is_ready, 30, "readiness after the restarts")
    payloads += send(d, 40, 40)
    after = wait_for(lambda: landed(d, payloads), 30, f"{payloads} payloads to land")
    for name, series in before.items():  # nothing went backwards
        for labels, o in series.items():
            assert after[name][labels].observations >= o.observations, (name, labels)
            assert after[name][labels].sum >= o.sum, (name, labels)
    check(after, stored_objects(tmp_path / "objects"), 80, 0, payloads, max_age_s)
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
