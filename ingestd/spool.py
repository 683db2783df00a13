"""The spool: everything acknowledged that is not yet in the sink, as files on local disk.

Layout under `spool.path`:
- `inflight/slot-N.rec`: what uploader slot N has taken off the queue and not yet uploaded.
  Appended on every take, rewritten after every upload. A restarted uploader in the same slot
  starts by loading it, which is how a killed uploader's batch is delivered again.
- `overflow/*.rec`: items spilled at a drain that hit its deadline, and in-flight files of
  slots that no longer exist. Adopted into slot files at the next start, or sent by `replay`.
- `journal/*.rec`: the disk journal (`journal.py`), with `spool.durability = "disk"`.
- `dead/*.rec` (+ `.why`): batches the sink refused for good. Sent by `ingestd replay`.
- `.lock`: held (flock) by the running daemon, so two daemons never share a spool.

Every file is a sequence of framed records (`records.py`); files appear by atomic rename.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from .errors import SpoolLockedError
from .records import Item, frame, read_records

log = logging.getLogger(__name__)


def _unique_name(suffix: str = ".rec") -> str:
    """Names sort in write order (nanosecond clock first) and never collide."""
    return f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def write_atomically(path: Path, data: bytes, fsync: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.rename(tmp, path)


def read_file(path: Path) -> list[Item]:
    try:
        with open(path, "rb") as f:
            return list(read_records(f))
    except FileNotFoundError:
        return []


class Spool:
    def __init__(self, root: str | os.PathLike[str], fsync: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.inflight_dir = self.root / "inflight"
        self.overflow_dir = self.root / "overflow"
        self.dead_dir = self.root / "dead"
        self.journal_dir = self.root / "journal"
        self._lock_file: IO[bytes] | None = None

    def prepare(self) -> None:
        for d in (self.inflight_dir, self.overflow_dir, self.dead_dir, self.journal_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- ownership ------------------------------------------------------------------------------
    def lock(self, name: str = ".lock") -> None:
        """Hold the spool for this process's lifetime (released by the kernel at any exit)."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / name, "ab")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise SpoolLockedError(f"spool {self.root} is in use by another ingestd process") from None
        self._lock_file = f

    # -- in-flight files, one per uploader slot --------------------------------------------------
    def slot_path(self, slot: int) -> Path:
        return self.inflight_dir / f"slot-{slot}.rec"

    def adopt_leftovers(self, slots: int) -> int:
        """At start: hand overflow files, journal segments of an earlier run and orphaned slot
        files to the live slots, round robin.

        Appending before unlinking means a crash here duplicates, never loses. Returns the
        number of payloads adopted.
        """
        sources = sorted(self.overflow_dir.glob("*.rec")) + sorted(self.journal_dir.rglob("*.rec"))
        for p in self.inflight_dir.glob("slot-*.rec"):
            n = p.stem.removeprefix("slot-")
            if not n.isdigit() or int(n) >= slots:
                sources.append(p)
        adopted = 0
        for i, src in enumerate(sources):
            items = read_file(src)
            if items:
                with open(self.slot_path(i % slots), "ab") as f:
                    f.write(b"".join(frame(it) for it in items))
                    if self.fsync:
                        os.fsync(f.fileno())
            adopted += sum(it.count for it in items)
            src.unlink()
            log.info("adopted %d payloads from %s into slot %d", sum(it.count for it in items), src, i % slots)
        return adopted

    # -- overflow and dead letters --------------------------------------------------------------
    def write_overflow(self, items: Sequence[Item]) -> Path | None:
        if not items:
            return None
        path = self.overflow_dir / _unique_name()
        write_atomically(path, b"".join(frame(i) for i in items), fsync=True)
        return path

    def write_dead_letter(self, items: Sequence[Item], reason: str) -> Path:
        path = self.dead_dir / _unique_name()
        write_atomically(path.with_suffix(".why"), (reason + "\n").encode(), fsync=False)
        write_atomically(path, b"".join(frame(i) for i in items), fsync=True)
        return path

    def retire_journal(self, directory: Path) -> int:
        """Move a dead listener's journal segments to overflow (sent at the next start or replay)."""
        moved = 0
        for seg in sorted(directory.glob("*.rec")):
            os.rename(seg, self.overflow_dir / f"{_unique_name('')}-{seg.name}")
            moved += 1
        return moved

    def claim_overflow(self, slot_file: SlotFile) -> int:
        """At an uploader's boot: move overflow files into its in-flight file. The rename makes
        each file one uploader's; a crash before the unlink leaves `slot-N.claim-*.rec`, which
        the next start adopts (duplicates, never loss). Returns the payloads claimed."""
        claimed = 0
        slot = slot_file.path.stem
        for src in sorted(self.overflow_dir.glob("*.rec")):
            mine = self.inflight_dir / f"{slot}.claim-{src.name}"
            try:
                os.rename(src, mine)
            except FileNotFoundError:
                continue  # another uploader took it
            items = read_file(mine)
            for item in items:
                slot_file.append(item)
            mine.unlink()
            claimed += sum(i.count for i in items)
        return claimed

    def replayable(self) -> Iterator[Path]:
        """Dead letters and overflow, oldest first."""
        for d in (self.dead_dir, self.overflow_dir):
            yield from sorted(d.glob("*.rec"))

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_suffix(".why").unlink(missing_ok=True)


class SlotFile:
    """The in-flight file of one uploader slot: append on take, rewrite after upload."""

    def __init__(self, path: Path, fsync: bool = False, lock_timeout_s: float = 30.0) -> None:
        self.path = path
        self.fsync = fsync
        # The slot is owned through a lock on a companion file (the .rec file itself is replaced
        # by rename). An orphan of a killed supervisor may still be flushing this slot: wait
        # for it, or two processes would rewrite one file and lose items.
        self._lock_fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + lock_timeout_s
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self._lock_fd)
                    raise SpoolLockedError(f"{path} is held by another process") from None
                time.sleep(0.1)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def load(self) -> list[Item]:
        return read_file(self.path)

    def append(self, item: Item) -> None:
        data = frame(item)
        while data:
            data = data[os.write(self._fd, data) :]
        if self.fsync:
            os.fdatasync(self._fd)

    def rewrite(self, items: Iterable[Item]) -> None:
        """Replace the file by exactly `items` (what is still pending), atomically."""
        write_atomically(self.path, b"".join(frame(i) for i in items), fsync=self.fsync)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._lock_fd)
