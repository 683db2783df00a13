"""`Every(seconds)`: a periodic task's timer, instead of `last_*` timestamps kept by hand."""

from __future__ import annotations

import time
from collections.abc import Callable


class Every:
    """True once every `seconds` of `clock` (the first call is True)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._last: float | None = None

    def __call__(self) -> bool:
        now = self.clock()
        if self._last is None or now - self._last >= self.seconds:
            self._last = now
            return True
        return False
