"""Health and metrics: read what the other parts publish on the board, plus psutil figures.

`Health.snapshot()` is the body of `GET /health`; `render_metrics` turns the same snapshot into
Prometheus text, so the two always agree. Readiness (the SPEC's): not draining, at least one
live uploader, and room in the queue. A failing sink alone only makes the status "degraded".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .board import Board, GlobalField, ProducerField, SlotField
from .jobqueue import Intake
from .states import SlotState


class WorkerView(NamedTuple):
    slot: int
    pid: int | None
    alive: bool
    restarts: int
    state: str


def board_worker_views(board: Board) -> Callable[[], list[WorkerView]]:
    """Worker views from what the supervisor publishes on the board (for listener processes)."""
    states = list(SlotState)

    def views() -> list[WorkerView]:
        out = []
        for s in range(board.slots):
            pid = board.get(s, SlotField.PID)
            state = states[board.get(s, SlotField.STATE)]
            out.append(WorkerView(s, pid or None, pid != 0 and psutil.pid_exists(pid), board.get(s, SlotField.RESTARTS),
                                  state.value))
        return out

    return views


class Health:
    def __init__(self, board: Board, intake: Intake, capacity: int, max_bytes: int,
                 workers: Callable[[], list[WorkerView]], clock: Callable[[], float] = time.time,
                 supervisor_pid: int | None = None) -> None:
        self.board = board
        self.intake = intake
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.workers = workers
        self.clock = clock
        self._procs: dict[int, psutil.Process] = {}
        # in a listener process, "the supervisor's own" figures are still the supervisor's
        self._supervisor = psutil.Process(supervisor_pid)
        self._supervisor.cpu_percent(None)

    def _usage(self, pid: int | None) -> tuple[int, float]:
        if pid is None:
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

    def snapshot(self) -> dict[str, Any]:
        board = self.board
        views = self.workers()
        live = {v.pid for v in views if v.pid}
        for pid in list(self._procs):
            if pid not in live:
                del self._procs[pid]
        workers = []
        for v in views:
            rss, cpu = self._usage(v.pid if v.alive else None)
            workers.append({"slot": v.slot, "pid": v.pid, "alive": v.alive, "state": v.state, "rss_bytes": rss,
                            "cpu_percent": cpu, "restarts": v.restarts,
                            "pending_payloads": board.get(v.slot, SlotField.PENDING_PAYLOADS)})
        depth = board.queued_items()
        queued_bytes = board.queued_bytes()
        sink_failing = any(board.get(s, SlotField.LAST_FAIL_MS) > board.get(s, SlotField.LAST_OK_MS)
                           for s in range(board.slots))
        full = depth >= self.capacity or queued_bytes >= self.max_bytes
        any_alive = any(v.alive for v in views)
        draining = self.intake.draining
        if draining:
            status = "draining"
        elif sink_failing or full or not all(v.alive for v in views):
            status = "degraded"
        else:
            status = "ok"
        try:
            with self._supervisor.oneshot():
                rss, cpu = self._supervisor.memory_info().rss, self._supervisor.cpu_percent(None)
        except psutil.Error:  # the supervisor is gone: this listener is about to notice and exit
            rss, cpu = 0, 0.0
        listeners = [{"index": p, "pid": board.pget(p, ProducerField.PID) or None,
                      "accepted_requests": board.pget(p, ProducerField.ACCEPTED_REQUESTS)}
                     for p in range(board.producers)]
        return {
            "status": status,
            "ready": not draining and any_alive and not full,
            "uptime_s": round(self.clock() - board.gget(GlobalField.STARTED_MS) / 1000, 3),
            "queue": {"depth": depth, "capacity": self.capacity, "bytes": queued_bytes, "max_bytes": self.max_bytes},
            "sink": {"failing": sink_failing},
            "workers": workers,
            "counters": {
                "accepted_requests": board.ptotal(ProducerField.ACCEPTED_REQUESTS),
                "accepted_payloads": board.ptotal(ProducerField.ACCEPTED_PAYLOADS),
                "uploaded_payloads": board.total(SlotField.UPLOADED_PAYLOADS),
                "uploaded_objects": board.total(SlotField.UPLOADED_OBJECTS),
                "failed_uploads": board.total(SlotField.FAILED_UPLOADS),
                "dead_lettered_payloads": board.total(SlotField.DEAD_LETTERED_PAYLOADS),
                "rejected_requests": board.ptotal(ProducerField.REJECTED_REQUESTS),
                "overload_rejections": board.ptotal(ProducerField.OVERLOAD_REJECTIONS),
            },
            "listeners": listeners,
            "rss_bytes": rss,
            "cpu_percent": cpu,
        }


_COUNTER_HELP = {
    "accepted_requests": "Ingest requests answered 202.",
    "accepted_payloads": "Payloads acknowledged with 202.",
    "uploaded_payloads": "Payloads written to the sink.",
    "uploaded_objects": "Objects written to the sink.",
    "failed_uploads": "Upload attempts that failed (each retry counts).",
    "dead_lettered_payloads": "Payloads the sink refused for good, kept in the dead-letter spool.",
    "rejected_requests": "POSTs to the ingest path answered 4xx or 503.",
    "overload_rejections": "Ingest requests answered 503 because the queue was full.",
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
            "ingestd_queue_depth": ("Items (requests) waiting in the queue.", s["queue"]["depth"]),
            "ingestd_queue_capacity": ("Bound of the queue (queue.max_items).", s["queue"]["capacity"]),
            "ingestd_queue_bytes": ("Bytes of lines waiting in the queue.", s["queue"]["bytes"]),
            "ingestd_ready": ("1 when the daemon accepts requests.", int(s["ready"])),
            "ingestd_draining": ("1 while draining at shutdown.", int(s["status"] == "draining")),
            "ingestd_sink_failing": ("1 when the last upload attempt of some uploader failed.", int(s["sink"]["failing"])),
            "ingestd_uptime_seconds": ("Seconds since the supervisor started.", s["uptime_s"]),
            "ingestd_uploaders_alive": ("Uploader processes alive.", sum(w["alive"] for w in s["workers"])),
            "ingestd_pending_payloads": ("Payloads held by uploaders, not yet written.",
                                         sum(w["pending_payloads"] for w in s["workers"])),
            "ingestd_uploader_restarts": ("Uploader restarts since start.", sum(w["restarts"] for w in s["workers"])),
            "ingestd_rss_bytes": ("Resident memory of all ingestd processes.",
                                  s["rss_bytes"] + sum(w["rss_bytes"] for w in s["workers"])),
        }
        for name, (help_text, value) in gauges.items():
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], value)
            yield g


def render_metrics(snap: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))  # type: ignore[arg-type]
    return generate_latest(registry)
