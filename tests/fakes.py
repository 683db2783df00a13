"""Small fakes shared by the unit tests (STYLE 7: inject a clock rather than patch time)."""

from __future__ import annotations


class FakeClock:
    """A clock that only moves when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
