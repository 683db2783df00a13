"""ratelimit.RateLimiter: GCRA arithmetic, and one bucket shared by real processes."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
from multiprocessing.context import BaseContext
from pathlib import Path

import pytest

from ingestd.config import Tenancy, Tenant
from ingestd.ratelimit import RateLimiter, now_us
from ingestd.scoreboard import Scoreboard

TENANCY = Tenancy((Tenant("default", 0), Tenant("acme", 100), Tenant("slow", 3)), ())
ACME, SLOW = 1, 2
T0 = 10_000_000_000  # microseconds: any instant of the monotonic clock


@pytest.fixture
def ctx() -> BaseContext:
    return multiprocessing.get_context("spawn")


def limiter(ctx: BaseContext, tmp_path: Path, board: Scoreboard | None = None) -> RateLimiter:
    board = board or Scoreboard(ctx, 2, 1, len(TENANCY.tenants))
    return RateLimiter(board, TENANCY, tmp_path / "locks" / "tenant-rates")


def test_an_unlimited_tenant_always_fits(ctx: BaseContext, tmp_path: Path) -> None:
    rl = limiter(ctx, tmp_path)
    assert not rl.limited(0)
    assert all(rl.take(0, 10_000, T0) == 0 for _ in range(100))


def test_the_bucket_holds_one_second_of_the_rate_then_refills_at_the_rate(ctx: BaseContext, tmp_path: Path) -> None:
    rl = limiter(ctx, tmp_path)
    assert rl.take(ACME, 60, T0) == 0
    assert rl.take(ACME, 40, T0) == 0  # 100 payloads: one second's worth at once
    assert rl.wait_s(ACME, 1, T0) == 1
    assert rl.take(ACME, 1, T0) == 1  # refused, nothing charged
    assert rl.take(ACME, 10, T0 + 99_000) == 1  # 9.9 payloads' worth have come back: 10 do not fit
    assert rl.take(ACME, 10, T0 + 100_000) == 0  # 10 have
    assert rl.take(ACME, 100, T0 + 2_100_000) == 0  # idle: the bucket is full again, never fuller


def test_retry_after_says_when_the_request_would_fit(ctx: BaseContext, tmp_path: Path) -> None:
    rl = limiter(ctx, tmp_path)
    assert rl.take(SLOW, 3, T0) == 0
    assert rl.take(SLOW, 3, T0) == 1  # 3 payloads at 3/s: one second
    assert rl.take(SLOW, 3, T0 - 2_000_000) == 3  # seen from earlier: three seconds


def test_give_back_returns_a_refused_requests_payloads(ctx: BaseContext, tmp_path: Path) -> None:
    rl = limiter(ctx, tmp_path)
    assert rl.take(ACME, 100, T0) == 0
    rl.give_back(ACME, 30)
    assert rl.take(ACME, 30, T0) == 0
    assert rl.take(ACME, 1, T0) == 1


def _hammer(board: Scoreboard, lock_path: str, tries: int, out: "multiprocessing.Queue[int]") -> None:
    rl = RateLimiter(board, TENANCY, Path(lock_path))
    out.put(sum(rl.take(ACME, 1, T0) == 0 for _ in range(tries)))


def test_processes_share_one_bucket_exactly(ctx: BaseContext, tmp_path: Path) -> None:
    board = Scoreboard(ctx, 2, 1, len(TENANCY.tenants))
    limiter(ctx, tmp_path, board)  # creates the lock file
    out: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(board, str(tmp_path / "locks" / "tenant-rates"), 400, out))
             for _ in range(3)]
    for p in procs:
        p.start()
    accepted = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    # at one instant, three processes taking one payload at a time: exactly one second's worth in all
    assert sum(accepted) == 100, accepted


def _hold_and_wait(lock_path: str, held: "multiprocessing.Queue[int]") -> None:
    fd = os.open(lock_path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, ACME)
    held.put(os.getpid())
    signal.pause()


def test_a_process_killed_inside_the_update_does_not_leave_the_bucket_locked(ctx: BaseContext, tmp_path: Path) -> None:
    rl = limiter(ctx, tmp_path)
    held: multiprocessing.Queue[int] = ctx.Queue()
    p = ctx.Process(target=_hold_and_wait, args=(str(tmp_path / "locks" / "tenant-rates"), held))
    p.start()
    held.get(timeout=30)
    os.kill(p.pid, signal.SIGKILL)  # as a listener SIGKILLed between lock and unlock
    p.join(30)
    assert rl.take(ACME, 1, now_us()) == 0  # would block for ever if the lock outlived its holder
