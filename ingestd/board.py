"""The board: counters and liveness shared by the supervisor and the uploaders, in shared memory.

One `RawArray` of 64-bit integers: a few global fields, a row per producer (the supervisor and
any listener processes, each writing its own row under its intake lock) and a row per uploader
slot (written by that slot's process). Aligned 64-bit stores are atomic on the platforms
ingestd runs on, so no cross-process lock is needed; readers sum rows.
Counters live here, not in the processes, so they survive an uploader restart and `/health`
reports real figures, not estimates.
"""

from __future__ import annotations

import enum
import time
from multiprocessing.context import BaseContext
from typing import Any


class SlotField(enum.IntEnum):
    """One row per uploader slot, written by that slot's process (RESTARTS, PID, STATE: the supervisor)."""

    TAKEN_ITEMS = 0
    TAKEN_BYTES = 1
    UPLOADED_PAYLOADS = 2
    UPLOADED_OBJECTS = 3
    FAILED_UPLOADS = 4  # attempts that failed (each retry counts)
    DEAD_LETTERED_PAYLOADS = 5
    HEARTBEAT_MS = 6  # wall clock of the last sign of life
    LAST_OK_MS = 7
    LAST_FAIL_MS = 8
    BOOTED_MS = 9  # set once the sink is built and the slot's spool is loaded
    PENDING_PAYLOADS = 10  # held in the batcher, not yet uploaded
    RESTARTS = 11
    PID = 12  # 0 while no process runs in the slot
    STATE = 13  # index of the slot's SlotState, for listener processes' /health


class ProducerField(enum.IntEnum):
    """One row per listener (producer of queue items; the supervisor is producer 0)."""

    ACCEPTED_REQUESTS = 0
    ACCEPTED_PAYLOADS = 1
    REJECTED_REQUESTS = 2
    PUT_BYTES = 3  # bytes of lines put on the queue (minus TAKEN_BYTES: bytes queued)
    CURSOR = 4  # seq of this producer's last item read off the pipe (a producer's items stay in order)
    OVERLOAD_REJECTIONS = 5  # 503 answers because the queue was full
    FLUSHED = 6  # at drain: 1 once every item it accepted is in the pipe (or spilled)
    PID = 7


class GlobalField(enum.IntEnum):
    LOCK_STATE = 0  # who holds the queue's read lock: 0 nobody, else 2 * (slot + 1) + phase
    DRAIN_DEADLINE_MS = 1  # 0 while running; at drain, when uploaders stop retrying and spill
    DRAINING = 2  # 1 once the supervisor begins the drain: listeners answer 503
    LISTENERS_EXIT = 3  # 1 once the uploaders are gone: listeners spill what is unread and exit
    STARTED_MS = 4  # when the supervisor started (uptime in every listener's /health)
    QUEUE_GENERATION = 5  # bumped when the queue is rebuilt: listeners on the old one spill and exit


# phase of the reader that holds the queue's read lock
PHASE_WAITING = 0  # polling the pipe: nothing consumed yet, the pipe is intact
PHASE_READING = 1  # consuming a message: if the reader dies here the pipe may be torn

_SLOT_WIDTH = len(SlotField)
_PRODUCER_WIDTH = len(ProducerField)
_GLOBAL_WIDTH = len(GlobalField)


def now_ms() -> int:
    return int(time.time() * 1000)


class Board:
    def __init__(self, ctx: BaseContext, slots: int, producers: int = 1) -> None:
        self.slots = slots
        self.producers = producers
        self._slot_base = _GLOBAL_WIDTH + producers * _PRODUCER_WIDTH
        self._a: Any = ctx.RawArray("q", self._slot_base + slots * _SLOT_WIDTH)

    # -- per slot ---------------------------------------------------------------------------
    def get(self, slot: int, f: SlotField) -> int:
        return int(self._a[self._slot_base + slot * _SLOT_WIDTH + f])

    def set(self, slot: int, f: SlotField, value: int) -> None:
        self._a[self._slot_base + slot * _SLOT_WIDTH + f] = value

    def add(self, slot: int, f: SlotField, n: int = 1) -> None:
        self._a[self._slot_base + slot * _SLOT_WIDTH + f] += n

    def total(self, f: SlotField) -> int:
        base = self._slot_base + f
        return sum(self._a[base + s * _SLOT_WIDTH] for s in range(self.slots))

    def beat(self, slot: int) -> None:
        self._a[self._slot_base + slot * _SLOT_WIDTH + SlotField.HEARTBEAT_MS] = now_ms()

    # -- per producer -------------------------------------------------------------------------
    def pget(self, producer: int, f: ProducerField) -> int:
        return int(self._a[_GLOBAL_WIDTH + producer * _PRODUCER_WIDTH + f])

    def pset(self, producer: int, f: ProducerField, value: int) -> None:
        self._a[_GLOBAL_WIDTH + producer * _PRODUCER_WIDTH + f] = value

    def padd(self, producer: int, f: ProducerField, n: int = 1) -> None:
        self._a[_GLOBAL_WIDTH + producer * _PRODUCER_WIDTH + f] += n

    def ptotal(self, f: ProducerField) -> int:
        return sum(self._a[_GLOBAL_WIDTH + p * _PRODUCER_WIDTH + f] for p in range(self.producers))

    # -- global -----------------------------------------------------------------------------
    def gget(self, f: GlobalField) -> int:
        return int(self._a[f])

    def gset(self, f: GlobalField, value: int) -> None:
        self._a[f] = value

    def queued_bytes(self) -> int:
        return self.ptotal(ProducerField.PUT_BYTES) - self.total(SlotField.TAKEN_BYTES)

    def queued_items(self) -> int:
        """Items put on the queue and not yet taken, by every producer together."""
        return self.ptotal(ProducerField.ACCEPTED_REQUESTS) - self.total(SlotField.TAKEN_ITEMS)
