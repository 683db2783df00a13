"""The supervisor: a pure arbiter that owns the processes, the signals and the drain.

Shaped like gunicorn's arbiter: it reserves the port, spawns the listener and uploader processes, and then runs one control loop: wait for a signal or a child's death,
handle signals, reap children and restart them with backoff, kill a child whose heartbeat
stopped, step the drain, tell systemd. It never serves a request and never touches a payload.

Every child is a `Child` with a guarded state machine (`states.py`). After any abnormal death
the supervisor bumps the *epoch* on the scoreboard: uploaders drop what they hold unjournaled,
listeners put back on the queue what of their logs is neither landed nor journaled, and the
queue needs no repair (see `refqueue.py`). That is the whole recovery: it is the same for a
listener, an uploader, or a new start after the whole tree was killed.

The drain (`Drain`) is an explicit phase: DRAINING (ingest answers 503, `/health` says
draining, uploaders deliver what is logged and exit), then at the deadline uploaders leave even
mid-PUT (their intents are journaled), then EXIT (listeners seal their logs and exit), and with
memory durability what could not be delivered is copied to `spool.path/overflow` for the next
start.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Any, Protocol

from . import __version__
from .config import Config, parse_listen
from .errors import CHILD_EXIT_BOOT_FAILED, EXIT_CHILD_BOOT, EXIT_OK, EXIT_STARTUP, SpoolLockedError
from .listener import bind_socket, run_listener
from .refqueue import RefQueue
from .scoreboard import ChildField, Control, ListenerField, Phase, Role, Scoreboard, UploaderField, now_ms
from .spool import Spool
from .states import ALLOWED, LIVE, ChildState
from .systemd import Notifier, watchdog_interval
from .timing import Every
from .uploader import run_uploader

log = logging.getLogger(__name__)

TICK_S = 0.2
STABLE_AFTER_S = 10.0  # a child that lived this long resets its crash backoff
LISTENER_RESTART_S = 0.5  # listeners come back fast: they hold the port's capacity
STRAGGLER_GRACE_S = 0.5  # after the deadline, uploaders still alive are killed (their intents are journaled)
EXIT_GRACE_S = 1.0  # listeners get this long to leave once told to
OLD_CHILDREN_WAIT_S = 10.0
STATUS_EVERY_S = 5.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STATES = list(ChildState)


class Process(Protocol):
    """What the supervisor needs of a child process (multiprocessing's, or a test's fake)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def exitcode(self) -> int | None: ...
    @property
    def sentinel(self) -> int: ...

    def is_alive(self) -> bool: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


StartProcess = Callable[[Callable[..., None], tuple[Any, ...], str], Process]


@dataclass
class Child:
    role: Role
    index: int
    state: ChildState = ChildState.STOPPED
    process: Process | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0
    crashes_in_a_row: int = 0
    boot_failures_in_a_row: int = 0

    @property
    def name(self) -> str:
        return f"{self.role.value} {self.index}"

    @property
    def pid(self) -> int:
        return (self.process.pid or 0) if self.process is not None else 0

    def transition(self, new: ChildState) -> None:
        if new not in ALLOWED[self.state]:
            raise AssertionError(f"{self.name}: {self.state.value} -> {new.value} is not a move")
        self.state = new


def describe_exit(code: int | None) -> str:
    return f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"


class Drain:
    """The drain, step by step (see the module docstring). `step` returns True when done."""

    def __init__(self, sup: Supervisor, timeout: float) -> None:
        self.sup = sup
        self.deadline = sup.clock() + timeout
        self.exit_at: float | None = None  # when listeners were told to exit
        board = sup.board
        board.control[Control.DEADLINE_MS] = now_ms() + int(timeout * 1000)
        board.control[Control.PHASE] = Phase.DRAINING
        for child in sup.children:
            if child.role is Role.UPLOADER and child.state in LIVE:
                child.transition(ChildState.STOPPING)

    def hurry(self) -> None:
        """A second stop signal: stop waiting for the sink."""
        self.deadline = self.sup.clock()
        self.sup.board.control[Control.DEADLINE_MS] = now_ms()

    def step(self) -> bool:
        sup, now = self.sup, self.sup.clock()
        uploaders = [c for c in sup.children if c.role is Role.UPLOADER]
        if self.exit_at is None:
            if now >= self.deadline + STRAGGLER_GRACE_S:
                for c in uploaders:
                    if c.process is not None and c.process.is_alive():
                        log.error("%s still running after the drain deadline: killing it (its intents are journaled)",
                                  c.name)
                        c.process.kill()
            done = all(c.state in (ChildState.EXITED, ChildState.FATAL) for c in uploaders)
            if done or now >= self.deadline + 2 * STRAGGLER_GRACE_S:
                self.exit_at = now
                sup.board.control[Control.PHASE] = Phase.EXIT
                for c in sup.children:
                    if c.role is Role.LISTENER and c.state in LIVE and c.state is not ChildState.STOPPING:
                        c.transition(ChildState.STOPPING)
            return False
        listeners = [c for c in sup.children if c.role is Role.LISTENER]
        if all(c.process is None for c in sup.children):
            return True
        if now >= self.exit_at + EXIT_GRACE_S:
            for c in listeners + uploaders:
                if c.process is not None and c.process.is_alive():
                    log.error("%s did not exit: killing it", c.name)
                    c.process.kill()
        return False


class Supervisor:
    def __init__(self, config: Config, environ: dict[str, str] | None = None,
                 start_process: StartProcess | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.ctx = multiprocessing.get_context("spawn")
        self.clock = clock
        self.spool = Spool(config.spool)
        self.board = Scoreboard(self.ctx, config.http.listeners, config.workers.count, len(config.tenancy.tenants))
        self.children = ([Child(Role.UPLOADER, i) for i in range(config.workers.count)]
                         + [Child(Role.LISTENER, i) for i in range(config.http.listeners)])
        self.start_process = start_process or self._start_process
        self.notifier = Notifier.from_environ(self.environ)
        self.signals: list[int] = []
        self.exit_code = EXIT_OK
        self.drain: Drain | None = None
        self.queue: RefQueue | None = None
        self.sock: socket.socket | None = None  # reserves the port (bound, not listening)
        self.address = ("", 0)
        self._wake_r, self._wake_w = socket.socketpair()
        self._ready_sent = False

    # -- signals: record and wake, nothing else ---------------------------------------------------
    def _record_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def install_signals(self) -> None:
        for w in (self._wake_r, self._wake_w):
            w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)

    def handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("received %s", name)
            lame_duck = self.config.shutdown.lame_duck_s
            if lame_duck and self.drain is None and not self.board.control[Control.LAME_DUCK_MS]:
                # readiness says 503 while requests are still accepted: load balancers take the
                # host out on their next checks, before anything is refused
                self.board.control[Control.LAME_DUCK_MS] = now_ms() + int(lame_duck * 1000)
                self.notifier.stopping(f"lame duck for {lame_duck:g} s, then draining")
                log.info("lame duck: /health/ready answers 503, requests are still accepted; draining in %.1fs "
                         "(send %s again to drain now)", lame_duck, name)
                return
            self.begin_drain()
        else:
            log.info("received %s: ignored (restart to change the configuration)", name)

    # -- children -----------------------------------------------------------------------------------
    def _start_process(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> Process:
        proc = self.ctx.Process(target=target, args=args, name=name, daemon=False)
        # the child inherits blocked SIGINT/SIGTERM and ignores them once it runs our code; one
        # arriving meanwhile stays pending here and is handled after the start, not lost. (The
        # resource tracker, which multiprocessing starts at the first spawn, unblocks both in
        # the calling thread: `boot` starts it before any of this.)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        return proc

    def spawn(self, child: Child) -> None:
        target: Callable[..., None]
        args: tuple[Any, ...]
        if child.role is Role.UPLOADER:
            target, args = run_uploader, (child.index, self.config, self.queue, self.board)
        else:
            target, args = run_listener, (child.index, self.config, self.queue, self.board, *self.address)
        child.process = self.start_process(target, args, f"ingestd-{child.role.value}-{child.index}")
        child.started_at = self.clock()
        child.transition(ChildState.STARTING)
        log.info("spawned %s (pid %d)", child.name, child.pid)

    def booted(self, child: Child) -> bool:
        if child.role is Role.UPLOADER:
            return self.board.uploader(child.index)[UploaderField.BOOTED_PID] == child.pid
        return self.board.listener(child.index)[ListenerField.SERVING_PID] == child.pid

    def reap(self) -> None:
        """Collect dead children: schedule restarts, and bump the epoch after any abnormal death."""
        now = self.clock()
        for child in self.children:
            proc = child.process
            if proc is None or proc.is_alive():
                continue
            code = proc.exitcode
            proc.join(0)
            booted = self.booted(child)
            child.process = None
            if child.state is ChildState.STOPPING and code == 0:
                child.transition(ChildState.EXITED)
                log.info("%s exited after draining", child.name)
                continue
            self.bump_epoch(f"{child.name} stopped by {describe_exit(code)}")
            self.schedule_restart(child, code, booted, now)

    def schedule_restart(self, child: Child, code: int | None, booted: bool, now: float) -> None:
        if code == CHILD_EXIT_BOOT_FAILED and not booted:
            child.boot_failures_in_a_row += 1
            if child.boot_failures_in_a_row >= self.config.workers.boot_failures_fatal:
                child.transition(ChildState.FATAL)
                log.critical("%s failed to boot %d times in a row; giving up (see the errors above)",
                             child.name, child.boot_failures_in_a_row)
                return
        else:
            child.boot_failures_in_a_row = 0
        lived = now - child.started_at
        child.crashes_in_a_row = 0 if lived >= STABLE_AFTER_S else child.crashes_in_a_row + 1
        base = LISTENER_RESTART_S if child.role is Role.LISTENER else 0.1
        delay = 0.0 if child.crashes_in_a_row == 0 else min(self.config.workers.restart_backoff_max_s,
                                                              base * 2 ** (child.crashes_in_a_row - 1))
        log.log(logging.INFO if code == 0 else logging.ERROR, "%s (%s) stopped by %s after %.1fs; restarting in %.2fs",
                child.name, child.state.value, describe_exit(code), lived, delay)
        child.transition(ChildState.BACKOFF)
        child.restart_at = now + delay

    def restart_due(self) -> None:
        now = self.clock()
        drain = self.drain
        for child in self.children:
            if child.state is not ChildState.BACKOFF:
                continue
            if drain is not None and (drain.exit_at is not None or
                                      (child.role is Role.UPLOADER and now >= drain.deadline)):
                child.transition(ChildState.EXITED)  # too late: the next start recovers its files
                continue
            if now >= child.restart_at:
                child.restarts += 1
                self.spawn(child)
                if drain is not None and child.role is Role.UPLOADER:
                    child.transition(ChildState.STOPPING)  # it finishes its predecessor's work, then leaves

    def check_children(self) -> None:
        """Mark booted children running; kill those whose heartbeat stopped."""
        limit_ms = int(self.config.workers.heartbeat_timeout_s * 1000)
        now = now_ms()
        for child in self.children:
            if child.process is None:
                continue
            if child.state is ChildState.STARTING and self.booted(child):
                child.transition(ChildState.RUNNING)
            if child.state is ChildState.STARTING and self.clock() - child.started_at > limit_ms / 1000:
                log.error("%s (pid %d) has not booted in %.0fs: killing it", child.name, child.pid, limit_ms / 1000)
                child.process.kill()
            if child.state is ChildState.RUNNING:
                silent = now - self.board.row(child.role, child.index)[0]  # HEARTBEAT_MS
                if silent > limit_ms:
                    log.error("%s (pid %d) silent for %.1fs: killing it", child.name, child.pid, silent / 1000)
                    child.process.kill()

    def bump_epoch(self, why: str) -> None:
        epoch = self.board.epoch + 1
        self.board.control[Control.EPOCH] = epoch
        log.warning("epoch %d: %s; what it held is put back on the queue", epoch, why)

    def publish(self) -> None:
        for child in self.children:
            view = self.board.child(child.role, child.index)
            view[ChildField.PID] = child.pid
            view[ChildField.STATE] = _STATES.index(child.state)
            view[ChildField.RESTARTS] = child.restarts

    # -- drain ----------------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        if self.drain is not None:
            log.warning("second stop signal: leaving what is not yet delivered for the next start")
            self.drain.hurry()
            return
        timeout = self.config.shutdown.drain_timeout_s
        self.drain = Drain(self, timeout)
        self.notifier.stopping("draining")
        log.info("draining: new requests get 503; %d references queued; deadline in %.1fs",
                 self.queue.depth() if self.queue is not None else 0, timeout)

    def finish(self) -> None:
        b = self.board
        uploaded = b.total(Role.UPLOADER, UploaderField.UPLOADED_PAYLOADS)
        accepted = b.total(Role.LISTENER, ListenerField.ACCEPTED_PAYLOADS)
        if self.spool.has_logged_data():
            if self.config.spool.on_disk:
                log.warning("drained: %d of %d payloads accepted in this run uploaded; the rest stays in %s for the "
                            "next start", uploaded, accepted, self.spool.logs_root)
            else:
                size = self.spool.save_overflow()
                log.warning("drained: %d of %d payloads accepted in this run uploaded; the rest (%d bytes, copied from "
                            "tmpfs) stays in %s for the next start", uploaded, accepted, size, self.spool.overflow_dir)
        else:
            if not self.config.spool.on_disk:
                self.spool.clear_logs_root()
            log.info("drained: %d payloads uploaded, nothing left in the spool", uploaded)

    # -- the control loop --------------------------------------------------------------------------------
    def boot(self) -> int | None:
        """Everything before the first spawn; an exit code when the daemon cannot start."""
        try:
            self.spool.lock_daemon()
        except SpoolLockedError as e:
            log.critical("%s", e)
            return EXIT_STARTUP
        self.spool.prepare()
        held = self.spool.wait_for_old_children(OLD_CHILDREN_WAIT_S)
        if held:
            log.critical("processes of an earlier ingestd still hold %s; not starting beside them", ", ".join(held))
            return EXIT_STARTUP
        restored = self.spool.restore_overflow()
        if restored:
            log.info("restored %d bytes left by the last drain from %s", restored, self.spool.overflow_dir)
        resource_tracker.ensure_running()  # see _start_process
        self.board.control[Control.STARTED_MS] = now_ms()
        self.board.control[Control.EPOCH] = 1
        self.queue = RefQueue(self.config.queue.max_items, ctx=self.ctx)
        host, port = parse_listen(self.config.http.listen)
        try:
            self.sock = bind_socket(host, port, listen=False)
        except OSError as e:
            log.critical("cannot listen on %s: %s", self.config.http.listen, e)
            return EXIT_STARTUP
        bound_host, bound_port = self.sock.getsockname()[:2]
        self.address = (host, bound_port)
        c = self.config
        log.info("ingestd %s listening on http://%s:%s (%d listeners, %d uploaders, sink %s, durability %s, logs in %s)",
                 __version__, bound_host, bound_port, c.http.listeners, c.workers.count, c.sink.kind,
                 c.spool.durability, self.spool.logs_root)
        return None

    def run(self) -> int:
        failed = self.boot()
        if failed is not None:
            return failed
        self.install_signals()
        for child in self.children:
            self.spawn(child)
        self.publish()
        watchdog = watchdog_interval(self.environ)
        ping_due = Every(watchdog or 0.0, self.clock)
        status_due = Every(STATUS_EVERY_S, self.clock)
        while True:
            self.wait_for_events()
            while self.signals:
                self.handle_signal(self.signals.pop(0))
            self.reap()
            self.restart_due()
            self.check_children()
            self.publish()
            if any(c.state is ChildState.FATAL for c in self.children) and self.drain is None:
                self.exit_code = EXIT_CHILD_BOOT
                self.begin_drain()
            if not self._ready_sent and all(c.state is ChildState.RUNNING for c in self.children):
                self._ready_sent = True
                self.notifier.ready(f"ready: {self.config.http.listeners} listeners, {self.config.workers.count} uploaders")
                log.info("ready: every listener and uploader is running")
            if self.notifier.enabled and self._ready_sent and status_due():
                self.notifier.status(self.status_line())
            if watchdog and ping_due():
                self.notifier.watchdog()
            lame_duck = self.board.control[Control.LAME_DUCK_MS]
            if lame_duck and self.drain is None and now_ms() >= lame_duck:
                self.begin_drain()
            if self.drain is not None and self.drain.step():
                break
        self.publish()
        self.finish()
        self.notifier.status("stopped")
        signal.set_wakeup_fd(-1)
        self._wake_r.close()
        self._wake_w.close()
        return self.exit_code

    def wait_for_events(self) -> None:
        """Until a signal, a child's death, or a tick."""
        waitables: list[Any] = [self._wake_r]
        waitables += [c.process.sentinel for c in self.children if c.process is not None]
        try:
            ready = multiprocessing.connection.wait(waitables, TICK_S)
        except InterruptedError:
            return
        if self._wake_r in ready:
            try:
                self._wake_r.recv(4096)
            except (BlockingIOError, InterruptedError):
                pass

    def status_line(self) -> str:
        b = self.board
        state = "draining" if self.drain is not None else "accepting"
        depth = self.queue.depth() if self.queue is not None else 0
        return (f"{state}; queue {depth}/{self.config.queue.max_items}; "
                f"accepted {b.total(Role.LISTENER, ListenerField.ACCEPTED_PAYLOADS)}, "
                f"uploaded {b.total(Role.UPLOADER, UploaderField.UPLOADED_PAYLOADS)}, "
                f"dead-lettered {b.total(Role.UPLOADER, UploaderField.DEAD_LETTERED_PAYLOADS)} payloads; "
                f"epoch {b.epoch}; {sum(c.process is not None for c in self.children)}/{len(self.children)} children")
