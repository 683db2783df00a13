"""SIGKILL of the whole process tree loses no acknowledged payload and duplicates none, in both
durability modes (memory: the logs are on tmpfs and outlive every process).

The sink hangs (FaultProxy in "hang" mode) so that, at the kill, payloads sit everywhere at
once: in the logs, on the queue, in batches being built, in journaled objects whose PUT is
under way. The next start, with the sink working, must deliver every payload that was answered
202, exactly once: the objects under way go again to their own keys.
"""

from __future__ import annotations

import signal

import pytest

from tests.faults import (  # noqa: F401 - fixtures are used by name
    FaultProxy,
    Ledger,
    Load,
    check_delivery,
    fault_proxy,
    s3_tables,
    settle,
    unique_prefix,
)
from tests.harness import payload_ids, read_bucket, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("durability,fsync", [
    ("memory", "interval"),
    ("disk", "interval"),
    ("disk", "always"),
])
def test_sigkill_of_the_tree_under_load_loses_nothing_acknowledged(daemon_factory, fault_proxy: FaultProxy, s3,
                                                                   bucket, durability, fsync):
    fault_proxy.set_mode("hang")
    tables = {**s3_tables(bucket, fault_proxy.url), "batch": {"max_payloads": 50, "max_age_ms": 100},
              "spool": {"durability": durability, "journal_fsync": fsync, "journal_fsync_interval_ms": 200},
              "queue": {"max_items": 5000}}
    d = daemon_factory(tables).start()
    ledger = Ledger()
    load = Load(d.url, ledger, unique_prefix(f"kill-{fsync}"), threads=3, requests_per_thread=400, payloads=4).start()
    try:
        wait_for(lambda: load.done >= 150 and fault_proxy.count("hang") > 0, 30, "load with uploads hanging")
        health = d.health()
        # payloads are in the queue and held by uploaders when the tree dies
        assert health["queue"]["depth"] > 0, health
        assert sum(w["pending_payloads"] for w in health["workers"]) > 0, health
        d.kill_group()  # SIGKILL to the supervisor and every uploader at once, mid-load
        assert d.proc is not None and d.proc.returncode == -signal.SIGKILL
    finally:
        load.join(60)
    acked_at_kill = ledger.acked_payloads
    assert acked_at_kill >= 150 * 4 and ledger.statuses[0] > 0, ledger.statuses  # the kill did land mid-run
    assert read_bucket(s3, bucket) == {}

    fault_proxy.set_mode(None)
    d2 = daemon_factory(tables).start()
    settle(lambda: d2.health()["counters"]["uploaded_payloads"] >= acked_at_kill, 30)
    d2.signal(signal.SIGTERM)
    assert d2.wait(30) == 0, d2.log()
    check_delivery(f"sigkill-tree-{durability}-{fsync}", ledger, payload_ids(read_bucket(s3, bucket)))
