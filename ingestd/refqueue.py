"""The shared bounded queue between listeners and uploaders: references to logged requests.

`RefQueue` is a `multiprocessing.Queue` whose items are `Ref`s: where an accepted request
sits in a listener's log (listener, segment, offset, length), which of its payload lines the
reference covers, and the epoch it was put in. The records themselves stay in the logs; the
queue only indexes them, so it can be thrown away and rebuilt from the logs at any time.

Why not the stock `put`/`get`: they hold cross-process locks (the read lock while a consumer
waits, the write lock while the feeder thread writes), hand items to a feeder thread, and count
room on a semaphore. A process SIGKILLed at the wrong moment leaves a lock held, a message torn
or a semaphore slot lost, and every other process stuck. Here every reference is exactly
`REF_SIZE` (24) bytes, moved by one `write` and one `read` system call on the queue's own pipe:
pipe writes of up to PIPE_BUF bytes are atomic, every read takes whole references because the
pipe only ever holds whole references, and no process holds anything between two system
calls. A killed process leaves nothing to repair; what it had read and not yet recorded is
found again by the re-index (see `listener.py`).

So `RefQueue` keeps the stock queue's pipe and interface (`put`, `get`, `qsize`, ...) and
leaves out the locks, the semaphore and the feeder thread, which this discipline does not need
and which a killed process could leave behind (named semaphores outlive a SIGKILL of the tree).

The bound is the pipe's own fill level (`depth()`, from FIONREAD: exact, and immune to dead
processes); producers check it against `queue.max_items` before they write, and a write that
finds the pipe full (both ends are non-blocking) fails instead of blocking a handler.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import struct
import termios
from multiprocessing import context
from multiprocessing.context import BaseContext
from multiprocessing.queues import Queue
from queue import Empty, Full
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031
PIPE_MAX_SIZE_FILE = "/proc/sys/fs/pipe-max-size"
_FIONREAD = struct.Struct("i")


class Ref(NamedTuple):
    listener: int  # whose log
    epoch: int  # the epoch it was put in (low 16 bits); refs of an older epoch are stale
    segment: int  # segment number in that listener's log
    offset: int  # where the record starts in the segment
    length: int  # the whole record (header and body)
    first_line: int  # first payload line this reference covers
    count: int  # type: ignore[assignment]  # payload lines it covers

    def pack(self) -> bytes:
        return _REF.pack(*self)

    @property
    def segment_key(self) -> tuple[int, int]:
        return self.listener, self.segment


_REF = struct.Struct("<HHIIIII")
REF_SIZE = _REF.size  # 24
REFS_PER_WRITE = 4096 // REF_SIZE  # one write of at most PIPE_BUF bytes is atomic


def epoch_tag(epoch: int) -> int:
    return epoch & 0xFFFF


class RefQueue(Queue):  # type: ignore[type-arg]
    """A multiprocessing.Queue of `Ref`s that no process death can damage (module docstring)."""

    _reader: Any
    _writer: Any

    def __init__(self, max_items: int, *, ctx: BaseContext) -> None:
        # not Queue.__init__: no locks, semaphore or feeder thread (module docstring)
        self._maxsize = self.max_items = max_items
        self._reader, self._writer = ctx.Pipe(duplex=False)
        wanted = 1 << (4 * max_items * REF_SIZE - 1).bit_length()  # room for stale and re-indexed refs
        try:
            with open(PIPE_MAX_SIZE_FILE) as f:
                wanted = min(wanted, int(f.read()))
        except (OSError, ValueError):
            pass
        try:
            self.pipe_bytes = fcntl.fcntl(self._writer.fileno(), F_SETPIPE_SZ, max(wanted, 65536))
        except OSError:
            self.pipe_bytes = 65536
        if self.pipe_bytes < max_items * REF_SIZE:
            log.warning("queue.max_items = %d: the queue's pipe holds only %d references; that is the real bound",
                        max_items, self.pipe_bytes // REF_SIZE)
        os.set_blocking(self._writer.fileno(), False)
        os.set_blocking(self._reader.fileno(), False)

    def __getstate__(self) -> Any:
        context.assert_spawning(self)  # shared by inheritance at spawn, like any multiprocessing.Queue
        return (self.max_items, self.pipe_bytes, self._reader, self._writer)

    def __setstate__(self, state: Any) -> None:
        self.max_items, self.pipe_bytes, self._reader, self._writer = state
        self._maxsize = self.max_items

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    # -- producers --------------------------------------------------------------------------
    def depth(self) -> int:
        """References in the pipe now (stale ones included)."""
        buf = fcntl.ioctl(self._reader.fileno(), termios.FIONREAD, b"\0\0\0\0")
        depth: int = _FIONREAD.unpack(buf)[0]
        return depth // REF_SIZE

    def try_put(self, ref: Ref) -> bool:
        """Write one reference, or return False at once when the pipe is full."""
        try:
            os.write(self._writer.fileno(), _REF.pack(*ref))
        except BlockingIOError:
            return False
        return True

    def put_many(self, refs: list[Ref]) -> int:
        """Write as many of `refs` as fit (atomically, in chunks); returns how many were written."""
        done = 0
        fd = self._writer.fileno()
        while done < len(refs):
            chunk = refs[done : done + REFS_PER_WRITE]
            try:
                os.write(fd, b"".join(_REF.pack(*r) for r in chunk))
            except BlockingIOError:
                break
            done += len(chunk)
        return done

    # -- consumers --------------------------------------------------------------------------
    def take(self, most: int, timeout: float) -> list[Ref]:
        """Up to `most` references; waits up to `timeout` seconds for the first."""
        fd = self._reader.fileno()
        try:
            data = os.read(fd, most * REF_SIZE)
        except BlockingIOError:
            if timeout <= 0:
                return []
            try:
                ready, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                return []
            if not ready:
                return []
            try:
                data = os.read(fd, most * REF_SIZE)
            except BlockingIOError:
                return []  # another consumer was faster
        return [Ref(*_REF.unpack_from(data, i)) for i in range(0, len(data), REF_SIZE)]

    # -- the stock interface, on the same discipline -------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Never blocks: Full when `max_items` references are waiting, or the pipe is full."""
        if self.depth() >= self.max_items or not self.try_put(obj):
            raise Full

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Ref:
        refs = self.take(1, (timeout if timeout is not None else 3600.0) if block else 0.0)
        if not refs:
            raise Empty
        return refs[0]

    def get_nowait(self) -> Ref:
        return self.get(False)

    def qsize(self) -> int:
        return self.depth()

    def empty(self) -> bool:
        return self.depth() == 0

    def full(self) -> bool:
        return self.depth() >= self.max_items
