"""Batching: cut the stream of queue items into objects bounded by payloads, bytes and age.

A `Batcher` is owned by one uploader process. Items are cut at line boundaries when they cross
a bound, so `batch.max_payloads = 1` gives one object per payload. The clock is injected so the
age rule is tested without sleeping.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from .records import Item, first_lines_within, split_lines


class Batch(NamedTuple):
    items: tuple[Item, ...]
    count: int  # payloads
    size: int  # bytes of the uncompressed body
    oldest: float  # earliest received_at: it sets the dt=/hour= partition

    def body(self) -> bytes:
        return b"".join(i.lines for i in self.items)


class Batcher:
    def __init__(self, max_payloads: int, max_bytes: int, max_age_s: float, clock: Callable[[], float]) -> None:
        self.max_payloads = max_payloads
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._ready: deque[Batch] = deque()
        self._open: list[Item] = []
        self._count = 0
        self._size = 0
        self._oldest = 0.0

    def add(self, item: Item) -> None:
        while True:
            if self._count + item.count <= self.max_payloads and self._size + len(item.lines) <= self.max_bytes:
                self._append(item)
                if self._count >= self.max_payloads:
                    self._close()
                return
            room = self.max_payloads - self._count
            n = min(room, first_lines_within(item, self.max_bytes - self._size))
            if n == 0:
                if self._count:
                    self._close()
                    continue
                n = 1  # one line larger than max_bytes travels alone
            if n >= item.count:
                self._append(item)
                self._close()
                return
            head, item = split_lines(item, n)
            self._append(head)
            self._close()

    def _append(self, item: Item) -> None:
        if not self._open:
            self._oldest = item.received_at
        else:
            self._oldest = min(self._oldest, item.received_at)
        self._open.append(item)
        self._count += item.count
        self._size += len(item.lines)

    def _close(self) -> None:
        self._ready.append(Batch(tuple(self._open), self._count, self._size, self._oldest))
        self._open, self._count, self._size = [], 0, 0

    def due_at(self) -> float | None:
        """When the open batch must be written (None when there is nothing open)."""
        return self._oldest + self.max_age_s if self._open else None

    def take_ready(self) -> list[Batch]:
        """Full batches, plus the open one once it is as old as max_age."""
        due = self.due_at()
        if due is not None and self._clock() >= due:
            self._close()
        out = list(self._ready)
        self._ready.clear()
        return out

    def take_all(self) -> list[Batch]:
        if self._open:
            self._close()
        return self.take_ready()

    def pending(self) -> list[Item]:
        """Everything added and not yet taken, in order."""
        return [i for b in self._ready for i in b.items] + self._open

    def __len__(self) -> int:
        return sum(b.count for b in self._ready) + self._count
