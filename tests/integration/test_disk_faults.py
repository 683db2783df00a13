"""Disk faults for real: full and read-only file systems, the spool cap, torn and damaged files.

A small tmpfs is mounted by the test (tests and CI run as root; skipped with the reason where
mounting is refused) under the request logs, the spool or the directory sink, and grown or
remounted read-write while the daemon runs. Expected every time: 503 with Retry-After (never
a 202) while the spool cannot take a request, `/health` not ready and saying why, service back
by itself once space returns, and every acknowledged payload landed exactly once.

Torn files are made the way the SPEC describes: a valid file, cut mid-record (or with the start
of a record appended, as a write torn by a crash leaves it), then the daemon started on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from ingestd.records import parse_request, scan
from tests.faults import (  # noqa: F401 - fixtures are used by name
    BATCH,
    check_delivery,
    fault_proxy,
    FaultProxy,
    Ledger,
    run_ingestd,
    s3_tables,
    unique_prefix,
)
from tests.harness import Daemon, logs_root, payload_ids, read_bucket, read_directory_sink, spool_lines, wait_for

FAST_RETRY = {"retry_base_ms": 20, "retry_max_ms": 200}


class Tmpfs:
    """A tmpfs mounted at `path` for the test; resized or made read-only while the daemon runs."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): disk-full tests need root and mount")

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    mounted: list[Tmpfs] = []

    def mount(name: str, size: str) -> Tmpfs:
        fs = Tmpfs(tmp_path / name, size)
        mounted.append(fs)
        return fs

    try:
        yield mount
    finally:
        for fs in mounted:
            fs.unmount()


def send_until_refused(d: Daemon, ledger: Ledger, prefix: str, most: int = 2000, pad: int = 900) -> int:
    """Post 1-payload requests until one is refused; returns how many were acknowledged."""
    statuses = ledger.send_many(d.url, prefix, most, 1, pad=pad, until=lambda s: s != 202)
    assert statuses[-1] == 503, f"never refused after {len(statuses)} requests: {set(statuses)}"
    return statuses.count(202)


def assert_refusing(d: Daemon, ledger: Ledger, prefix: str, why: str) -> None:
    """503 with Retry-After for every request (not one 202), and /health not ready saying why."""
    statuses = ledger.send_many(d.url, prefix, 10, 1, pad=100)
    assert set(statuses) == {503}, statuses
    r = requests.post(d.url + "/v1/payloads", json={"data": [{"id": f"{prefix}-probe"}]}, timeout=10)
    ledger.record(r.status_code, [f"{prefix}-probe"], r)
    assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
    health = requests.get(d.url + "/health", timeout=5)
    assert health.status_code == 503, health.text
    assert any(why in reason for reason in health.json()["reasons"]), health.json()


def accepting(d: Daemon, ledger: Ledger, prefix: str) -> bool:
    return ledger.send(d.url, [f"{prefix}-{len(ledger.statuses)}-{ledger.statuses[202]}"]) == 202


# -- full file systems ---------------------------------------------------------------------------------

@pytest.mark.parametrize("durability", ["memory", "disk"])
def test_full_tmpfs_under_the_logs_refuses_then_resumes_by_itself(daemon_factory, tmpfs, fault_proxy: FaultProxy,
                                                                  s3, bucket, tmp_path, durability):
    fs = tmpfs("logs", "512k")
    spool = {"durability": durability}
    spool.update({"memory_path": str(fs.path)} if durability == "memory" else {"path": str(fs.path / "spool")})
    fault_proxy.set_mode("503")  # nothing lands: the logs fill the tmpfs
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url, **FAST_RETRY), "batch": BATCH, "spool": spool}).start()
    ledger = Ledger()
    acked = send_until_refused(d, ledger, unique_prefix("full"))
    assert acked > 50, acked
    assert_refusing(d, ledger, unique_prefix("still-full"), "request log not writable")

    fs.remount("size=16m")  # space returns: no restart, no request needed to notice
    wait_for(d.is_ready, 15, "ready again once there is room")
    resumed = unique_prefix("resumed")
    wait_for(lambda: accepting(d, ledger, resumed), 10, "202 again")
    fault_proxy.set_mode(None)
    wait_for(lambda: d.health()["counters"]["uploaded_payloads"] >= ledger.acked_payloads, 30, "delivery")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    check_delivery(f"full-tmpfs-logs-{durability}", ledger, payload_ids(read_bucket(s3, bucket)))
    assert spool_lines(d.workdir) == []


def test_a_log_folder_that_refuses_writes_answers_503_then_resumes(daemon_factory, tmpfs, tmp_path):
    """Write errors that are not a full disk (here EACCES): 503, not ready, back by itself.

    A read-only remount would be the natural fault, but Linux refuses it while files are open
    for writing (the logs always are), and root passes every permission check: so the daemon
    runs without CAP_DAC_OVERRIDE (setpriv) and the test takes the write permission of its log
    folder away."""
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing: cannot run the daemon without CAP_DAC_OVERRIDE")
    fs = tmpfs("logs", "16m")
    d = daemon_factory({"batch": BATCH, "spool": {"memory_path": str(fs.path)}})
    d.wrap = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    d.start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix("before"), 30, 2, pad=100)
    assert ledger.statuses == {202: 30}, ledger.statuses
    logs = fs.path / "logs"
    folders = [logs, *(p for p in logs.iterdir() if p.is_dir())]
    for folder in folders:
        os.chmod(folder, 0o555)  # the next segment (a second at most) cannot be created
    denied = unique_prefix("denied")

    def every_listener_refused() -> bool:
        ledger.send(d.url, [f"{denied}-{sum(ledger.statuses.values())}"])  # the kernel spreads them
        health = d.health()
        return all(x["log_error"] for x in health["listeners"]) and not health["ready"]

    wait_for(every_listener_refused, 15, "every listener to find its log folder refusing writes")
    assert_refusing(d, ledger, unique_prefix("still-denied"), "request log not writable")
    for folder in folders:
        os.chmod(folder, 0o755)
    wait_for(d.is_ready, 15, "ready again once writable")
    wait_for(lambda: accepting(d, ledger, unique_prefix("allowed")), 10, "202 again")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    check_delivery("log-folder-refusing-writes", ledger, payload_ids(read_directory_sink(tmp_path / "objects")))
    assert spool_lines(tmp_path) == []


def test_full_directory_sink_is_retried_not_dead_lettered(daemon_factory, tmpfs, tmp_path):
    fs = tmpfs("sink", "256k")
    d = daemon_factory({"sink": {"path": str(fs.path), **FAST_RETRY}, "batch": {**BATCH, "compression": "none"}}).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix("sink-full"), 400, 1, pad=900)  # ~400 KB of objects for 256 KB
    assert ledger.statuses[202] == 400, ledger.statuses
    wait_for(lambda: d.health()["counters"]["failed_uploads"] > 0, 15, "the sink to fill up")
    health = d.health()
    assert health["counters"]["dead_lettered_payloads"] == 0 and health["status"] == "degraded", health
    fs.remount("size=16m")
    wait_for(lambda: d.health()["counters"]["uploaded_payloads"] >= 400, 30, "delivery once there is room")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    check_delivery("full-directory-sink", ledger, payload_ids(read_directory_sink(fs.path)))
    assert not list((d.workdir / "spool" / "dead").iterdir())


# -- the spool cap --------------------------------------------------------------------------------------

def test_permanent_refusals_fill_dead_letters_to_the_cap_then_503_until_replayed(
        daemon_factory, fault_proxy: FaultProxy, s3, bucket):
    fault_proxy.set_mode("403")
    cap = 96 * 1024
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url, **FAST_RETRY), "batch": BATCH,
                        "spool": {"max_bytes": cap}}).start()
    ledger = Ledger()
    acked = send_until_refused(d, ledger, unique_prefix("dead-cap"), pad=1500)
    assert acked > 20, acked
    assert_refusing(d, ledger, unique_prefix("capped"), "dead letters cannot be written")
    spool = d.workdir / "spool"
    used = sum(p.stat().st_size for p in spool.rglob("*") if p.is_file())
    assert used <= cap, f"the spool holds {used} bytes, over spool.max_bytes = {cap}"

    fault_proxy.set_mode(None)
    r = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)  # safe while the daemon runs
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    wait_for(d.is_ready, 20, "ready again once the dead letters are replayed")
    wait_for(lambda: accepting(d, ledger, unique_prefix("after-replay")), 10, "202 again")
    wait_for(lambda: not list((spool / "dead").glob("*.dead")) or
             run_ingestd(["replay", "--config", str(d.config_path)], d.workdir).returncode != 0, 30,
             "the last dead letters to be replayed")
    wait_for(lambda: len(set(payload_ids(read_bucket(s3, bucket)))) >= ledger.acked_payloads, 30, "delivery")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    check_delivery("dead-letters-to-the-cap-then-replay", ledger, payload_ids(read_bucket(s3, bucket)))


def test_disk_logs_at_the_spool_cap_refuse_until_they_land(daemon_factory, fault_proxy: FaultProxy, s3, bucket):
    fault_proxy.set_mode("500")
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url, **FAST_RETRY), "batch": BATCH,
                        "spool": {"durability": "disk", "max_bytes": 256 * 1024}}).start()
    ledger = Ledger()
    acked = send_until_refused(d, ledger, unique_prefix("cap"))
    assert acked > 50, acked
    assert_refusing(d, ledger, unique_prefix("at-cap"), "spool.max_bytes")
    fault_proxy.set_mode(None)
    wait_for(d.is_ready, 20, "ready once the logs have landed")
    wait_for(lambda: accepting(d, ledger, unique_prefix("below-cap")), 10, "202 again")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    check_delivery("disk-logs-at-the-cap", ledger, payload_ids(read_bucket(s3, bucket)))


# -- torn and damaged files --------------------------------------------------------------------------------

def logged_then_killed(daemon_factory, fault_proxy: FaultProxy, s3: Any, bucket: str, tag: str,
                       durability: str = "memory") -> tuple[dict[str, Any], Ledger, Daemon]:
    """A daemon whose uploads hang, killed (whole tree) once requests are logged and intents open."""
    fault_proxy.set_mode("hang")
    tables = {**s3_tables(bucket, fault_proxy.url, **FAST_RETRY), "batch": BATCH, "spool": {"durability": durability}}
    d = daemon_factory(tables).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix(tag), 60, 2, pad=50)
    assert ledger.statuses == {202: 60}, ledger.statuses
    wait_for(lambda: fault_proxy.count("hang") > 0, 10, "an upload to hang")
    d.kill_group()
    fault_proxy.set_mode(None)
    return tables, ledger, d


def last_file(root: Path, pattern: str) -> Path:
    files = sorted((p for p in root.glob(pattern) if p.stat().st_size), key=lambda p: (p.stat().st_mtime, p.name))
    assert files, f"no {pattern} under {root}"
    return files[-1]


def restart_and_deliver(daemon_factory, tables: dict[str, Any], ledger: Ledger, s3: Any, bucket: str,
                        scenario: str) -> Daemon:
    d = daemon_factory(tables).start()
    wait_for(lambda: d.health()["counters"]["uploaded_payloads"] >= ledger.acked_payloads, 30, "delivery")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    check_delivery(scenario, ledger, payload_ids(read_bucket(s3, bucket)))
    assert "Traceback" not in d.log() and "restarting in" not in d.log(), d.log()  # no crash loop
    return d


@pytest.mark.parametrize("durability", ["memory", "disk"])
def test_a_torn_record_at_the_end_of_a_log_is_cut_and_never_trusted(daemon_factory, fault_proxy: FaultProxy, s3,
                                                                   bucket, durability):
    tables, ledger, d = logged_then_killed(daemon_factory, fault_proxy, s3, bucket, "torn-log", durability)
    segment = last_file(logs_root(d.workdir) / "logs", "*/*.log")
    data = segment.read_bytes()
    # a crash mid-write leaves the start of a record: append the first half of a copy of one
    last = scan(data).records[-1]
    segment.write_bytes(data + data[last.offset : last.offset + last.size // 2])
    d2 = restart_and_deliver(daemon_factory, tables, ledger, s3, bucket, f"torn-log-tail-{durability}")
    assert "torn tail of" in d2.log() and f"cut at offset {len(data)}" in d2.log(), d2.log()


def test_a_log_cut_mid_record_loses_only_that_unacknowledged_record(daemon_factory, fault_proxy: FaultProxy, s3,
                                                                    bucket):
    tables, ledger, d = logged_then_killed(daemon_factory, fault_proxy, s3, bucket, "cut-log")
    segment = last_file(logs_root(d.workdir) / "logs", "*/*.log")
    data = segment.read_bytes()
    last = scan(data).records[-1]
    cut_ids = [orjson.loads(ln)["payload"]["id"] for ln in parse_request(last.body, last.flags).lines.splitlines()]
    os.truncate(segment, last.offset + last.size // 2)
    # the test plays a crash in the middle of that request's write: it was never acknowledged
    ledger.acked = [x for x in ledger.acked if x not in cut_ids]
    ledger.unknown.extend(cut_ids)
    d2 = restart_and_deliver(daemon_factory, tables, ledger, s3, bucket, "log-cut-mid-record")
    stored = set(payload_ids(read_bucket(s3, bucket)))
    assert not stored & set(cut_ids), "a torn record was trusted"
    assert "torn tail of" in d2.log()


def test_a_torn_journal_tail_is_cut_and_its_payloads_delivered_once(daemon_factory, fault_proxy: FaultProxy, s3,
                                                                    bucket):
    tables, ledger, d = logged_then_killed(daemon_factory, fault_proxy, s3, bucket, "torn-journal")
    journal = last_file(logs_root(d.workdir) / "journals", "*/*.jnl")
    size = journal.stat().st_size
    os.truncate(journal, size - 7)  # the last intent (its PUT hung: it never landed) is torn
    d2 = restart_and_deliver(daemon_factory, tables, ledger, s3, bucket, "torn-journal-tail")
    assert "torn tail of" in d2.log(), d2.log()


def test_garbage_at_the_end_of_a_landed_file_is_skipped(daemon_factory, fault_proxy: FaultProxy, s3, bucket):
    tables, ledger, d = logged_then_killed(daemon_factory, fault_proxy, s3, bucket, "landed-garbage")
    landed = sorted((logs_root(d.workdir) / "logs").glob("*/*.landed"))
    assert landed
    for path in landed:
        with open(path, "ab") as f:
            f.write(b"\xff" * 16 + b"\x01\x02\x03")  # a whole bad entry, then a partial one
    restart_and_deliver(daemon_factory, tables, ledger, s3, bucket, "landed-garbage")


def test_damage_in_the_middle_of_a_log_is_quarantined_and_the_rest_delivered(daemon_factory,
                                                                             fault_proxy: FaultProxy, s3, bucket):
    tables, ledger, d = logged_then_killed(daemon_factory, fault_proxy, s3, bucket, "damaged-log")
    segment = last_file(logs_root(d.workdir) / "logs", "*/*.log")
    data = bytearray(segment.read_bytes())
    records = scan(bytes(data)).records
    assert len(records) >= 3, "the segment is too short to damage its middle"
    victim = records[len(records) // 2]
    lost = [orjson.loads(ln)["payload"]["id"] for ln in parse_request(victim.body, victim.flags).lines.splitlines()]
    data[victim.offset + victim.size - 5] ^= 0xFF  # a flipped byte inside the record: its checksum fails
    segment.write_bytes(bytes(data))
    # damaged storage loses that record (it is kept in quarantine); everything around it lands
    ledger.acked = [x for x in ledger.acked if x not in lost]
    ledger.unknown.extend(lost)
    d2 = daemon_factory(tables).start()
    wait_for(lambda: d2.health()["counters"]["uploaded_payloads"] >= ledger.acked_payloads, 30, "delivery")
    assert d2.health()["counters"]["quarantined_bytes"] > 0
    d2.signal(signal.SIGTERM)
    assert d2.wait(30) == 0, d2.log()
    check_delivery("damaged-log-middle", ledger, payload_ids(read_bucket(s3, bucket)))
    assert not set(payload_ids(read_bucket(s3, bucket))) & set(lost)
    assert list((d.workdir / "spool" / "quarantine").glob("*.why")), "nothing quarantined"


def test_a_damaged_dead_letter_is_quarantined_by_replay(daemon_factory, fault_proxy: FaultProxy, s3, bucket):
    fault_proxy.set_mode("403")
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url), "batch": BATCH}).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix("dead-torn"), 40, 1)
    wait_for(lambda: d.health()["counters"]["dead_lettered_payloads"] >= 40, 15, "dead letters")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    dead = sorted((d.workdir / "spool" / "dead").glob("*.dead"))
    assert len(dead) >= 2
    os.truncate(dead[0], dead[0].stat().st_size // 2)
    fault_proxy.set_mode(None)
    r = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"  # one could not be replayed: said, not crashed
    assert "damaged dead letter" in r.stderr, r.stderr
    assert list((d.workdir / "spool" / "quarantine").glob("*.why"))
    assert not list((d.workdir / "spool" / "dead").glob("*.dead"))
    stored = payload_ids(read_bucket(s3, bucket))
    assert len(stored) == len(set(stored)) and set(stored) < set(ledger.acked)
