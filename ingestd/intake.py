"""Admission of one request in a listener: decide, log, index, then (and only then) say 202.

`Intake.submit` is all a request handler does after validation: refuse when draining or full
(queue depth, bytes not yet landed, spool cap or errors), append the request to the listener's
log, hand its reference to the listener's `RefWriter`, answer. Only the append holds the
listener's lock (it decides the record's offset): the record is framed before it, and the
reference written to the queue's pipe by one writer thread, in batches, so that the handler
threads make one system call per request (the append), not three, and do not queue up behind
each other's. A reference waiting in the writer is as safe as one in the pipe: the record is in
the log, and a listener that dies with references unwritten is re-indexed like any death. With
`journal_fsync = "always"` the reference is handed over only after the group-commit fdatasync;
a request whose fdatasync fails is cancelled in the log (a CANCEL record) and answered 503:
every answer but 202 keeps nothing.

The intake also records the *cut* of each epoch: where in the log the references of the new
epoch begin. Everything before it is the re-index's to put back (`listener.py`).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence

from .records import request_record
from .refqueue import Ref, RefQueue, epoch_tag
from .requestlog import Pos, RequestLog
from .scoreboard import Control, ListenerField, Phase, Role, Row, Scoreboard, TenantField, UploaderField, now_ms

log = logging.getLogger(__name__)



class Admission(enum.Enum):
    ACCEPTED = "accepted"
    FULL = "full"  # queue, or bytes accepted and not yet landed
    SPOOL = "spool"  # the log cannot be written (disk full, I/O error, spool cap)
    DRAINING = "draining"


class RefWriter(threading.Thread):
    """Writes the listener's references to the queue's pipe, many per system call.

    Handler threads only append to a deque (thread-safe, no lock, no wake-up); the writer
    flushes every `FLUSH_S`. Waking a thread per request, or a system call per request, costs a
    hand-off of the GIL among the handler threads, which at a few thousand requests a second is
    what limits a listener."""

    FLUSH_S = 0.002

    def __init__(self, queue: RefQueue) -> None:
        super().__init__(name="ref-writer", daemon=True)
        self.queue = queue
        self._refs: deque[Ref] = deque()
        self._writing = 0
        self._closing = False
        self._flushed = threading.Condition()
        self.depth = 0  # the pipe's depth after the last write (or the keeper's last look)

    def put(self, ref: Ref) -> None:
        self._refs.append(ref)

    @property
    def backlog(self) -> int:
        """References handed over and not yet in the pipe."""
        return len(self._refs) + self._writing

    def wait_flushed(self, timeout: float) -> bool:
        """Until every reference handed over is in the pipe (or `timeout`)."""
        with self._flushed:
            return self._flushed.wait_for(lambda: not self._refs and not self._writing, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is handed over, then stop (tests; a listener just exits)."""
        self._closing = True
        self.join(timeout)

    def run(self) -> None:
        refs = self._refs
        while True:
            if not refs:
                if self._closing:
                    return
                time.sleep(self.FLUSH_S)
                continue
            n = min(len(refs), 4096)
            self._writing = n  # before the pops: the backlog may over-count a moment, never under-count
            batch = [refs.popleft() for _ in range(n)]
            done = 0
            while True:
                done += self.queue.put_many(batch[done:])
                self._writing = len(batch) - done
                if done == len(batch):
                    break
                time.sleep(0.001)  # the pipe is full: uploaders make room (admission keeps this bounded)
            self.depth = self.queue.depth()
            with self._flushed:
                self._flushed.notify_all()


class Intake:
    def __init__(self, index: int, log: RequestLog, queue: RefQueue, board: Scoreboard, max_items: int,
                 max_bytes: int, always_sync: bool, tenant_names: Sequence[str] = ()) -> None:
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
        self._pending: Counter[int] = Counter()  # "always": epoch -> requests logged, not yet synced
        self._tenant_rows = [board.tenant_row(index, t) for t in range(board.tenants)]
        # what a record carries of its tenant (for `{tenant}` in object keys): nothing for `default`
        self._tenant_tags = [b""] + [n.encode("ascii") for n in tenant_names[1:]]
        self.writer = RefWriter(queue)
        self.writer.start()
        # refusals the other processes decide (read straight from the board on every request, so
        # that every listener refuses from the instant one does, not from its next tick)
        self._raw = board.raw
        self._cap_flags = [(board.flat_index(Role.LISTENER, i, ListenerField.HEARTBEAT_MS),
                            board.flat_index(Role.LISTENER, i, ListenerField.CAP_BLOCKED), i)
                           for i in range(board.counts[Role.LISTENER]) if i != index]
        self._dead_flags = [board.flat_index(Role.UPLOADER, i, UploaderField.DEAD_LETTER_BLOCKED)
                            for i in range(board.counts[Role.UPLOADER])]
        # what other listeners may have put since the writer last looked
        self._margin = max(64, max_items // 4)

    def others_refuse(self) -> str | None:
        """Does another live listener refuse for the spool cap, or an uploader for dead letters?"""
        a = self._raw
        for heartbeat, flag, i in self._cap_flags:
            if a[flag] and a[heartbeat] > now_ms() - 3000:
                return f"spool.max_bytes reached (seen by listener {i})"
        for flag in self._dead_flags:
            if a[flag]:
                return "dead letters cannot be written"
        return None

    def queue_full(self) -> bool:
        """Room for one more reference? Far from the bound, the writer's last look at the pipe
        (after its last write, at most a tick old) answers without a system call; near it, the
        pipe itself does, so the bound holds up to the requests under way at that instant."""
        writer = self.writer
        if writer.depth + writer.backlog + self._margin < self.max_items:
            return False
        writer.depth = self.queue.depth()
        return writer.depth + writer.backlog >= self.max_items

    def submit(self, received_at: float, count: int, lines: bytes, tenant: int = 0) -> Admission:
        board = self.board
        if board.control[Control.PHASE] != Phase.RUNNING:
            return Admission.DRAINING
        if self.blocked:
            return self._refused(Admission.SPOOL)
        if self.others_refuse():
            return self._refused(Admission.SPOOL)
        if self.queue_full():  # racy by a few requests across listeners: a bound, not a count
            return self._refused(Admission.FULL)
        tag = self._tenant_tags[tenant] if tenant < len(self._tenant_tags) else b""
        record = request_record(received_at, count, lines, tag)  # framed and checksummed outside the lock
        with self.lock:
            if self.draining:
                return Admission.DRAINING
            if self.log.total_bytes + self.others_bytes + len(record) > self.max_bytes:
                self.row.add(ListenerField.OVERLOAD_REJECTIONS)
                return Admission.FULL
            epoch = board.control[Control.EPOCH]
            if epoch != self.epoch:
                self.epoch, self.cut = epoch, self.log.position()
            try:
                pos = self.log.append(record, count)
            except OSError as e:
                self._write_failed(e)
                return Admission.SPOOL
            if not self.always_sync:
                self._accepted(pos, count, tenant)
            else:
                self._pending[epoch] += 1
                upto = self.log.written
        ref = Ref(self.index, epoch_tag(epoch), pos.segment.number, pos.offset, pos.size, 0, count)
        if self.always_sync:
            try:
                self.log.commit(upto)  # group commit: one fdatasync for every thread that wrote before it
            except OSError as e:
                with self.lock:
                    self._pending[epoch] -= 1
                    self.log.cancel(pos)
                    self._write_failed(e)
                return Admission.SPOOL
            with self.lock:
                self._pending[epoch] -= 1
                self._accepted(pos, count, tenant)
        self.writer.put(ref)
        return Admission.ACCEPTED

    def _refused(self, why: Admission) -> Admission:
        with self.lock:
            self.row.add(ListenerField.OVERLOAD_REJECTIONS)
        return why

    def _accepted(self, pos: Pos, count: int, tenant: int) -> None:
        """Under the lock: the request is logged (and synced as the policy asks)."""
        if self.row[ListenerField.SPOOL_ERROR]:
            self.row[ListenerField.SPOOL_ERROR] = 0
        self.log.put_done(pos)  # nothing can cancel it any more
        self.row.add(ListenerField.ACCEPTED_REQUESTS)
        self.row.add(ListenerField.ACCEPTED_PAYLOADS, count)
        by_tenant = self._tenant_rows[tenant]
        by_tenant.add(TenantField.ACCEPTED_REQUESTS)
        by_tenant.add(TenantField.ACCEPTED_PAYLOADS, count)

    def _write_failed(self, e: OSError) -> None:
        self.row[ListenerField.SPOOL_ERROR] = e.errno or 5
        self.row.add(ListenerField.OVERLOAD_REJECTIONS)
        if self.blocked is None:
            log.error("listener %d: cannot write the request log (%s): answering 503 until it can", self.index, e)
        self.blocked = f"request log not writable: {e.strerror or e}"

    def count_rejection(self, rate_limited_tenant: int | None = None) -> None:
        with self.lock:
            self.row.add(ListenerField.REJECTED_REQUESTS)
            if rate_limited_tenant is not None:
                self._tenant_rows[rate_limited_tenant].add(TenantField.RATE_LIMITED)

    # -- for the keeper ----------------------------------------------------------------------------
    def pending_before(self, epoch: int) -> int:
        """Requests of epochs other than `epoch` logged and not yet synced ("always")."""
        with self.lock:
            return sum(n for e, n in self._pending.items() if e != epoch)

    def pending(self) -> int:
        """Requests logged whose reference is not yet in the pipe."""
        with self.lock:
            waiting = sum(self._pending.values())
        return waiting + self.writer.backlog

    def begin_epoch(self, epoch: int) -> tuple[int, int]:
        """Adopt `epoch` now if no request did; return its cut."""
        with self.lock:
            if epoch != self.epoch:
                self.epoch, self.cut = epoch, self.log.position()
            return self.cut

    def begin_drain(self) -> None:
        with self.lock:
            self.draining = True
