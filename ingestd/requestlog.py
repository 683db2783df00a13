"""A listener's request log: where an accepted request is written before its 202.

Each listener appends every accepted request, as one checksummed record (`records.py`), to the
current segment of its folder `logs/<index>/`: `<segment>.log`. A segment is *open* while
requests are appended to it, *rotated* after `spool.segment_bytes` or a second, and *closed*
once no request of it is still on its way to the queue. Beside each segment, uploaders append
to `<segment>.landed` what of it has landed (`append_landed`): fixed 16-byte entries (record
offset, first line, line count, CRC), so concurrent appends never interleave and a bad entry
is skipped on its own (readers resynchronize after garbage, byte by byte). A closed segment
whose every payload line has landed (or was cancelled)
is deleted by its listener: nothing is deleted because it was *taken*, only because it *landed*.

The listener keeps an index of its records in memory (offset, size, lines), so a re-index
(`uncovered`) needs no scan; a successor adopting the folder builds it with `adopt`, which cuts
a torn tail (nothing is appended after it: the successor starts a new segment) and keeps the
valid records around damaged bytes.

fsync policy (`spool.journal_fsync`, disk durability only; memory durability is tmpfs):
"always" fdatasyncs before the 202 with group commit (one thread syncs for all that wrote
before it); "interval" fdatasyncs from the listener's keeper every `journal_fsync_interval_ms`;
"never" leaves it to the kernel. A written page survives any process death; fsync is about
power loss.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from .records import HEADER, Kind, Request, frame, parse_request, scan, slice_lines
from .refqueue import Ref
from .spool import fsync_dir, write_atomically

log = logging.getLogger(__name__)

SEGMENT_MAX_AGE_S = 1.0
NEXT_FILE = ".next-segment"  # the next segment number of a folder (never reused)
_LANDED = struct.Struct("<IIII")  # record offset, first line, line count, crc32 of the first 12 bytes
_CANCEL = struct.Struct("<I")  # offset of the cancelled record, in the same segment


class Part(NamedTuple):
    """Some payload lines of one logged request: what an object holds, and what lands."""

    listener: int
    segment: int
    offset: int
    first_line: int
    count: int  # type: ignore[assignment]


def landed_entries(parts: Iterable[Part]) -> bytes:
    out = []
    for p in parts:
        head = struct.pack("<III", p.offset, p.first_line, p.count)
        out.append(head + struct.pack("<I", zlib.crc32(head)))
    return b"".join(out)


def segment_path(logs_dir: Path, listener: int, segment: int) -> Path:
    return logs_dir / str(listener) / f"{segment:010d}.log"


def landed_path(segment: Path) -> Path:
    return segment.with_suffix(".landed")


def append_landed(logs_dir: Path, parts: list[Part]) -> None:
    """Record that `parts` have landed, segment by segment (uploaders call this after a PUT).

    The `.landed` file is created with its segment; a missing one means the segment is gone,
    which happens only once all of it landed, so there is nothing left to record.
    """
    by_segment: dict[tuple[int, int], list[Part]] = {}
    for p in parts:
        by_segment.setdefault((p.listener, p.segment), []).append(p)
    for (listener, segment), group in by_segment.items():
        path = landed_path(segment_path(logs_dir, listener, segment))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            data = memoryview(landed_entries(group))
            while data:  # a short write stops at a page boundary, which is an entry boundary
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)


def read_record(fd: int, ref: Ref) -> Request | None:
    """The request at `ref`, cut to the lines it covers, or None if the record fails its checksum."""
    data = os.pread(fd, ref.length, ref.offset)
    found = scan(data).records
    if len(data) != ref.length or len(found) != 1 or found[0].kind is not Kind.REQUEST:
        return None
    request = parse_request(found[0].body, found[0].flags)
    if ref.first_line == 0 and ref.count == request.count:
        return request
    if ref.first_line + ref.count > request.count:
        return None
    return request._replace(count=ref.count, lines=slice_lines(request.lines, ref.first_line, ref.count))


class Segment:
    """One segment file and what the listener knows about it."""

    def __init__(self, listener: int, number: int, path: Path) -> None:
        self.listener = listener
        self.number = number
        self.path = path
        self.offsets = array("Q")
        self.sizes = array("I")
        self.lines = array("I")
        self.total_lines = 0
        self.size = 0  # bytes of valid records (the file's length once recovered)
        self.cancelled: dict[int, int] = {}  # offset -> lines
        self.rotated = False
        self.pending = 0  # requests appended whose reference is not yet put (or cancelled)
        self.fd = -1  # open while the segment is open or rotated
        self.landed_pos = 0
        self.landed: dict[tuple[int, int], int] = {}
        self.landed_lines = 0
        self.opened = time.monotonic()

    def add(self, offset: int, size: int, lines: int) -> None:
        self.offsets.append(offset)
        self.sizes.append(size)
        self.lines.append(lines)
        self.total_lines += lines

    @property
    def closed(self) -> bool:
        return self.rotated and self.pending == 0

    def refresh_landed(self) -> None:
        """Read what was appended to the `.landed` file since the last call.

        Entries carry their own checksum. Garbage (a power cut, a torn write, anything) is
        skipped byte by byte until a valid entry starts again, so entries appended after it by
        uploaders, which cannot know of it, are still read: a part recorded as landed is never
        missed (a re-index would send it twice)."""
        lpath = landed_path(self.path)
        try:
            with open(lpath, "rb") as f:
                f.seek(self.landed_pos)
                data = f.read()
        except FileNotFoundError:
            return
        size = _LANDED.size
        i = 0
        while i + size <= len(data):
            offset, first, count, crc = _LANDED.unpack_from(data, i)
            if zlib.crc32(data[i : i + 12]) != crc:
                i += 1  # resynchronize
                continue
            if (offset, first) not in self.landed:
                self.landed[(offset, first)] = count
                self.landed_lines += count
            i += size
        self.landed_pos += i  # a partial entry at the end is read again next time

    @property
    def complete(self) -> bool:
        return self.closed and self.landed_lines + sum(self.cancelled.values()) >= self.total_lines

    def records(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.offsets, self.sizes, self.lines)


Covered = dict[tuple[int, int, int], list[tuple[int, int]]]  # (listener, segment, offset) -> [(first, count)]


def uncovered_ranges(lines: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[0, lines) minus the covered (first, count) ranges, as (first, count) ranges."""
    out = []
    pos = 0
    for first, count in sorted(covered):
        if first > pos:
            out.append((pos, first - pos))
        pos = max(pos, first + count)
    if pos < lines:
        out.append((pos, lines - pos))
    return out


class Pos(NamedTuple):
    segment: Segment
    offset: int
    size: int
    count: int  # type: ignore[assignment]


class RequestLog:
    """The log of one listener: its own folder, plus the folders it adopted."""

    def __init__(self, logs_dir: Path, index: int, fsync: str, segment_bytes: int,
                 quarantine: Callable[[Path, bytes, str], object] | None = None) -> None:
        self.logs_dir = logs_dir
        self.index = index
        self.fsync = fsync  # always | interval | never | none (memory durability)
        self.segment_bytes = segment_bytes
        self._quarantine = quarantine
        self.dir = logs_dir / str(index)
        self.segments: dict[tuple[int, int], Segment] = {}
        self.current: Segment | None = None
        self._next = 1
        self._written = 0  # bytes appended in total (for group commit)
        self._synced = 0
        self._sync_lock = threading.Lock()
        self.damaged_bytes = 0
        self.total_bytes = 0  # bytes of every segment held: what queue.max_bytes bounds

    # -- recovery --------------------------------------------------------------------------------
    def adopt(self, listener: int) -> int:
        """Take over the segments of folder `listener` (this listener's own predecessor, or an
        orphan). Cuts torn tails, keeps damaged bytes aside. Returns the payloads found."""
        folder = self.logs_dir / str(listener)
        found = 0
        for path in sorted(folder.glob("*.log")):
            if not path.stem.isdigit():
                continue
            seg = self._load(listener, int(path.stem), path)
            if seg is None:
                continue
            self.segments[(listener, seg.number)] = seg
            self.total_bytes += seg.size
            found += seg.total_lines - sum(seg.cancelled.values()) - seg.landed_lines
            if listener == self.index:
                self._next = max(self._next, seg.number + 1)
        for stray in folder.glob("*.landed"):  # a segment deleted between its two unlinks
            if not stray.with_suffix(".log").exists():
                stray.unlink(missing_ok=True)
        return found

    def _load(self, listener: int, number: int, path: Path) -> Segment | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        result = scan(data)
        seg = Segment(listener, number, path)
        seg.rotated = True
        for start, end in result.damaged:
            self.damaged_bytes += end - start
            if self._quarantine is not None:
                self._quarantine(path, data[start:end], f"damaged bytes at {start}..{end}")
        if result.good_end < len(data):
            log.warning("%s: torn tail of %d bytes cut at offset %d", path, len(data) - result.good_end, result.good_end)
            os.truncate(path, result.good_end)
        for rec in result.records:
            if rec.kind is Kind.REQUEST:
                seg.add(rec.offset, rec.size, parse_request(rec.body).count)
            elif rec.kind is Kind.CANCEL:
                (offset,) = _CANCEL.unpack_from(rec.body)
                seg.cancelled[offset] = 0
        for i, offset in enumerate(seg.offsets):
            if offset in seg.cancelled:
                seg.cancelled[offset] = seg.lines[i]
        seg.size = result.good_end
        lpath = landed_path(path)
        if not lpath.exists():
            lpath.touch()
        seg.refresh_landed()
        return seg

    def _read_next(self) -> int:
        try:
            return int((self.dir / NEXT_FILE).read_text().strip() or 1)
        except (FileNotFoundError, ValueError):
            return 1

    # -- writing (under the caller's lock: the listener's intake lock) ------------------------------
    def _open_segment(self) -> Segment:
        self.dir.mkdir(parents=True, exist_ok=True)
        number = max(self._next, self._read_next())
        # A segment number is never used twice in a folder, even once every segment is gone:
        # references, uploaders' open files, journaled intents and `.landed` appends name a
        # segment by its number, and must never reach another segment by it.
        sync = self.fsync in ("always", "interval")
        write_atomically(self.dir / NEXT_FILE, b"%d\n" % (number + 1), fsync=sync)
        path = segment_path(self.logs_dir, self.index, number)
        landed_path(path).touch()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._next = number + 1
        seg = Segment(self.index, number, path)
        seg.fd = fd
        if self.fsync in ("always", "interval"):
            fsync_dir(self.dir)  # the new file's name survives a power cut too
        self.segments[(self.index, number)] = seg
        self.current = seg
        return seg

    def _rotate(self) -> None:
        seg = self.current
        if seg is None:
            return
        self.current = None
        seg.rotated = True
        if self.fsync in ("always", "interval"):
            with self._sync_lock:
                os.fdatasync(seg.fd)
                self._synced = self._written  # every byte written so far is in this or older segments
        self._close_if_done(seg)

    def _close_if_done(self, seg: Segment) -> None:
        if seg.closed and seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1

    def append(self, data: bytes, count: int) -> Pos:
        """Write one request record (`records.request_record`). On failure nothing of it stays
        in the log (or the segment is abandoned and its torn tail cut on recovery) and OSError
        is raised."""
        seg = self.current
        if seg is not None and seg.size and (
            seg.size >= self.segment_bytes or time.monotonic() - seg.opened >= SEGMENT_MAX_AGE_S):
            self._rotate()
            seg = None
        if seg is None:
            seg = self._open_segment()
        start = seg.size
        try:
            n = os.write(seg.fd, data)
            if n != len(data):
                raise OSError(28, "short write to the request log")
        except OSError:
            try:
                os.ftruncate(seg.fd, start)
                os.lseek(seg.fd, start, os.SEEK_SET)
            except OSError:
                self._rotate()  # abandon it: recovery cuts the torn tail, nothing is appended after it
            raise
        seg.size += len(data)
        self.total_bytes += len(data)
        seg.add(start, len(data), count)
        seg.pending += 1
        self._written += len(data)
        return Pos(seg, start, len(data), count)

    def put_done(self, pos: Pos) -> None:
        """The reference of `pos` is on the queue."""
        pos.segment.pending -= 1
        self._close_if_done(pos.segment)

    def cancel(self, pos: Pos, may_truncate: bool = False) -> None:
        """The request of `pos` was refused after it was logged: it must never be delivered.

        `may_truncate`: the caller held the intake lock from the append until now, so no cut
        (`position`) can lie past this record and it may simply be cut off the end. Otherwise a
        CANCEL record says so: offsets below a cut must never be reused."""
        seg = pos.segment
        seg.pending -= 1
        seg.cancelled[pos.offset] = pos.count
        if may_truncate and seg is self.current and seg.size == pos.offset + pos.size:
            try:
                os.ftruncate(seg.fd, pos.offset)
                os.lseek(seg.fd, pos.offset, os.SEEK_SET)
                seg.size = pos.offset
                self.total_bytes -= pos.size
                seg.offsets.pop()
                seg.sizes.pop()
                seg.lines.pop()
                seg.total_lines -= pos.count
                del seg.cancelled[pos.offset]
                return
            except OSError:
                pass
        try:  # not the last record any more: a CANCEL record in the same segment says so
            data = frame(Kind.CANCEL, _CANCEL.pack(pos.offset))
            if os.write(seg.fd, data) == len(data):
                seg.size += len(data)
                self.total_bytes += len(data)
                if self.fsync in ("always", "interval"):
                    os.fdatasync(seg.fd)
        except OSError as e:
            log.error("%s: cannot record the cancel of offset %d (%s); kept in memory", seg.path, pos.offset, e)
        self._close_if_done(seg)

    def rotate_if_old(self) -> None:
        seg = self.current
        if seg is not None and seg.size and time.monotonic() - seg.opened >= SEGMENT_MAX_AGE_S:
            self._rotate()

    def seal(self) -> None:
        """At exit: no more requests."""
        self._rotate()

    # -- durability -------------------------------------------------------------------------------
    @property
    def written(self) -> int:
        return self._written

    def commit(self, upto: int) -> None:
        """Before a 202 under "always": bytes up to `upto` (a `written` value) are on disk."""
        with self._sync_lock:
            if self._synced >= upto:
                return  # another thread's fdatasync covered this one: group commit
            target = self._written
            seg = self.current
            if seg is not None and seg.fd >= 0:
                os.fdatasync(seg.fd)
            self._synced = max(self._synced, target)

    def sync(self) -> None:
        """The "interval" policy's periodic flush."""
        seg = self.current
        with self._sync_lock:
            target = self._written
            if target > self._synced and seg is not None and seg.fd >= 0:
                os.fdatasync(seg.fd)
                self._synced = target

    # -- what has landed ---------------------------------------------------------------------------
    def collect(self, lock: threading.Lock) -> int:
        """Delete closed segments whose every line has landed. Returns the bytes freed. Reads
        outside `lock` (the intake's), changes what appends see only under it."""
        freed = 0
        with lock:
            closed = [(key, seg) for key, seg in self.segments.items() if seg.closed]
        for key, seg in closed:
            seg.refresh_landed()
            if seg.complete:
                try:
                    seg.path.unlink(missing_ok=True)
                    landed_path(seg.path).unlink(missing_ok=True)
                except OSError as e:  # a read-only remount, an I/O error: try again next time
                    log.warning("%s: cannot delete this landed segment yet: %s", seg.path, e)
                    continue
                with lock:
                    del self.segments[key]
                    self.total_bytes -= seg.size
                freed += seg.size
        return freed

    @property
    def payloads(self) -> int:
        """Payload lines logged and not yet landed (approximately: landed counts of open segments lag)."""
        return sum(s.total_lines - s.landed_lines - sum(s.cancelled.values()) for s in self.segments.values())

    def uncovered(self, covered: Covered, cut: tuple[int, int] | None, lock: threading.Lock) -> list[Part]:
        """Every part of a logged request before `cut` (segment, offset of this listener's
        own log) that is neither in `covered` (intents, landed) nor cancelled."""
        out: list[Part] = []
        with lock:
            segments = sorted(self.segments.items())
        for (listener, number), seg in segments:
            seg.refresh_landed()
            landed: dict[int, list[tuple[int, int]]] = {}
            for (offset, first), count in seg.landed.items():
                landed.setdefault(offset, []).append((first, count))
            for offset, _size, lines in seg.records():
                if cut is not None and listener == self.index and (number, offset) >= cut:
                    break
                if offset in seg.cancelled:
                    continue
                ranges = covered.get((listener, number, offset), []) + landed.get(offset, [])
                for first, count in uncovered_ranges(lines, ranges):
                    out.append(Part(listener, number, offset, first, count))
        return out

    def ref(self, part: Part, epoch: int) -> Ref:
        seg = self.segments[(part.listener, part.segment)]
        i = _find(seg.offsets, part.offset)
        return Ref(part.listener, epoch & 0xFFFF, part.segment, part.offset, seg.sizes[i], part.first_line, part.count)

    def position(self) -> tuple[int, int]:
        """Where the next request would go: the cut of a re-index begun now."""
        seg = self.current
        if seg is None:
            return (self._next, 0)
        return (seg.number, seg.size)

    def close(self) -> None:
        for seg in self.segments.values():
            if seg.fd >= 0:
                os.close(seg.fd)
                seg.fd = -1


def _find(offsets: array[int], offset: int) -> int:
    i = bisect.bisect_left(offsets, offset)
    if i >= len(offsets) or offsets[i] != offset:
        raise KeyError(offset)
    return i


class Rebuilt(NamedTuple):
    body: bytes
    count: int  # type: ignore[assignment]  # payload lines in `body`
    damaged: list[Part]  # parts whose record failed its checksum: left out of `body`


def read_parts(logs_dir: Path, parts: Iterable[Part]) -> Rebuilt | None:
    """The lines of `parts`, in order, read back from the logs; None if a segment is gone.
    A part whose record fails its checksum (damaged storage) is left out and listed."""
    out = []
    count = 0
    damaged: list[Part] = []
    fds: dict[tuple[int, int], int] = {}
    try:
        for p in parts:
            fd = fds.get((p.listener, p.segment))
            if fd is None:
                try:
                    fd = fds[(p.listener, p.segment)] = os.open(segment_path(logs_dir, p.listener, p.segment),
                                                                 os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
            head = os.pread(fd, HEADER.size, p.offset)
            length = HEADER.unpack(head)[3] if len(head) == HEADER.size else 0
            got = None
            if head and p.offset + HEADER.size + length <= os.fstat(fd).st_size:  # a damaged length allocates nothing
                got = read_record(fd, Ref(p.listener, 0, p.segment, p.offset, HEADER.size + length, p.first_line,
                                          p.count))
            if got is None:
                damaged.append(p)
                continue
            out.append(got.lines)
            count += p.count
    finally:
        for fd in fds.values():
            os.close(fd)
    return Rebuilt(b"".join(out), count, damaged)
