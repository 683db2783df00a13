"""The scoreboard: state shared by every process of the tree, in shared memory, split by owner.

One `RawArray` of 64-bit integers (aligned 64-bit loads and stores are atomic on the platforms
ingestd runs on, so no cross-process lock exists to be left held by a killed process):

- the control block (`Control`), written only by the supervisor: epoch, phase, drain deadline;
- the supervisor's view of each child (`ChildField`: pid, state, restarts), written only by
  the supervisor;
- one row per listener (`ListenerField`) and one per uploader (`UploaderField`), each written
  only by the process that currently holds that index. A restarted child continues its row, so
  counters survive restarts and `/health` reports real figures;
- after those, each child's histograms (bucket counters and sums, see `histograms.py`), owned
  the same way.

Readers (health, listeners waiting for acknowledgements, the supervisor's heartbeat check) only
read. Apache calls this a scoreboard.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any

from .histograms import LISTENER_SERIES, LISTENER_SLOTS, UPLOADER_SERIES, UPLOADER_SLOTS, HistogramSet


def now_ms() -> int:
    return int(time.time() * 1000)


class Role(enum.Enum):
    LISTENER = "listener"
    UPLOADER = "uploader"


class Phase(enum.IntEnum):
    RUNNING = 0
    DRAINING = 1  # stop accepting; uploaders deliver what is logged and exit
    EXIT = 2  # uploaders are gone: listeners stop serving and exit


class Control(enum.IntEnum):
    STARTED_MS = 0
    EPOCH = 1  # bumped by the supervisor after any abnormal child death: the queue is re-indexed
    PHASE = 2
    DEADLINE_MS = 3  # while draining: when uploaders stop retrying and leave
    LAME_DUCK_MS = 4  # after SIGTERM with shutdown.lame_duck_s: when the drain begins (0: not shutting down)


class ChildField(enum.IntEnum):
    PID = 0  # 0 while no process runs at this index
    STATE = 1  # index into states.ChildState
    RESTARTS = 2


class ListenerField(enum.IntEnum):
    HEARTBEAT_MS = 0
    SERVING_PID = 1  # pid of the process once it serves HTTP
    INDEXED_EPOCH = 2  # the last epoch whose re-index this listener has finished
    QUIET_PID = 3  # at drain: pid once no request of it is between log and queue any more
    ACCEPTED_REQUESTS = 4
    ACCEPTED_PAYLOADS = 5
    REJECTED_REQUESTS = 6
    OVERLOAD_REJECTIONS = 7  # 503 answers (queue, log bytes or spool full)
    LOG_BYTES = 8  # bytes of its log segments not yet all landed
    SPOOL_ERROR = 9  # 0, or the errno of the last failed log write (until a write succeeds)
    REINDEXED_PAYLOADS = 10  # payloads put back on the queue by re-indexes
    QUARANTINED_BYTES = 11  # damaged bytes found in log files
    SPOOL_USED = 12  # bytes under spool.path at this listener's last look (once a second)
    CAP_BLOCKED = 13  # 1 while this listener refuses for spool.max_bytes (until usage falls to the low-water mark)


class UploaderField(enum.IntEnum):
    HEARTBEAT_MS = 0
    BOOTED_PID = 1  # pid of the process once its sink is built and its journal recovered
    ACK_EPOCH = 2  # the epoch whose re-index it has acknowledged (held references dropped)
    UPLOADED_PAYLOADS = 3
    UPLOADED_OBJECTS = 4
    FAILED_UPLOADS = 5  # attempts that failed (each retry counts)
    DEAD_LETTERED_PAYLOADS = 6
    PENDING_PAYLOADS = 7  # held: being batched, or in objects not yet landed
    LAST_OK_MS = 8
    LAST_FAIL_MS = 9
    DEAD_LETTER_BLOCKED = 10  # 1 while a dead letter cannot be written (spool cap, disk full)
    RESENT_OBJECTS = 11  # objects of an earlier process sent again after a crash (same key)
    DAMAGED_RECORDS = 12  # referenced records that failed their checksum (quarantined)
    OPEN_PARTITIONS = 13  # partitions with an object being gathered (at most batch.max_partitions + overflow)
    OVERFLOW_PAYLOADS = 14  # payloads sent to an _overflow partition (batch.max_partitions was reached)


class TenantField(enum.IntEnum):
    """Per listener and tenant: counters of that listener's answers to that tenant."""

    ACCEPTED_REQUESTS = 0
    ACCEPTED_PAYLOADS = 1
    RATE_LIMITED = 2  # 429 answers


_WIDTH = {Role.LISTENER: len(ListenerField), Role.UPLOADER: len(UploaderField)}


class Row:
    """One row of the board: index with the row's field enum."""

    __slots__ = ("_a", "_base")

    def __init__(self, array: Any, base: int) -> None:
        self._a = array
        self._base = base

    def __getitem__(self, f: int) -> int:
        return int(self._a[self._base + f])

    def __setitem__(self, f: int, value: int) -> None:
        self._a[self._base + f] = value

    def add(self, f: int, n: int = 1) -> None:
        """Only the row's owner calls this: a read-modify-write by one process."""
        self._a[self._base + f] += n

    def beat(self) -> None:
        self._a[self._base] = now_ms()  # HEARTBEAT_MS is field 0 of both row kinds


class Scoreboard:
    def __init__(self, ctx: BaseContext, listeners: int, uploaders: int, tenants: int = 1) -> None:
        self.counts = {Role.LISTENER: listeners, Role.UPLOADER: uploaders}
        self.tenants = tenants
        self._child_base = len(Control)
        children = listeners + uploaders
        self._row_base = {Role.LISTENER: self._child_base + children * len(ChildField)}
        self._row_base[Role.UPLOADER] = self._row_base[Role.LISTENER] + listeners * _WIDTH[Role.LISTENER]
        # one rate-limit slot per tenant (the one block every listener writes, under a file lock:
        # see ratelimit.py), then each listener's counters per tenant (written by that listener)
        self._bucket_base = self._row_base[Role.UPLOADER] + uploaders * _WIDTH[Role.UPLOADER]
        self._tenant_base = self._bucket_base + tenants
        # then each child's histograms (histograms.py), last so that nothing above moves
        self._histogram_base = {Role.LISTENER: self._tenant_base + listeners * tenants * len(TenantField)}
        self._histogram_base[Role.UPLOADER] = self._histogram_base[Role.LISTENER] + listeners * LISTENER_SLOTS
        size = self._histogram_base[Role.UPLOADER] + uploaders * UPLOADER_SLOTS
        self._a: Any = ctx.RawArray("q", size)
        self.control = Row(self._a, 0)

    def _child_index(self, role: Role, index: int) -> int:
        return index if role is Role.LISTENER else self.counts[Role.LISTENER] + index

    def child(self, role: Role, index: int) -> Row:
        """The supervisor's view of one child (ChildField)."""
        return Row(self._a, self._child_base + self._child_index(role, index) * len(ChildField))

    def row(self, role: Role, index: int) -> Row:
        return Row(self._a, self._row_base[role] + index * _WIDTH[role])

    def bucket_index(self, tenant: int) -> int:
        """Where tenant `tenant`'s rate-limit state lives in `raw`."""
        return self._bucket_base + tenant

    def tenant_row(self, listener: int, tenant: int) -> Row:
        return Row(self._a, self._tenant_base + (listener * self.tenants + tenant) * len(TenantField))

    def tenant_total(self, tenant: int, f: int) -> int:
        return sum(self.tenant_row(i, tenant)[f] for i in range(self.counts[Role.LISTENER]))

    def histograms(self, role: Role, index: int) -> HistogramSet:
        """The histograms of a child's row: written only by that child, like the row."""
        if role is Role.LISTENER:
            return HistogramSet(self._a, self._histogram_base[role] + index * LISTENER_SLOTS, LISTENER_SERIES)
        return HistogramSet(self._a, self._histogram_base[role] + index * UPLOADER_SLOTS, UPLOADER_SERIES)

    def all_histograms(self) -> list[HistogramSet]:
        return [self.histograms(role, i) for role in Role for i in range(self.counts[role])]

    def flat_index(self, role: Role, index: int, f: int) -> int:
        """Where a field lives in `raw`: for hot paths that read a few flags without Row objects."""
        return self._row_base[role] + index * _WIDTH[role] + f

    @property
    def raw(self) -> Any:
        return self._a

    def listener(self, index: int) -> Row:
        return self.row(Role.LISTENER, index)

    def uploader(self, index: int) -> Row:
        return self.row(Role.UPLOADER, index)

    def rows(self, role: Role) -> Iterator[Row]:
        return (self.row(role, i) for i in range(self.counts[role]))

    def total(self, role: Role, f: int) -> int:
        return sum(r[f] for r in self.rows(role))

    @property
    def epoch(self) -> int:
        return self.control[Control.EPOCH]

    @property
    def phase(self) -> Phase:
        return Phase(self.control[Control.PHASE])
