"""The listener process: the Falcon app on waitress, its request log, and its keeper.

`run_listener` is the process target. Each listener binds its own socket on the port with
SO_REUSEPORT, so the kernel spreads connections evenly over the listeners that are up (one
shared socket lets whichever process polls first take most of them); the supervisor holds a
bound, non-listening socket of the same group that reserves the port. Each listener:

- serves HTTP in waitress' threads; the ingest handler calls `Intake.submit` (log, then queue);
- runs the *keeper* in its main thread, every 50 ms:
  - follows the epoch: after any abnormal child death the supervisor bumps it, and the keeper
    re-indexes: it waits until every live uploader has acknowledged the epoch (dropped what it
    held unjournaled), reads every journal's intents, then the `.landed` files, and puts back on
    the queue every part of its log before the epoch's cut that is in neither. Reading the
    journals first matters: a journal file is deleted only after its intents' parts were
    recorded as landed, so a part missed in one is found in the other;
  - rotates the current segment after a second, fdatasyncs under the "interval" policy, deletes
    segments whose every line has landed, publishes its log's size, watches the spool cap and
    retries a log that could not be written, so service resumes by itself;
  - follows the drain: refuse new requests, report QUIET once nothing is between log and
    queue, and at EXIT stop serving, seal the log and leave.

At boot a listener adopts its predecessor's folder (and those of listener indexes that no
longer exist): torn tails are cut, damaged bytes quarantined, and what is unlanded is
re-indexed like after an epoch change.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import waitress

from .app import create_app, rejection_headers
from .child import setup_child
from .config import Config
from .front import create_server
from .errors import CHILD_EXIT_BOOT_FAILED
from .health import Health, shared_refusals
from .intake import Intake
from .journal import read_all_intents
from .ratelimit import RateLimiter
from .refqueue import RefQueue
from .requestlog import Covered, RequestLog
from .scoreboard import ChildField, ListenerField, Phase, Role, Scoreboard, UploaderField
from .spool import Lock, Spool
from .timing import Every

log = logging.getLogger(__name__)

TICK_S = 0.05
COLLECT_EVERY_S = 0.2
USAGE_EVERY_S = 1.0
PROBE_BYTES = 65536


def bind_socket(host: str, port: int, listen: bool = True) -> socket.socket:
    """A socket of the port's SO_REUSEPORT group: each listener has its own, so the kernel
    spreads new connections evenly over the listeners that are up (a dead one's socket closes
    with it and leaves the group). The supervisor binds one without listening, which reserves
    the port (and finds it for port 0) and receives no connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after any exit
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


class Keeper:
    def __init__(self, index: int, config: Config, intake: Intake, board: Scoreboard, spool: Spool,
                 queue: RefQueue) -> None:
        self.index = index
        self.config = config
        self.intake = intake
        self.log = intake.log
        self.board = board
        self.row = board.listener(index)
        self.spool = spool
        self.queue = queue
        self.pid = os.getpid()
        self.collect_due = Every(COLLECT_EVERY_S)
        self.usage_due = Every(USAGE_EVERY_S)
        self.sync_due = Every(config.spool.journal_fsync_interval_ms / 1000)
        self._probe_failed = False

    # -- epochs and the re-index ---------------------------------------------------------------------
    def uploaders_acknowledged(self, epoch: int) -> bool:
        for k in range(self.board.counts[Role.UPLOADER]):
            pid = self.board.child(Role.UPLOADER, k)[ChildField.PID]
            row = self.board.uploader(k)
            if pid and not (row[UploaderField.ACK_EPOCH] == epoch and row[UploaderField.BOOTED_PID] == pid):
                return False
        return True

    def reindex(self, epoch: int) -> bool:
        """Put back every unlanded, unjournaled part before the cut of `epoch`. False if a newer
        epoch (or the exit) interrupted it."""
        cut = self.intake.begin_epoch(epoch)

        def current() -> bool:
            self.row.beat()
            return self.board.epoch == epoch and self.board.phase is not Phase.EXIT

        while self.intake.pending_before(epoch) or not self.uploaders_acknowledged(epoch):
            if not current():
                return False
            time.sleep(0.01)
        covered: Covered = {}
        for intent in read_all_intents(self.spool.journals_dir):  # journals first, then .landed
            for p in intent.parts:
                covered.setdefault((p.listener, p.segment, p.offset), []).append((p.first_line, p.count))
        parts = self.log.uncovered(covered, cut, self.intake.lock)
        with self.intake.lock:
            refs = [self.log.ref(p, epoch) for p in parts]
        done = 0
        while done < len(refs):
            done += self.queue.put_many(refs[done:])
            if done < len(refs):
                if not current():
                    return False
                time.sleep(0.005)
        payloads = sum(r.count for r in refs)
        self.row.add(ListenerField.REINDEXED_PAYLOADS, payloads)
        self.row[ListenerField.INDEXED_EPOCH] = epoch
        if refs:
            log.info("listener %d: epoch %d: %d payloads put back on the queue", self.index, epoch, payloads)
        return True

    # -- the spool -------------------------------------------------------------------------------------
    def check_spool(self) -> None:
        intake = self.intake
        if self.row[ListenerField.SPOOL_ERROR] and self.probe():
            self.row[ListenerField.SPOOL_ERROR] = 0
            log.info("listener %d: the request log is writable again", self.index)
        if self.usage_due():
            self.row[ListenerField.SPOOL_USED] = self.spool.used_bytes()
        reasons = shared_refusals(self.board, self.config.spool.max_bytes)
        self.row[ListenerField.CAP_BLOCKED] = int(any(r.startswith("spool.max_bytes") for r in reasons))
        if self.row[ListenerField.SPOOL_ERROR]:
            reasons.insert(0, "request log not writable")
        intake.blocked = "; ".join(reasons) or None
        intake.writer.depth = self.queue.depth()  # what uploaders took meanwhile (and other listeners put)
        intake.others_bytes = sum(r[ListenerField.LOG_BYTES] for i, r in enumerate(self.board.rows(Role.LISTENER))
                                  if i != self.index)

    def probe(self) -> bool:
        """Can the log's folder take a write again? (a full disk or an I/O error may heal)"""
        path = self.log.dir / f".probe-{self.pid}"
        try:
            self.log.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, b"\0" * PROBE_BYTES)
                if self.config.spool.on_disk:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
            self._probe_failed = False
            return True
        except OSError as e:
            if not self._probe_failed:
                log.error("listener %d: the request log folder still refuses writes (%s); probing every %.0f ms",
                          self.index, e, TICK_S * 1000)
            self._probe_failed = True
            return False

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> bool:
        """One tick; False once the listener must exit."""
        self.row.beat()
        phase = self.board.phase
        if phase is not Phase.RUNNING and not self.intake.draining:
            self.intake.begin_drain()
        if self.board.epoch != self.row[ListenerField.INDEXED_EPOCH]:
            self.reindex(self.board.epoch)
        quiet = self.intake.draining and not self.intake.pending()
        if quiet and self.row[ListenerField.QUIET_PID] != self.pid:
            self.row[ListenerField.QUIET_PID] = self.pid
            log.info("listener %d: draining: every request it accepted is logged and indexed", self.index)
        with self.intake.lock:
            self.log.rotate_if_old()
            if quiet:
                self.log.seal()  # so that its segments can go as soon as they have landed
        if self.log.fsync == "interval" and self.sync_due():
            try:
                self.log.sync()
            except OSError as e:
                log.error("listener %d: fdatasync of the request log failed: %s", self.index, e)
        if self.collect_due():
            self.log.collect(self.intake.lock)
        self.row[ListenerField.LOG_BYTES] = self.log.total_bytes
        self.check_spool()
        return phase is not Phase.EXIT


def adopt_logs(log_: RequestLog, spool: Spool, index: int, count: int, held: list[Lock]) -> int:
    """Its own folder, then those of listener indexes >= count that map to it (k mod count)."""
    found = log_.adopt(index)
    for k in spool.indexes(spool.logs_dir):
        if k >= count and k % count == index:
            lock = spool.child_lock(f"listener-{k}")
            if lock.acquire(0):
                held.append(lock)
                found += log_.adopt(k)
    return found


def run_listener(index: int, config: Config, queue: RefQueue, board: Scoreboard, host: str, port: int) -> None:
    """Process target of listener `index`."""
    spool = Spool(config.spool)
    held = [spool.child_lock(f"listener-{index}")]
    parent = setup_child(config.log, f"listener-{index}", held[0])
    row = board.listener(index)
    row.beat()
    sp = config.spool
    try:
        request_log = RequestLog(spool.logs_dir, index, sp.journal_fsync if sp.on_disk else "none", sp.segment_bytes,
                                 quarantine=spool.quarantine)
        adopted = adopt_logs(request_log, spool, index, config.http.listeners, held)
    except Exception:
        log.exception("listener %d: cannot boot", index)
        sys.exit(CHILD_EXIT_BOOT_FAILED)
    row.add(ListenerField.QUARANTINED_BYTES, request_log.damaged_bytes)
    intake = Intake(index, request_log, queue, board, config.queue.max_items, config.queue.max_bytes,
                    always_sync=sp.on_disk and sp.journal_fsync == "always", tenant_names=config.tenancy.names)
    health = Health(board, queue, config, intake, supervisor_pid=parent)
    limiter = RateLimiter(board, config.tenancy, spool.locks_dir / "tenant-rates")
    app = create_app(config, intake, health, limiter)
    try:
        sock = bind_socket(host, port)
    except OSError:
        log.exception("listener %d: cannot listen on %s:%d", index, host, port)
        sys.exit(CHILD_EXIT_BOOT_FAILED)
    serve_args = (app, config, sock, app.payloads.gate, lambda ex: rejection_headers(ex, config.http.retry_after_s),
                  intake.count_rejection)
    stop_serving: Callable[[], None] | None = None  # waitress has no graceful stop: os._exit below ends it
    if config.http.server == "uvloop":
        from .fastfront import create_server as create_fast_server  # the `fast` extra: imported only when asked for

        fast = create_fast_server(*serve_args)
        serve, stop_serving = fast.run, fast.stop
    else:
        serve = create_server(*serve_args).run
    keeper = Keeper(index, config, intake, board, spool, queue)
    row[ListenerField.LOG_BYTES] = request_log.total_bytes
    keeper.check_spool()  # the spool's state before the first request; the re-index follows in the loop
    threading.Thread(target=serve, name=config.http.server, daemon=True).start()
    row[ListenerField.SERVING_PID] = os.getpid()
    log.info("listener %d: serving (pid %d, %d payloads of earlier processes adopted)", index, os.getpid(), adopted)
    run_keeper(keeper, lambda: os.getppid() != parent)
    if stop_serving is not None:
        stop_serving()  # stop accepting; the requests being handled answer, then every connection closes
    with intake.lock:
        request_log.seal()
    request_log.collect(intake.lock)  # what the uploaders landed while draining goes now
    row[ListenerField.LOG_BYTES] = request_log.total_bytes
    request_log.close()
    log.info("listener %d: exiting", index)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # waitress' threads may hold connections: the process is done


def run_keeper(keeper: Keeper, orphaned: Callable[[], bool]) -> None:
    while True:
        time.sleep(TICK_S)
        if orphaned():
            log.error("listener %d: the supervisor is gone; exiting", keeper.index)
            return
        try:
            if not keeper.step():
                return
        except Exception:  # a bug in housekeeping must not stop ingest: log it, go on
            log.exception("listener %d: keeper step failed", keeper.index)
