"""spool.py: slot files, the spool lock, adoption of leftovers, dead letters and replay order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ingestd.errors import SpoolLockedError
from ingestd.records import Item, frame
from ingestd.spool import SlotFile, Spool, read_file

REPO = Path(__file__).resolve().parents[2]


def item(n: int, count: int = 1) -> Item:
    lines = b"".join(b'{"item":%d,"line":%d}\n' % (n, j) for j in range(count))
    return Item(0, 1000.0 + n, count, lines)


def stored(items: list[Item]) -> list[tuple[float, int, bytes]]:
    return [(i.received_at, i.count, i.lines) for i in items]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.prepare()
    return s


# -- SlotFile -----------------------------------------------------------------------------------


def test_slot_file_append_and_load(spool: Spool) -> None:
    sf = SlotFile(spool.slot_path(0))
    try:
        assert sf.load() == []
        sf.append(item(1, 2))
        sf.append(item(2))
        assert stored(sf.load()) == stored([item(1, 2), item(2)])
        assert stored(read_file(spool.slot_path(0))) == stored([item(1, 2), item(2)])
    finally:
        sf.close()


def test_slot_file_rewrite_then_append(spool: Spool) -> None:
    sf = SlotFile(spool.slot_path(1), fsync=True)
    try:
        for n in range(1, 4):
            sf.append(item(n))
        sf.rewrite([item(3)])
        assert stored(sf.load()) == stored([item(3)])
        sf.append(item(4))  # goes to the new file, not the replaced one
        assert stored(read_file(spool.slot_path(1))) == stored([item(3), item(4)])
        sf.rewrite([])
        assert sf.load() == [] and spool.slot_path(1).read_bytes() == b""
        assert [p.name for p in spool.inflight_dir.iterdir() if p.name.startswith(".")] == []  # no temp file left
        assert [p.name for p in spool.inflight_dir.glob("*.rec")] == ["slot-1.rec"]
    finally:
        sf.close()


def test_slot_file_keeps_what_is_already_there(spool: Spool) -> None:
    spool.slot_path(0).write_bytes(frame(item(1)))
    sf = SlotFile(spool.slot_path(0))
    try:
        sf.append(item(2))
        assert stored(sf.load()) == stored([item(1), item(2)])
    finally:
        sf.close()


# -- lock ---------------------------------------------------------------------------------------


def test_second_locker_in_the_same_process_is_refused(tmp_path: Path) -> None:
    first, second = Spool(tmp_path / "s"), Spool(tmp_path / "s")
    first.lock()
    with pytest.raises(SpoolLockedError, match=str(tmp_path / "s")):
        second.lock()
    assert Spool(tmp_path / "other").lock() is None  # another spool is free


LOCKER = """
import sys
from ingestd.spool import Spool
spool = Spool(sys.argv[1])  # the lock lives as long as this object
spool.lock()
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_held_by_another_process_until_it_exits(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"locked\n"
        with pytest.raises(SpoolLockedError):
            Spool(root).lock()
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
        Spool(root).lock()  # the kernel released the lock when the holder exited
    finally:
        proc.kill()
        proc.wait()


# -- adopt_leftovers ----------------------------------------------------------------------------


def test_adopt_leftovers_round_robin(spool: Spool) -> None:
    spool.slot_path(0).write_bytes(frame(item(1)))
    spool.slot_path(1).write_bytes(frame(item(2)))
    spool.slot_path(2).write_bytes(frame(item(3, 2)))  # slots 2 and 3 no longer exist
    spool.slot_path(3).write_bytes(frame(item(4)) + frame(item(5, 3)))
    (spool.overflow_dir / "a.rec").write_bytes(frame(item(6, 4)))
    (spool.overflow_dir / "b.rec").write_bytes(frame(item(7)))

    adopted = spool.adopt_leftovers(2)

    assert adopted == 2 + 1 + 3 + 4 + 1
    assert list(spool.overflow_dir.iterdir()) == []
    assert sorted(p.name for p in spool.inflight_dir.glob("*.rec")) == ["slot-0.rec", "slot-1.rec"]
    slot0 = stored(read_file(spool.slot_path(0)))
    slot1 = stored(read_file(spool.slot_path(1)))
    # overflow files first (sorted), then the orphaned slot files, dealt out in turn
    assert slot0[:2] == stored([item(1), item(6, 4)])
    assert slot1[:2] == stored([item(2), item(7)])
    orphans = [stored([item(3, 2)]), stored([item(4), item(5, 3)])]
    assert sorted([slot0[2:], slot1[2:]]) == sorted(orphans)


def test_adopt_leftovers_takes_journal_segments_after_overflow(spool: Spool) -> None:
    (spool.overflow_dir / "o.rec").write_bytes(frame(item(1, 2)))
    (spool.journal_dir / "j1.rec").write_bytes(frame(item(2)) + frame(item(3)))
    (spool.journal_dir / "j2.rec").write_bytes(frame(item(4, 3)))
    assert spool.adopt_leftovers(2) == 2 + 1 + 1 + 3
    assert stored(read_file(spool.slot_path(0))) == stored([item(1, 2), item(4, 3)])
    assert stored(read_file(spool.slot_path(1))) == stored([item(2), item(3)])
    assert list(spool.journal_dir.glob("*.rec")) == [] and list(spool.overflow_dir.iterdir()) == []


def test_adopt_leftovers_counts_payloads_and_handles_empty_files(spool: Spool) -> None:
    (spool.overflow_dir / "empty.rec").write_bytes(b"")
    (spool.overflow_dir / "torn.rec").write_bytes(frame(item(1, 5)) + frame(item(2))[:-3])
    (spool.overflow_dir / "ignored.txt").write_bytes(b"not a spool file")
    adopted = spool.adopt_leftovers(1)
    assert adopted == 5
    assert stored(read_file(spool.slot_path(0))) == stored([item(1, 5)])
    assert [p.name for p in spool.overflow_dir.iterdir()] == ["ignored.txt"]


def test_adopt_leftovers_with_nothing_to_adopt(spool: Spool) -> None:
    spool.slot_path(0).write_bytes(frame(item(1)))
    assert spool.adopt_leftovers(4) == 0
    assert stored(read_file(spool.slot_path(0))) == stored([item(1)])


def test_adopt_leftovers_after_shrinking_to_one_slot(spool: Spool) -> None:
    for n in range(4):
        spool.slot_path(n).write_bytes(frame(item(n, n + 1)))
    assert spool.adopt_leftovers(1) == 2 + 3 + 4
    got = stored(read_file(spool.slot_path(0)))
    assert got[0] == stored([item(0, 1)])[0]
    assert sorted(got[1:]) == sorted(stored([item(1, 2), item(2, 3), item(3, 4)]))


# -- overflow, dead letters, replay --------------------------------------------------------------


def test_write_dead_letter_writes_rec_and_why(spool: Spool) -> None:
    path = spool.write_dead_letter([item(1, 2), item(2)], "AccessDenied: no write to bucket b")
    assert path.parent == spool.dead_dir and path.suffix == ".rec"
    assert stored(read_file(path)) == stored([item(1, 2), item(2)])
    assert path.with_suffix(".why").read_text() == "AccessDenied: no write to bucket b\n"
    assert sorted(p.suffix for p in spool.dead_dir.iterdir()) == [".rec", ".why"]  # no temp file left
    spool.remove(path)
    assert list(spool.dead_dir.iterdir()) == []


def test_write_overflow(spool: Spool) -> None:
    assert spool.write_overflow([]) is None
    path = spool.write_overflow([item(1), item(2, 3)])
    assert path is not None and path.parent == spool.overflow_dir
    assert stored(read_file(path)) == stored([item(1), item(2, 3)])
    assert [p.name for p in spool.overflow_dir.iterdir()] == [path.name]


def test_replayable_lists_dead_letters_then_overflow(spool: Spool) -> None:
    dead = spool.write_dead_letter([item(1)], "denied")
    over = spool.write_overflow([item(2)])
    assert list(spool.replayable()) == [dead, over]


def test_replayable_is_oldest_first(spool: Spool) -> None:
    # files written one after the other, within the same second most of the time
    dead = [spool.write_dead_letter([item(n)], "denied") for n in range(20)]
    over = [spool.write_overflow([item(n)]) for n in range(20)]
    assert list(spool.replayable()) == dead + over
