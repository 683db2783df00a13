"""The uploader process: take references off the shared queue, batch the logged requests they
point at, write objects to the sink through `Delivery`.

`run_uploader` is the process target (module level, so the `spawn` start method can import
it). Each process builds its own sink client inside the child. Its life:

1. boot: take its lock, recover its journal (and those of uploader indexes that no longer
   exist: index k goes to k mod workers.count), build the sink. Intents left open by the
   previous process of the index are sent first, to their own keys. A failure here exits with
   CHILD_EXIT_BOOT_FAILED, so the supervisor stops respawning.
2. loop: take up to a few dozen references, read their records from the logs, batch them;
   every batch that is full or old enough becomes a journaled intent and goes to the sender
   thread, which does the PUT while the main thread goes on taking. At most one object waits
   behind the one being sent: while the sink is slow or down, the uploader stops taking, the
   queue fills, and the listeners answer 503.
3. epochs: when the supervisor bumps the epoch (a child died), the uploader drops what it holds
   and has not journaled (the re-index puts it back on the queue), acknowledges the epoch, and
   ignores references of older epochs from then on. Journaled intents stay its own.
4. drain: once the listeners are quiet and re-indexed and the queue is empty, it cuts what it
   holds, waits for the sender, and exits 0. At the drain deadline it exits at once, even in
   the middle of a PUT: the intent is on disk, and the next start sends it again.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from .batching import Batch, Partitions
from .child import setup_child
from .config import Config
from .delivery import DeadlineReached, Delivery
from .errors import CHILD_EXIT_BOOT_FAILED
from .histograms import DeliveryHistograms
from .journal import Intent, Journal
from .refqueue import Ref, RefQueue, epoch_tag
from .requestlog import Part, append_landed, read_record, segment_path
from .scoreboard import ChildField, Control, ListenerField, Phase, Role, Scoreboard, UploaderField, now_ms
from .sinks import build_sink
from .spool import Lock, Spool
from .states import ChildState
from .timing import Every

log = logging.getLogger(__name__)
_STATES = list(ChildState)

TAKE_TIMEOUT_S = 0.1  # longest wait on an empty queue: bounds heartbeat, epoch and age checks
TAKE_MOST = 64  # references read at once
GATHER_S = 0.005  # after a small take, how long to let references gather
FD_CACHE = 32
COMPACT_EVERY_S = 1.0


def journal_fsync(config: Config) -> str:
    return config.spool.journal_fsync if config.spool.on_disk else "none"


class Sender(threading.Thread):
    """Delivers intents one at a time, in order, while the main thread goes on batching."""

    def __init__(self, delivery: Delivery, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.delivery = delivery
        self._work: deque[tuple[Intent, Journal, bytes | None]] = deque()
        self._cond = threading.Condition()
        self._busy = 0  # payloads of the object being sent
        self.deadline_hit = False

    def submit(self, intent: Intent, journal: Journal, body: bytes | None) -> None:
        with self._cond:
            self._work.append((intent, journal, body))
            self._cond.notify_all()

    def has_room(self) -> bool:
        """Room for one object to wait behind the one being sent."""
        with self._cond:
            return len(self._work) < 2

    def wait_for_room(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._work) < 2 or self.deadline_hit, timeout)

    def idle(self) -> bool:
        with self._cond:
            return not self._work and not self._busy

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: (not self._work and not self._busy) or self.deadline_hit, timeout)

    @property
    def pending_payloads(self) -> int:
        """Payloads of the objects waiting and of the one being sent (it stays first in line)."""
        with self._cond:
            return sum(i.count for i, _, _ in self._work)

    def run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._work))
                intent, journal, body = self._work[0]
                self._busy = intent.count
            try:
                self.delivery.deliver(intent, journal, body)
            except DeadlineReached:
                with self._cond:
                    self.deadline_hit = True
                    self._cond.notify_all()
                return
            with self._cond:
                self._work.popleft()
                self._busy = 0
                self._cond.notify_all()


class Uploader:
    def __init__(self, index: int, config: Config, queue: RefQueue, board: Scoreboard, delivery: Delivery,
                 journals: list[Journal], spool: Spool, parent: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.config = config
        self.queue = queue
        self.board = board
        self.row = board.uploader(index)
        self.delivery = delivery
        self.journal = journals[0]
        self.orphans = journals[1:]
        self.spool = spool
        self.parent = parent
        self.clock = clock
        self.batcher = Partitions.for_config(config, clock)
        self.target_bytes = config.batch.target_object_bytes
        if self.target_bytes:  # until a ratio is measured, as if nothing compressed
            self.batcher.set_object_bytes(self.target_bytes)
        self.sender = Sender(delivery, f"sender-{index}")
        self.epoch = board.epoch
        self.overflow_base = self.row[UploaderField.OVERFLOW_PAYLOADS]  # of earlier processes of this index
        self._fds: dict[tuple[int, int], int] = {}
        self._stale = 0

    # -- epochs ---------------------------------------------------------------------------------
    def follow_epoch(self) -> None:
        epoch = self.board.epoch
        if epoch == self.epoch:
            return
        dropped = self.batcher.clear()
        self.epoch = epoch
        self.row[UploaderField.ACK_EPOCH] = epoch
        log.info("uploader %d: epoch %d: dropped %d unjournaled payloads (the re-index puts them back)",
                 self.index, epoch, dropped)

    # -- taking ----------------------------------------------------------------------------------
    def _fd(self, ref: Ref) -> int:
        key = ref.segment_key
        fd = self._fds.get(key)
        if fd is None:
            if len(self._fds) >= FD_CACHE:
                self.close_fds()
            fd = self._fds[key] = os.open(segment_path(self.spool.logs_dir, ref.listener, ref.segment),
                                          os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def close_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def add(self, ref: Ref) -> None:
        if ref.epoch != epoch_tag(self.epoch):
            # a reference of an epoch this uploader has not seen yet (a listener saw the bump
            # first) is valid: follow, then take it; one of an older epoch is stale (re-indexed)
            self.follow_epoch()
            if ref.epoch != epoch_tag(self.epoch):
                self._stale += 1
                return
        part = Part(ref.listener, ref.segment, ref.offset, ref.first_line, ref.count)
        try:
            got = read_record(self._fd(ref), ref)
        except FileNotFoundError:
            got = None
        if got is None:
            # damaged storage under a reference of this epoch: keep what is there for inspection,
            # and record the part as landed so its segment can go (it can never be delivered)
            self.row.add(UploaderField.DAMAGED_RECORDS)
            path = segment_path(self.spool.logs_dir, ref.listener, ref.segment)
            try:
                data = os.pread(self._fd(ref), ref.length, ref.offset)
            except OSError:
                data = b""
            self.spool.quarantine(path, data, f"record at offset {ref.offset} fails its checksum")
            append_landed(self.spool.logs_dir, [part])
            return
        self.batcher.add(part, got.received_at, got.tenant, got.lines)
        if self.target_bytes and not self.delivery.stored_ratio:
            first = self.batcher.first_ready()
            if first is not None:  # the first object: measure the ratio now, before more are cut
                self.delivery.encode(first.body(), self.delivery.encoding, self.delivery.level)
                self.follow_target()

    def hand_over(self, batches: list[Batch]) -> None:
        for batch in batches:
            while True:
                try:
                    intent = self.delivery.cut(batch, self.journal)
                    break
                except OSError as e:  # journal full: wait (the queue fills and ingest answers 503)
                    log.error("uploader %d: cannot write an intent (%s); retrying", self.index, e)
                    self.row.beat()
                    time.sleep(0.5)
                    if self.deadline_passed():
                        return
            self.sender.submit(intent, self.journal, batch.body())
        if self.target_bytes and batches:
            self.follow_target()

    def follow_target(self) -> None:
        """Objects as large as it takes for their stored size to reach batch.target_object_bytes."""
        ratio = self.delivery.stored_ratio
        if not ratio:
            return
        want = int(self.target_bytes / max(ratio, 0.001))
        if abs(want - self.batcher.object_bytes) > self.batcher.object_bytes // 20:
            self.batcher.set_object_bytes(want)

    # -- draining ---------------------------------------------------------------------------------
    def deadline_passed(self) -> bool:
        deadline = self.board.control[Control.DEADLINE_MS]
        return bool(deadline) and now_ms() >= deadline

    def listeners_done(self) -> bool:
        """Every listener is quiet (nothing between log and queue) and re-indexed; one that is
        coming back (a successor adopts the log of a dead one) is waited for."""
        epoch = self.board.epoch
        for i in range(self.board.counts[Role.LISTENER]):
            view = self.board.child(Role.LISTENER, i)
            if _STATES[view[ChildField.STATE]] in (ChildState.BACKOFF, ChildState.STARTING):
                return False
            pid = view[ChildField.PID]
            if not pid:
                continue
            row = self.board.listener(i)
            if row[ListenerField.QUIET_PID] != pid or row[ListenerField.INDEXED_EPOCH] != epoch:
                return False
        return True

    def can_finish(self) -> bool:
        return self.listeners_done() and self.queue.depth() == 0

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, resend: list[tuple[Intent, Journal]]) -> None:
        for intent, journal in resend:
            self.sender.submit(intent, journal, None)
        self.sender.start()
        housekeeping_due = Every(COMPACT_EVERY_S)
        while True:
            self.row.beat()
            if os.getppid() != self.parent:
                log.error("uploader %d: the supervisor is gone; exiting (the next start delivers the rest)", self.index)
                return
            self.follow_epoch()
            if self.board.phase is not Phase.RUNNING:
                if self.deadline_passed() or self.sender.deadline_hit:
                    log.warning("uploader %d: drain deadline passed; %d payloads stay logged for the next start",
                                self.index, len(self.batcher) + self.sender.pending_payloads)
                    return
                if self.can_finish():
                    self.hand_over(self.batcher.take_all())
                    idle = self.sender.wait_idle(0.1) and not self.sender.deadline_hit
                    if idle and self.can_finish() and not len(self.batcher):
                        log.info("uploader %d: drained, exiting", self.index)
                        return
                    continue
            if not self.sender.has_room():
                self.sender.wait_for_room(TAKE_TIMEOUT_S)
                self._publish()
                continue
            due = self.batcher.due_at()
            timeout = TAKE_TIMEOUT_S if due is None else min(TAKE_TIMEOUT_S, max(0.0, due - self.clock()))
            refs = self.queue.take(TAKE_MOST, timeout)
            for ref in refs:
                self.add(ref)
            if not refs:
                self.close_fds()  # idle: let deleted segments go (tmpfs frees them on the last close)
            elif len(refs) < TAKE_MOST // 2:
                # a trickle: let references gather for a moment rather than wake (with the other
                # uploaders) for each one; objects wait for batch.max_age_ms anyway
                time.sleep(GATHER_S)
            self.hand_over(self.batcher.take_ready())
            self._publish()
            if housekeeping_due():
                self.housekeeping()

    def _publish(self) -> None:
        self.row[UploaderField.PENDING_PAYLOADS] = len(self.batcher) + self.sender.pending_payloads
        self.row[UploaderField.OPEN_PARTITIONS] = self.batcher.open_partitions
        self.row[UploaderField.OVERFLOW_PAYLOADS] = self.overflow_base + self.batcher.overflow_payloads

    def housekeeping(self) -> None:
        self.journal.sync()
        self.journal.compact()
        for orphan in list(self.orphans):
            orphan.compact()
            if orphan.remove_if_empty():
                self.orphans.remove(orphan)
                log.info("uploader %d: journal %s of a former uploader is done and removed", self.index, orphan.dir)


def adopt_journals(spool: Spool, index: int, count: int, fsync: str, held: list[Lock]) -> list[Journal]:
    """Its own journal, then those of indexes >= count that map to it (k mod count); the locks
    of those go into `held` (they must live as long as the process)."""
    journals = [Journal(spool.journal_dir(str(index)), fsync)]
    for k in spool.indexes(spool.journals_dir):
        if k >= count and k % count == index:
            lock = spool.child_lock(f"uploader-{k}")
            if lock.acquire(0):
                held.append(lock)
                journals.append(Journal(spool.journal_dir(str(k)), fsync))
    return journals


def run_uploader(index: int, config: Config, queue: RefQueue, board: Scoreboard) -> None:
    """Process target of uploader `index`."""
    spool = Spool(config.spool)
    held = [spool.child_lock(f"uploader-{index}")]
    parent = setup_child(config.log, f"uploader-{index}", held[0])
    row = board.uploader(index)
    row.beat()
    try:
        journals = adopt_journals(spool, index, config.workers.count, journal_fsync(config), held)
        resend = [(intent, j) for j in journals for intent in j.recover()]
        sink = build_sink(config.sink)
    except Exception:
        log.exception("uploader %d: cannot boot", index)
        sys.exit(CHILD_EXIT_BOOT_FAILED)
    delivery = Delivery.for_config(f"uploader {index}", config, sink, spool, row,
                                   deadline_ms=lambda: board.control[Control.DEADLINE_MS], alive=row.beat)
    delivery.histograms = DeliveryHistograms(board.histograms(Role.UPLOADER, index))
    uploader = Uploader(index, config, queue, board, delivery, journals, spool, parent)
    row[UploaderField.ACK_EPOCH] = uploader.epoch
    row[UploaderField.BOOTED_PID] = os.getpid()
    log.info("uploader %d: started (pid %d, sink %s, %d objects to send again)", index, os.getpid(), sink.describe(),
             len(resend))
    uploader.run(resend)
    # the sender may still be in a PUT at the drain deadline: its intent is journaled, so leave now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

