"""supervisor.py's control loop with fake processes and an injected clock (gunicorn's test_arbiter).

Nothing here binds a socket, locks the spool or starts a process: `Supervisor.run()` and
`boot()` are never called. The tests spawn the children through a fake `start_process`, make
them "boot" and "die" by writing what real children write (their scoreboard rows, their exit
codes), and drive the loop's steps in the order `run()` calls them.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.config import (
    Config,
    HttpConfig,
    ShutdownConfig,
    SpoolConfig,
    WorkersConfig,
)
from ingestd.errors import CHILD_EXIT_BOOT_FAILED
from ingestd.listener import run_listener
from ingestd.scoreboard import (
    ChildField,
    Control,
    ListenerField,
    Phase,
    Role,
    UploaderField,
    now_ms,
)
from ingestd.states import ALLOWED, ChildState
from ingestd.supervisor import (
    EXIT_GRACE_S,
    STABLE_AFTER_S,
    STRAGGLER_GRACE_S,
    Child,
    Supervisor,
)
from ingestd.uploader import run_uploader
from tests.fakes import FakeClock

UPLOADERS = 2
LISTENERS = 2
DRAIN_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 5.0
BACKOFF_MAX_S = 1.5
BOOT_FAILURES_FATAL = 3
S = ChildState


class FakeProcess:
    """What the supervisor needs of a child process; it "dies" when the test sets its exit code."""

    def __init__(self, pid: int, target: Callable[..., None], args: tuple[Any, ...], name: str,
                 dies_when_killed: bool = True) -> None:
        self.pid = pid
        self.target = target
        self.args = args
        self.name = name
        self.exitcode: int | None = None
        self.kills = 0
        self.joined = False
        self.dies_when_killed = dies_when_killed
        self._r, self._w = os.pipe()

    @property
    def sentinel(self) -> int:
        return self._r

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        self.kills += 1
        if self.dies_when_killed and self.exitcode is None:
            self.exitcode = -signal.SIGKILL

    def join(self, timeout: float | None = None) -> None:
        assert self.exitcode is not None, "joined a live process"
        self.joined = True

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


class Starter:
    """The injected `start_process`: records every start and hands out fresh pids."""

    def __init__(self) -> None:
        self.started: list[FakeProcess] = []
        self._pids = itertools.count(40001)
        self.dies_when_killed = True

    def __call__(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> FakeProcess:
        proc = FakeProcess(next(self._pids), target, args, name, self.dies_when_killed)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def starter() -> Iterator[Starter]:
    s = Starter()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        http=HttpConfig(listeners=LISTENERS),
        workers=WorkersConfig(count=UPLOADERS, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
                              restart_backoff_max_s=BACKOFF_MAX_S, boot_failures_fatal=BOOT_FAILURES_FATAL),
        shutdown=ShutdownConfig(drain_timeout_s=DRAIN_TIMEOUT_S),
        spool=SpoolConfig(path=str(tmp_path / "spool"), memory_path=str(tmp_path / "mem")),
    )


@pytest.fixture
def sup(config: Config, starter: Starter, clock: FakeClock) -> Iterator[Supervisor]:
    s = Supervisor(config, environ={}, start_process=starter, clock=clock)
    s.board.control[Control.EPOCH] = 1  # as boot() publishes it
    try:
        yield s
    finally:
        s._wake_r.close()  # the constructor's wake-up pair; run() would own it for the process's life
        s._wake_w.close()


# -- helpers: what the children and the loop do ----------------------------------------------------


def fake(child: Child) -> FakeProcess:
    assert isinstance(child.process, FakeProcess), f"{child.name} has no process"
    return child.process


def child(sup: Supervisor, role: Role, index: int) -> Child:
    [c] = [c for c in sup.children if c.role is role and c.index == index]
    return c


def uploaders(sup: Supervisor) -> list[Child]:
    return [c for c in sup.children if c.role is Role.UPLOADER]


def listeners(sup: Supervisor) -> list[Child]:
    return [c for c in sup.children if c.role is Role.LISTENER]


def spawn_all(sup: Supervisor) -> None:
    for c in sup.children:
        sup.spawn(c)
    sup.publish()


def boot(sup: Supervisor, c: Child) -> None:
    """What a child writes once it has booted: its pid in its row, and a heartbeat."""
    row = sup.board.row(c.role, c.index)
    row[UploaderField.BOOTED_PID if c.role is Role.UPLOADER else ListenerField.SERVING_PID] = c.pid
    row.beat()


def run_all(sup: Supervisor) -> None:
    spawn_all(sup)
    for c in sup.children:
        boot(sup, c)
    sup.check_children()
    assert [c.state for c in sup.children] == [S.RUNNING] * len(sup.children)


def state(c: Child) -> ChildState:
    return c.state


def phase(sup: Supervisor) -> Phase:
    return sup.board.phase


def die(c: Child, code: int) -> None:
    fake(c).exitcode = code


def tick(sup: Supervisor) -> bool:
    """One turn of `Supervisor.run()`'s loop, without the wait and the signals: True when done."""
    sup.reap()
    sup.restart_due()
    sup.check_children()
    sup.publish()
    return sup.drain is not None and sup.drain.step()


def view(sup: Supervisor, c: Child) -> tuple[int, ChildState, int]:
    v = sup.board.child(c.role, c.index)
    return v[ChildField.PID], list(ChildState)[v[ChildField.STATE]], v[ChildField.RESTARTS]


# -- spawning and publishing --------------------------------------------------------------------------


def test_spawn_starts_each_child_with_its_target_index_and_name(sup: Supervisor, starter: Starter) -> None:
    spawn_all(sup)
    assert [(p.target, p.args[0], p.name) for p in starter.started] == [
        (run_uploader, 0, "ingestd-uploader-0"), (run_uploader, 1, "ingestd-uploader-1"),
        (run_listener, 0, "ingestd-listener-0"), (run_listener, 1, "ingestd-listener-1")]
    assert all(p.args[3] is sup.board for p in starter.started)
    assert [c.state for c in sup.children] == [S.STARTING] * 4


def test_publish_writes_pid_state_and_restarts_into_the_scoreboard(sup: Supervisor, clock: FakeClock) -> None:
    spawn_all(sup)
    assert [view(sup, c) for c in sup.children] == [(c.pid, S.STARTING, 0) for c in sup.children]
    u = child(sup, Role.UPLOADER, 1)
    old_pid = u.pid
    die(u, -signal.SIGKILL)
    sup.reap()
    sup.publish()
    assert view(sup, u) == (0, S.BACKOFF, 0)
    clock.advance(BACKOFF_MAX_S)
    sup.restart_due()
    sup.publish()
    assert u.pid != old_pid
    assert view(sup, u) == (u.pid, S.STARTING, 1)
    assert view(sup, child(sup, Role.LISTENER, 0)) == (child(sup, Role.LISTENER, 0).pid, S.STARTING, 0)


# -- booting ---------------------------------------------------------------------------------------


def test_a_child_moves_to_running_once_the_scoreboard_says_this_very_process_booted(sup: Supervisor) -> None:
    spawn_all(sup)
    sup.check_children()
    assert [c.state for c in sup.children] == [S.STARTING] * 4
    u, x = child(sup, Role.UPLOADER, 0), child(sup, Role.LISTENER, 1)
    sup.board.uploader(0)[UploaderField.BOOTED_PID] = u.pid + 1000  # a predecessor's pid does not count
    sup.board.listener(1)[ListenerField.SERVING_PID] = x.pid + 1000
    sup.board.uploader(0).beat()
    sup.board.listener(1).beat()
    sup.check_children()
    assert (u.state, x.state) == (S.STARTING, S.STARTING)
    boot(sup, u)
    sup.check_children()
    assert (u.state, x.state) == (S.RUNNING, S.STARTING)
    boot(sup, x)
    sup.check_children()
    assert (u.state, x.state) == (S.RUNNING, S.RUNNING)
    assert fake(u).kills == fake(x).kills == 0


# -- deaths, restarts and backoff -------------------------------------------------------------------


@pytest.mark.parametrize("role, delays", [
    (Role.UPLOADER, [0.1, 0.2, 0.4, 0.8, BACKOFF_MAX_S, BACKOFF_MAX_S]),
    (Role.LISTENER, [0.5, 1.0, BACKOFF_MAX_S, BACKOFF_MAX_S]),
])
def test_a_child_killed_again_and_again_is_restarted_with_exponential_backoff_up_to_the_maximum(
        sup: Supervisor, starter: Starter, clock: FakeClock, role: Role, delays: list[float]) -> None:
    run_all(sup)
    c = child(sup, role, 1)
    for n, delay in enumerate(delays, start=1):
        pid = c.pid
        die(c, -signal.SIGKILL)
        sup.reap()
        assert state(c) is S.BACKOFF and c.process is None
        assert c.restart_at == pytest.approx(clock() + delay)
        started = len(starter.started)
        clock.now = c.restart_at - 0.001
        sup.restart_due()
        assert state(c) is S.BACKOFF and len(starter.started) == started
        clock.now = c.restart_at
        sup.restart_due()
        assert state(c) is S.STARTING and len(starter.started) == started + 1
        assert c.pid not in (0, pid) and c.restarts == n


def test_backoff_resets_once_a_child_has_lived_stable_after_s(sup: Supervisor, clock: FakeClock) -> None:
    run_all(sup)
    c = child(sup, Role.UPLOADER, 0)

    def crash_after(lived: float) -> float:
        clock.advance(lived)
        die(c, 1)
        sup.reap()
        delay = c.restart_at - clock()
        clock.now = c.restart_at
        sup.restart_due()
        assert state(c) is S.STARTING
        return delay

    assert crash_after(0.0) == pytest.approx(0.1)
    assert crash_after(0.0) == pytest.approx(0.2)
    assert crash_after(STABLE_AFTER_S - 0.01) == pytest.approx(0.4)  # not quite stable: still growing
    assert crash_after(STABLE_AFTER_S) == 0.0  # lived long enough: restarted at once
    assert crash_after(0.0) == pytest.approx(0.1)  # and counting starts again


@pytest.mark.parametrize("code", [-signal.SIGKILL, -signal.SIGSEGV, 1, CHILD_EXIT_BOOT_FAILED, 0])
def test_every_abnormal_death_bumps_the_epoch_exactly_once(sup: Supervisor, clock: FakeClock, code: int) -> None:
    run_all(sup)
    die(child(sup, Role.UPLOADER, 0), code)  # exit 0 unasked is abnormal too: it was not told to stop
    sup.reap()
    assert sup.board.epoch == 2
    sup.reap()
    sup.check_children()
    assert sup.board.epoch == 2
    die(child(sup, Role.UPLOADER, 1), code)
    die(child(sup, Role.LISTENER, 0), code)
    sup.reap()
    assert sup.board.epoch == 4
    clock.advance(BACKOFF_MAX_S)
    sup.restart_due()
    sup.reap()
    assert sup.board.epoch == 4


def test_a_stopping_child_that_exits_cleanly_is_not_restarted_and_keeps_the_epoch(
        sup: Supervisor, starter: Starter, clock: FakeClock) -> None:
    run_all(sup)
    sup.begin_drain()
    u = child(sup, Role.UPLOADER, 0)
    proc = fake(u)
    die(u, 0)
    sup.reap()
    assert state(u) is S.EXITED and u.process is None and proc.joined
    assert sup.board.epoch == 1
    clock.advance(BACKOFF_MAX_S * 10)
    sup.restart_due()
    assert len(starter.started) == 4


def test_boot_failures_in_a_row_end_in_fatal_and_no_further_spawn(
        sup: Supervisor, starter: Starter, clock: FakeClock) -> None:
    spawn_all(sup)
    c = child(sup, Role.UPLOADER, 0)
    for n in range(1, BOOT_FAILURES_FATAL + 1):
        die(c, CHILD_EXIT_BOOT_FAILED)
        sup.reap()
        if n < BOOT_FAILURES_FATAL:
            assert state(c) is S.BACKOFF
            clock.now = c.restart_at
            sup.restart_due()
            assert state(c) is S.STARTING
    assert state(c) is S.FATAL and c.process is None
    started = len(starter.started)
    clock.advance(BACKOFF_MAX_S * 100)
    sup.restart_due()
    sup.check_children()
    assert state(c) is S.FATAL and len(starter.started) == started
    assert sup.board.epoch == 1 + BOOT_FAILURES_FATAL


@pytest.mark.parametrize("in_between", ["booted, then exit code 3", "killed before booting"])
def test_a_boot_or_another_death_in_between_resets_the_count_of_boot_failures(
        sup: Supervisor, clock: FakeClock, in_between: str) -> None:
    spawn_all(sup)
    c = child(sup, Role.LISTENER, 1)

    def fail_and_restart(code: int = CHILD_EXIT_BOOT_FAILED, booted: bool = False) -> None:
        if booted:
            boot(sup, c)
        die(c, code)
        sup.reap()
        assert state(c) is S.BACKOFF
        clock.now = c.restart_at
        sup.restart_due()
        assert state(c) is S.STARTING

    for _ in range(BOOT_FAILURES_FATAL - 1):
        fail_and_restart()
    if in_between == "booted, then exit code 3":
        fail_and_restart(booted=True)
    else:
        fail_and_restart(code=-signal.SIGKILL)
    for _ in range(BOOT_FAILURES_FATAL - 1):
        fail_and_restart()  # would be FATAL without the reset
    die(c, CHILD_EXIT_BOOT_FAILED)
    sup.reap()
    assert state(c) is S.FATAL


# -- heartbeats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.UPLOADER, Role.LISTENER])
def test_a_running_child_whose_heartbeat_is_older_than_the_timeout_is_killed_and_restarted(
        sup: Supervisor, starter: Starter, clock: FakeClock, role: Role) -> None:
    run_all(sup)
    c = child(sup, role, 0)
    row = sup.board.row(role, c.index)
    row[0] = now_ms() - int(HEARTBEAT_TIMEOUT_S * 1000) + 1000  # quiet, but within the timeout
    sup.check_children()
    assert fake(c).kills == 0
    row[0] = now_ms() - int(HEARTBEAT_TIMEOUT_S * 1000) - 1000
    proc = fake(c)
    sup.check_children()
    assert proc.kills == 1
    assert all(fake(o).kills == 0 for o in sup.children if o is not c)
    sup.reap()
    assert state(c) is S.BACKOFF and sup.board.epoch == 2
    clock.now = c.restart_at
    sup.restart_due()
    assert state(c) is S.STARTING and len(starter.started) == 5


# -- the state machine -----------------------------------------------------------------------------


@pytest.mark.parametrize("old, new", [(a, b) for a in ChildState for b in ChildState],
                         ids=lambda s: s.value)
def test_child_transition_allows_exactly_the_moves_listed_in_states(old: ChildState, new: ChildState) -> None:
    c = Child(Role.UPLOADER, 0, state=old)
    if new in ALLOWED[old]:
        c.transition(new)
        assert c.state is new
    else:
        with pytest.raises(AssertionError, match=f"{old.value} -> {new.value}"):
            c.transition(new)
        assert c.state is old


# -- the drain -------------------------------------------------------------------------------------


def test_the_drain_stops_uploaders_first_then_listeners_and_ends_when_every_child_is_gone(
        sup: Supervisor, starter: Starter) -> None:
    run_all(sup)
    before_ms = now_ms()
    sup.begin_drain()
    assert phase(sup) is Phase.DRAINING
    assert before_ms + DRAIN_TIMEOUT_S * 1000 <= sup.board.control[Control.DEADLINE_MS] <= now_ms() + DRAIN_TIMEOUT_S * 1000
    assert [c.state for c in uploaders(sup)] == [S.STOPPING] * UPLOADERS
    assert [c.state for c in listeners(sup)] == [S.RUNNING] * LISTENERS
    assert tick(sup) is False
    die(child(sup, Role.UPLOADER, 0), 0)
    assert tick(sup) is False
    assert phase(sup) is Phase.DRAINING  # one uploader is still delivering
    assert [c.state for c in listeners(sup)] == [S.RUNNING] * LISTENERS
    die(child(sup, Role.UPLOADER, 1), 0)
    assert tick(sup) is False
    assert phase(sup) is Phase.EXIT
    assert [c.state for c in listeners(sup)] == [S.STOPPING] * LISTENERS
    die(child(sup, Role.LISTENER, 0), 0)
    assert tick(sup) is False
    die(child(sup, Role.LISTENER, 1), 0)
    assert tick(sup) is True
    assert [c.state for c in sup.children] == [S.EXITED] * 4
    assert sup.board.epoch == 1
    assert all(p.kills == 0 for p in starter.started) and len(starter.started) == 4
    assert [view(sup, c)[:2] for c in sup.children] == [(0, S.EXITED)] * 4


def test_uploaders_still_alive_at_the_deadline_plus_grace_are_killed_and_not_restarted(
        sup: Supervisor, starter: Starter, clock: FakeClock) -> None:
    run_all(sup)
    sup.begin_drain()
    procs = [fake(c) for c in uploaders(sup)]
    clock.advance(DRAIN_TIMEOUT_S + STRAGGLER_GRACE_S - 0.01)
    assert tick(sup) is False
    assert [p.kills for p in procs] == [0, 0]
    clock.advance(0.01)
    assert tick(sup) is False
    assert [p.kills for p in procs] == [1, 1]
    assert tick(sup) is False
    assert phase(sup) is Phase.EXIT  # every uploader process is gone
    assert [c.state for c in listeners(sup)] == [S.STOPPING] * LISTENERS
    clock.advance(BACKOFF_MAX_S)  # past their restart time: too late to restart
    assert tick(sup) is False
    assert [c.state for c in uploaders(sup)] == [S.EXITED] * UPLOADERS
    assert len(starter.started) == 4


def test_the_drain_moves_on_to_exit_even_when_an_uploader_survives_its_kill(
        sup: Supervisor, starter: Starter, clock: FakeClock) -> None:
    starter.dies_when_killed = False
    run_all(sup)
    sup.begin_drain()
    clock.advance(DRAIN_TIMEOUT_S + STRAGGLER_GRACE_S)
    tick(sup)
    assert phase(sup) is Phase.DRAINING
    clock.advance(STRAGGLER_GRACE_S)
    assert tick(sup) is False
    assert phase(sup) is Phase.EXIT
    for x in listeners(sup):
        die(x, 0)
    clock.advance(EXIT_GRACE_S)
    assert tick(sup) is False
    assert [fake(u).kills for u in uploaders(sup)] == [3, 3]  # at the deadline, at twice the grace, at exit


def test_listeners_that_do_not_exit_within_the_grace_of_exit_are_killed(
        sup: Supervisor, starter: Starter, clock: FakeClock) -> None:
    run_all(sup)
    sup.begin_drain()
    for u in uploaders(sup):
        die(u, 0)
    assert tick(sup) is False
    assert phase(sup) is Phase.EXIT
    procs = [fake(x) for x in listeners(sup)]
    clock.advance(EXIT_GRACE_S - 0.01)
    assert tick(sup) is False
    assert [p.kills for p in procs] == [0, 0]
    clock.advance(0.01)
    assert tick(sup) is False
    assert [p.kills for p in procs] == [1, 1]
    assert tick(sup) is True
    clock.advance(BACKOFF_MAX_S)  # had the loop gone on: listeners are not restarted after EXIT
    sup.restart_due()
    assert [c.state for c in listeners(sup)] == [S.EXITED] * LISTENERS
    assert len(starter.started) == 4


def test_a_second_stop_hurries_the_deadline_to_now(sup: Supervisor, clock: FakeClock) -> None:
    run_all(sup)
    sup.begin_drain()
    drain = sup.drain
    assert drain is not None and drain.deadline == clock() + DRAIN_TIMEOUT_S
    clock.advance(1.0)
    sup.begin_drain()
    assert sup.drain is drain
    assert drain.deadline == clock()
    assert sup.board.control[Control.DEADLINE_MS] <= now_ms()
    clock.advance(STRAGGLER_GRACE_S)
    tick(sup)
    assert [fake(u).kills for u in uploaders(sup)] == [1, 1]


def test_an_uploader_that_dies_during_the_drain_is_restarted_straight_into_stopping(
        sup: Supervisor, starter: Starter, clock: FakeClock) -> None:
    run_all(sup)
    sup.begin_drain()
    u = child(sup, Role.UPLOADER, 0)
    die(u, -signal.SIGKILL)
    assert tick(sup) is False
    assert state(u) is S.BACKOFF and sup.board.epoch == 2
    clock.now = u.restart_at
    assert tick(sup) is False
    assert state(u) is S.STOPPING and len(starter.started) == 5 and u.restarts == 1
    assert view(sup, u) == (u.pid, S.STOPPING, 1)
    assert phase(sup) is Phase.DRAINING


def test_an_uploader_that_dies_after_the_deadline_is_not_restarted(
        sup: Supervisor, starter: Starter, clock: FakeClock) -> None:
    run_all(sup)
    sup.begin_drain()
    clock.advance(DRAIN_TIMEOUT_S)
    u = child(sup, Role.UPLOADER, 0)
    die(u, -signal.SIGKILL)
    tick(sup)
    assert state(u) is S.EXITED and len(starter.started) == 4  # no backoff to wait out: it is over
    clock.advance(BACKOFF_MAX_S)
    tick(sup)
    assert state(u) is S.EXITED and len(starter.started) == 4


def test_the_last_uploader_dying_during_the_drain_is_restarted_before_the_listeners_are_told_to_exit(
        sup: Supervisor, starter: Starter, clock: FakeClock) -> None:
    run_all(sup)
    sup.begin_drain()
    die(child(sup, Role.UPLOADER, 0), 0)  # done with its share
    assert tick(sup) is False
    u = child(sup, Role.UPLOADER, 1)
    die(u, -signal.SIGKILL)  # dies mid-PUT, the deadline is seconds away
    assert tick(sup) is False
    assert phase(sup) is Phase.DRAINING
    clock.now = u.restart_at
    assert tick(sup) is False
    assert state(u) is S.STOPPING and len(starter.started) == 5
