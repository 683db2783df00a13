"""Batching: cut the stream of logged requests into objects bounded by payloads, bytes and age.

A `Batcher` is owned by one uploader. It receives `Piece`s (some payload lines of one logged
request, with where they came from) and cuts them at line boundaries when they cross a bound,
so `batch.max_payloads = 1` gives one object per payload. The clock is injected so the age rule
is tested without sleeping.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from .records import lines_within, slice_lines
from .requestlog import Part


class Piece(NamedTuple):
    part: Part
    received_at: float
    lines: bytes  # exactly part.count newline-terminated lines


def split_piece(piece: Piece, first: int) -> tuple[Piece, Piece]:
    """Cut after the first `first` lines (0 < first < count)."""
    p = piece.part
    head = slice_lines(piece.lines, 0, first)
    tail = piece.lines[len(head) :]
    return (Piece(p._replace(count=first), piece.received_at, head),
            Piece(p._replace(first_line=p.first_line + first, count=p.count - first), piece.received_at, tail))


class Batch(NamedTuple):
    pieces: tuple[Piece, ...]
    count: int  # type: ignore[assignment]  # payloads
    size: int  # bytes of the uncompressed body
    oldest: float  # earliest received_at: it sets the dt=/hour= partition

    def body(self) -> bytes:
        return b"".join(p.lines for p in self.pieces)

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(p.part for p in self.pieces)


class Batcher:
    def __init__(self, max_payloads: int, max_bytes: int, max_age_s: float, clock: Callable[[], float]) -> None:
        self.max_payloads = max_payloads
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._ready: deque[Batch] = deque()
        self._open: list[Piece] = []
        self._count = 0
        self._size = 0
        self._oldest = 0.0

    def add(self, piece: Piece) -> None:
        while True:
            count, size = piece.part.count, len(piece.lines)
            if self._count + count <= self.max_payloads and self._size + size <= self.max_bytes:
                self._append(piece)
                if self._count >= self.max_payloads:
                    self._close()
                return
            room = self.max_payloads - self._count
            n = lines_within(piece.lines, self.max_bytes - self._size, min(room, count))
            if n == 0:
                if self._count:
                    self._close()
                    continue
                n = 1  # one line larger than max_bytes travels alone
            if n >= count:
                self._append(piece)
                self._close()
                return
            head, piece = split_piece(piece, n)
            self._append(head)
            self._close()

    def _append(self, piece: Piece) -> None:
        self._oldest = piece.received_at if not self._open else min(self._oldest, piece.received_at)
        self._open.append(piece)
        self._count += piece.part.count
        self._size += len(piece.lines)

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

    def clear(self) -> int:
        """Drop everything held (a re-index puts it back on the queue). Returns the payloads dropped."""
        n = len(self)
        self._ready.clear()
        self._open, self._count, self._size = [], 0, 0
        return n

    def __len__(self) -> int:
        return sum(b.count for b in self._ready) + self._count
