"""Per-tenant rate limits, shared by the listener processes of one host.

Each limited tenant has one token bucket holding one second of its rate, kept as GCRA does (the
generic cell rate algorithm, as in ATM networks and most HTTP rate limiters): a single number per
tenant, the *theoretical arrival time* (TAT) of the next payload, in microseconds of the
system-wide monotonic clock. A request of n payloads at time t fits when

    max(TAT, t) + n * interval - t <= 1 s        (interval = 1 s / rate)

and then moves TAT there. The TATs live in the scoreboard's shared memory. The update is a
read-modify-write by several processes, so it runs under a POSIX record lock on one byte per
tenant of a lock file (`fcntl.lockf`): the kernel drops it when its holder dies, so a listener
killed inside the update cannot leave the bucket locked (the threading lock beside it serialises
the threads of one process, which POSIX record locks do not). A tenant without a limit costs
nothing; a limited one costs two system calls per request.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
import time
from pathlib import Path

from .config import Tenancy
from .scoreboard import Scoreboard

WINDOW_US = 1_000_000  # the bucket holds one second of the rate


def now_us() -> int:
    return time.monotonic_ns() // 1000


class RateLimiter:
    def __init__(self, board: Scoreboard, tenancy: Tenancy, lock_path: Path) -> None:
        self._raw = board.raw
        self._slot = [board.bucket_index(i) for i in range(len(tenancy.tenants))]
        # microseconds per payload (0: unlimited)
        self._interval = [WINDOW_US / t.max_payloads_per_s if t.max_payloads_per_s else 0.0 for t in tenancy.tenants]
        self.rates = [t.max_payloads_per_s for t in tenancy.tenants]
        self._threads = [threading.Lock() for _ in tenancy.tenants]
        self._fd = -1
        if any(self._interval):
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def limited(self, tenant: int) -> bool:
        return bool(self._interval[tenant])

    def wait_s(self, tenant: int, n: int = 1, now: int | None = None) -> int:
        """Seconds until `n` payloads would fit (0: they fit now). Reads only: the cheap refusal
        before a request's body is parsed."""
        interval = self._interval[tenant]
        if not interval:
            return 0
        t = now_us() if now is None else now
        over = max(int(self._raw[self._slot[tenant]]), t) + n * interval - t - WINDOW_US
        return 0 if over <= 0 else max(1, math.ceil(over / 1e6))

    def take(self, tenant: int, n: int, now: int | None = None) -> int:
        """Charge `n` payloads: 0 when they fit (charged), else the seconds to wait (nothing charged)."""
        interval = self._interval[tenant]
        if not interval:
            return 0
        slot = self._slot[tenant]
        with self._threads[tenant]:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, tenant)
            try:
                t = now_us() if now is None else now
                tat = max(int(self._raw[slot]), t) + n * interval
                over = tat - t - WINDOW_US
                if over > 0:
                    return max(1, math.ceil(over / 1e6))
                self._raw[slot] = int(tat)
                return 0
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, tenant)

    def give_back(self, tenant: int, n: int) -> None:
        """A charged request that was then refused (503): its payloads were not kept."""
        interval = self._interval[tenant]
        if not interval:
            return
        with self._threads[tenant]:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, tenant)
            try:
                self._raw[self._slot[tenant]] -= int(n * interval)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, tenant)
