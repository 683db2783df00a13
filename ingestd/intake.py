"""Admission of one request in a listener: decide, log, index, then (and only then) say 202.

`Intake.submit` is all a request handler does after validation, under one lock per listener:
refuse when draining or full (queue depth, bytes not yet landed, spool cap or errors), append
the request to the listener's log, put its reference on the queue. With
`journal_fsync = "always"` the reference goes out only after the group-commit fdatasync, so
that a request answered 503 (fsync failed) is never delivered. A request whose reference
cannot be put is cancelled in the log: every answer but 202 keeps nothing.

The intake also records the *cut* of each epoch: where in the log the references of the new
epoch begin. Everything before it is the re-index's to put back (`listener.py`).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter

from .records import RECORD_OVERHEAD
from .refqueue import Ref, RefQueue, epoch_tag
from .requestlog import Pos, RequestLog
from .scoreboard import Control, ListenerField, Phase, Row, Scoreboard

log = logging.getLogger(__name__)

PUT_PATIENCE_S = 1.0  # "always": how long a logged and synced request waits for room on the queue


class Admission(enum.Enum):
    ACCEPTED = "accepted"
    FULL = "full"  # queue, or bytes accepted and not yet landed
    SPOOL = "spool"  # the log cannot be written (disk full, I/O error, spool cap)
    DRAINING = "draining"


class Intake:
    def __init__(self, index: int, log: RequestLog, queue: RefQueue, board: Scoreboard, max_items: int,
                 max_bytes: int, always_sync: bool) -> None:
        self.index = index
        self.log = log
        self.queue = queue
        self.board = board
        self.row: Row = board.listener(index)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.always_sync = always_sync
        self.lock = threading.Lock()
        self.epoch = board.epoch
        self.cut = log.position()
        self.draining = False
        self.blocked: str | None = None  # why the spool cannot take requests now (set by the keeper too)
        self.others_bytes = 0  # LOG_BYTES of the other listeners, refreshed by the keeper
        self._pending: Counter[int] = Counter()  # epoch -> requests logged, reference not yet put

    def submit(self, received_at: float, count: int, lines: bytes) -> Admission:
        board = self.board
        if board.control[Control.PHASE] != Phase.RUNNING:
            return Admission.DRAINING
        with self.lock:
            if self.draining:
                return Admission.DRAINING
            if self.blocked:
                self.row.add(ListenerField.OVERLOAD_REJECTIONS)
                return Admission.SPOOL
            if (self.queue.depth() >= self.max_items
                    or self.log.total_bytes + self.others_bytes + RECORD_OVERHEAD + len(lines) > self.max_bytes):
                self.row.add(ListenerField.OVERLOAD_REJECTIONS)
                return Admission.FULL
            epoch = board.control[Control.EPOCH]
            if epoch != self.epoch:
                self.epoch, self.cut = epoch, self.log.position()
            try:
                pos = self.log.append(received_at, count, lines)
            except OSError as e:
                self._write_failed(e)
                return Admission.SPOOL
            self.row[ListenerField.SPOOL_ERROR] = 0
            ref = Ref(self.index, epoch_tag(epoch), pos.segment.number, pos.offset, pos.size, 0, count)
            if not self.always_sync:
                if self.queue.try_put(ref):
                    return self._accepted(pos, count)
                self.log.cancel(pos, may_truncate=True)  # the lock was held since the append
                self.row.add(ListenerField.OVERLOAD_REJECTIONS)
                return Admission.FULL
            self._pending[epoch] += 1
            upto = self.log.written
        return self._sync_and_put(pos, ref, epoch, upto, count)

    def _sync_and_put(self, pos: Pos, ref: Ref, epoch: int, upto: int, count: int) -> Admission:
        try:
            self.log.commit(upto)
            ok = self.queue.try_put(ref)
            deadline = time.monotonic() + PUT_PATIENCE_S
            while not ok and time.monotonic() < deadline:
                time.sleep(0.002)
                ok = self.queue.try_put(ref)
        except OSError as e:
            with self.lock:
                self._pending[epoch] -= 1
                self.log.cancel(pos)
                self._write_failed(e)
            return Admission.SPOOL
        with self.lock:
            self._pending[epoch] -= 1
            if ok:
                return self._accepted(pos, count)
            self.log.cancel(pos)
            self.row.add(ListenerField.OVERLOAD_REJECTIONS)
            return Admission.FULL

    def _accepted(self, pos: Pos, count: int) -> Admission:
        self.log.put_done(pos)
        self.row.add(ListenerField.ACCEPTED_REQUESTS)
        self.row.add(ListenerField.ACCEPTED_PAYLOADS, count)
        return Admission.ACCEPTED

    def _write_failed(self, e: OSError) -> None:
        self.row[ListenerField.SPOOL_ERROR] = e.errno or 5
        self.row.add(ListenerField.OVERLOAD_REJECTIONS)
        if self.blocked is None:
            log.error("listener %d: cannot write the request log (%s): answering 503 until it can", self.index, e)
        self.blocked = f"request log not writable: {e.strerror or e}"

    def count_rejection(self) -> None:
        with self.lock:
            self.row.add(ListenerField.REJECTED_REQUESTS)

    # -- for the keeper ----------------------------------------------------------------------------
    def pending_before(self, epoch: int) -> int:
        """Requests of epochs other than `epoch` logged and not yet put or cancelled."""
        with self.lock:
            return sum(n for e, n in self._pending.items() if e != epoch)

    def pending(self) -> int:
        with self.lock:
            return sum(self._pending.values())

    def begin_epoch(self, epoch: int) -> tuple[int, int]:
        """Adopt `epoch` now if no request did; return its cut."""
        with self.lock:
            if epoch != self.epoch:
                self.epoch, self.cut = epoch, self.log.position()
            return self.cut

    def begin_drain(self) -> None:
        with self.lock:
            self.draining = True
