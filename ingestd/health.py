"""Health and metrics: read what the other processes publish on the scoreboard, plus psutil.

`Health.snapshot()` is the body of `GET /health`; `render_metrics` turns the same snapshot into
Prometheus text, so the two always agree. Readiness: not draining, every listener has started
serving, at least one uploader has booted (its sink client built), room in the queue (depth
and bytes not yet landed), and a writable spool under its cap. A failing sink alone only makes
the status "degraded": buffering through an outage is the point.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .config import Config
from .refqueue import RefQueue
from .scoreboard import ChildField, Control, ListenerField, Phase, Role, Scoreboard, TenantField, UploaderField, now_ms
from .states import ChildState

if TYPE_CHECKING:
    from .intake import Intake

_STATES = list(ChildState)


CAP_LOW_WATER = 0.9  # refusing at spool.max_bytes goes on until usage falls below this share of it


def shared_refusals(board: Scoreboard, spool_max_bytes: int) -> list[str]:
    """Why every listener refuses requests, read from the board alone (so whichever listener
    answers, and whether it is refusing a request or answering /health, the same answer): the
    spool cap and dead letters that cannot be written.

    The cap counts the largest of every live listener's last look at the spool's size, with
    hysteresis: once a listener refuses for it, all refuse until usage is below the low-water
    mark, so that a spool hovering at the cap (files written and removed while nothing lands)
    does not let single requests through."""
    fresh = now_ms() - 3000
    live = [r for r in board.rows(Role.LISTENER) if r[ListenerField.HEARTBEAT_MS] > fresh]
    used = max((r[ListenerField.SPOOL_USED] for r in live), default=0)
    held = any(r[ListenerField.CAP_BLOCKED] for r in live)
    reasons = []
    if used >= spool_max_bytes or (held and used > spool_max_bytes * CAP_LOW_WATER):
        reasons.append(f"spool.max_bytes ({spool_max_bytes}) reached")
    if any(r[UploaderField.DEAD_LETTER_BLOCKED] for r in board.rows(Role.UPLOADER)):
        reasons.append("dead letters cannot be written")
    return reasons


class Health:
    def __init__(self, board: Scoreboard, queue: RefQueue, config: Config, intake: Intake | None,
                 supervisor_pid: int, clock: Callable[[], float] = time.time) -> None:
        self.board = board
        self.queue = queue
        self.capacity = config.queue.max_items
        self.max_bytes = config.queue.max_bytes
        self.spool_max_bytes = config.spool.max_bytes
        self.detail = config.http.health_detail
        self.tenant_names = config.tenancy.names
        self.intake = intake
        self.clock = clock
        self._procs: dict[int, psutil.Process] = {}
        self._supervisor_pid = supervisor_pid

    def _usage(self, pid: int) -> tuple[int, float]:
        if not pid:
            return 0, 0.0
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only sets the reference point
            with proc.oneshot():
                return proc.memory_info().rss, proc.cpu_percent(None)
        except psutil.Error:
            self._procs.pop(pid, None)
            return 0, 0.0

    def _children(self, role: Role) -> list[dict[str, Any]]:
        out = []
        for i in range(self.board.counts[role]):
            view = self.board.child(role, i)
            pid = view[ChildField.PID]
            rss, cpu = self._usage(pid)
            out.append({"index": i, "pid": pid or None, "alive": bool(pid), "state": _STATES[view[ChildField.STATE]].value,
                        "restarts": view[ChildField.RESTARTS], "rss_bytes": rss, "cpu_percent": cpu})
        return out

    def snapshot(self) -> dict[str, Any]:
        board = self.board
        uploaders = self._children(Role.UPLOADER)
        for w, row in zip(uploaders, board.rows(Role.UPLOADER)):
            w["booted"] = bool(w["pid"]) and row[UploaderField.BOOTED_PID] == w["pid"]
            w["pending_payloads"] = row[UploaderField.PENDING_PAYLOADS]
            w["open_partitions"] = row[UploaderField.OPEN_PARTITIONS]
        listeners = self._children(Role.LISTENER)
        for x, row in zip(listeners, board.rows(Role.LISTENER)):
            x["serving"] = bool(x["pid"]) and row[ListenerField.SERVING_PID] == x["pid"]
            x["accepted_requests"] = row[ListenerField.ACCEPTED_REQUESTS]
            err = row[ListenerField.SPOOL_ERROR]
            x["log_error"] = os.strerror(err) if err else None
        live = {w["pid"] for w in uploaders + listeners if w["pid"]} | {self._supervisor_pid}
        for pid in list(self._procs):
            if pid not in live:
                del self._procs[pid]
        # references in the pipe, and this listener's that its writer has not flushed yet (2 ms)
        depth = self.queue.depth() + (self.intake.writer.backlog if self.intake is not None else 0)
        log_bytes = board.total(Role.LISTENER, ListenerField.LOG_BYTES)
        sink_failing = any(r[UploaderField.LAST_FAIL_MS] > r[UploaderField.LAST_OK_MS] for r in board.rows(Role.UPLOADER))
        full = depth >= self.capacity or log_bytes >= self.max_bytes
        # every listener's log errors and the refusals all listeners share: whichever listener
        # answers, the same readiness, and the same as a refused request is told
        blocked = "; ".join([f"listener {x['index']}: request log not writable ({x['log_error']})"
                             for x in listeners if x["log_error"]]
                            + shared_refusals(board, self.spool_max_bytes)) or None
        lame_duck_ms = board.control[Control.LAME_DUCK_MS]
        draining = board.phase is not Phase.RUNNING or bool(lame_duck_ms)
        reasons = []
        if board.phase is not Phase.RUNNING:
            reasons.append("draining")
        elif lame_duck_ms:
            left = max(0.0, (lame_duck_ms - now_ms()) / 1000)
            reasons.append(f"shutting down: still accepting for {left:.1f} s (shutdown.lame_duck_s), then draining")
        if not any(w["booted"] for w in uploaders):
            reasons.append("no uploader has booted")
        if not all(board.listener(i)[ListenerField.SERVING_PID] for i in range(len(listeners))):
            reasons.append("not every listener has started")
        if full:
            reasons.append("queue full")
        if blocked:
            reasons.append(blocked)
        if draining:
            status = "draining"
        elif sink_failing or full or blocked or not all(c["alive"] for c in uploaders + listeners):
            status = "degraded"
        else:
            status = "ok"
        rss, cpu = self._usage(self._supervisor_pid)
        return {
            "status": status,
            "ready": not reasons,
            "reasons": reasons,
            "uptime_s": round(self.clock() - board.control[Control.STARTED_MS] / 1000, 3),
            "epoch": board.epoch,
            "queue": {"depth": depth, "capacity": self.capacity, "bytes": log_bytes, "max_bytes": self.max_bytes},
            "sink": {"failing": sink_failing},
            "workers": uploaders,
            "listeners": listeners,
            "counters": {
                "accepted_requests": board.total(Role.LISTENER, ListenerField.ACCEPTED_REQUESTS),
                "accepted_payloads": board.total(Role.LISTENER, ListenerField.ACCEPTED_PAYLOADS),
                "uploaded_payloads": board.total(Role.UPLOADER, UploaderField.UPLOADED_PAYLOADS),
                "uploaded_objects": board.total(Role.UPLOADER, UploaderField.UPLOADED_OBJECTS),
                "failed_uploads": board.total(Role.UPLOADER, UploaderField.FAILED_UPLOADS),
                "dead_lettered_payloads": board.total(Role.UPLOADER, UploaderField.DEAD_LETTERED_PAYLOADS),
                "rejected_requests": board.total(Role.LISTENER, ListenerField.REJECTED_REQUESTS),
                "overload_rejections": board.total(Role.LISTENER, ListenerField.OVERLOAD_REJECTIONS),
                "reindexed_payloads": board.total(Role.LISTENER, ListenerField.REINDEXED_PAYLOADS),
                "resent_objects": board.total(Role.UPLOADER, UploaderField.RESENT_OBJECTS),
                "damaged_records": board.total(Role.UPLOADER, UploaderField.DAMAGED_RECORDS),
                "overflow_payloads": board.total(Role.UPLOADER, UploaderField.OVERFLOW_PAYLOADS),
                "quarantined_bytes": board.total(Role.LISTENER, ListenerField.QUARANTINED_BYTES),
            },
            "tenants": {
                name: {"accepted_requests": board.tenant_total(t, TenantField.ACCEPTED_REQUESTS),
                       "accepted_payloads": board.tenant_total(t, TenantField.ACCEPTED_PAYLOADS),
                       "rate_limited_requests": board.tenant_total(t, TenantField.RATE_LIMITED)}
                for t, name in enumerate(self.tenant_names)
            },
            "rss_bytes": rss,
            "cpu_percent": cpu,
        }

    def public(self, snap: dict[str, Any]) -> dict[str, Any]:
        """The snapshot as /health shows it: without pids, RSS and CPU when health_detail is off."""
        if self.detail:
            return snap
        out = {k: v for k, v in snap.items() if k not in _DETAIL}
        for group in ("workers", "listeners"):
            out[group] = [{k: v for k, v in c.items() if k not in _DETAIL} for c in snap[group]]
        return out


_DETAIL = frozenset({"pid", "rss_bytes", "cpu_percent"})

_TENANT_HELP = {
    "accepted_requests": "Ingest requests of the tenant answered 202.",
    "accepted_payloads": "Payloads of the tenant acknowledged with 202.",
    "rate_limited_requests": "Ingest requests of the tenant answered 429 (over max_payloads_per_s).",
}

_COUNTER_HELP = {
    "accepted_requests": "Ingest requests answered 202.",
    "accepted_payloads": "Payloads acknowledged with 202.",
    "uploaded_payloads": "Payloads written to the sink.",
    "uploaded_objects": "Objects written to the sink.",
    "failed_uploads": "Upload attempts that failed (each retry counts).",
    "dead_lettered_payloads": "Payloads the sink refused for good, kept in the dead-letter spool.",
    "rejected_requests": "POSTs to the ingest path answered 4xx or 503.",
    "overload_rejections": "Ingest requests answered 503 because the queue, the logs or the spool were full.",
    "reindexed_payloads": "Payloads put back on the queue after a child process died.",
    "resent_objects": "Objects sent again to their own key after a crash left them without an outcome.",
    "damaged_records": "Logged records that failed their checksum when read (quarantined).",
    "overflow_payloads": "Payloads written to an _overflow partition because batch.max_partitions were open.",
    "quarantined_bytes": "Damaged bytes found in request logs at recovery (quarantined).",
}


class _SnapshotCollector:
    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        for name, value in s["counters"].items():
            c = CounterMetricFamily(f"ingestd_{name}", _COUNTER_HELP[name])
            c.add_metric([], value)
            yield c
        gauges = {
            "ingestd_queue_depth": ("References waiting in the queue.", s["queue"]["depth"]),
            "ingestd_queue_capacity": ("Bound of the queue (queue.max_items).", s["queue"]["capacity"]),
            "ingestd_queue_bytes": ("Bytes of request logs not yet landed (queue.max_bytes bounds it).",
                                    s["queue"]["bytes"]),
            "ingestd_ready": ("1 when the daemon accepts requests.", int(s["ready"])),
            "ingestd_draining": ("1 while draining at shutdown.", int(s["status"] == "draining")),
            "ingestd_sink_failing": ("1 when the last upload attempt of some uploader failed.", int(s["sink"]["failing"])),
            "ingestd_uptime_seconds": ("Seconds since the supervisor started.", s["uptime_s"]),
            "ingestd_epoch": ("Re-index epoch: bumped after every abnormal child death.", s["epoch"]),
            "ingestd_uploaders_alive": ("Uploader processes alive.", sum(w["alive"] for w in s["workers"])),
            "ingestd_listeners_alive": ("Listener processes alive.", sum(x["alive"] for x in s["listeners"])),
            "ingestd_pending_payloads": ("Payloads held by uploaders, not yet written.",
                                         sum(w["pending_payloads"] for w in s["workers"])),
            "ingestd_open_partitions": ("Partitions (key folders) with an object being gathered, all uploaders.",
                                        sum(w["open_partitions"] for w in s["workers"])),
            "ingestd_restarts": ("Child process restarts since start.",
                                 sum(c["restarts"] for c in s["workers"] + s["listeners"])),
        }
        if "rss_bytes" in s:  # left out with http.health_detail = false
            gauges["ingestd_rss_bytes"] = ("Resident memory of all ingestd processes.",
                                           s["rss_bytes"] + sum(c["rss_bytes"] for c in s["workers"] + s["listeners"]))
        for name, (help_text, value) in gauges.items():
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], value)
            yield g
        for key, help_text in _TENANT_HELP.items():
            c = CounterMetricFamily(f"ingestd_tenant_{key}", help_text, labels=["tenant"])
            for tenant, counters in s["tenants"].items():
                c.add_metric([tenant], counters[key])
            yield c


def render_metrics(snap: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)
