"""Supervision with real processes and real signals: uploaders that die come back, nothing is lost."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path

import requests

from tests.harness import payload_ids, read_bucket, read_directory_sink, spool_lines, wait_for


class Load:
    """Client threads posting payloads with unique ids; remembers what was acknowledged."""

    def __init__(self, url: str, threads: int, requests_per_thread: int, payloads: int,
                 fresh_connections: bool = False) -> None:
        self.url = url
        self.fresh = fresh_connections
        self.acked: list[str] = []
        self.refused: list[str] = []
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(t, requests_per_thread, payloads))
                         for t in range(threads)]

    def _run(self, t: int, n: int, k: int) -> None:
        session = requests.Session()
        for r in range(n):
            ids = [f"t{t}-r{r}-p{i}" for i in range(k)]
            try:
                resp = session.post(self.url + "/v1/payloads", json={"version": "1", "data": [{"id": x} for x in ids]},
                                    timeout=10, headers={"Connection": "close"} if self.fresh else None)
                status = resp.status_code
            except requests.RequestException:
                status = 0
            with self._lock:
                self.statuses[status] += 1
                (self.acked if status == 202 else self.refused).extend(ids)

    def start(self) -> Load:
        for th in self._threads:
            th.start()
        return self

    def join(self) -> None:
        for th in self._threads:
            th.join(120)

    @property
    def done(self) -> int:
        with self._lock:
            return sum(self.statuses.values())


def process_running(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by whoever adopted it) is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def metric_values(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=5).text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def assert_metrics_between(before: dict, url: str, health) -> None:
    """Under load, /metrics read between two /health reads lies between them, counter by counter."""
    values = metric_values(url)
    after = health()
    for name, low in before["counters"].items():
        assert low <= values[f"ingestd_{name}_total"] <= after["counters"][name], name


def check_delivery(load: Load, stored: list[str]) -> dict[str, int]:
    counts = Counter(stored)
    missing = [x for x in load.acked if counts[x] == 0]
    assert not missing, f"{len(missing)} acknowledged payloads lost, e.g. {missing[:5]}"
    refused_but_stored = [x for x in load.refused if counts[x]]
    assert not refused_but_stored, f"refused payloads were kept: {refused_but_stored[:5]}"
    assert set(counts) == set(load.acked)
    return {"acknowledged": len(load.acked), "landed": len(counts),
            "duplicates": sum(c - 1 for c in counts.values())}


def test_sigkill_uploaders_under_load_loses_nothing(daemon_factory, s3_tables, s3, bucket, tmp_path):
    d = daemon_factory({**s3_tables, "workers": {"count": 2}, "batch": {"max_payloads": 100, "max_age_ms": 100}}).start()
    load = Load(d.url, threads=3, requests_per_thread=250, payloads=5).start()
    kills = 0
    try:
        for _ in range(6):  # kill an uploader, wait for its successor, again
            start = load.done
            wait_for(lambda: load.done >= start + 40 or not any(t.is_alive() for t in load._threads), 60, "load")
            health = d.health()
            assert_metrics_between(health, d.url, d.health)
            workers = health["workers"]
            victim = workers[kills % len(workers)]
            os.kill(victim["pid"], signal.SIGKILL)
            kills += 1
            wait_for(lambda: any(w["index"] == victim["index"] and w["alive"] and w["pid"] != victim["pid"]
                                 for w in d.health()["workers"]), 30, "the uploader to be restarted")
    finally:
        load.join()
    health = d.health()
    # the queue needs no repair after a kill: each kill restarts exactly its victim
    assert sum(w["restarts"] for w in health["workers"]) == kills, health["workers"]
    assert health["epoch"] == 1 + kills, health
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()
    figures = check_delivery(load, payload_ids(read_bucket(s3, bucket)))
    print("kill-under-load:", kills, "kills,", figures, dict(load.statuses))
    assert figures["acknowledged"] > 0 and load.statuses[202] > 0
    assert figures["duplicates"] == 0, figures


def test_hung_uploader_is_killed_and_replaced(daemon_factory, tmp_path):
    d = daemon_factory({"workers": {"count": 1, "heartbeat_timeout_s": 1.0}}).start()
    victim = d.health()["workers"][0]
    os.kill(victim["pid"], signal.SIGSTOP)  # alive, but silent
    try:
        wait_for(lambda: d.health()["workers"][0]["restarts"] == 1 and d.health()["workers"][0]["alive"],
                 30, "the hung uploader to be replaced")
    finally:
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "silent for" in d.log()
    resp = requests.post(d.url + "/v1/payloads", json={"data": [{"id": "after-hang"}]}, timeout=10)
    assert resp.status_code == 202
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    assert payload_ids(read_directory_sink(tmp_path / "objects")) == ["after-hang"]


def test_uploader_that_cannot_boot_ends_in_fatal_not_a_restart_storm(daemon_factory, tmp_path, s3_tables):
    broken = tmp_path / "aws-config"
    broken.write_text("[default\nthis is not an ini file\n")
    d = daemon_factory({**s3_tables, "workers": {"count": 2, "boot_failures_fatal": 3}},
                       env={"AWS_CONFIG_FILE": str(broken)}).start(ready=False)
    code = d.wait(60)
    log = d.log()
    assert code == 4, log
    assert "failed to boot 3 times in a row" in log
    assert log.count("spawned uploader") <= 2 * 3


def test_restarted_daemon_delivers_what_a_killed_tree_left_in_flight(daemon_factory, tmp_path):
    """SIGKILL of the whole tree mid-batch: what the uploaders had taken is still in the request
    logs (on tmpfs: the kernel keeps written pages), and the next start sends it, once."""
    cfg = {"batch": {"max_age_ms": 60000, "max_payloads": 1000}}  # hold batches open
    d = daemon_factory(cfg).start()
    ids = [f"held-{i}" for i in range(30)]
    for i in range(0, 30, 3):
        r = requests.post(d.url + "/v1/payloads", json={"data": [{"id": x} for x in ids[i:i + 3]]}, timeout=10)
        assert r.status_code == 202
    wait_for(lambda: sum(w["pending_payloads"] for w in d.health()["workers"]) == 30, 10,
             "uploaders to take every item")
    d.kill_group()
    assert read_directory_sink(tmp_path / "objects") == {}
    d2 = daemon_factory({"batch": {"max_age_ms": 100}}).start()
    wait_for(lambda: len(payload_ids(read_directory_sink(tmp_path / "objects"))) >= 30, 30, "redelivery")
    d2.signal(signal.SIGTERM)
    assert d2.wait(30) == 0
    assert Counter(payload_ids(read_directory_sink(tmp_path / "objects"))) == Counter(ids)
    assert spool_lines(tmp_path) == []


def test_health_and_metrics_agree(daemon_factory):
    d = daemon_factory().start()
    for i in range(5):
        assert requests.post(d.url + "/v1/payloads", json={"data": [{"id": i}, {"id": -i}]}, timeout=10).status_code == 202
    assert requests.post(d.url + "/v1/payloads", data=b"{", headers={"Content-Type": "application/json"},
                         timeout=10).status_code == 400
    wait_for(lambda: d.health()["counters"]["uploaded_payloads"] == 10, 20, "uploads")
    health = d.health()
    metrics = requests.get(d.url + "/metrics", timeout=5).text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    for name, value in health["counters"].items():
        assert values[f"ingestd_{name}_total"] == value, name
    assert values["ingestd_queue_capacity"] == health["queue"]["capacity"]
    assert values["ingestd_uploaders_alive"] == 2
    assert health["counters"]["accepted_payloads"] == 10
    assert health["counters"]["rejected_requests"] == 1
    for w in health["workers"]:
        assert w["rss_bytes"] > 1_000_000 and w["restarts"] == 0 and isinstance(w["cpu_percent"], float)
    assert health["rss_bytes"] > 1_000_000
    assert requests.get(d.url + "/health/live", timeout=5).status_code == 200
    assert requests.get(d.url + "/health/ready", timeout=5).status_code == 200
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0


def test_supervisor_sigkill_orphans_flush_and_restart_on_same_port_loses_nothing(daemon_factory, tmp_path):
    """SIGKILL of the supervisor alone: its children die with it (PR_SET_PDEATHSIG); a new daemon
    started at once on the same port and spool waits until each of them is gone (their locks),
    then delivers everything the logs hold, once."""
    d = daemon_factory({"batch": {"max_age_ms": 60000, "max_payloads": 1000}}).start()
    ids = [f"orphan-{i}" for i in range(40)]
    for i in range(0, 40, 4):
        assert requests.post(d.url + "/v1/payloads", json={"data": [{"id": x} for x in ids[i:i + 4]]},
                             timeout=10).status_code == 202
    wait_for(lambda: sum(w["pending_payloads"] for w in d.health()["workers"]) == 40, 10, "uploaders to take all")
    orphans = d.uploader_pids()
    d.signal(signal.SIGKILL)
    d.wait(10)
    d2 = daemon_factory({"http": {"listen": f"127.0.0.1:{d.port}"}}).start()
    assert d2.port == d.port
    wait_for(lambda: not any(process_running(pid) for pid in orphans), 30, "orphans to exit")
    wait_for(lambda: len(payload_ids(read_directory_sink(tmp_path / "objects"))) >= 40, 30, "delivery")
    d2.signal(signal.SIGTERM)
    assert d2.wait(30) == 0
    counts = Counter(payload_ids(read_directory_sink(tmp_path / "objects")))
    assert counts == Counter(ids), counts
    print("supervisor-kill: acknowledged=40 landed=%d duplicates=%d" % (len(counts), sum(counts.values()) - len(counts)))


def test_lame_duck_keeps_accepting_while_readiness_says_503_then_drains(daemon_factory, tmp_path):
    d = daemon_factory({"shutdown": {"lame_duck_s": 3}}).start()
    ids = iter(f"lame-{i}" for i in range(10_000))
    sent: list[str] = []

    def send_one() -> int:
        pid = next(ids)
        r = requests.post(d.url + "/v1/payloads", json={"data": [{"id": pid}]}, timeout=10)
        if r.status_code == 202:
            sent.append(pid)
        return r.status_code

    assert send_one() == 202
    d.signal(signal.SIGTERM)

    def lame() -> dict | None:
        r = requests.get(d.url + "/health/ready", timeout=5)
        return r.json() if r.status_code == 503 else None

    health = wait_for(lame, 5, "readiness to answer 503")
    assert any("lame_duck_s" in reason for reason in health["reasons"]), health
    # still accepting: the load balancer has not taken the host out yet
    statuses = Counter(send_one() for _ in range(20))
    assert statuses == {202: 20}, statuses
    assert d.proc is not None and d.proc.poll() is None
    assert d.wait(30) == 0, d.log()
    assert sorted(payload_ids(read_directory_sink(tmp_path / "objects"))) == sorted(sent)
    assert "lame duck" in d.log()


def test_a_second_sigterm_ends_the_lame_duck_at_once(daemon_factory):
    d = daemon_factory({"shutdown": {"lame_duck_s": 600}}).start()
    d.signal(signal.SIGTERM)
    wait_for(lambda: requests.get(d.url + "/health/ready", timeout=5).status_code == 503, 5, "the lame duck")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
