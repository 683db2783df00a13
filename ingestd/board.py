"""The board: counters and liveness shared by the supervisor and the uploaders, in shared memory.

One `RawArray` of 64-bit integers. Each uploader slot owns a row that only that slot's process
writes (aligned 64-bit stores are atomic on the platforms ingestd runs on), so no lock is
needed; the supervisor sums rows. The supervisor's own row is written under the intake lock.
Counters live here, not in the processes, so they survive an uploader restart and `/health`
reports real figures, not estimates.
"""

from __future__ import annotations

import enum
import time
from multiprocessing.context import BaseContext
from typing import Any


class SlotField(enum.IntEnum):
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
    RESTARTS = 11  # written by the supervisor


class GlobalField(enum.IntEnum):
    ACCEPTED_REQUESTS = 0
    ACCEPTED_PAYLOADS = 1
    REJECTED_REQUESTS = 2
    PUT_BYTES = 3  # bytes of lines put on the queue (minus TAKEN_BYTES: bytes queued)
    CURSOR = 4  # seq of the last item read off the queue pipe (items are read in put order)
    LOCK_STATE = 5  # who holds the queue's read lock: 0 nobody, else 2 * (slot + 1) + phase
    DRAIN_DEADLINE_MS = 6  # 0 while running; at drain, when uploaders stop retrying and spill
    OVERLOAD_REJECTIONS = 7  # 503 answers because the queue was full


# phase of the reader that holds the queue's read lock
PHASE_WAITING = 0  # polling the pipe: nothing consumed yet, the pipe is intact
PHASE_READING = 1  # consuming a message: if the reader dies here the pipe may be torn

_SLOT_WIDTH = len(SlotField)
_GLOBAL_WIDTH = len(GlobalField)


def now_ms() -> int:
    return int(time.time() * 1000)


class Board:
    def __init__(self, ctx: BaseContext, slots: int) -> None:
        self.slots = slots
        self._a: Any = ctx.RawArray("q", _GLOBAL_WIDTH + slots * _SLOT_WIDTH)

    # -- per slot ---------------------------------------------------------------------------
    def get(self, slot: int, f: SlotField) -> int:
        return int(self._a[_GLOBAL_WIDTH + slot * _SLOT_WIDTH + f])

    def set(self, slot: int, f: SlotField, value: int) -> None:
        self._a[_GLOBAL_WIDTH + slot * _SLOT_WIDTH + f] = value

    def add(self, slot: int, f: SlotField, n: int = 1) -> None:
        i = _GLOBAL_WIDTH + slot * _SLOT_WIDTH + f
        self._a[i] += n

    def total(self, f: SlotField) -> int:
        base = _GLOBAL_WIDTH + f
        return sum(self._a[base + s * _SLOT_WIDTH] for s in range(self.slots))

    def beat(self, slot: int) -> None:
        self._a[_GLOBAL_WIDTH + slot * _SLOT_WIDTH + SlotField.HEARTBEAT_MS] = now_ms()

    # -- global -----------------------------------------------------------------------------
    def gget(self, f: GlobalField) -> int:
        return int(self._a[f])

    def gset(self, f: GlobalField, value: int) -> None:
        self._a[f] = value

    def gadd(self, f: GlobalField, n: int = 1) -> None:
        self._a[f] += n

    def queued_bytes(self) -> int:
        return self.gget(GlobalField.PUT_BYTES) - self.total(SlotField.TAKEN_BYTES)
