"""batching.py: cuts by payloads, bytes and age, with an injected clock (never a sleep)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from ingestd.batching import Batch, Batcher
from ingestd.records import Item

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ingestd-unit-hypothesis")


class FakeClock:
    """A clock that only moves when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.times = [start]

    def __call__(self) -> float:
        return self.times[-1]

    def advance(self, seconds: float) -> None:
        self.times.append(self.times[-1] + seconds)


def make_item(seq: int, lines: list[bytes], received_at: float = 1000.0) -> Item:
    return Item(seq, received_at, len(lines), b"".join(ln + b"\n" for ln in lines))


def numbered(seq: int, n: int, width: int = 10, received_at: float = 1000.0) -> Item:
    """n lines of exactly `width` bytes each (newline included), each naming item and line."""
    lines = []
    for i in range(n):
        stem = f"{seq}:{i}".encode()
        lines.append(stem + b"x" * (width - 1 - len(stem)))
    return make_item(seq, lines, received_at)


def lines_of(batches: list[Batch]) -> list[bytes]:
    return b"".join(b.body() for b in batches).splitlines(keepends=True)


def check_invariants(batches: list[Batch], max_payloads: int, max_bytes: int) -> None:
    for b in batches:
        body = b.body()
        assert b.count == body.count(b"\n") == sum(i.count for i in b.items)
        assert b.size == len(body)
        assert 1 <= b.count <= max_payloads
        assert b.size <= max_bytes or b.count == 1, "only a single oversized line may exceed max_bytes"
        assert b.oldest == min(i.received_at for i in b.items)


# -- by payloads --------------------------------------------------------------------------------


def test_full_batch_by_payloads_is_ready_at_once() -> None:
    clock = FakeClock()
    b = Batcher(max_payloads=3, max_bytes=10_000, max_age_s=60, clock=clock)
    b.add(numbered(1, 2))
    assert b.take_ready() == []
    b.add(numbered(2, 1))
    ready = b.take_ready()
    assert [x.count for x in ready] == [3]
    assert ready[0].body() == numbered(1, 2).lines + numbered(2, 1).lines
    assert len(b) == 0 and b.due_at() is None


def test_item_crossing_max_payloads_is_split() -> None:
    b = Batcher(max_payloads=4, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(1, 3))
    b.add(numbered(2, 3))
    ready = b.take_ready()
    assert [x.count for x in ready] == [4]
    assert lines_of(ready) == (numbered(1, 3).lines + numbered(2, 1).lines).splitlines(keepends=True)
    assert len(b) == 2
    rest = b.take_all()
    assert lines_of(rest) == numbered(2, 3).lines.splitlines(keepends=True)[1:]


def test_max_payloads_one_splits_an_item_into_one_batch_per_payload() -> None:
    b = Batcher(max_payloads=1, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    item = numbered(7, 10, received_at=1234.5)
    b.add(item)
    ready = b.take_ready()
    assert len(ready) == 10
    assert [x.body() for x in ready] == item.lines.splitlines(keepends=True)
    assert all(x.count == 1 and len(x.items) == 1 for x in ready)
    assert all(x.items[0].seq == 7 and x.oldest == 1234.5 for x in ready)
    assert b.take_all() == []


# -- by bytes -----------------------------------------------------------------------------------


def test_cut_by_bytes_at_line_boundaries() -> None:
    b = Batcher(max_payloads=1000, max_bytes=35, max_age_s=60, clock=FakeClock())
    b.add(numbered(1, 8, width=10))  # 80 bytes: 3 + 3 + 2 lines
    ready = b.take_ready()
    assert [x.count for x in ready] == [3, 3]
    assert [x.size for x in ready] == [30, 30]
    rest = b.take_all()
    assert [x.count for x in rest] == [2]
    assert lines_of(ready + rest) == numbered(1, 8).lines.splitlines(keepends=True)


def test_exact_fit_by_bytes() -> None:
    b = Batcher(max_payloads=1000, max_bytes=30, max_age_s=60, clock=FakeClock())
    b.add(numbered(1, 3, width=10))
    assert b.take_ready() == []  # exactly full: may stay open, but never over
    b.add(numbered(2, 1, width=10))
    ready = b.take_ready()
    assert [x.size for x in ready] == [30]
    assert [x.size for x in b.take_all()] == [10]


def test_item_that_does_not_fit_closes_the_open_batch_first() -> None:
    b = Batcher(max_payloads=1000, max_bytes=25, max_age_s=60, clock=FakeClock())
    b.add(numbered(1, 2, width=10))  # 20 bytes open
    b.add(numbered(2, 1, width=20))  # does not fit the 5 left
    ready = b.take_ready()
    assert [x.body() for x in ready] == [numbered(1, 2, width=10).lines]
    assert [x.body() for x in b.take_all()] == [numbered(2, 1, width=20).lines]


def test_oversized_line_travels_alone() -> None:
    b = Batcher(max_payloads=1000, max_bytes=20, max_age_s=60, clock=FakeClock())
    b.add(numbered(1, 1, width=10))
    big = make_item(2, [b"s", b"B" * 99, b"t"])
    b.add(big)
    batches = b.take_all()
    assert [x.body() for x in batches] == [numbered(1, 1, width=10).lines + b"s\n", b"B" * 99 + b"\n", b"t\n"]
    check_invariants(batches, 1000, 20)


# -- by age -------------------------------------------------------------------------------------


def test_open_batch_is_written_after_max_age() -> None:
    clock = FakeClock(500.0)
    b = Batcher(max_payloads=100, max_bytes=10_000, max_age_s=2.0, clock=clock)
    assert b.due_at() is None
    b.add(numbered(1, 2, received_at=500.0))
    assert b.due_at() == 502.0
    clock.advance(1.999)
    assert b.take_ready() == []
    assert len(b) == 2
    clock.advance(0.001)
    ready = b.take_ready()
    assert [x.count for x in ready] == [2]
    assert b.due_at() is None and len(b) == 0


def test_due_at_follows_the_oldest_item() -> None:
    clock = FakeClock(100.0)
    b = Batcher(max_payloads=100, max_bytes=10_000, max_age_s=1.0, clock=clock)
    b.add(numbered(1, 1, received_at=100.0))
    b.add(numbered(2, 1, received_at=100.7))
    assert b.due_at() == 101.0
    b.add(numbered(3, 1, received_at=99.5))  # an item received earlier but added later
    assert b.due_at() == 100.5


def test_oldest_is_min_received_at() -> None:
    b = Batcher(max_payloads=3, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(1, 1, received_at=50.0))
    b.add(numbered(2, 1, received_at=40.0))
    b.add(numbered(3, 1, received_at=45.0))
    [batch] = b.take_ready()
    assert batch.oldest == 40.0
    b.add(numbered(4, 1, received_at=70.0))
    assert b.take_all()[0].oldest == 70.0  # the next batch does not inherit the old minimum


def test_age_counts_from_the_new_batch_after_a_cut() -> None:
    clock = FakeClock(0.0)
    b = Batcher(max_payloads=2, max_bytes=10_000, max_age_s=5.0, clock=clock)
    b.add(numbered(1, 2, received_at=0.0))
    assert len(b.take_ready()) == 1
    b.add(numbered(2, 1, received_at=10.0))
    assert b.due_at() == 15.0


# -- take_all, pending ----------------------------------------------------------------------------


def test_take_all_returns_ready_then_open() -> None:
    b = Batcher(max_payloads=2, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(1, 5))
    batches = b.take_all()
    assert [x.count for x in batches] == [2, 2, 1]
    assert lines_of(batches) == numbered(1, 5).lines.splitlines(keepends=True)
    assert b.take_all() == [] and len(b) == 0 and b.pending() == []


def test_pending_lists_ready_then_open_items_in_order() -> None:
    b = Batcher(max_payloads=3, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    b.add(numbered(1, 2))
    b.add(numbered(2, 2))  # 1 line goes to the ready batch, 1 stays open
    b.add(numbered(3, 1))
    pending = b.pending()
    assert [i.seq for i in pending] == [1, 2, 2, 3]
    assert b"".join(i.lines for i in pending) == numbered(1, 2).lines + numbered(2, 2).lines + numbered(3, 1).lines
    assert len(b) == 5 == sum(i.count for i in pending)
    b.take_ready()
    assert [i.seq for i in b.pending()] == [2, 3]


# -- randomized ---------------------------------------------------------------------------------

items_strategy = st.lists(
    st.tuples(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12),
              st.floats(min_value=0, max_value=10, allow_nan=False), st.booleans()),
    min_size=1, max_size=25,
)


@settings(max_examples=100, deadline=None)
@given(items_strategy, st.integers(min_value=1, max_value=20), st.integers(min_value=1, max_value=200))
def test_batches_reproduce_every_line_in_order(
    spec: list[tuple[list[int], float, bool]], max_payloads: int, max_bytes: int
) -> None:
    clock = FakeClock(0.0)
    b = Batcher(max_payloads, max_bytes, max_age_s=3.0, clock=clock)
    expected: list[bytes] = []
    batches: list[Batch] = []
    for seq, (widths, gap, take_now) in enumerate(spec, start=1):
        lines = [f"{seq}.{j}:".encode() + b"p" * w for j, w in enumerate(widths)]
        item = make_item(seq, lines, received_at=clock())
        expected += item.lines.splitlines(keepends=True)
        b.add(item)
        assert len(b) + sum(x.count for x in batches) == len(expected)
        clock.advance(gap)
        if take_now:
            batches += b.take_ready()
    batches += b.take_all()
    assert len(b) == 0
    assert lines_of(batches) == expected
    check_invariants(batches, max_payloads, max_bytes)
