"""SIGKILL in a loop, under load, of every kind of process and of the whole tree, in both
durability modes: nothing acknowledged is lost and nothing lands twice.

Every payload carries a unique id; the client records what was acknowledged (202), refused
(any other answer: must never land) and unknown (no answer: may land, at most once). After the
loop the daemon is drained and the directory sink is read back. The figures are printed.

`INGESTD_FAULT_KILLS` sets the kills per scenario: 3 by default (CI), 20 or more for a local
fault run (`INGESTD_FAULT_KILLS=20 scripts/test tests/integration/test_crashes.py -s`).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.faults import Ledger, Load, check_delivery, unique_prefix
from tests.harness import Daemon, payload_ids, read_directory_sink, spool_lines, wait_for

KILLS = int(os.environ.get("INGESTD_FAULT_KILLS", "3"))
PROGRESS = 25  # acknowledged requests between two kills, so every kill lands under load


def tables(durability: str) -> dict[str, dict[str, Any]]:
    return {
        "http": {"listeners": 2},
        # a child killed again and again backs off up to this long before it comes back (the
        # default, 30 s, protects a host from a crash loop; this loop is about data, not backoff)
        "workers": {"count": 2, "restart_backoff_max_s": 1.0},
        "batch": {"max_payloads": 40, "max_age_ms": 150},
        "spool": {"durability": durability, "journal_fsync": "interval", "journal_fsync_interval_ms": 100},
        "shutdown": {"drain_timeout_s": 15},
    }


def try_health(d: Daemon) -> dict[str, Any] | None:
    try:
        return d.health()
    except (requests.RequestException, ValueError):  # a listener killed under the request
        return None


def replaced(d: Daemon, kind: str, index: int, old_pid: int) -> bool:
    """The child `kind` `index` runs again as a new process that has booted."""
    health = try_health(d)
    if health is None:
        return False
    views = health["workers"] if kind == "uploader" else health["listeners"]
    view = views[index]
    booted = view.get("booted") if kind == "uploader" else view.get("serving")
    return bool(view["alive"] and view["pid"] != old_pid and booted)


class Crasher:
    """Kills one kind of process of a running daemon, and brings the daemon back when needed."""

    def __init__(self, start: Callable[[int], Daemon], victim: str) -> None:
        self.start = start
        self.victim = victim
        self.d = start(0)
        self.port = self.d.port
        self.rng = random.Random(7)
        self.timings: list[float] = []

    def kill(self) -> None:
        began = time.monotonic()
        d = self.d
        if self.victim in ("uploader", "listener"):
            health = wait_for(lambda: try_health(d), 10, "a health answer")
            views = health["workers"] if self.victim == "uploader" else health["listeners"]
            view = self.rng.choice([v for v in views if v["alive"]])
            os.kill(view["pid"], signal.SIGKILL)
            wait_for(lambda: replaced(d, self.victim, view["index"], view["pid"]), 30,
                     f"{self.victim} {view['index']} to come back")
        else:
            if self.victim == "supervisor":
                d.signal(signal.SIGKILL)  # its children die with it (PR_SET_PDEATHSIG)
                d.wait(10)
            else:
                d.kill_group()
            self.d = self.start(self.port)
        self.timings.append(time.monotonic() - began)


@pytest.mark.parametrize("durability", ["memory", "disk"])
@pytest.mark.parametrize("victim", ["uploader", "listener", "supervisor", "tree"])
def test_sigkill_loop_under_load_loses_and_duplicates_nothing(daemon_factory, tmp_path, victim, durability):
    kill_loop(daemon_factory, tmp_path, victim, durability)


# partitioned by a payload field with few partitions allowed: requests split into parts that are
# not contiguous, most of them in the _overflow partition, objects in zstd or Parquet
PARTITIONED = {
    "sink": {"key_template": "{prefix}/{tenant}/id={payload.id}/dt={date}/hour={hour}"},
    "batch": {"max_partitions": 8},
}


@pytest.mark.parametrize("victim, durability, fmt", [("uploader", "disk", "parquet"), ("tree", "memory", "zstd")])
def test_sigkill_loop_with_partitions_and_formats_loses_and_duplicates_nothing(daemon_factory, tmp_path, victim,
                                                                                durability, fmt):
    batch = {"compression": "zstd"} if fmt == "zstd" else {"format": "parquet", "parquet_columns": {"id": "string"}}
    layout = {"sink": PARTITIONED["sink"], "batch": {**PARTITIONED["batch"], **batch}}
    kill_loop(daemon_factory, tmp_path, victim, durability, layout, f"-{fmt}")


def kill_loop(daemon_factory, tmp_path, victim: str, durability: str,
              layout: dict[str, dict[str, Any]] | None = None, tag: str = "") -> None:
    def start(port: int) -> Daemon:
        t = tables(durability)
        for table, keys in (layout or {}).items():
            t.setdefault(table, {}).update(keys)
        t["http"]["listen"] = f"127.0.0.1:{port}"
        return daemon_factory(t).start()

    crasher = Crasher(start, victim)
    ledger = Ledger()
    load = Load(crasher.d.url, ledger, unique_prefix(f"{victim}-{durability}"), threads=4, requests_per_thread=100_000,
                payloads=3, pad=200, persist=True).start()
    try:
        for _ in range(KILLS):
            mark = ledger.statuses[202]
            wait_for(lambda: ledger.statuses[202] >= mark + PROGRESS, 60, "load to make progress")
            crasher.kill()
        mark = ledger.statuses[202]
        wait_for(lambda: ledger.statuses[202] >= mark + PROGRESS, 60, "load after the last kill")
    finally:
        load.stop()
        load.join(60)
    d = crasher.d
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()
    stored = payload_ids(read_directory_sink(tmp_path / "objects"))
    figures = check_delivery(f"sigkill-{victim}-x{KILLS}-{durability}{tag}", ledger, stored)
    print(f"  kills={KILLS} recovery s: min {min(crasher.timings):.2f} max {max(crasher.timings):.2f}")
    assert figures["acknowledged"] > KILLS * PROGRESS
    assert spool_lines(tmp_path) == [], "payloads held in the spool after a clean drain"
