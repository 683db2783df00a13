"""journal.py: intents and outcomes, recovery of what is still open, torn tails, compaction, and
reading every intent across uploader folders (what a re-index must not put back)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingestd import journal as journal_module
from ingestd.journal import Intent, Journal, read_all_intents
from ingestd.records import Kind, frame, scan
from ingestd.requestlog import Part

MakeJournal = Callable[..., Journal]


def intent(n: int, parts: tuple[Part, ...] | None = None) -> Intent:
    return Intent(
        id=f"{n:016x}",
        key=f"p/dt=2025-11-28/hour=03/20251128T030405125Z-h-{n:016x}.ndjson.gz",
        encoding="gzip",
        level=6,
        parts=parts if parts is not None else (Part(0, 1, 100 * n, 0, 2), Part(1, 3, 0, 1, 1)),
        count=3,
        size=120,
        oldest=1764299045.125 + n,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "journals" / "0"


@pytest.fixture
def make_journal(folder: Path) -> Iterator[MakeJournal]:
    """Journals (one per "process"), closed at the end of the test."""
    made: list[Journal] = []

    def make(directory: Path | None = None, fsync: str = "never") -> Journal:
        j = Journal(directory or folder, fsync)
        made.append(j)
        return j

    yield make
    for j in made:
        j.close()


def files(folder: Path) -> list[str]:
    """The numbered journal files of `folder`, in number order."""
    return [f"{n}.jnl" for n in sorted(int(p.stem) for p in folder.glob("*.jnl") if p.stem.isdigit())]


def kinds(path: Path) -> list[Kind]:
    return [r.kind for r in scan(path.read_bytes()).records]


# -- Intent -------------------------------------------------------------------------------------------


def test_intent_json_round_trip() -> None:
    original = intent(7)
    back = Intent.from_json(original.to_json())
    assert back == original
    assert all(type(p) is Part for p in back.parts)


def test_intent_json_round_trip_without_encoding_and_from_a_memoryview() -> None:
    original = Intent("id", "k.ndjson", None, 1, (Part(65535, 2**32 - 1, 2**32 - 1, 0, 1),), 1, 0, 0.001)
    assert Intent.from_json(memoryview(original.to_json())) == original


# -- intend, close_intent, recover ---------------------------------------------------------------------------


def test_recover_returns_exactly_the_intents_without_an_outcome(make_journal: MakeJournal) -> None:
    j = make_journal()
    for n in range(1, 6):
        j.intend(intent(n))
    j.close_intent(intent(2).id)
    j.close_intent(intent(4).id, dead=True)
    assert j.open_count == 3
    j.close()  # the process ends (or dies) here
    after = make_journal()
    assert after.recover() == [intent(1), intent(3), intent(5)]
    assert after.open_count == 3


def test_recover_of_an_empty_folder_finds_nothing(make_journal: MakeJournal, folder: Path) -> None:
    j = make_journal()
    assert folder.is_dir()
    assert j.recover() == [] and j.open_count == 0


def test_intent_closed_by_a_later_process_stays_closed(make_journal: MakeJournal, folder: Path) -> None:
    first = make_journal()
    first.intend(intent(1))
    first.intend(intent(2))
    first.close()
    second = make_journal()
    assert second.recover() == [intent(1), intent(2)]
    second.close_intent(intent(1).id)  # the re-send landed
    second.close()
    third = make_journal()
    assert third.recover() == [intent(2)]


def test_records_are_written_in_order(make_journal: MakeJournal, folder: Path) -> None:
    j = make_journal()
    j.intend(intent(1))
    j.close_intent(intent(1).id)
    j.intend(intent(2))
    j.close_intent(intent(2).id, dead=True)
    [name] = files(folder)
    assert kinds(folder / name) == [Kind.INTENT, Kind.LANDED, Kind.INTENT, Kind.DEAD]
    assert [bytes(r.body) for r in scan((folder / name).read_bytes()).records][1] == intent(1).id.encode()


@pytest.mark.parametrize("fsync", ["always", "interval", "never", "none"])
def test_every_fsync_policy_writes_and_recovers(make_journal: MakeJournal, fsync: str) -> None:
    j = make_journal(fsync=fsync)
    j.intend(intent(1))
    j.sync()
    j.intend(intent(2))
    j.close_intent(intent(1).id)
    j.sync()
    j.sync()
    j.close()
    assert make_journal().recover() == [intent(2)]


# -- torn tails -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 12, 13])
def test_torn_tail_is_cut_and_the_next_process_writes_a_new_file(make_journal: MakeJournal, folder: Path,
                                                                 cut: int) -> None:
    first = make_journal()
    first.intend(intent(1))
    first.intend(intent(2))
    first.close()
    path = folder / "1.jnl"
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(frame(Kind.INTENT, intent(3).to_json())[:-cut])  # killed mid-write
    second = make_journal()
    assert second.recover() == [intent(1), intent(2)]
    assert path.read_bytes() == good  # cut at the end of the last valid record
    second.intend(intent(4))
    assert files(folder) == ["1.jnl", "2.jnl"]
    assert path.read_bytes() == good  # nothing was appended after the cut
    assert kinds(folder / "2.jnl") == [Kind.INTENT]
    second.close()
    assert make_journal().recover() == [intent(1), intent(2), intent(4)]


def test_outcome_torn_off_leaves_its_intent_open(make_journal: MakeJournal, folder: Path) -> None:
    first = make_journal()
    first.intend(intent(1))
    first.close_intent(intent(1).id)
    first.close()
    path = folder / "1.jnl"
    os.truncate(path, path.stat().st_size - 3)  # the LANDED record did not make it whole
    assert make_journal().recover() == [intent(1)]  # so the object is sent again, to the same key


def test_damaged_record_in_the_middle_is_skipped_and_the_rest_kept(make_journal: MakeJournal, folder: Path) -> None:
    first = make_journal()
    for n in (1, 2, 3):
        first.intend(intent(n))
    first.close()
    path = folder / "1.jnl"
    data = bytearray(path.read_bytes())
    one = len(frame(Kind.INTENT, intent(1).to_json()))
    data[one + 20] ^= 0x01  # inside the second intent
    path.write_bytes(bytes(data))
    assert make_journal().recover() == [intent(1), intent(3)]
    assert path.stat().st_size == len(data)  # damage is not a torn tail: nothing is cut


def test_files_that_are_not_journal_files_are_left_alone(make_journal: MakeJournal, folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "notes.jnl").write_bytes(b"x")
    (folder / "2.tmp").write_bytes(b"y")
    first = make_journal()
    assert first.recover() == []
    first.intend(intent(1))
    assert (folder / "notes.jnl").exists() and (folder / "2.tmp").exists()
    assert files(folder) == ["1.jnl"]


# -- compaction -----------------------------------------------------------------------------------------------


def three_files(make_journal: MakeJournal) -> None:
    """Files 1, 2, 3 from three successive processes, with intents 1; 2, 3; 4 left open."""
    for batch in ([1], [2, 3], [4]):
        j = make_journal()
        j.recover()
        for n in batch:
            j.intend(intent(n))
        j.close()


def test_compact_deletes_leading_files_without_open_intents_only(make_journal: MakeJournal, folder: Path) -> None:
    three_files(make_journal)
    j = make_journal()
    assert j.recover() == [intent(n) for n in (1, 2, 3, 4)]
    assert files(folder) == ["1.jnl", "2.jnl", "3.jnl"]
    j.close_intent(intent(2).id)
    j.compact()
    assert files(folder) == ["1.jnl", "2.jnl", "3.jnl", "4.jnl"]  # 1 still open: nothing goes
    j.close_intent(intent(4).id)
    j.compact()
    assert files(folder) == ["1.jnl", "2.jnl", "3.jnl", "4.jnl"]  # 3 is empty, but not leading
    j.close_intent(intent(1).id)
    j.compact()
    assert files(folder) == ["2.jnl", "3.jnl", "4.jnl"]  # 2 holds intent 3
    j.close_intent(intent(3).id)
    j.compact()
    assert files(folder) == ["4.jnl"]  # the file being written stays
    assert j.open_count == 0
    j.intend(intent(5))  # and is still written to
    assert files(folder) == ["4.jnl"]
    j.close()
    assert make_journal().recover() == [intent(5)]


def test_recover_deletes_the_files_whose_intents_all_have_an_outcome(make_journal: MakeJournal, folder: Path) -> None:
    three_files(make_journal)
    j = make_journal()
    j.recover()
    for n in (1, 2, 3, 4):
        j.close_intent(intent(n).id)
    j.close()  # killed before any compaction
    assert files(folder) == ["1.jnl", "2.jnl", "3.jnl", "4.jnl"]
    after = make_journal()
    assert after.recover() == []
    assert files(folder) == []  # nothing written by this process yet: every file can go
    after.intend(intent(9))
    assert files(folder) == ["5.jnl"]  # numbers keep rising


def test_compact_never_deletes_the_file_being_written(make_journal: MakeJournal, folder: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "ROTATE_BYTES", 1)  # a new file for every record
    j = make_journal()
    j.intend(intent(1))
    j.close_intent(intent(1).id)
    assert files(folder) == ["1.jnl", "2.jnl"]
    j.compact()
    assert files(folder) == ["2.jnl"]
    j.intend(intent(2))
    j.compact()
    assert files(folder) == ["3.jnl"]
    j.close_intent(intent(2).id)
    j.compact()
    assert files(folder) == ["4.jnl"]  # 3 held intent 2, 4 holds its outcome and is open
    j.close()
    assert make_journal().recover() == []
    assert files(folder) == []


# -- remove_if_empty ------------------------------------------------------------------------------------------


def test_remove_if_empty_keeps_a_folder_with_an_open_intent(make_journal: MakeJournal, folder: Path) -> None:
    three_files(make_journal)
    orphan = make_journal()
    orphan.recover()
    assert orphan.remove_if_empty() is False
    assert files(folder) == ["1.jnl", "2.jnl", "3.jnl"]


def test_remove_if_empty_deletes_a_finished_folder_whole(make_journal: MakeJournal, folder: Path) -> None:
    three_files(make_journal)
    orphan = make_journal()
    for i in orphan.recover():
        orphan.close_intent(i.id)  # the adopter sent them again
    assert orphan.remove_if_empty() is True
    assert not folder.exists()
    assert read_all_intents(folder.parent) == []


def test_remove_if_empty_keeps_a_folder_with_foreign_files(make_journal: MakeJournal, folder: Path) -> None:
    j = make_journal()
    j.intend(intent(1))
    j.close_intent(intent(1).id)
    (folder / "README").write_bytes(b"not ours")
    assert j.remove_if_empty() is True
    assert files(folder) == [] and (folder / "README").exists()


# -- read_all_intents ------------------------------------------------------------------------------------------


def test_read_all_intents_reads_every_folder_with_or_without_outcome(make_journal: MakeJournal, tmp_path: Path) -> None:
    root = tmp_path / "journals"
    a = make_journal(root / "0")
    b = make_journal(root / "3")
    a.intend(intent(1))
    a.close_intent(intent(1).id)
    a.intend(intent(2))
    b.intend(intent(3))
    found = read_all_intents(root)
    assert sorted(found, key=lambda i: i.id) == [intent(1), intent(2), intent(3)]


def test_read_all_intents_skips_torn_and_damaged_records(make_journal: MakeJournal, tmp_path: Path) -> None:
    root = tmp_path / "journals"
    a = make_journal(root / "0")
    for n in (1, 2, 3):
        a.intend(intent(n))
    a.close()
    path = root / "0" / "1.jnl"
    data = bytearray(path.read_bytes())
    one = len(frame(Kind.INTENT, intent(1).to_json()))
    data[one + 30] ^= 0x04  # damages intent 2
    data += frame(Kind.INTENT, intent(4).to_json())[:-9]  # a torn intent 4
    path.write_bytes(bytes(data))
    (root / "1").mkdir()
    (root / "1" / "1.jnl").write_bytes(b"")
    assert sorted(read_all_intents(root), key=lambda i: i.id) == [intent(1), intent(3)]


def test_read_all_intents_of_no_journals_is_empty(tmp_path: Path) -> None:
    assert read_all_intents(tmp_path / "missing") == []
    (tmp_path / "journals").mkdir()
    assert read_all_intents(tmp_path / "journals") == []
