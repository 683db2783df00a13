"""spool.py: paths, locks (in this process and held by another), atomic writes, dead letters,
quarantine, and the overflow of memory durability to disk and back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from ingestd.config import SpoolConfig
from ingestd.errors import SpoolLockedError
from ingestd.records import Kind, frame, scan
from ingestd.spool import (
    OVERFLOW_COMPLETE,
    Lock,
    Spool,
    tree_bytes,
    write_atomically,
)


def memory_spool(tmp_path: Path) -> Spool:
    """Memory durability with its logs root in a folder of the test instead of /dev/shm."""
    return Spool(SpoolConfig(path=str(tmp_path / "spool"), durability="memory", memory_path=str(tmp_path / "shm")))


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = memory_spool(tmp_path)
    s.prepare()
    return s


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path, with its contents."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fill_logs_root(spool: Spool) -> dict[str, bytes]:
    """A request log segment with its .landed file and a journal, as listeners and uploaders leave them."""
    seg = spool.listener_dir(0) / "0000000001.log"
    seg.parent.mkdir(parents=True, exist_ok=True)
    seg.write_bytes(frame(Kind.REQUEST, b"\x00" * 12 + b'{"a":1}\n') * 3)
    seg.with_suffix(".landed").write_bytes(b"\x01" * 16)
    (spool.listener_dir(1)).mkdir(parents=True, exist_ok=True)
    (spool.listener_dir(1) / "0000000007.log").write_bytes(b"x" * 1000)
    (spool.listener_dir(1) / "0000000007.landed").write_bytes(b"")
    journal = spool.journal_dir("0") / "3.jnl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_bytes(frame(Kind.INTENT, b'{"id":"i"}'))
    return snapshot(spool.logs_root)


# -- paths ----------------------------------------------------------------------------------------


def test_prepare_makes_every_folder(tmp_path: Path) -> None:
    s = memory_spool(tmp_path)
    s.prepare()
    for d in (s.dead_dir, s.quarantine_dir, s.locks_dir, s.logs_dir, s.journals_dir):
        assert d.is_dir(), d
    assert s.logs_dir == tmp_path / "shm" / "logs" and s.journals_dir == tmp_path / "shm" / "journals"
    assert s.dead_dir == tmp_path / "spool" / "dead" and s.overflow_dir == tmp_path / "spool" / "overflow"
    assert not s.overflow_dir.exists()  # made only by a drain that needs it
    s.prepare()  # twice is fine


def test_disk_durability_keeps_the_logs_under_the_spool_path(tmp_path: Path) -> None:
    s = Spool(SpoolConfig(path=str(tmp_path / "spool"), durability="disk", memory_path=str(tmp_path / "shm")))
    assert s.logs_root == tmp_path / "spool"
    assert s.listener_dir(3) == tmp_path / "spool" / "logs" / "3"
    assert s.journal_dir("2") == tmp_path / "spool" / "journals" / "2"


def test_memory_durability_without_a_memory_path_lives_in_dev_shm(tmp_path: Path) -> None:
    a = Spool(SpoolConfig(path=str(tmp_path / "a"), durability="memory"))
    b = Spool(SpoolConfig(path=str(tmp_path / "b"), durability="memory"))
    assert a.logs_root.parent == Path("/dev/shm") and a.logs_root.name.startswith("ingestd-")
    assert a.logs_root != b.logs_root  # two spools never share their logs
    assert a.logs_root == Spool(SpoolConfig(path=str(tmp_path / "a"), durability="memory")).logs_root


def test_indexes_lists_numbered_folders_in_order(spool: Spool) -> None:
    for name in ("10", "2", "0", "tmp", ".5"):
        (spool.logs_dir / name).mkdir()
    (spool.logs_dir / "7").write_bytes(b"a file, not a folder")
    assert spool.indexes(spool.logs_dir) == [0, 2, 10]
    assert spool.indexes(spool.root / "missing") == []


# -- write_atomically -------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [True, False])
def test_write_atomically_replaces_the_file_and_leaves_no_temp(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "f.bin"
    write_atomically(path, b"old contents, longer", fsync=fsync)
    write_atomically(path, b"new", fsync=fsync)
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_write_atomically_that_fails_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        write_atomically(tmp_path / "d", b"new")  # renaming a file over a folder fails
    with pytest.raises(TypeError):
        write_atomically(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.bin"]
    assert list((tmp_path / "d").iterdir()) == []


def test_tree_bytes_counts_every_file_below(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "x").write_bytes(b"12345")
    (tmp_path / "a" / "y").write_bytes(b"1" * 100)
    (tmp_path / "a" / "b" / "z").write_bytes(b"")
    assert tree_bytes(tmp_path) == 105
    assert tree_bytes(tmp_path / "missing") == 0


def test_used_bytes_counts_everything_under_the_spool_path(spool: Spool) -> None:
    assert spool.used_bytes() == 0
    spool.write_dead_letter("k", None, 6, 1, b"x" * 500, "denied")
    (spool.locks_dir / "w.lock").write_bytes(b"")
    used = spool.used_bytes()
    assert used == sum(p.stat().st_size for p in spool.root.rglob("*") if p.is_file())
    assert used > 500
    fill_logs_root(spool)  # memory durability: the logs are not under spool.path
    assert spool.used_bytes() == used


# -- locks ------------------------------------------------------------------------------------------


def test_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "uploader-0.lock"
    first, second = Lock(path), Lock(path)
    assert first.acquire()
    assert path.exists()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    first.release()  # releasing twice is harmless


def test_lock_acquire_waits_up_to_its_timeout(tmp_path: Path) -> None:
    holder, waiter = Lock(tmp_path / "l.lock"), Lock(tmp_path / "l.lock")
    assert holder.acquire()
    try:
        start = time.monotonic()
        assert not waiter.acquire(timeout=0.2)
        assert time.monotonic() - start >= 0.2
    finally:
        holder.release()


def test_daemon_lock_refuses_a_second_daemon(tmp_path: Path) -> None:
    first, second = memory_spool(tmp_path), memory_spool(tmp_path)
    first.lock_daemon()
    with pytest.raises(SpoolLockedError, match=str(tmp_path / "spool")):
        second.lock_daemon()
    memory_spool(tmp_path / "other").lock_daemon()  # another spool is free


HOLDER = """
import fcntl, sys
f = open(sys.argv[1], "ab")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def lock_holder(spool: Spool) -> Iterator[subprocess.Popen[bytes]]:
    """A real process holding the lock of uploader-0 until its stdin closes."""
    path = spool.child_lock("uploader-0").path
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_wait_for_old_children_names_the_locks_still_held(spool: Spool, lock_holder: subprocess.Popen[bytes]) -> None:
    free = spool.child_lock("listener-1")
    assert free.acquire()
    free.release()  # a lock file left by a child that is gone
    start = time.monotonic()
    assert spool.wait_for_old_children(0.3) == ["uploader-0"]
    assert time.monotonic() - start >= 0.3
    assert not spool.child_lock("uploader-0").acquire()  # still held: nothing was broken


def test_wait_for_old_children_waits_for_a_child_that_exits(spool: Spool, lock_holder: subprocess.Popen[bytes]) -> None:
    assert lock_holder.stdin is not None
    lock_holder.stdin.close()  # the holder exits by itself, soon
    assert spool.wait_for_old_children(10.0) == []
    assert lock_holder.wait(timeout=5) == 0


def test_wait_for_old_children_after_the_holder_is_killed(spool: Spool, lock_holder: subprocess.Popen[bytes]) -> None:
    lock_holder.kill()
    lock_holder.wait()
    assert spool.wait_for_old_children(5.0) == []  # the kernel dropped the lock with the process
    lock = spool.child_lock("uploader-0")
    assert lock.acquire()
    lock.release()


def test_wait_for_old_children_with_no_locks(spool: Spool) -> None:
    assert spool.wait_for_old_children(0.0) == []


# -- dead letters -------------------------------------------------------------------------------------

DEAD_KEY = "pre/dt=2025-11-28/hour=03/20251128T030405125Z-h-00ff.ndjson.gz"


def test_dead_letter_round_trip(spool: Spool) -> None:
    body = b'{"a":1}\n{"b":2}\n'
    path = spool.write_dead_letter(DEAD_KEY, "gzip", 6, 2, body, "AccessDenied")
    assert path.parent == spool.dead_dir and path.suffix == ".dead" and "/" not in path.name
    assert spool.read_dead_letter(path) == (
        {"key": DEAD_KEY, "encoding": "gzip", "level": 6, "count": 2, "reason": "AccessDenied"}, body)
    assert spool.dead_letters() == [path]
    assert [p.name for p in spool.dead_dir.iterdir()] == [path.name]  # no temp file left


def test_dead_letters_are_listed_in_order_and_one_per_key(spool: Spool) -> None:
    paths = [spool.write_dead_letter(f"p/dt=2025-11-28/hour=03/{n:03d}.ndjson", None, 6, 1, b"x\n", "no")
             for n in (2, 0, 1)]
    assert spool.dead_letters() == sorted(paths) and len(set(paths)) == 3
    again = spool.write_dead_letter("p/dt=2025-11-28/hour=03/000.ndjson", None, 6, 1, b"y\n", "again")
    assert len(spool.dead_letters()) == 3
    letter = spool.read_dead_letter(again)
    assert letter is not None and letter[1] == b"y\n"


def test_dead_letter_of_a_long_key_is_written(spool: Spool) -> None:
    prefix = "/".join(f"tenant-{i:02d}-telemetry" for i in range(8))  # 159 bytes: a legal prefix
    host = "ingest-eu-west-1a-node-17.example.internal"
    key = f"{prefix}/dt=2025-11-28/hour=03/20251128T030405125Z-{host}-00ff00ff00ff00ff.ndjson.gz"
    assert len(key.encode()) < 1024
    path = spool.write_dead_letter(key, "gzip", 6, 1, b"x\n", "denied")
    letter = spool.read_dead_letter(path)
    assert letter is not None and letter[0]["key"] == key


def test_dead_letters_of_a_spool_without_any(tmp_path: Path) -> None:
    assert memory_spool(tmp_path).dead_letters() == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_damaged_dead_letter_reads_as_none(spool: Spool, damage: str) -> None:
    path = spool.write_dead_letter(DEAD_KEY, None, 6, 1, b"x\n" * 50, "denied")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0x01
    elif damage == "truncate":
        data = data[:-3]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"\x00garbage" * 20)
    path.write_bytes(bytes(data))
    assert spool.read_dead_letter(path) is None


def test_dead_letter_with_records_out_of_order_reads_as_none(spool: Spool) -> None:
    path = spool.dead_dir / "odd.dead"
    path.write_bytes(frame(Kind.REQUEST, b"x\n") + frame(Kind.INTENT, orjson.dumps({"key": "k"})))
    assert spool.read_dead_letter(path) is None


def test_missing_dead_letter_reads_as_none(spool: Spool) -> None:
    assert spool.read_dead_letter(spool.dead_dir / "gone.dead") is None


# -- quarantine ---------------------------------------------------------------------------------------


def test_quarantine_keeps_the_bytes_and_why(spool: Spool) -> None:
    source = spool.listener_dir(0) / "0000000001.log"
    path = spool.quarantine(source, b"\xde\xad\xbe\xef", "damaged bytes at 10..14")
    assert path.parent == spool.quarantine_dir and path.name.endswith("-0000000001.log")
    assert path.read_bytes() == b"\xde\xad\xbe\xef"
    assert path.with_name(path.name + ".why").read_text() == f"{source}: damaged bytes at 10..14\n"
    second = spool.quarantine(source, b"x", "again")
    assert second != path
    assert len(list(spool.quarantine_dir.iterdir())) == 4


# -- overflow (memory durability) -------------------------------------------------------------------


def test_save_overflow_copies_the_logs_root_to_disk_and_empties_it(spool: Spool) -> None:
    before = fill_logs_root(spool)
    (spool.logs_dir / "0" / ".0000000001.log.abcd.tmp").write_bytes(b"half-written temp file")
    saved = spool.save_overflow()
    assert (spool.overflow_dir / OVERFLOW_COMPLETE).exists()
    copy = snapshot(spool.overflow_dir)
    assert copy == {**before, OVERFLOW_COMPLETE: b""}
    assert saved == sum(len(v) for v in before.values()) == tree_bytes(spool.overflow_dir)
    assert not spool.has_logged_data()
    assert snapshot(spool.logs_root) == {}
    assert [p.name for p in spool.root.iterdir() if p.name.startswith(".overflow")] == []


def test_restore_overflow_moves_it_back_into_the_logs_root(spool: Spool) -> None:
    before = fill_logs_root(spool)
    saved = spool.save_overflow()
    assert spool.restore_overflow() == saved
    assert snapshot(spool.logs_root) == before
    assert not spool.overflow_dir.exists()
    assert spool.has_logged_data()
    assert spool.restore_overflow() == 0  # nothing more to restore
    assert snapshot(spool.logs_root) == before


def test_restore_overflow_replaces_what_the_logs_root_held(spool: Spool) -> None:
    # a drain that died after the rename and before emptying the logs root: the copy is whole
    before = fill_logs_root(spool)
    spool.save_overflow()
    stale = spool.listener_dir(5) / "0000000001.log"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left in memory")
    spool.restore_overflow()
    assert snapshot(spool.logs_root) == before


def test_overflow_copy_without_its_marker_is_discarded_and_the_logs_root_kept(spool: Spool) -> None:
    before = fill_logs_root(spool)
    partial = spool.overflow_dir / "logs" / "0"
    partial.mkdir(parents=True)
    (partial / "0000000001.log").write_bytes(b"half a copy")
    assert spool.restore_overflow() == 0
    assert not spool.overflow_dir.exists()
    assert snapshot(spool.logs_root) == before


def test_save_overflow_with_nothing_logged_does_nothing(spool: Spool) -> None:
    journal = spool.journal_dir("0") / "1.jnl"
    journal.parent.mkdir(parents=True)
    journal.write_bytes(b"")
    assert spool.save_overflow() == 0
    assert not spool.overflow_dir.exists()
    assert journal.exists()


def test_save_overflow_with_disk_durability_does_nothing(tmp_path: Path) -> None:
    s = Spool(SpoolConfig(path=str(tmp_path / "spool"), durability="disk"))
    s.prepare()
    before = fill_logs_root(s)
    assert s.save_overflow() == 0
    assert not s.overflow_dir.exists()
    assert snapshot(s.logs_dir) == {k[len("logs/"):]: v for k, v in before.items() if k.startswith("logs/")}


def test_save_overflow_replaces_an_older_overflow(spool: Spool) -> None:
    old = spool.overflow_dir / "logs" / "9"
    old.mkdir(parents=True)
    (old / "0000000001.log").write_bytes(b"old")
    before = fill_logs_root(spool)
    spool.save_overflow()
    assert snapshot(spool.overflow_dir) == {**before, OVERFLOW_COMPLETE: b""}


def test_overflow_survives_on_disk_when_the_logs_root_is_lost(tmp_path: Path) -> None:
    # a reboot wipes tmpfs: a new Spool over the same path finds the overflow and restores it
    s = memory_spool(tmp_path)
    s.prepare()
    before = fill_logs_root(s)
    s.save_overflow()
    shutil.rmtree(s.logs_root, ignore_errors=True)
    after_reboot = memory_spool(tmp_path)
    assert after_reboot.restore_overflow() > 0
    assert snapshot(after_reboot.logs_root) == before
    assert scan((after_reboot.listener_dir(0) / "0000000001.log").read_bytes()).good_end == len(
        before["logs/0/0000000001.log"])
    assert os.path.isdir(after_reboot.journals_dir)


def _hold_dead_letter_guard(spool_path: str, held: "multiprocessing.Queue[int]") -> None:
    import signal

    with Spool(SpoolConfig(path=spool_path)).dead_letter_guard():
        held.put(os.getpid())
        signal.pause()


def test_the_dead_letter_guard_excludes_other_processes_and_dies_with_its_holder(spool: Spool) -> None:
    import fcntl
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    held: multiprocessing.Queue[int] = ctx.Queue()
    p = ctx.Process(target=_hold_dead_letter_guard, args=(str(spool.root), held))
    p.start()
    held.get(timeout=30)
    fd = os.open(spool.locks_dir / "dead-letters", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # another uploader cannot check the cap meanwhile
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.kill(p.pid, signal.SIGKILL)  # killed while holding it
        p.join(30)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel let it go
    finally:
        os.close(fd)
    with spool.dead_letter_guard():
        pass
