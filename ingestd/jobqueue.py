"""The shared bounded queue between the request handlers and the uploaders.

`JobQueue` is a `multiprocessing.Queue` whose consumer side survives SIGKILL of a consumer.
A plain `Queue.get` holds the queue's read lock while it waits, so a consumer killed while
idle leaks the lock and every other consumer hangs forever; one killed while reading a message
tears the pipe. `take` records on the board who holds the lock and whether it is mid-message,
so the supervisor can release a leaked lock (`repair_after_death`) or, for a torn pipe, rebuild
the queue from the intake's ledger.

Within the lock, `take` also hands the item to the uploader's in-flight spool and advances the
board's cursor, so each item is always either in the pipe (seq > cursor, still in the ledger)
or in an uploader's in-flight file (seq <= cursor). Nothing acknowledged falls between.

`Intake` is the producer side, used by the request handlers of a listener (the supervisor, or
a listener process with `http.listeners` > 1): admission (draining, queue full by items or
bytes), sequence numbers, and the ledger. Each producer's items reach the pipe in its own
order (one feeder thread per process), so a cursor per producer is enough.
"""

from __future__ import annotations

import enum
import logging
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.queues import Queue
from queue import Full
from typing import Any

from .board import PHASE_READING, PHASE_WAITING, Board, GlobalField, ProducerField
from .journal import Journal
from .records import Item

log = logging.getLogger(__name__)


class JobQueue(Queue):  # type: ignore[type-arg]
    """A bounded multiprocessing.Queue of `Item`s with a crash-aware consumer side."""

    _rlock: Any
    _sem: Any

    def __init__(self, maxsize: int, *, ctx: BaseContext) -> None:
        super().__init__(maxsize, ctx=ctx)

    def take(self, board: Board, slot: int, timeout: float, on_taken: Callable[[Item], None]) -> Item | None:
        """Next item, or None after `timeout`. `on_taken` runs before the lock is released."""
        deadline = time.monotonic() + timeout
        if not self._rlock.acquire(True, timeout):
            return None
        holder = 2 * (slot + 1)
        board.gset(GlobalField.LOCK_STATE, holder + PHASE_WAITING)
        try:
            if not self._poll(max(0.0, deadline - time.monotonic())):  # type: ignore[attr-defined]
                return None
            board.gset(GlobalField.LOCK_STATE, holder + PHASE_READING)
            raw = self._recv_bytes()  # type: ignore[attr-defined]
            self._sem.release()
            item: Item = pickle.loads(raw)
            on_taken(item)
            if item.seq > 0:
                board.pset(item.producer, ProducerField.CURSOR, item.seq)
            return item
        finally:
            board.gset(GlobalField.LOCK_STATE, 0)
            self._rlock.release()

    def repair_after_death(self, board: Board, slot: int) -> bool:
        """After `slot`'s process died: release the read lock if it held it.

        Returns False when the dead process was mid-message: the pipe may be torn and the
        queue must be rebuilt.
        """
        state = board.gget(GlobalField.LOCK_STATE)
        if state // 2 != slot + 1:
            return True
        board.gset(GlobalField.LOCK_STATE, 0)
        if state % 2 == PHASE_READING:
            return False
        self._rlock.release()
        log.warning("uploader slot %d died holding the queue read lock; lock released", slot)
        return True


class Admission(enum.Enum):
    ACCEPTED = "accepted"
    FULL = "full"
    DRAINING = "draining"


class Intake:
    """The producer side: decides admission and keeps what is in the pipe until it is read.

    All puts happen under one lock so that ledger order is pipe order: the ledger is trimmed
    by the board's cursor and holds exactly the items not yet read by an uploader.
    """

    def __init__(self, queue: JobQueue, board: Board, max_bytes: int,
                 journal: Journal | None = None, producer: int = 0) -> None:
        """The bound in items is the queue's own (`queue.max_items`); `max_bytes` is checked here."""
        self.queue = queue
        self.board = board
        self.max_bytes = max_bytes
        self.producer = producer
        self._journal = journal
        self._lock = threading.Lock()
        self._ledger: deque[Item] = deque()
        # a restarted listener continues its row's numbering, so its cursor stays monotonic
        self._seq = board.pget(producer, ProducerField.ACCEPTED_REQUESTS)
        self._draining = False

    def attach_journal(self, journal: Journal) -> None:
        with self._lock:
            self._journal = journal

    @property
    def draining(self) -> bool:
        # the board's flag is set by the supervisor: every listener process stops at once
        return self._draining or bool(self.board.gget(GlobalField.DRAINING))

    def submit(self, received_at: float, count: int, lines: bytes) -> Admission:
        board, me = self.board, self.producer
        written = 0
        with self._lock:
            if self.draining:
                return Admission.DRAINING
            if board.queued_bytes() + len(lines) > self.max_bytes:
                board.padd(me, ProducerField.OVERLOAD_REJECTIONS)
                return Admission.FULL
            item = Item(self._seq + 1, received_at, count, lines, me)
            try:
                self.queue.put_nowait(item)
            except Full:
                board.padd(me, ProducerField.OVERLOAD_REJECTIONS)
                return Admission.FULL
            self._seq += 1
            # journaled after the put (an item must not be journaled and then refused); the 202
            # waits for both, and a crash in between loses only what was never acknowledged
            if self._journal is not None:
                written = self._journal.append(item)
            self._ledger.append(item)
            self._trim()
            board.padd(me, ProducerField.PUT_BYTES, len(lines))
            board.padd(me, ProducerField.ACCEPTED_REQUESTS)
            board.padd(me, ProducerField.ACCEPTED_PAYLOADS, count)
        if self._journal is not None:
            self._journal.commit(written)  # outside the lock: threads share one fdatasync
        return Admission.ACCEPTED

    def count_rejection(self) -> None:
        with self._lock:
            self.board.padd(self.producer, ProducerField.REJECTED_REQUESTS)

    def _trim(self) -> None:
        cursor = self.board.pget(self.producer, ProducerField.CURSOR)
        ledger = self._ledger
        while ledger and ledger[0].seq <= cursor:
            ledger.popleft()

    def depth(self) -> int:
        """Items waiting in the queue (read off the ledger: qsize() is not portable)."""
        with self._lock:
            self._trim()
            return len(self._ledger)

    def begin_drain(self) -> None:
        """From now on every submit answers DRAINING; returns once no submit is under way."""
        with self._lock:
            self._draining = True

    def unread(self) -> list[Item]:
        """Items still in the pipe, oldest first."""
        with self._lock:
            self._trim()
            return list(self._ledger)

    def replace_queue(self, queue: JobQueue) -> int:
        """Swap in a fresh queue after a torn pipe and put the unread items back on it."""
        with self._lock:
            self._trim()
            self.queue = queue
            for item in self._ledger:
                queue.put(item)
            return len(self._ledger)
