"""batching.py: cuts by payloads, bytes and age, with an injected clock (never a sleep)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from ingestd.batching import Batch, Batcher, Piece, split_piece
from ingestd.requestlog import Part
from tests.fakes import FakeClock

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ingestd-unit-hypothesis")


def make_piece(offset: int, lines: list[bytes], received_at: float = 1000.0, listener: int = 0,
               segment: int = 1, first_line: int = 0) -> Piece:
    return Piece(Part(listener, segment, offset, first_line, len(lines)), received_at,
                 b"".join(ln + b"\n" for ln in lines))


def numbered(offset: int, n: int, width: int = 10, received_at: float = 1000.0) -> Piece:
    """n lines of exactly `width` bytes each (newline included), each naming its record and line."""
    lines = []
    for i in range(n):
        stem = f"{offset}:{i}".encode()
        lines.append(stem + b"x" * (width - 1 - len(stem)))
    return make_piece(offset, lines, received_at)


def lines_of(batches: list[Batch]) -> list[bytes]:
    return b"".join(b.body() for b in batches).splitlines(keepends=True)


def part_lines(batches: list[Batch]) -> list[tuple[int, int, int, int]]:
    """(listener, segment, offset, line) of every line the batches' parts name, in order."""
    return [(p.listener, p.segment, p.offset, p.first_line + i)
            for b in batches for p in b.parts for i in range(p.count)]


def piece_lines(pieces: list[Piece]) -> list[tuple[int, int, int, int]]:
    return part_lines([Batch(tuple(pieces), 0, 0, 0.0)])


def check_invariants(batches: list[Batch], max_payloads: int, max_bytes: int) -> None:
    for b in batches:
        body = b.body()
        assert b.count == body.count(b"\n") == sum(p.part.count for p in b.pieces)
        assert all(p.part.count == p.lines.count(b"\n") >= 1 for p in b.pieces)
        assert b.size == len(body)
        assert 1 <= b.count <= max_payloads
        assert b.size <= max_bytes or b.count == 1, "only a single oversized line may exceed max_bytes"
        assert b.oldest == min(p.received_at for p in b.pieces)
        assert b.parts == tuple(p.part for p in b.pieces)


# -- split_piece --------------------------------------------------------------------------------------


def test_split_piece_cuts_lines_and_parts_at_the_same_place() -> None:
    piece = Piece(Part(2, 7, 4096, 5, 4), 5.5, b"a\nbb\nccc\ndddd\n")
    head, tail = split_piece(piece, 1)
    assert head == Piece(Part(2, 7, 4096, 5, 1), 5.5, b"a\n")
    assert tail == Piece(Part(2, 7, 4096, 6, 3), 5.5, b"bb\nccc\ndddd\n")
    head, tail = split_piece(piece, 3)
    assert head == Piece(Part(2, 7, 4096, 5, 3), 5.5, b"a\nbb\nccc\n")
    assert tail == Piece(Part(2, 7, 4096, 8, 1), 5.5, b"dddd\n")


# -- by payloads --------------------------------------------------------------------------------------


def test_full_batch_by_payloads_is_ready_at_once() -> None:
    b = Batcher(max_payloads=3, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 2))
    assert b.take_ready() == []
    b.add(numbered(100, 1))
    ready = b.take_ready()
    assert [x.count for x in ready] == [3]
    assert ready[0].body() == numbered(0, 2).lines + numbered(100, 1).lines
    assert ready[0].parts == (numbered(0, 2).part, numbered(100, 1).part)
    assert len(b) == 0 and b.due_at() is None


def test_piece_crossing_max_payloads_is_split_into_contiguous_parts() -> None:
    b = Batcher(max_payloads=4, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 3))
    b.add(numbered(100, 3))
    ready = b.take_ready()
    assert [x.count for x in ready] == [4]
    assert ready[0].parts == (Part(0, 1, 0, 0, 3), Part(0, 1, 100, 0, 1))
    assert lines_of(ready) == (numbered(0, 3).lines + numbered(100, 1).lines).splitlines(keepends=True)
    assert len(b) == 2
    rest = b.take_all()
    assert rest[0].parts == (Part(0, 1, 100, 1, 2),)
    assert lines_of(rest) == numbered(100, 3).lines.splitlines(keepends=True)[1:]


def test_max_payloads_one_gives_one_object_per_payload() -> None:
    b = Batcher(max_payloads=1, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    piece = numbered(64, 10, received_at=1234.5)
    b.add(piece)
    ready = b.take_ready()
    assert len(ready) == 10
    assert [x.body() for x in ready] == piece.lines.splitlines(keepends=True)
    assert [x.parts for x in ready] == [(Part(0, 1, 64, i, 1),) for i in range(10)]
    assert all(x.count == 1 and x.oldest == 1234.5 for x in ready)
    assert b.take_all() == [] and len(b) == 0


def test_split_of_a_piece_that_starts_mid_record_keeps_counting_from_its_first_line() -> None:
    b = Batcher(max_payloads=2, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(make_piece(8, [b"c", b"d", b"e"], first_line=2))  # lines 2..4 of the record at offset 8
    batches = b.take_all()
    assert [x.parts for x in batches] == [(Part(0, 1, 8, 2, 2),), (Part(0, 1, 8, 4, 1),)]
    assert [x.body() for x in batches] == [b"c\nd\n", b"e\n"]


# -- by bytes -----------------------------------------------------------------------------------------


def test_cut_by_bytes_at_line_boundaries() -> None:
    b = Batcher(max_payloads=1000, max_bytes=35, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 8, width=10))  # 80 bytes: 3 + 3 + 2 lines
    ready = b.take_ready()
    assert [x.count for x in ready] == [3, 3]
    assert [x.size for x in ready] == [30, 30]
    rest = b.take_all()
    assert [x.count for x in rest] == [2]
    assert [x.parts for x in ready + rest] == [(Part(0, 1, 0, 0, 3),), (Part(0, 1, 0, 3, 3),), (Part(0, 1, 0, 6, 2),)]
    assert lines_of(ready + rest) == numbered(0, 8).lines.splitlines(keepends=True)


def test_exact_fit_by_bytes_stays_open_and_is_never_exceeded() -> None:
    b = Batcher(max_payloads=1000, max_bytes=30, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 3, width=10))
    assert b.take_ready() == []  # exactly full: may stay open, but never over
    b.add(numbered(100, 1, width=10))
    ready = b.take_ready()
    assert [x.size for x in ready] == [30]
    assert [x.size for x in b.take_all()] == [10]


def test_piece_that_does_not_fit_closes_the_open_batch_first() -> None:
    b = Batcher(max_payloads=1000, max_bytes=25, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 2, width=10))  # 20 bytes open
    b.add(numbered(100, 1, width=20))  # does not fit the 5 left
    ready = b.take_ready()
    assert [x.body() for x in ready] == [numbered(0, 2, width=10).lines]
    assert [x.body() for x in b.take_all()] == [numbered(100, 1, width=20).lines]


def test_line_larger_than_max_bytes_travels_alone() -> None:
    b = Batcher(max_payloads=1000, max_bytes=20, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 1, width=10))
    b.add(make_piece(100, [b"s", b"B" * 99, b"t"]))
    batches = b.take_all()
    assert [x.body() for x in batches] == [numbered(0, 1, width=10).lines + b"s\n", b"B" * 99 + b"\n", b"t\n"]
    assert [x.parts for x in batches] == [(Part(0, 1, 0, 0, 1), Part(0, 1, 100, 0, 1)), (Part(0, 1, 100, 1, 1),),
                                          (Part(0, 1, 100, 2, 1),)]
    check_invariants(batches, 1000, 20)


def test_oversized_single_line_piece_into_an_empty_batcher_is_one_batch() -> None:
    b = Batcher(max_payloads=10, max_bytes=5, max_age_s=60, clock=FakeClock())
    b.add(make_piece(0, [b"x" * 50]))
    [batch] = b.take_ready()
    assert batch.count == 1 and batch.size == 51 and len(b) == 0


# -- by age -------------------------------------------------------------------------------------------


def test_open_batch_is_ready_once_as_old_as_max_age() -> None:
    clock = FakeClock(500.0)
    b = Batcher(max_payloads=100, max_bytes=10_000, max_age_s=2.0, clock=clock)
    assert b.due_at() is None
    b.add(numbered(0, 2, received_at=500.0))
    assert b.due_at() == 502.0
    clock.advance(1.5)
    assert b.take_ready() == []
    assert len(b) == 2
    clock.advance(0.5)
    ready = b.take_ready()
    assert [x.count for x in ready] == [2]
    assert b.due_at() is None and len(b) == 0


def test_due_at_follows_the_oldest_piece() -> None:
    b = Batcher(max_payloads=100, max_bytes=10_000, max_age_s=1.0, clock=FakeClock(100.0))
    b.add(numbered(0, 1, received_at=100.0))
    b.add(numbered(100, 1, received_at=100.75))
    assert b.due_at() == 101.0
    b.add(numbered(200, 1, received_at=99.5))  # received earlier but added later
    assert b.due_at() == 100.5


def test_oldest_is_the_earliest_received_at_of_the_batch() -> None:
    b = Batcher(max_payloads=3, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 1, received_at=50.0))
    b.add(numbered(100, 1, received_at=40.0))
    b.add(numbered(200, 1, received_at=45.0))
    [batch] = b.take_ready()
    assert batch.oldest == 40.0
    b.add(numbered(300, 1, received_at=70.0))
    assert b.take_all()[0].oldest == 70.0  # the next batch does not inherit the old minimum


def test_age_counts_from_the_new_batch_after_a_cut() -> None:
    b = Batcher(max_payloads=2, max_bytes=10_000, max_age_s=5.0, clock=FakeClock(0.0))
    b.add(numbered(0, 2, received_at=0.0))
    assert len(b.take_ready()) == 1
    b.add(numbered(100, 1, received_at=10.0))
    assert b.due_at() == 15.0


# -- take_all, clear ----------------------------------------------------------------------------------


def test_take_all_returns_the_ready_batches_then_the_open_one() -> None:
    b = Batcher(max_payloads=2, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 5))
    assert len(b) == 5
    batches = b.take_all()
    assert [x.count for x in batches] == [2, 2, 1]
    assert lines_of(batches) == numbered(0, 5).lines.splitlines(keepends=True)
    assert b.take_all() == [] and len(b) == 0 and b.due_at() is None


def test_clear_drops_everything_held_and_says_how_many_payloads() -> None:
    b = Batcher(max_payloads=3, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(0, 4))  # one ready batch of 3, one open of 1
    b.add(numbered(100, 1))
    assert len(b) == 5
    assert b.clear() == 5
    assert len(b) == 0 and b.due_at() is None and b.take_all() == []
    b.add(numbered(200, 2))  # and it batches as new afterwards
    assert [x.parts for x in b.take_all()] == [(Part(0, 1, 200, 0, 2),)]


def test_clear_of_an_empty_batcher_drops_nothing() -> None:
    assert Batcher(max_payloads=3, max_bytes=100, max_age_s=1, clock=FakeClock()).clear() == 0


# -- randomized -----------------------------------------------------------------------------------

pieces_strategy = st.lists(
    st.tuples(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12),
              st.floats(min_value=0, max_value=10, allow_nan=False), st.booleans()),
    min_size=1, max_size=25,
)


@settings(max_examples=100, deadline=None)
@given(pieces_strategy, st.integers(min_value=1, max_value=20), st.integers(min_value=1, max_value=200))
def test_batches_reproduce_every_input_line_and_part_in_order_within_the_bounds(
    spec: list[tuple[list[int], float, bool]], max_payloads: int, max_bytes: int
) -> None:
    clock = FakeClock(0.0)
    b = Batcher(max_payloads, max_bytes, max_age_s=3.0, clock=clock)
    pieces: list[Piece] = []
    batches: list[Batch] = []
    for seq, (widths, gap, take_now) in enumerate(spec, start=1):
        lines = [f"{seq}.{j}:".encode() + b"p" * w for j, w in enumerate(widths)]
        piece = make_piece(seq * 1000, lines, received_at=clock(), segment=seq % 3)
        pieces.append(piece)
        b.add(piece)
        assert len(b) + sum(x.count for x in batches) == sum(p.part.count for p in pieces)
        clock.advance(gap)
        if take_now:
            due = b.due_at()
            ready = b.take_ready()
            assert due is None or clock() < due or ready, "a batch as old as max_age is ready"
            batches += ready
    batches += b.take_all()
    assert len(b) == 0 and b.due_at() is None
    assert lines_of(batches) == b"".join(p.lines for p in pieces).splitlines(keepends=True)
    assert part_lines(batches) == piece_lines(pieces)
    # the lines a part names are the lines its piece carries
    for batch in batches:
        for piece in batch.pieces:
            source = pieces[piece.part.offset // 1000 - 1]
            assert piece.lines == b"".join(source.lines.splitlines(keepends=True)[
                piece.part.first_line : piece.part.first_line + piece.part.count])
    check_invariants(batches, max_payloads, max_bytes)
