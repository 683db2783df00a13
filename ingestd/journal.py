"""The disk journal (`spool.durability = "disk"`): a request is written here before its 202.

Segments `spool/journal/<run>-<n>.rec` hold framed items in admission order. A segment is
closed at `journal_segment_bytes` or after a second, and deleted once every item in it has been
read off the queue by an uploader (the board's cursor has passed its last seq): from then on
the uploader's in-flight file holds those items. Segments left by a crashed run are adopted
at the next start like drain overflow, so even SIGKILL of the whole process tree loses nothing
acknowledged (an item both journaled and in an in-flight file is sent twice: at-least-once).

fsync policy (`spool.journal_fsync`):
- "interval" (default): write() before the 202, fdatasync by the control loop every
  `journal_fsync_interval_ms`. write() alone survives any process death, SIGKILL included
  (the page cache belongs to the kernel); the interval bounds what a power cut can take.
- "always": fdatasync before the 202, with group commit: one handler thread syncs for all
  that wrote before it. Survives power loss; costs a disk flush per burst of requests.
- "never": the kernel flushes when it likes.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path

from .records import Item, frame

log = logging.getLogger(__name__)

SEGMENT_MAX_AGE_S = 1.0


class Journal:
    def __init__(self, directory: Path, policy: str, segment_bytes: int) -> None:
        self.dir = directory
        self.policy = policy
        self.segment_bytes = segment_bytes
        self.run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
        self._n = 0
        self._closed: list[tuple[Path, int]] = []  # (segment, last seq), oldest first
        self._fd = -1
        self._path = Path()
        self._size = 0
        self._opened = 0.0
        self._last_seq = 0
        self._written = 0  # bytes written in total, across segments
        self._synced = 0
        self._sync_lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self._n += 1
        self._path = self.dir / f"{self.run}-{self._n:06d}.rec"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._size = 0
        self._opened = time.monotonic()

    def append(self, item: Item) -> int:
        """Write one item (called under the intake lock, so order is admission order)."""
        if self._size and (self._size >= self.segment_bytes or time.monotonic() - self._opened >= SEGMENT_MAX_AGE_S):
            self._rotate()
        data = frame(item)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(data)
        self._written += len(data)
        self._last_seq = item.seq
        return self._written

    def _rotate(self) -> None:
        with self._sync_lock:
            if self.policy != "never":
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._synced = self._written
        self._closed.append((self._path, self._last_seq))
        self._open()

    def commit(self, upto: int) -> None:
        """Before a 202 under "always": make sure bytes up to `upto` are on disk."""
        if self.policy != "always":
            return
        with self._sync_lock:
            if self._synced >= upto:
                return  # another thread's fdatasync covered us: group commit
            target = self._written
            os.fdatasync(self._fd)
            self._synced = max(self._synced, target)

    def sync(self) -> None:
        """Periodic flush for the "interval" policy (from the control loop)."""
        if self.policy == "never":
            return
        with self._sync_lock:
            target = self._written
            if target > self._synced:
                os.fdatasync(self._fd)
                self._synced = target

    def retire(self, cursor: int) -> int:
        """Delete closed segments whose items have all been taken by uploaders."""
        n = 0
        while self._closed and self._closed[0][1] <= cursor:
            path, _ = self._closed.pop(0)
            path.unlink(missing_ok=True)
            n += 1
        return n

    def close(self) -> None:
        """At a clean drain end: every item is in the sink or in the spool, so the journal goes."""
        os.close(self._fd)
        for path, _ in self._closed:
            path.unlink(missing_ok=True)
        self._path.unlink(missing_ok=True)
        self._closed.clear()
