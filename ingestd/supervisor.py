"""The supervisor: owns the processes, the signals, the listener and the drain.

Shaped like gunicorn's arbiter. Signal handlers only record the signal number and wake the
control loop; the loop (`run`) handles signals, reaps uploaders and restarts them with
backoff, kills an uploader whose heartbeat stopped, and pings systemd. An uploader that cannot
even boot, too many times in a row, ends in FATAL and stops the daemon with a clear message
instead of a restart storm.

The Falcon app runs on waitress in a thread of this process. Waitress has no graceful-stop
API, so the drain is ours: the intake flips to "draining" (ingest answers 503, `/health`
answers 503 "draining", the listener stays up), one STOP sentinel per uploader goes on the
queue behind everything accepted, the uploaders write what they hold and exit, and whatever
could not be written by `shutdown.drain_timeout_s` stays in the spool for the next start.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from queue import Full
from typing import Any

from . import __version__
from .app import create_app
from .board import Board, GlobalField, ProducerField, SlotField, now_ms
from .config import Config, bearer_tokens, parse_listen
from .errors import EXIT_OK, EXIT_STARTUP, EXIT_UPLOADER_BOOT, UPLOADER_EXIT_BOOT_FAILED, SpoolLockedError
from .health import Health, WorkerView
from .jobqueue import Intake, JobQueue
from .journal import Journal
from .listener import bind_socket, create_listener, open_journal, run_listener
from .records import STOP
from .spool import Spool
from .states import SlotState
from .systemd import Notifier, watchdog_interval
from .uploader import run_uploader

log = logging.getLogger(__name__)

TICK_S = 0.2
STABLE_AFTER_S = 10.0  # an uploader that lived this long resets its crash backoff
KILL_GRACE_S = 5.0  # after the drain deadline, how long uploaders get to leave before SIGKILL
STATUS_EVERY_S = 5.0  # how often STATUS= tells systemd the figures
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Slot:
    index: int
    state: SlotState = SlotState.STARTING
    process: SpawnProcess | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0
    crashes_in_a_row: int = 0
    boot_failures_in_a_row: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


@dataclass
class Listener:
    """A listener process (index >= 1; the supervisor itself is listener 0)."""

    index: int
    process: SpawnProcess | None = None
    restart_at: float = 0.0
    restarts: int = 0


class Supervisor:
    def __init__(self, config: Config, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.ctx: SpawnContext = multiprocessing.get_context("spawn")
        self.spool = Spool(config.spool.path, fsync=config.spool.durability == "disk")
        self.board = Board(self.ctx, config.workers.count, producers=config.http.listeners)
        self.board.gset(GlobalField.STARTED_MS, now_ms())
        self.board.pset(0, ProducerField.PID, os.getpid())
        self.queue = JobQueue(config.queue.max_items, ctx=self.ctx)
        self.journal: Journal | None = None  # opened in run(), once the spool is ours
        self.intake = Intake(self.queue, self.board, config.queue.max_bytes)
        self.slots = [Slot(i) for i in range(config.workers.count)]
        self.listeners = [Listener(i) for i in range(1, config.http.listeners)]  # 0 is this process
        self.health = Health(self.board, self.intake, config.queue.max_items, config.queue.max_bytes, self.worker_views)
        self.notifier = Notifier.from_environ(self.environ)
        self.signals: list[int] = []
        self.server: Any = None
        self.exit_code = EXIT_OK
        self._wake_r, self._wake_w = socket.socketpair()
        self._drain_deadline: float | None = None
        self._stops_sent = False
        self._ready_sent = False
        self._address = ("", 0)

    # -- views for health ----------------------------------------------------------------------
    def worker_views(self) -> list[WorkerView]:
        return [WorkerView(s.index, s.pid, s.alive, s.restarts, s.state.value) for s in self.slots]

    # -- signals: record and wake, nothing else --------------------------------------------------
    def _record_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def install_signals(self) -> None:
        for w in (self._wake_r, self._wake_w):
            w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)

    # -- processes ------------------------------------------------------------------------------
    def _start_child(self, target: Any, args: tuple[Any, ...], name: str) -> SpawnProcess:
        proc = self.ctx.Process(target=target, args=args, name=name, daemon=False)
        # The child inherits a blocked SIGINT and ignores it once it runs our code; a Ctrl-C
        # meanwhile stays pending here and is handled after the start, not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return proc

    def spawn_uploader(self, slot: Slot) -> None:
        self.board.set(slot.index, SlotField.BOOTED_MS, 0)
        self.board.beat(slot.index)
        proc = self._start_child(run_uploader, (slot.index, self.config, self.queue, self.board),
                                 f"ingestd-uploader-{slot.index}")
        slot.process = proc
        slot.state = SlotState.STARTING
        slot.started_at = time.monotonic()
        log.info("spawned uploader %d (pid %d)", slot.index, proc.pid)

    def spawn_listener(self, listener: Listener) -> None:
        host, port = self._address
        listener.process = proc = self._start_child(
            run_listener, (listener.index, self.config, self.queue, self.board, host, port),
            f"ingestd-listener-{listener.index}")
        log.info("spawned listener %d (pid %d)", listener.index, proc.pid)

    def reap_listeners(self) -> None:
        now = time.monotonic()
        for listener in self.listeners:
            proc = listener.process
            if proc is not None and not proc.is_alive():
                code = proc.exitcode
                proc.join(0)
                proc.close()
                listener.process = None
                self.board.pset(listener.index, ProducerField.PID, 0)
                if self._drain_deadline is None:
                    # what its feeder had not yet written to the pipe died with it (memory
                    # durability); a journal it kept goes to overflow when its successor starts
                    log.error("listener %d stopped by %s; restarting in 1s", listener.index,
                              f"signal {-code}" if code is not None and code < 0 else f"exit code {code}")
                    listener.restart_at = now + 1.0
                else:
                    self.board.pset(listener.index, ProducerField.FLUSHED, 1)
            elif proc is None and self._drain_deadline is None and now >= listener.restart_at:
                listener.restarts += 1
                self.spawn_listener(listener)

    def listeners_flushed(self) -> bool:
        assert self._drain_deadline is not None
        return time.monotonic() >= self._drain_deadline or all(
            self.board.pget(x.index, ProducerField.FLUSHED) or x.process is None for x in self.listeners)

    def stop_listeners(self) -> None:
        self.board.gset(GlobalField.LISTENERS_EXIT, 1)
        for listener in self.listeners:
            if listener.process is not None:
                listener.process.join(KILL_GRACE_S)
                if listener.process.is_alive():
                    log.error("listener %d did not exit: killing it", listener.index)
                    listener.process.kill()
                    listener.process.join(5)

    def publish_slots(self) -> None:
        """What listener processes need for their /health: pid and state of each uploader."""
        states = list(SlotState)
        for slot in self.slots:
            self.board.set(slot.index, SlotField.PID, slot.pid if slot.alive and slot.pid else 0)
            self.board.set(slot.index, SlotField.STATE, states.index(slot.state))

    def reap_uploaders(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.is_alive():
                continue
            code = proc.exitcode
            proc.join(0)
            proc.close()
            slot.process = None
            if not self.queue.repair_after_death(self.board, slot.index):
                log.error("uploader %d died while reading a message: rebuilding the queue", slot.index)
                self.rebuild_queue()
            if slot.state is SlotState.STOPPING and code == 0:
                slot.state = SlotState.EXITED
                log.info("uploader %d exited after draining", slot.index)
                continue
            self._schedule_restart(slot, code, now)

    def _schedule_restart(self, slot: Slot, code: int | None, now: float) -> None:
        booted = self.board.get(slot.index, SlotField.BOOTED_MS) > 0
        if code == UPLOADER_EXIT_BOOT_FAILED and not booted:
            slot.boot_failures_in_a_row += 1
            if slot.boot_failures_in_a_row >= self.config.workers.boot_failures_fatal:
                slot.state = SlotState.FATAL
                log.critical("uploader %d failed to boot %d times in a row; giving up (see the errors above)",
                             slot.index, slot.boot_failures_in_a_row)
                return
        else:
            slot.boot_failures_in_a_row = 0
        lived = now - slot.started_at
        slot.crashes_in_a_row = 0 if lived >= STABLE_AFTER_S else slot.crashes_in_a_row + 1
        delay = min(self.config.workers.restart_backoff_max_s, 0.1 * 2 ** max(0, slot.crashes_in_a_row - 1))
        if slot.crashes_in_a_row == 0:
            delay = 0.0
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        level = logging.INFO if code == 0 else logging.ERROR
        log.log(level, "uploader %d (%s) stopped by %s after %.1fs; restarting in %.2fs",
                slot.index, slot.state.value, how, lived, delay)
        slot.state = SlotState.BACKOFF
        slot.restart_at = now + delay

    def restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.state is SlotState.BACKOFF and now >= slot.restart_at:
                slot.restarts += 1
                self.board.set(slot.index, SlotField.RESTARTS, slot.restarts)
                self.spawn_uploader(slot)
                if self._stops_sent:
                    # it missed its STOP (or took it and died): give it one of its own
                    self._send_stop(slot)

    def check_uploaders(self) -> None:
        """Mark booted uploaders running; kill those whose heartbeat stopped."""
        limit_ms = int(self.config.workers.heartbeat_timeout_s * 1000)
        now = now_ms()
        for slot in self.slots:
            if not slot.alive:
                continue
            if slot.state is SlotState.STARTING and self.board.get(slot.index, SlotField.BOOTED_MS):
                slot.state = SlotState.RUNNING
            silent = now - self.board.get(slot.index, SlotField.HEARTBEAT_MS)
            if silent > limit_ms and slot.pid:
                log.error("uploader %d (pid %d) silent for %.1fs: killing it", slot.index, slot.pid, silent / 1000)
                os.kill(slot.pid, signal.SIGKILL)

    def rebuild_queue(self) -> None:
        """The pipe may be torn: stop every uploader, put the unread items on a new queue.

        Each uploader's in-flight file keeps what it held, so its successor sends it again.
        """
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(5)
                slot.process.close()
                slot.process = None
            if slot.state not in (SlotState.FATAL, SlotState.EXITED):
                slot.state = SlotState.BACKOFF
                slot.restart_at = 0.0
        self.board.gset(GlobalField.LOCK_STATE, 0)
        old = self.queue
        self.queue = JobQueue(self.config.queue.max_items, ctx=self.ctx)
        n = self.intake.replace_queue(self.queue)
        # listener processes hold the old queue: each spills its unread items to overflow and
        # exits before the uploaders restart (they claim overflow at boot); successors get the
        # new queue from reap_listeners
        self.board.gset(GlobalField.QUEUE_GENERATION, self.board.gget(GlobalField.QUEUE_GENERATION) + 1)
        for listener in self.listeners:
            if listener.process is not None:
                listener.process.join(KILL_GRACE_S)
                if listener.process.is_alive():
                    log.error("listener %d did not hand over its queue: killing it", listener.index)
                    listener.process.kill()
                    listener.process.join(5)
                listener.process.close()
                listener.process = None
                self.board.pset(listener.index, ProducerField.PID, 0)
                listener.restart_at = 0.0
        old.cancel_join_thread()
        old.close()
        log.warning("queue rebuilt with %d unread items of this process", n)

    # -- drain ------------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        if self._drain_deadline is not None:
            # a second signal: do not wait for a failing sink any longer
            self._drain_deadline = time.monotonic()
            self.board.gset(GlobalField.DRAIN_DEADLINE_MS, now_ms())
            log.warning("second stop signal: spilling what is left to the spool now")
            return
        timeout = self.config.shutdown.drain_timeout_s
        self.intake.begin_drain()
        self.board.gset(GlobalField.DRAINING, 1)
        self._drain_deadline = time.monotonic() + timeout
        self.board.gset(GlobalField.DRAIN_DEADLINE_MS, now_ms() + int(timeout * 1000))
        self.notifier.stopping("draining")
        log.info("draining: new requests get 503; %d items queued; deadline in %.1fs", self.board.queued_items(), timeout)

    def send_stops(self) -> None:
        """Once every listener's accepted items are in the pipe: one STOP per uploader behind them."""
        self._stops_sent = True
        for slot in self.slots:
            if slot.state in (SlotState.STARTING, SlotState.RUNNING):
                self._send_stop(slot)

    def _send_stop(self, slot: Slot) -> None:
        """Queue one STOP behind everything accepted; the queue may be full, so wait for room."""
        assert self._drain_deadline is not None
        while True:
            try:
                self.queue.put(STOP, timeout=TICK_S)
                slot.state = SlotState.STOPPING
                return
            except Full:
                if time.monotonic() >= self._drain_deadline or not any(s.alive for s in self.slots):
                    slot.state = SlotState.STOPPING
                    return

    def drain_done(self) -> bool:
        assert self._drain_deadline is not None
        if all(s.process is None and s.state in (SlotState.EXITED, SlotState.FATAL) for s in self.slots):
            return True
        if time.monotonic() < self._drain_deadline + KILL_GRACE_S:
            return False
        for slot in self.slots:
            if slot.alive and slot.process is not None:
                log.error("uploader %d still running %.0fs after the drain deadline: killing it",
                          slot.index, KILL_GRACE_S)
                slot.process.kill()
                slot.process.join(5)
        return True

    def finish_drain(self) -> None:
        """Spill what no uploader took; its items are already acknowledged."""
        self.stop_listeners()  # each spills its own unread items
        left = self.intake.unread()
        if left:
            path = self.spool.write_overflow(left)
            log.warning("drain: %d payloads never left the queue; spilled to %s", sum(i.count for i in left), path)
        self.queue.cancel_join_thread()
        self.queue.close()
        if self.journal is not None:
            self.journal.close()  # everything it held is now in the sink or in the spool
        held = sum(self.board.get(s.index, SlotField.PENDING_PAYLOADS) for s in self.slots)
        log.info("drained: %d payloads uploaded, %d stay in the spool for the next start",
                 self.board.total(SlotField.UPLOADED_PAYLOADS), held + sum(i.count for i in left))

    # -- the listener ------------------------------------------------------------------------------
    def start_server(self) -> None:
        h = self.config.http
        host, port = parse_listen(h.listen)
        app = create_app(self.config, self.intake, self.health, bearer_tokens(self.config.auth))
        sock = bind_socket(host, port, reuse_port=h.listeners > 1)
        self.server = create_listener(app, self.config, sock)
        self._address = (host, int(self.server.effective_port))
        thread = threading.Thread(target=self.server.run, name="waitress", daemon=True)
        thread.start()
        log.info("ingestd %s listening on http://%s:%s (%d listeners, %d uploaders, sink %s, durability %s)",
                 __version__, self.server.effective_host, self.server.effective_port, h.listeners, len(self.slots),
                 self.config.sink.kind, self.config.spool.durability)

    # -- the control loop ----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.spool.lock()
        except SpoolLockedError as e:
            log.critical("%s", e)
            return EXIT_STARTUP
        self.spool.prepare()
        adopted = self.spool.adopt_leftovers(len(self.slots))
        if adopted:
            log.info("%d payloads from an earlier run will be delivered first", adopted)
        self.journal = open_journal(self.config, self.spool, 0)
        if self.journal is not None:
            self.intake.attach_journal(self.journal)
        self.install_signals()
        try:
            self.start_server()
        except OSError as e:
            log.critical("cannot listen on %s: %s", self.config.http.listen, e)
            return EXIT_STARTUP
        for slot in self.slots:
            self.spawn_uploader(slot)
        for listener in self.listeners:
            self.spawn_listener(listener)
        watchdog = watchdog_interval(self.environ)
        last_ping = last_sync = last_status = 0.0
        while True:
            self._sleep()
            while self.signals:
                self.handle_signal(self.signals.pop(0))
            self.reap_uploaders()
            self.restart_due()
            self.check_uploaders()
            self.reap_listeners()
            self.publish_slots()
            self._trim_ledger()
            if self._drain_deadline is not None and not self._stops_sent and self.listeners_flushed():
                self.send_stops()
            if self.journal is not None:
                if time.monotonic() - last_sync >= self.config.spool.journal_fsync_interval_ms / 1000:
                    self.journal.sync()
                    last_sync = time.monotonic()
                self.journal.retire(self.board.pget(0, ProducerField.CURSOR))
            if not self._ready_sent and all(s.state is SlotState.RUNNING for s in self.slots):
                self._ready_sent = True
                self.notifier.ready(f"ready: {len(self.slots)} uploaders")
                log.info("ready: %d uploaders running", len(self.slots))
            if any(s.state is SlotState.FATAL for s in self.slots) and self._drain_deadline is None:
                self.exit_code = EXIT_UPLOADER_BOOT
                self.begin_drain()
            if self.notifier.enabled and self._ready_sent and time.monotonic() - last_status >= STATUS_EVERY_S:
                self.notifier.status(self.status_line())
                last_status = time.monotonic()
            if watchdog and time.monotonic() - last_ping >= watchdog:
                self.notifier.watchdog()
                last_ping = time.monotonic()
            if self._stops_sent and self.drain_done():
                break
        self.finish_drain()
        self.notifier.status("stopped")
        self.server.task_dispatcher.shutdown(timeout=1)
        return self.exit_code

    def status_line(self) -> str:
        b = self.board
        state = "draining" if self.intake.draining else "accepting"
        return (f"{state}; queue {b.queued_items()}/{self.config.queue.max_items}; "
                f"accepted {b.ptotal(ProducerField.ACCEPTED_PAYLOADS)}, uploaded {b.total(SlotField.UPLOADED_PAYLOADS)}, "
                f"dead-lettered {b.total(SlotField.DEAD_LETTERED_PAYLOADS)} payloads; "
                f"{sum(s.alive for s in self.slots)}/{len(self.slots)} uploaders")

    def handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("received %s", name)
            self.begin_drain()
        else:
            log.info("received %s: ignored (restart to change the configuration)", name)

    def _trim_ledger(self) -> None:
        self.intake.depth()  # trims as a side effect, so an idle intake does not hold read items

    def _sleep(self) -> None:
        try:
            select.select([self._wake_r], [], [], TICK_S)
            self._wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
