"""Batching: cut the stream of logged requests into objects bounded by payloads, bytes and age.

A `Batcher` gathers the objects of one partition. It receives `Piece`s (some payload lines of
one logged request, with where they came from) and cuts them at line boundaries when they cross
a bound, so `batch.max_payloads = 1` gives one object per payload. The clock is injected so the
age rule is tested without sleeping.

`Partitions` is what an uploader owns: a `Batcher` per open partition (folder of the key), the
`Router` saying which lines of a request go where. All open partitions together hold at most
`batch.max_bytes` (past it, the largest open object is cut early), at most `max_partitions` are
open at once (payloads of a further partition go to its `_overflow` partition; never dropped),
and a partition whose objects are all handed over is forgotten.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from .config import Config
from .partitions import KeyTemplate, PartitionKey, Router
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
    oldest: float  # earliest received_at (it names the object)
    folder: str = ""  # the partition: the folder part of the key

    def body(self) -> bytes:
        return b"".join(p.lines for p in self.pieces)

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(p.part for p in self.pieces)


class Batcher:
    def __init__(self, max_payloads: int, max_bytes: int, max_age_s: float, clock: Callable[[], float],
                 folder: str = "") -> None:
        self.folder = folder
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
        self._ready.append(Batch(tuple(self._open), self._count, self._size, self._oldest, self.folder))
        self._open, self._count, self._size = [], 0, 0

    @property
    def open_bytes(self) -> int:
        return self._size

    def cut_open(self) -> None:
        """Close the open batch now (it becomes ready)."""
        if self._open:
            self._close()

    @property
    def empty(self) -> bool:
        return not self._open and not self._ready

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


class Partitions:
    """The batchers of one uploader's open partitions; see the module docstring."""

    def __init__(self, router: Router, max_payloads: int, max_bytes: int, max_age_s: float,
                 clock: Callable[[], float], max_partitions: int) -> None:
        self.router = router
        self.max_payloads = max_payloads
        self.max_bytes = max_bytes  # bound of one object, and of all open objects together
        self.object_bytes = max_bytes  # bound of one object (lower with a stored-size target)
        self.max_age_s = max_age_s
        self.clock = clock
        self.max_partitions = max_partitions
        self._open: dict[str, Batcher] = {}
        self._held = 0  # bytes of the open (not yet ready) objects of every partition
        self.overflow_payloads = 0  # payloads sent to an _overflow partition, ever

    @classmethod
    def for_config(cls, config: Config, clock: Callable[[], float]) -> Partitions:
        b, s = config.batch, config.sink
        router = Router(KeyTemplate.parse(s.key_template), s.prefix)
        return cls(router, b.max_payloads, b.max_bytes, b.max_age_ms / 1000.0, clock, b.max_partitions)

    def add(self, part: Part, received_at: float, tenant: str, lines: bytes) -> None:
        router = self.router
        if not router.by_field:  # the whole request is one partition (the usual case: no parse)
            self._add(router.whole(received_at, tenant), Piece(part, received_at, lines))
            return
        for route in router.routes(received_at, tenant, lines, part.count):
            if route.first == 0 and route.count == part.count:
                piece = Piece(part, received_at, lines)
            else:
                piece = Piece(Part(part.listener, part.segment, part.offset, part.first_line + route.first, route.count),
                              received_at, lines[route.start : route.end])
            self._add(route.key, piece)

    def _add(self, key: PartitionKey, piece: Piece) -> None:
        folder = self.router.folder(key)
        batcher = self._open.get(folder)
        if batcher is None:
            if len(self._open) >= self.max_partitions and self.router.by_field:
                self.overflow_payloads += piece.part.count
                folder = self.router.folder(self.router.overflow(key))
                batcher = self._open.get(folder)
            if batcher is None:
                batcher = self._open[folder] = Batcher(self.max_payloads, self.object_bytes, self.max_age_s,
                                                       self.clock, folder)
        before = batcher.open_bytes
        batcher.add(piece)
        self._held += batcher.open_bytes - before
        while self._held > self.max_bytes:  # many partitions: cut the largest open object early
            largest = max(self._open.values(), key=lambda b: b.open_bytes)
            self._held -= largest.open_bytes
            largest.cut_open()

    def set_object_bytes(self, n: int) -> None:
        """A new bound for objects (a stored-size target adapting to the compression ratio)."""
        self.object_bytes = max(1, min(n, self.max_bytes))
        for batcher in self._open.values():
            batcher.max_bytes = self.object_bytes

    def first_ready(self) -> Batch | None:
        """A batch already cut and not yet taken, if any (to measure a compression ratio on)."""
        for batcher in self._open.values():
            if batcher._ready:
                return batcher._ready[0]
        return None

    @property
    def open_partitions(self) -> int:
        return len(self._open)

    def due_at(self) -> float | None:
        due = [d for b in self._open.values() if (d := b.due_at()) is not None]
        return min(due) if due else None

    def take_ready(self) -> list[Batch]:
        out: list[Batch] = []
        for folder, batcher in list(self._open.items()):
            before = batcher.open_bytes
            out.extend(batcher.take_ready())
            self._held -= before - batcher.open_bytes
            if batcher.empty:
                del self._open[folder]
        return out

    def take_all(self) -> list[Batch]:
        for batcher in self._open.values():
            batcher.cut_open()
        self._held = 0
        return self.take_ready()

    def clear(self) -> int:
        n = len(self)
        self._open.clear()
        self._held = 0
        return n

    def __len__(self) -> int:
        return sum(len(b) for b in self._open.values())
