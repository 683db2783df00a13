"""requestlog.py: appending, rotation, cancels, what has landed, deletion, adoption of a
predecessor's folder (torn tails, damage), the re-index (`uncovered`) and reading parts back."""

from __future__ import annotations

import os
import resource
import signal
import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingestd.records import HEADER, Kind, request_record, scan
from ingestd.refqueue import Ref
from ingestd.requestlog import (
    SEGMENT_MAX_AGE_S,
    Covered,
    Part,
    Pos,
    Rebuilt,
    RequestLog,
    Segment,
    append_landed,
    landed_entries,
    landed_path,
    read_parts,
    read_record,
    segment_path,
    uncovered_ranges,
)

T0 = 1764299045.125


def lines(tag: int, n: int) -> bytes:
    return b"".join(b'{"r":%d,"l":%d}\n' % (tag, i) for i in range(n))


def line_range(tag: int, first: int, count: int) -> bytes:
    return b"".join(lines(tag, first + count).splitlines(keepends=True)[first:])


def record_size(tag: int, n: int) -> int:
    return len(request_record(T0, n, lines(tag, n)))


Quarantined = list[tuple[Path, bytes, str]]
MakeLog = Callable[..., RequestLog]


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
def quarantined() -> Quarantined:
    return []


@pytest.fixture
def make_log(logs_dir: Path, quarantined: Quarantined) -> Iterator[MakeLog]:
    """RequestLogs over `logs_dir`, closed at the end of the test."""
    made: list[RequestLog] = []

    def make(index: int = 0, fsync: str = "never", segment_bytes: int = 1 << 20) -> RequestLog:
        log = RequestLog(logs_dir, index, fsync, segment_bytes,
                         quarantine=lambda path, data, why: quarantined.append((path, data, why)))
        made.append(log)
        return log

    yield make
    for log in made:
        log.close()


@pytest.fixture
def lock() -> threading.Lock:
    return threading.Lock()


def write(log: RequestLog, tag: int, n: int, done: bool = True) -> Pos:
    """Append request `tag` of `n` lines; `done`: its reference is on the queue."""
    pos = log.append(request_record(T0 + tag, n, lines(tag, n)), n)
    if done:
        log.put_done(pos)
    return pos


def whole(pos: Pos, listener: int = 0) -> Part:
    return Part(listener, pos.segment.number, pos.offset, 0, pos.count)


def file_records(path: Path) -> list[tuple[Kind, int]]:
    return [(r.kind, r.offset) for r in scan(path.read_bytes()).records]


def read_at(path: Path, ref: Ref) -> tuple[float, bytes] | None:
    """(received_at, lines) of the request at `ref`, or None."""
    fd = os.open(path, os.O_RDONLY)
    try:
        got = read_record(fd, ref)
    finally:
        os.close(fd)
    return None if got is None else (got.received_at, got.lines)


# -- appending and reading back ------------------------------------------------------------------------


def test_appended_requests_are_readable_where_append_says(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = log.append(request_record(T0, 2, lines(1, 2)), 2)
    b = log.append(request_record(T0 + 1, 3, lines(2, 3)), 3)
    assert (a.segment.number, a.offset, a.size, a.count) == (1, 0, record_size(1, 2), 2)
    assert (b.segment, b.offset, b.size, b.count) == (a.segment, a.size, record_size(2, 3), 3)
    path = segment_path(logs_dir, 0, 1)
    assert path == logs_dir / "0" / "0000000001.log" and a.segment.path == path
    assert landed_path(path).read_bytes() == b""  # created with its segment
    assert path.stat().st_size == a.size + b.size == log.total_bytes == log.written
    assert read_at(path, Ref(0, 0, 1, a.offset, a.size, 0, 2)) == (T0, lines(1, 2))
    assert read_at(path, Ref(0, 0, 1, b.offset, b.size, 0, 3)) == (T0 + 1, lines(2, 3))
    assert read_at(path, Ref(0, 0, 1, b.offset, b.size, 1, 2)) == (T0 + 1, line_range(2, 1, 2))
    assert log.payloads == 5


def test_read_record_refuses_what_does_not_match_the_reference(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2)
    b = write(log, 2, 3)
    path = segment_path(logs_dir, 0, 1)
    assert read_at(path, Ref(0, 0, 1, a.offset, a.size - 1, 0, 2)) is None  # too short
    assert read_at(path, Ref(0, 0, 1, a.offset, a.size + b.size, 0, 2)) is None  # two records
    assert read_at(path, Ref(0, 0, 1, a.offset + 1, a.size, 0, 2)) is None  # not where a record starts
    assert read_at(path, Ref(0, 0, 1, b.offset, b.size, 2, 2)) is None  # more lines than it has
    data = bytearray(path.read_bytes())
    data[b.offset + b.size - 3] ^= 0x01
    path.write_bytes(bytes(data))
    assert read_at(path, Ref(0, 0, 1, b.offset, b.size, 0, 3)) is None  # fails its checksum
    assert read_at(path, Ref(0, 0, 1, a.offset, a.size, 0, 2)) == (T0 + 1, lines(1, 2))


def test_ref_of_a_part_carries_the_record_length_and_the_epoch_tag(make_log: MakeLog) -> None:
    log = make_log(index=2)
    write(log, 1, 2)
    b = write(log, 2, 5)
    assert log.ref(Part(2, 1, b.offset, 1, 3), 0x1_0007) == Ref(2, 7, 1, b.offset, b.size, 1, 3)
    with pytest.raises(KeyError):
        log.ref(Part(2, 1, b.offset + 1, 0, 1), 1)


def test_position_is_where_the_next_request_goes(make_log: MakeLog) -> None:
    log = make_log()
    assert log.position() == (1, 0)
    a = write(log, 1, 2)
    assert log.position() == (1, a.size)
    log.seal()
    assert log.position() == (2, 0)


# -- rotation -------------------------------------------------------------------------------------------


def test_segment_rotates_once_it_reaches_segment_bytes(make_log: MakeLog, logs_dir: Path) -> None:
    size = record_size(1, 2)
    log = make_log(segment_bytes=2 * size)
    pos = [write(log, tag, 2) for tag in range(1, 6)]
    assert [p.segment.number for p in pos] == [1, 1, 2, 2, 3]
    assert [p.offset for p in pos] == [0, size, 0, size, 0]
    assert sorted(p.name for p in (logs_dir / "0").iterdir()) == [".next-segment"] + [
        f"000000000{n}.{ext}" for n in (1, 2, 3) for ext in ("landed", "log")]
    assert (logs_dir / "0" / ".next-segment").read_text() == "4\n"
    assert [segment_path(logs_dir, 0, n).stat().st_size for n in (1, 2, 3)] == [2 * size, 2 * size, size]
    assert pos[0].segment.rotated and pos[0].segment.closed and pos[0].segment.fd == -1
    assert log.current is pos[4].segment and not pos[4].segment.rotated and pos[4].segment.fd >= 0
    assert log.total_bytes == 5 * size


def test_record_larger_than_segment_bytes_gets_a_segment_of_its_own(make_log: MakeLog) -> None:
    log = make_log(segment_bytes=10)
    pos = [write(log, tag, 3) for tag in range(1, 4)]
    assert [(p.segment.number, p.offset) for p in pos] == [(1, 0), (2, 0), (3, 0)]


def test_segment_rotates_after_its_age(make_log: MakeLog) -> None:
    log = make_log()
    a = write(log, 1, 1)
    b = write(log, 2, 1)
    assert b.segment is a.segment
    a.segment.opened -= SEGMENT_MAX_AGE_S  # as if opened a second ago
    c = write(log, 3, 1)
    assert c.segment.number == 2 and c.offset == 0
    assert a.segment.rotated and a.segment.closed


def test_rotate_if_old_rotates_only_an_old_segment_with_something_in_it(make_log: MakeLog) -> None:
    log = make_log()
    log.rotate_if_old()  # nothing open: nothing to do
    assert log.current is None
    a = write(log, 1, 1)
    log.rotate_if_old()
    assert log.current is a.segment  # young
    a.segment.opened -= SEGMENT_MAX_AGE_S
    log.rotate_if_old()
    assert log.current is None and a.segment.closed
    b = log.append(request_record(T0, 1, lines(2, 1)), 1)
    log.cancel(b, may_truncate=True)  # the last record: cut, so the new segment is empty again
    assert b.segment.size == 0
    b.segment.opened -= SEGMENT_MAX_AGE_S
    log.rotate_if_old()
    assert log.current is b.segment  # an empty segment is not rotated


# -- put_done, closed, cancel --------------------------------------------------------------------------------


def test_segment_is_closed_once_rotated_and_every_reference_is_put(make_log: MakeLog) -> None:
    log = make_log()
    a = write(log, 1, 1, done=False)
    b = write(log, 2, 1, done=False)
    seg = a.segment
    log.seal()
    assert seg.rotated and not seg.closed and seg.fd >= 0 and seg.pending == 2
    log.put_done(a)
    assert not seg.closed and seg.fd >= 0
    log.put_done(b)
    assert seg.closed and seg.fd == -1


def test_open_segment_is_not_closed_even_with_nothing_pending(make_log: MakeLog) -> None:
    log = make_log()
    a = write(log, 1, 1)
    assert a.segment.pending == 0 and not a.segment.closed
    log.seal()
    assert a.segment.closed


def test_cancel_of_the_last_record_cuts_it_off(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2)
    b = write(log, 2, 3, done=False)
    log.cancel(b, may_truncate=True)  # the intake held its lock since the append
    seg = a.segment
    path = segment_path(logs_dir, 0, 1)
    assert path.stat().st_size == a.size == seg.size == log.total_bytes
    assert list(seg.offsets) == [a.offset] and seg.total_lines == 2 and seg.cancelled == {} and seg.pending == 0
    c = write(log, 3, 1)
    assert (c.segment, c.offset) == (seg, a.size)  # the next request takes its place
    assert file_records(path) == [(Kind.REQUEST, 0), (Kind.REQUEST, a.size)]
    assert read_at(path, Ref(0, 0, 1, c.offset, c.size, 0, 1)) == (T0 + 3, lines(3, 1))


def test_cancel_of_an_earlier_record_appends_a_cancel_record(make_log: MakeLog, logs_dir: Path,
                                                             lock: threading.Lock) -> None:
    log = make_log()
    a = write(log, 1, 2, done=False)
    b = write(log, 2, 3)
    log.cancel(a)
    seg = a.segment
    path = segment_path(logs_dir, 0, 1)
    assert file_records(path) == [(Kind.REQUEST, 0), (Kind.REQUEST, b.offset), (Kind.CANCEL, b.offset + b.size)]
    cancel = scan(path.read_bytes()).records[2]
    assert struct.unpack("<I", cancel.body) == (a.offset,)
    assert seg.cancelled == {a.offset: 2} and seg.pending == 0
    assert log.uncovered({}, None, lock) == [whole(b)]
    assert log.payloads == 3
    # the cancelled lines count as done: the segment goes once the rest has landed
    log.seal()
    append_landed(log.logs_dir, [whole(b)])
    assert log.collect(lock) == seg.size
    assert not path.exists()


def test_cancel_in_a_rotated_segment_is_recorded_there(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2, done=False)
    a.segment.opened -= SEGMENT_MAX_AGE_S
    b = write(log, 2, 1)
    assert b.segment.number == 2
    assert not a.segment.closed  # a is still pending
    log.cancel(a)
    assert file_records(segment_path(logs_dir, 0, 1)) == [(Kind.REQUEST, 0), (Kind.CANCEL, a.size)]
    assert a.segment.closed and a.segment.fd == -1
    assert file_records(segment_path(logs_dir, 0, 2)) == [(Kind.REQUEST, 0)]


def test_cancel_survives_into_the_successor(make_log: MakeLog, lock: threading.Lock) -> None:
    log = make_log()
    a = write(log, 1, 2, done=False)
    b = write(log, 2, 3)
    log.cancel(a)
    log.close()  # the process dies
    successor = make_log()
    assert successor.adopt(0) == 3
    assert successor.uncovered({}, None, lock) == [whole(b)]
    assert successor.segments[(0, 1)].cancelled == {a.offset: 2}


# -- what has landed -------------------------------------------------------------------------------------------


def test_landed_entries_are_sixteen_bytes_each() -> None:
    data = landed_entries([Part(0, 1, 4096, 2, 3), Part(0, 1, 0, 0, 1)])
    assert len(data) == 32
    assert struct.unpack_from("<III", data) == (4096, 2, 3)


def test_refresh_landed_counts_each_landed_part_once(make_log: MakeLog) -> None:
    log = make_log()
    a = write(log, 1, 5)
    seg = a.segment
    append_landed(log.logs_dir, [Part(0, 1, a.offset, 0, 2)])
    seg.refresh_landed()
    assert seg.landed == {(a.offset, 0): 2} and seg.landed_lines == 2
    append_landed(log.logs_dir, [Part(0, 1, a.offset, 0, 2), Part(0, 1, a.offset, 2, 3)])  # a re-send lands again
    append_landed(log.logs_dir, [Part(0, 1, a.offset, 2, 3)])
    seg.refresh_landed()
    seg.refresh_landed()
    assert seg.landed == {(a.offset, 0): 2, (a.offset, 2): 3} and seg.landed_lines == 5


def test_refresh_landed_skips_a_garbage_entry_and_keeps_those_after_it(make_log: MakeLog) -> None:
    log = make_log()
    a = write(log, 1, 5)
    lpath = landed_path(a.segment.path)
    with open(lpath, "ab") as f:
        f.write(landed_entries([Part(0, 1, a.offset, 0, 1)]))
        f.write(b"\x00" * 16)  # what a power cut can leave
        f.write(b"\xff" * 16)
        f.write(landed_entries([Part(0, 1, a.offset, 1, 4)]))
    a.segment.refresh_landed()
    assert a.segment.landed == {(a.offset, 0): 1, (a.offset, 1): 4} and a.segment.landed_lines == 5


def test_refresh_landed_reads_a_partial_entry_once_it_is_whole(make_log: MakeLog) -> None:
    log = make_log()
    a = write(log, 1, 5)
    entry = landed_entries([Part(0, 1, a.offset, 0, 5)])
    lpath = landed_path(a.segment.path)
    with open(lpath, "ab") as f:
        f.write(entry[:7])
    a.segment.refresh_landed()
    assert a.segment.landed_lines == 0
    with open(lpath, "ab") as f:
        f.write(entry[7:])
    a.segment.refresh_landed()
    assert a.segment.landed_lines == 5


def test_append_landed_for_a_segment_that_is_gone_records_nothing(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2)
    gone = Part(0, 99, 0, 0, 4)
    append_landed(logs_dir, [gone, whole(a), Part(7, 1, 0, 0, 1)])
    assert not landed_path(segment_path(logs_dir, 0, 99)).exists()
    assert not (logs_dir / "7").exists()
    assert landed_path(a.segment.path).read_bytes() == landed_entries([whole(a)])


def test_refresh_landed_of_a_deleted_segment_changes_nothing(tmp_path: Path) -> None:
    seg = Segment(0, 1, tmp_path / "0000000001.log")
    seg.refresh_landed()
    assert seg.landed == {} and seg.landed_lines == 0 and seg.landed_pos == 0


# -- collect ----------------------------------------------------------------------------------------------


def test_collect_deletes_a_closed_segment_once_every_line_landed(make_log: MakeLog, lock: threading.Lock) -> None:
    log = make_log()
    a = write(log, 1, 3)
    b = write(log, 2, 2)
    log.seal()
    seg = a.segment
    append_landed(log.logs_dir, [whole(a), Part(0, 1, b.offset, 0, 1)])
    assert log.collect(lock) == 0
    assert seg.path.exists() and (0, 1) in log.segments
    append_landed(log.logs_dir, [Part(0, 1, b.offset, 1, 1)])
    assert log.collect(lock) == a.size + b.size
    assert not seg.path.exists() and not landed_path(seg.path).exists()
    assert log.segments == {} and log.total_bytes == 0 and log.payloads == 0


def test_collect_never_deletes_the_open_segment(make_log: MakeLog, lock: threading.Lock) -> None:
    log = make_log()
    a = write(log, 1, 3)
    append_landed(log.logs_dir, [whole(a)])
    assert log.collect(lock) == 0
    assert a.segment.path.exists() and log.current is a.segment
    b = write(log, 2, 1)  # and it is still appended to
    assert b.segment is a.segment


def test_collect_keeps_a_rotated_segment_with_a_reference_not_yet_put(make_log: MakeLog, lock: threading.Lock) -> None:
    log = make_log()
    a = write(log, 1, 3, done=False)
    log.seal()
    append_landed(log.logs_dir, [whole(a)])
    assert log.collect(lock) == 0 and a.segment.path.exists()
    log.put_done(a)
    assert log.collect(lock) == a.size and not a.segment.path.exists()


def test_collect_deletes_only_the_complete_segments(make_log: MakeLog, lock: threading.Lock) -> None:
    log = make_log(segment_bytes=1)
    pos = [write(log, tag, 2) for tag in range(1, 5)]  # one segment each
    log.seal()
    append_landed(log.logs_dir, [whole(pos[0]), whole(pos[2])])
    assert log.collect(lock) == pos[0].size + pos[2].size
    assert sorted(log.segments) == [(0, 2), (0, 4)]
    assert [p.segment.path.exists() for p in pos] == [False, True, False, True]
    assert log.total_bytes == pos[1].size + pos[3].size


def test_collect_that_cannot_delete_a_segment_keeps_it_for_the_next_time(make_log: MakeLog,
                                                                         lock: threading.Lock) -> None:
    log = make_log()
    a = write(log, 1, 2)
    log.seal()
    append_landed(log.logs_dir, [whole(a)])
    a.segment.path.unlink()
    a.segment.path.mkdir()  # unlink now fails (EISDIR), as it would on a read-only remount (EROFS)
    assert log.collect(lock) == 0
    assert (0, 1) in log.segments and log.total_bytes == a.size
    a.segment.path.rmdir()
    assert log.collect(lock) == a.size
    assert log.segments == {} and log.total_bytes == 0 and not landed_path(a.segment.path).exists()


# -- adopt --------------------------------------------------------------------------------------------------


def test_adopt_of_a_predecessor_cuts_a_torn_tail_and_starts_a_new_segment(make_log: MakeLog, logs_dir: Path,
                                                                          lock: threading.Lock) -> None:
    old = make_log(segment_bytes=3 * record_size(1, 2) - 1)
    pos = [write(old, tag, 2) for tag in range(1, 5)]  # segments 1 (three records) and 2 (one)
    old.close()  # killed: segment 2 never rotated
    path = segment_path(logs_dir, 0, 2)
    good = path.stat().st_size
    torn = request_record(T0, 9, lines(9, 9))[:-5]
    with open(path, "ab") as f:
        f.write(torn)  # a write cut short
    new = make_log()
    assert new.adopt(0) == 8
    assert path.stat().st_size == good  # cut at the end of the last valid record
    assert file_records(path) == [(Kind.REQUEST, 0)]
    seg = new.segments[(0, 2)]
    assert seg.rotated and seg.closed and seg.size == good and list(seg.offsets) == [0]
    assert new.total_bytes == sum(p.size for p in pos) and new.damaged_bytes == 0
    fresh = write(new, 5, 1)
    assert fresh.segment.number == 3 and fresh.offset == 0  # nothing is appended after a torn tail
    assert path.stat().st_size == good
    assert new.uncovered({}, None, lock) == [whole(p) for p in pos] + [whole(fresh)]


def test_adopt_keeps_the_records_around_damaged_bytes_and_quarantines_them(
    make_log: MakeLog, logs_dir: Path, quarantined: Quarantined, lock: threading.Lock
) -> None:
    old = make_log()
    a, b, c = (write(old, tag, 2) for tag in (1, 2, 3))
    old.close()
    path = segment_path(logs_dir, 0, 1)
    data = bytearray(path.read_bytes())
    data[b.offset + HEADER.size + 4] ^= 0x20
    path.write_bytes(bytes(data))
    new = make_log()
    assert new.adopt(0) == 4
    assert path.read_bytes() == bytes(data)  # damage is kept aside, not cut
    assert quarantined == [(path, bytes(data[b.offset : c.offset]), f"damaged bytes at {b.offset}..{c.offset}")]
    assert new.damaged_bytes == b.size
    assert new.uncovered({}, None, lock) == [whole(a), whole(c)]
    assert read_parts(logs_dir, [whole(c), whole(a)]) == Rebuilt(lines(3, 2) + lines(1, 2), 4, [])


def test_adopt_reads_what_landed_and_what_was_cancelled(make_log: MakeLog, lock: threading.Lock) -> None:
    old = make_log()
    a = write(old, 1, 4)
    b = write(old, 2, 3, done=False)
    c = write(old, 3, 2)
    old.cancel(b)
    append_landed(old.logs_dir, [Part(0, 1, a.offset, 0, 4), Part(0, 1, c.offset, 1, 1)])
    old.close()
    new = make_log()
    assert new.adopt(0) == 1  # neither cancelled (3) nor landed (5)
    seg = new.segments[(0, 1)]
    assert seg.landed_lines == 5 and seg.cancelled == {b.offset: 3} and new.payloads == 1
    assert new.uncovered({}, None, lock) == [Part(0, 1, c.offset, 0, 1)]
    append_landed(new.logs_dir, [Part(0, 1, c.offset, 0, 1)])
    assert new.collect(lock) == seg.size and not seg.path.exists()


def test_adopt_of_an_orphan_folder_keeps_its_listener_and_numbers(make_log: MakeLog, lock: threading.Lock) -> None:
    orphan = make_log(index=3)
    a = write(orphan, 1, 2)
    orphan.seal()
    b = write(orphan, 2, 1)  # segment 2
    orphan.close()
    log = make_log(index=0)
    assert log.adopt(3) == 3
    assert sorted(log.segments) == [(3, 1), (3, 2)]
    cut = log.position()
    own = write(log, 5, 1)
    assert own.segment.number == 1  # the orphan's numbers do not move this listener's own
    assert log.uncovered({}, cut, lock) == [whole(a, 3), whole(b, 3)]
    assert log.uncovered({}, None, lock) == [whole(own), whole(a, 3), whole(b, 3)]  # by listener, then segment
    assert log.ref(whole(b, 3), 1) == Ref(3, 1, 2, 0, b.size, 0, 1)


def test_adopt_creates_a_missing_landed_file_and_removes_a_stray_one(make_log: MakeLog, logs_dir: Path) -> None:
    old = make_log()
    a = write(old, 1, 2)
    old.close()
    landed_path(a.segment.path).unlink()
    stray = logs_dir / "0" / "0000000005.landed"  # its segment was deleted between the two unlinks
    stray.write_bytes(b"")
    (logs_dir / "0" / "notes.log").write_bytes(b"not a segment")
    new = make_log()
    assert new.adopt(0) == 2
    assert landed_path(a.segment.path).exists() and not stray.exists()
    assert sorted(new.segments) == [(0, 1)]
    assert (logs_dir / "0" / "notes.log").exists()


def test_adopt_of_a_folder_that_does_not_exist_finds_nothing(make_log: MakeLog) -> None:
    log = make_log()
    assert log.adopt(4) == 0 and log.segments == {}


def test_adopt_of_a_segment_torn_in_its_first_record_leaves_it_empty(make_log: MakeLog, logs_dir: Path,
                                                                     lock: threading.Lock) -> None:
    path = segment_path(logs_dir, 0, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(request_record(T0, 2, lines(1, 2))[:20])
    log = make_log()
    assert log.adopt(0) == 0
    assert path.stat().st_size == 0
    assert log.collect(lock) == 0 and not path.exists()  # nothing in it: it goes at once
    assert write(log, 2, 1).segment.number == 2


# -- uncovered ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines_, covered, expected",
    [
        (5, [], [(0, 5)]),
        (5, [(0, 5)], []),
        (5, [(0, 2)], [(2, 3)]),
        (5, [(3, 2)], [(0, 3)]),
        (5, [(1, 1), (3, 1)], [(0, 1), (2, 1), (4, 1)]),
        (5, [(3, 1), (1, 1)], [(0, 1), (2, 1), (4, 1)]),  # in any order
        (5, [(0, 3), (1, 3)], [(4, 1)]),  # overlapping
        (5, [(0, 2), (2, 2)], [(4, 1)]),  # adjacent
        (5, [(0, 2), (0, 2)], [(2, 3)]),  # twice
        (5, [(2, 10)], [(0, 2)]),  # beyond the end
        (0, [], []),
    ],
)
def test_uncovered_ranges(lines_: int, covered: list[tuple[int, int]], expected: list[tuple[int, int]]) -> None:
    assert uncovered_ranges(lines_, covered) == expected


def test_uncovered_is_exactly_what_is_neither_covered_nor_landed(make_log: MakeLog, lock: threading.Lock) -> None:
    log = make_log()
    a = write(log, 1, 3)
    b = write(log, 2, 2)
    c = write(log, 3, 4)
    d = write(log, 4, 1)
    covered: Covered = {(0, 1, a.offset): [(0, 3)], (0, 1, c.offset): [(1, 2)]}
    append_landed(log.logs_dir, [Part(0, 1, b.offset, 0, 1), Part(0, 1, d.offset, 0, 1)])
    assert log.uncovered(covered, None, lock) == [
        Part(0, 1, b.offset, 1, 1), Part(0, 1, c.offset, 0, 1), Part(0, 1, c.offset, 3, 1)]
    assert log.uncovered({}, None, lock) == [whole(a), Part(0, 1, b.offset, 1, 1), whole(c)]  # landed always counts


def test_uncovered_stops_at_the_cut_of_its_own_log(make_log: MakeLog, lock: threading.Lock) -> None:
    log = make_log(index=1, segment_bytes=2 * record_size(1, 2))
    a = write(log, 1, 2)
    b = write(log, 2, 2)
    cut = log.position()  # a re-index begins: what comes after is put on the queue by the handlers
    c = write(log, 3, 2)  # segment 2
    d = write(log, 4, 2)
    assert (c.segment.number, d.segment.number) == (2, 2)
    assert log.uncovered({}, cut, lock) == [whole(a, 1), whole(b, 1)]
    assert log.uncovered({}, (1, b.offset), lock) == [whole(a, 1)]
    assert log.uncovered({}, (2, d.offset), lock) == [whole(a, 1), whole(b, 1), whole(c, 1)]
    assert log.uncovered({}, (1, 0), lock) == []
    assert log.uncovered({}, None, lock) == [whole(p, 1) for p in (a, b, c, d)]


def test_uncovered_never_returns_a_request_appended_after_the_cut(make_log: MakeLog, lock: threading.Lock) -> None:
    # the always-fsync path of the intake: b is appended under the lock, synced and put outside
    # it; a re-index takes its cut meanwhile and waits for b, which the full queue refuses
    log = make_log()
    a = write(log, 1, 1)
    b = log.append(request_record(T0 + 2, 2, lines(2, 2)), 2)
    cut = log.position()
    log.cancel(b)
    c = write(log, 3, 1)  # a request of the new epoch: its handler puts its reference itself
    assert log.uncovered({}, cut, lock) == [whole(a)]
    assert c.offset >= cut[1]  # an offset below a cut is never reused


def test_uncovered_does_not_apply_the_cut_to_adopted_folders(make_log: MakeLog, lock: threading.Lock) -> None:
    orphan = make_log(index=4)
    x = write(orphan, 8, 1)
    o = write(orphan, 9, 2)
    orphan.close()
    log = make_log(index=0)
    log.adopt(4)
    cut = log.position()
    assert cut == (1, 0)  # every (segment, offset) of folder 4 is at or past it
    a = write(log, 1, 1)
    assert log.uncovered({}, cut, lock) == [whole(x, 4), whole(o, 4)]
    assert log.uncovered({}, None, lock) == [whole(a), whole(x, 4), whole(o, 4)]


# -- read_parts ---------------------------------------------------------------------------------------------


def test_read_parts_rebuilds_the_lines_in_the_order_of_the_parts(make_log: MakeLog, logs_dir: Path) -> None:
    one = make_log(index=0, segment_bytes=1)
    two = make_log(index=1)
    a = write(one, 1, 3)
    b = write(one, 2, 2)  # segment 2
    c = write(two, 3, 4)
    parts = [Part(1, 1, c.offset, 2, 2), Part(0, 1, a.offset, 0, 3), Part(0, 2, b.offset, 1, 1),
             Part(1, 1, c.offset, 0, 2)]
    body = line_range(3, 2, 2) + lines(1, 3) + line_range(2, 1, 1) + line_range(3, 0, 2)
    assert read_parts(logs_dir, parts) == Rebuilt(body, 8, [])
    assert read_parts(logs_dir, []) == Rebuilt(b"", 0, [])


def test_read_parts_is_none_when_a_segment_is_gone(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2)
    assert read_parts(logs_dir, [whole(a), Part(0, 2, 0, 0, 1)]) is None
    assert read_parts(logs_dir, [Part(5, 1, 0, 0, 1)]) is None


def test_read_parts_leaves_out_and_lists_a_part_that_fails_its_checksum(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2)
    b = write(log, 2, 2)
    c = write(log, 3, 1)
    data = bytearray(a.segment.path.read_bytes())
    data[b.offset + b.size - 2] ^= 0x01
    a.segment.path.write_bytes(bytes(data))
    assert read_parts(logs_dir, [whole(a)]) == Rebuilt(lines(1, 2), 2, [])
    assert read_parts(logs_dir, [whole(a), Part(0, 1, b.offset, 1, 1), whole(c)]) == Rebuilt(
        lines(1, 2) + lines(3, 1), 3, [Part(0, 1, b.offset, 1, 1)])


def test_read_parts_with_a_damaged_length_lists_the_part_without_allocating_it(make_log: MakeLog,
                                                                                logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2)
    b = write(log, 2, 2)
    data = bytearray(a.segment.path.read_bytes())
    data[b.offset + 4 : b.offset + 8] = struct.pack("<I", 0xFFFFFFF0)
    a.segment.path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        rebuilt = read_parts(logs_dir, [whole(b), whole(a)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rebuilt == Rebuilt(lines(1, 2), 2, [whole(b)])
    assert peak < 1024 * 1024, f"peak {peak} bytes"


def test_read_parts_lists_a_part_beyond_its_file_or_its_record(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2)
    past_the_end = Part(0, 1, a.size + 100, 0, 1)
    cut_short = Part(0, 1, a.size - 5, 0, 1)
    too_many_lines = Part(0, 1, a.offset, 1, 2)
    not_a_record = Part(0, 1, a.offset + 1, 0, 1)
    for part in (past_the_end, cut_short, too_many_lines, not_a_record):
        assert read_parts(logs_dir, [part, whole(a)]) == Rebuilt(lines(1, 2), 2, [part]), part


# -- durability ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["always", "interval", "never", "none"])
def test_commit_and_sync_under_every_policy(make_log: MakeLog, fsync: str, lock: threading.Lock) -> None:
    log = make_log(fsync=fsync, segment_bytes=2 * record_size(1, 2))
    pos = []
    for tag in range(1, 6):
        pos.append(write(log, tag, 2))
        log.commit(log.written)
        log.commit(log.written)  # already covered: returns at once
        log.sync()
    log.seal()  # rotation syncs too
    log.commit(log.written)
    log.sync()
    assert log.written == sum(p.size for p in pos)
    assert log.uncovered({}, None, lock) == [whole(p) for p in pos]
    body = b"".join(lines(t, 2) for t in range(1, 6))
    assert read_parts(log.logs_dir, [whole(p) for p in pos]) == Rebuilt(body, 10, [])


def test_commit_from_several_threads_covers_every_append(make_log: MakeLog) -> None:
    log = make_log(fsync="always")
    append_lock = threading.Lock()
    errors: list[BaseException] = []

    def handler(tag: int) -> None:
        try:
            for i in range(20):
                with append_lock:
                    write(log, tag * 100 + i, 1)
                    upto = log.written
                log.commit(upto)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=handler, args=(t,)) for t in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert sum(seg.size for seg in log.segments.values()) == log.written == 80 * record_size(100, 1)
    assert sum(p.count for p in log.uncovered({}, None, threading.Lock())) == 80


# -- a failed append ------------------------------------------------------------------------------------------------


def test_append_that_fails_leaves_nothing_of_its_record(make_log: MakeLog, logs_dir: Path,
                                                        lock: threading.Lock) -> None:
    log = make_log()
    a = write(log, 1, 2)
    seg = a.segment
    # make the segment's descriptor read-only in place: the write fails with EBADF (and so does
    # the truncate), and the descriptor stays the log's own to close
    ro = os.open(seg.path, os.O_RDONLY)
    os.dup2(ro, seg.fd)
    os.close(ro)
    with pytest.raises(OSError):
        log.append(request_record(T0, 3, lines(2, 3)), 3)
    assert seg.path.read_bytes() == request_record(T0 + 1, 2, lines(1, 2))
    assert list(seg.offsets) == [0] and seg.total_lines == 2 and log.total_bytes == a.size
    assert seg.rotated and seg.closed  # abandoned: nothing is appended to it again
    b = write(log, 3, 1)
    assert b.segment.number == 2 and b.offset == 0
    assert log.uncovered({}, None, lock) == [whole(a), whole(b)]
    log.close()
    successor = make_log()
    assert successor.adopt(0) == 3


def test_append_cut_short_is_truncated_away_and_the_segment_kept(make_log: MakeLog, logs_dir: Path) -> None:
    log = make_log()
    a = write(log, 1, 2)
    seg = a.segment
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # the file may grow by 5 bytes only: the next record's write comes back short
    resource.setrlimit(resource.RLIMIT_FSIZE, (a.size + 5, hard))
    try:
        with pytest.raises(OSError):
            log.append(request_record(T0, 3, lines(2, 3)), 3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert seg.path.stat().st_size == a.size  # the 5 bytes were taken back
    assert log.current is seg and not seg.rotated
    b = write(log, 3, 1)
    assert (b.segment, b.offset) == (seg, a.size)
    assert seg.path.read_bytes() == request_record(T0 + 1, 2, lines(1, 2)) + request_record(T0 + 3, 1, lines(3, 1))
    assert scan(seg.path.read_bytes()).damaged == []


def test_segment_numbers_are_never_reused_even_once_every_segment_is_gone(make_log: MakeLog,
                                                                         lock: threading.Lock) -> None:
    """References, uploaders' open files, intents and `.landed` appends name a segment by its
    number: a successor that finds an empty folder must not start again at 1."""
    old = make_log()
    a = write(old, 1, 1)
    old.seal()
    append_landed(old.logs_dir, [whole(a)])
    assert old.collect(lock) == a.size and not list(old.dir.glob("*.log"))
    old.close()
    successor = make_log()
    assert successor.adopt(0) == 0
    b = write(successor, 2, 1)
    assert b.segment.number == a.segment.number + 1


def test_landed_entries_appended_after_garbage_of_any_length_are_still_read(make_log: MakeLog,
                                                                            lock: threading.Lock) -> None:
    """Uploaders cannot know of a torn tail in a `.landed` file and append after it: a part they
    record there must still count as landed (else a re-index sends it twice)."""
    log = make_log()
    a = write(log, 1, 2)
    b = write(log, 2, 3)
    log.seal()
    seg = a.segment
    append_landed(log.logs_dir, [whole(a)])
    with open(landed_path(seg.path), "ab") as f:
        f.write(b"\xff" * 16 + b"\x01\x02\x03")  # a whole bad entry, then 3 bytes: misaligned from here on
    seg.refresh_landed()
    assert seg.landed_lines == 2
    append_landed(log.logs_dir, [whole(b)])
    seg.refresh_landed()
    assert seg.landed_lines == 5 and seg.complete
    assert log.uncovered({}, None, lock) == []
