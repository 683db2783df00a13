"""The uploader process: take items off the shared queue, batch them, write objects to the sink.

`run_uploader` is the process target (module level, so the `spawn` start method can import it).
Each process builds its own sink client inside the child. Its life:

1. boot: build the sink, load the slot's in-flight file (what a previous occupant of the slot
   held when it died or was spilled) into the batcher; a failure here exits with
   UPLOADER_EXIT_BOOT_FAILED so the supervisor stops respawning.
2. loop: take an item (logged to the in-flight file before the queue's lock is released),
   write the batches that are full or old enough, rewrite the in-flight file to what is still
   pending, heartbeat.
3. on the STOP sentinel: write everything it holds and exit 0. When the drain deadline passes
   with the sink still failing, it stops retrying and leaves its batches in the in-flight file:
   the next start delivers them.

Retryable sink errors are retried with exponential backoff and full jitter; while it retries,
it takes nothing, so the bounded queue fills and the handlers answer 503: memory stays flat.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable

from .batching import Batch, Batcher
from .board import Board, GlobalField, SlotField, now_ms
from .child import setup_child
from .config import BatchConfig, Config
from .errors import UPLOADER_EXIT_BOOT_FAILED, PermanentSinkError, RetryableSinkError
from .jobqueue import JobQueue
from .records import Item
from .sinks import KeyMaker, Sink, build_sink
from .spool import SlotFile, Spool

log = logging.getLogger(__name__)

TAKE_TIMEOUT_S = 0.25  # longest wait on an empty queue: bounds heartbeat and age checks
BACKLOG_TAKE_S = 0.02  # while gathering a backlog, how long to wait for the next item
ORPHAN_GRACE_MS = 10_000  # an orphaned uploader's last attempt to write what it holds


class DrainDeadline(Exception):
    """The drain deadline passed while the sink was failing: leave the rest in the spool."""


def encode_object(batch: Batch, config: BatchConfig, keys: KeyMaker) -> tuple[str, bytes, str | None]:
    """Key, body and Content-Encoding of the object that stores `batch`."""
    body = batch.body()
    if config.compression == "gzip":
        return keys.key(batch.oldest), gzip.compress(body, compresslevel=config.gzip_level, mtime=0), "gzip"
    return keys.key(batch.oldest), body, None


class Uploader:
    def __init__(self, slot: int, config: Config, queue: JobQueue | None, board: Board, sink: Sink,
                 slot_file: SlotFile | None, spool: Spool, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, parent: int | None = None) -> None:
        self.slot = slot
        self.config = config
        self.queue = queue
        self.board = board
        self.sink = sink
        self.slot_file = slot_file
        self.spool = spool
        self.clock = clock
        self.sleep = sleep
        b = config.batch
        self.batcher = Batcher(b.max_payloads, b.max_bytes, b.max_age_ms / 1000.0, clock)
        self.keys = KeyMaker(config.sink.prefix, b.compression == "gzip")
        self.parent = os.getppid() if parent is None else parent
        self._sender: threading.Thread | None = None
        self._unsent: list[Batch] = []  # what the sender could not write before the drain deadline

    # -- life ---------------------------------------------------------------------------------
    def load_inflight(self) -> int:
        assert self.slot_file is not None
        items = self.slot_file.load()
        for item in items:
            self.batcher.add(item)
        n = sum(i.count for i in items)
        self.board.set(self.slot, SlotField.PENDING_PAYLOADS, len(self.batcher))
        return n

    def _on_taken(self, item: Item) -> None:
        assert self.slot_file is not None
        if item.count:
            self.slot_file.append(item)
            self.board.add(self.slot, SlotField.TAKEN_ITEMS)
            self.board.add(self.slot, SlotField.TAKEN_BYTES, len(item.lines))

    def run(self) -> None:
        assert self.queue is not None and self.slot_file is not None
        stopping = False
        while not stopping:
            self.board.beat(self.slot)
            due = self.batcher.due_at()
            timeout = TAKE_TIMEOUT_S if due is None else min(TAKE_TIMEOUT_S, max(0.0, due - self.clock()))
            item = self.queue.take(self.board, self.slot, timeout, self._on_taken)
            # A backlog (sink slow, uploader restarted) is all past max_age: take what is ready
            # right now, up to a full batch, before cutting, or each item would be its own object.
            taken = 0
            while item is not None:
                if item.seq < 0:
                    stopping = True
                    break
                self.batcher.add(item)
                taken += item.count
                if taken >= self.batcher.max_payloads:
                    break
                if self._sender is not None and not self._sender.is_alive():
                    # drop what just landed from the in-flight file now: a kill before the
                    # rewrite would send it twice
                    self.reap_sender(wait=False)
                # a short wait, not 0: the other uploader holds the read lock while it polls
                item = self.queue.take(self.board, self.slot, BACKLOG_TAKE_S, self._on_taken)
            if taken:
                self.board.set(self.slot, SlotField.PENDING_PAYLOADS, len(self.batcher))
            batches = self.batcher.take_all() if stopping else self.batcher.take_ready()
            try:
                self.reap_sender(wait=bool(batches) or stopping, holding=batches)
                if batches:
                    self.start_sender(batches)
                    if stopping:
                        self.reap_sender(wait=True)
            except DrainDeadline:
                log.warning("uploader %d: drain deadline passed with the sink failing; %d payloads stay in %s",
                            self.slot, len(self.batcher), self.slot_file.path)
                return
            if os.getppid() != self.parent:
                # orphaned (the supervisor was killed): try for a while, then leave the rest in
                # the in-flight file, which the next daemon's uploader in this slot picks up
                log.error("uploader %d: supervisor is gone; writing what it holds and exiting", self.slot)
                self.board.gset(GlobalField.DRAIN_DEADLINE_MS, now_ms() + ORPHAN_GRACE_MS)
                try:
                    self.reap_sender(wait=True)
                    if len(self.batcher):
                        self.start_sender(self.batcher.take_all())
                        self.reap_sender(wait=True)
                except DrainDeadline:
                    pass
                return
        log.info("uploader %d: drained, exiting", self.slot)

    # -- delivery -----------------------------------------------------------------------------
    # One sender thread uploads while the main thread goes on taking items: a PUT is mostly
    # waiting on the network (the GIL is free), and an uploader that stops taking while it
    # uploads halves what the pool drains. At most one upload is in flight per uploader. Only
    # the main thread touches the in-flight file: it rewrites it once an upload is done.
    def start_sender(self, batches: list[Batch]) -> None:
        self._unsent = []
        self._sender = threading.Thread(target=self._send, args=(batches,), name="sender", daemon=True)
        self._sender.start()

    def _send(self, batches: list[Batch]) -> None:
        for i, batch in enumerate(batches):
            try:
                self.upload(batch)
            except DrainDeadline:
                self._unsent = batches[i:]
                return

    def reap_sender(self, wait: bool, holding: list[Batch] | None = None) -> None:
        """Collect a finished upload (or wait for it): rewrite the in-flight file to what is
        still pending, `holding` (batches cut but not yet handed to a sender) included; after a
        drain deadline, put the unsent batches back and raise DrainDeadline."""
        sender = self._sender
        if sender is None:
            return
        while sender.is_alive():
            if not wait:
                return
            self.board.beat(self.slot)
            sender.join(0.2)
        self._sender = None
        assert self.slot_file is not None
        unsent, self._unsent = self._unsent, []
        if unsent:
            # the drain deadline passed: everything goes back to the batcher and stays in the file
            for batch in unsent + list(holding or []):
                for item in batch.items:
                    self.batcher.add(item)
            if holding:
                holding.clear()
            self.slot_file.rewrite(self.batcher.pending())
            self.board.set(self.slot, SlotField.PENDING_PAYLOADS, len(self.batcher))
            raise DrainDeadline()
        held = [item for batch in holding or [] for item in batch.items]
        self.slot_file.rewrite(self.batcher.pending() + held)
        self.board.set(self.slot, SlotField.PENDING_PAYLOADS, len(self.batcher) + sum(i.count for i in held))

    def upload(self, batch: Batch) -> None:
        """Write one batch; a permanent refusal sends it to the dead-letter spool instead."""
        key, body, encoding = encode_object(batch, self.config.batch, self.keys)
        try:
            self.put_with_retry(key, body, encoding, batch.count)
        except PermanentSinkError as e:
            path = self.spool.write_dead_letter(batch.items, f"{key}: {e}")
            self.board.add(self.slot, SlotField.DEAD_LETTERED_PAYLOADS, batch.count)
            log.error("uploader %d: sink refused %s for good (%s); %d payloads dead-lettered to %s",
                      self.slot, key, e, batch.count, path)
            return
        self.board.add(self.slot, SlotField.UPLOADED_PAYLOADS, batch.count)
        self.board.add(self.slot, SlotField.UPLOADED_OBJECTS)
        log.debug("uploader %d: wrote %s (%d payloads, %d bytes)", self.slot, key, batch.count, len(body))

    def put_with_retry(self, key: str, body: bytes, encoding: str | None, count: int) -> None:
        """Retry retryable errors with exponential backoff and full jitter, until the drain deadline."""
        sink_cfg = self.config.sink
        attempt = 0
        while True:
            try:
                self.sink.put(key, body, encoding)
            except RetryableSinkError as e:
                self.board.add(self.slot, SlotField.FAILED_UPLOADS)
                self.board.set(self.slot, SlotField.LAST_FAIL_MS, now_ms())
                cap = min(sink_cfg.retry_max_ms, sink_cfg.retry_base_ms * 2 ** min(attempt, 30)) / 1000.0
                delay = random.uniform(0, cap)
                attempt += 1
                log.warning("uploader %d: upload of %s failed (attempt %d, %d payloads), retrying in %.2fs: %s",
                            self.slot, key, attempt, count, delay, e)
                self._wait(delay)
                continue
            except PermanentSinkError:
                self.board.add(self.slot, SlotField.FAILED_UPLOADS)
                self.board.set(self.slot, SlotField.LAST_FAIL_MS, now_ms())
                raise
            self.board.set(self.slot, SlotField.LAST_OK_MS, now_ms())
            return

    def _wait(self, delay: float) -> None:
        """Sleep between retries, heartbeating, and give up at the drain deadline."""
        end = time.monotonic() + delay
        while True:
            self.board.beat(self.slot)
            deadline = self.board.gget(GlobalField.DRAIN_DEADLINE_MS)
            if deadline and now_ms() >= deadline:
                raise DrainDeadline()
            left = end - time.monotonic()
            if left <= 0:
                return
            self.sleep(min(left, 0.2))


def run_uploader(slot: int, config: Config, queue: JobQueue, board: Board) -> None:
    """Process target of an uploader slot."""
    parent = setup_child(config.log, f"uploader-{slot}")
    try:
        spool = Spool(config.spool.path, fsync=config.spool.durability == "disk")
        # the in-flight file takes over from the journal: as durable as the journal's policy
        always = config.spool.durability == "disk" and config.spool.journal_fsync == "always"
        slot_file = SlotFile(spool.slot_path(slot), fsync=always)
        uploader = Uploader(slot, config, queue, board, build_sink(config.sink), slot_file, spool, parent=parent)
        spool.claim_overflow(slot_file)  # what listeners spilled when the queue was rebuilt
        loaded = uploader.load_inflight()
    except Exception:
        log.exception("uploader %d: cannot boot", slot)
        sys.exit(UPLOADER_EXIT_BOOT_FAILED)
    board.set(slot, SlotField.BOOTED_MS, now_ms())
    log.info("uploader %d: started (pid %d, sink %s, %d payloads to deliver again)",
             slot, os.getpid(), uploader.sink.describe(), loaded)
    uploader.run()
