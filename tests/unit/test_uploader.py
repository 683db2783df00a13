"""uploader.py and delivery.py with a fake sink, over a real scoreboard, queue, request log,
journal and spool under tmp_path, and an injected clock for the batcher.

`Uploader.run()` runs only in the drain test, where it must return by itself; everything else
drives the pieces (add, follow_epoch, hand_over, the sender, Delivery.deliver) directly.
"""

from __future__ import annotations

import gzip
import multiprocessing
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingestd import formats
from ingestd.batching import Batch
from ingestd.config import (
    BatchConfig,
    Config,
    HttpConfig,
    SinkConfig,
    SpoolConfig,
    WorkersConfig,
)
from ingestd.delivery import UNCERTAIN_ATTEMPTS, DeadlineReached, Delivery
from ingestd.errors import PermanentSinkError, RetryableSinkError, SinkError, UncertainSinkError
from ingestd.intake import Admission, Intake
from ingestd.journal import Intent, Journal, read_all_intents
from ingestd.records import Kind, encode_lines, scan
from ingestd.refqueue import Ref, RefQueue
from ingestd.requestlog import RequestLog, segment_path
from ingestd.scoreboard import Control, Phase, Row, Scoreboard, UploaderField, now_ms
from ingestd.spool import Spool
from ingestd.uploader import Uploader
from tests.fakes import FakeClock
from tests.harness import wait_for

NOW = 1764299045.125  # 2025-11-28T03:04:05.125Z
KEY_RE = re.compile(r"^pfx/dt=2025-11-28/hour=03/20251128T030405125Z-testhost-[0-9a-f]{16}\.ndjson\.gz$")
WAIT_S = 5.0


class SimulatedCrash(BaseException):
    """A SIGKILL at this exact point: nothing after it runs (not an Exception: nobody catches it)."""


class FakeSink:
    """Records every put; can be told to fail the next puts, or to "crash" right after one lands."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts = 0
        self.puts: list[tuple[str, bytes, str | None]] = []
        self.objects: dict[str, bytes] = {}
        self._failures: deque[type[SinkError]] = deque()
        self._always: type[SinkError] | None = None
        self.crash_after_next_put = False
        self.gate: threading.Event | None = None  # when set, a put waits for it (a slow sink)
        self.entered = threading.Event()

    def fail_next(self, n: int, kind: type[SinkError]) -> None:
        with self.lock:
            self._failures.extend([kind] * n)

    def fail_always(self, kind: type[SinkError] | None) -> None:
        with self.lock:
            self._always = kind

    def put(self, key: str, body: bytes, content_encoding: str | None) -> None:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        with self.lock:
            self.attempts += 1
            kind = self._failures.popleft() if self._failures else self._always
            if kind is not None:
                raise kind(f"fake sink refuses {key}")
            self.puts.append((key, body, content_encoding))
            self.objects[key] = body
            if self.crash_after_next_put:
                self.crash_after_next_put = False
                raise SimulatedCrash()

    def describe(self) -> str:
        return "fake sink"

    def put_count(self) -> int:
        with self.lock:
            return len(self.puts)


@dataclass
class World:
    config: Config
    board: Scoreboard
    queue: RefQueue
    spool: Spool
    log: RequestLog
    intake: Intake
    journal: Journal
    sink: FakeSink
    delivery: Delivery
    uploader: Uploader
    clock: FakeClock

    @property
    def row(self) -> Row:
        return self.board.uploader(0)

    def log_request(self, payloads: list[dict[str, Any]], received_at: float = NOW) -> tuple[Ref, bytes]:
        """A request accepted by listener 0: its reference (taken off the queue) and its lines."""
        lines = encode_lines(received_at, None, payloads)
        assert self.intake.submit(received_at, len(payloads), lines) is Admission.ACCEPTED
        [ref] = self.queue.take(1, 1.0)
        return ref, lines

    def batch_of(self, *refs: Ref) -> Batch:
        for ref in refs:
            self.uploader.add(ref)
        [batch] = self.uploader.batcher.take_all()
        return batch

    def landed(self, ref: Ref) -> dict[tuple[int, int], int]:
        """What the `.landed` file beside the ref's segment says of its record: (offset, first line) -> lines."""
        seg = self.log.segments[(ref.listener, ref.segment)]
        seg.refresh_landed()
        return {k: v for k, v in seg.landed.items() if k[0] == ref.offset}

    def open_intents(self) -> list[Intent]:
        """What a successor process would find open in this uploader's journal."""
        successor = Journal(self.journal.dir, "none")
        try:
            return successor.recover()
        finally:
            successor.close()

    def journal_kinds(self) -> list[Kind]:
        return [rec.kind for path in sorted(self.journal.dir.glob("*.jnl")) for rec in scan(path.read_bytes()).records]


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    ctx = multiprocessing.get_context("spawn")
    worlds: list[World] = []

    def make(spool_max_bytes: int = 1 << 30) -> World:
        root = tmp_path / f"w{len(worlds)}"
        config = Config(
            http=HttpConfig(listeners=1),
            workers=WorkersConfig(count=1),
            batch=BatchConfig(max_payloads=500, max_age_ms=1000, compression="gzip", gzip_level=6),
            sink=SinkConfig(prefix="pfx", retry_base_ms=1, retry_max_ms=4),
            spool=SpoolConfig(path=str(root / "spool"), memory_path=str(root / "mem"), max_bytes=spool_max_bytes),
        )
        board = Scoreboard(ctx, 1, 1)
        board.control[Control.EPOCH] = 1
        queue = RefQueue(100, ctx=ctx)
        spool = Spool(config.spool)
        spool.prepare()
        log = RequestLog(spool.logs_dir, 0, "none", 1 << 20)
        intake = Intake(0, log, queue, board, 100, 1 << 20, always_sync=False)
        journal = Journal(spool.journal_dir("0"), "none")
        sink = FakeSink()
        row = board.uploader(0)
        delivery = Delivery("uploader 0", sink, spool, "gzip", 6, config.sink.retry_base_ms, config.sink.retry_max_ms,
                            row, deadline_ms=lambda: board.control[Control.DEADLINE_MS], alive=row.beat,
                            host="testhost")
        clock = FakeClock(NOW)
        uploader = Uploader(0, config, queue, board, delivery, [journal], spool, parent=os.getppid(), clock=clock)
        world = World(config, board, queue, spool, log, intake, journal, sink, delivery, uploader, clock)
        worlds.append(world)
        return world

    try:
        yield make
    finally:
        for w in worlds:
            sender = w.uploader.sender
            if sender.is_alive():  # it waits for work forever: give it one that meets the deadline
                w.board.control[Control.DEADLINE_MS] = 1
                w.sink.fail_always(RetryableSinkError)
                sender.submit(Intent("stop", "stop", None, 6, (), 1, 2, NOW), w.journal, b"{}\n")
                sender.join(WAIT_S)
                assert not sender.is_alive()
            w.uploader.close_fds()
            w.journal.close()
            w.log.close()
            w.intake.writer.close()
            w.queue.close()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def lines_of(objects: dict[str, bytes]) -> list[bytes]:
    return sorted(ln for body in objects.values() for ln in gzip.decompress(body).splitlines(keepends=True))


# -- taking: epochs ----------------------------------------------------------------------------------


def test_a_reference_of_an_older_epoch_is_ignored(world: World) -> None:
    ref, _ = world.log_request([{"n": 1}, {"n": 2}])
    world.uploader.add(ref._replace(epoch=0))
    assert len(world.uploader.batcher) == 0
    world.uploader.add(ref)
    assert len(world.uploader.batcher) == 2
    assert world.landed(ref) == {} and world.row[UploaderField.DAMAGED_RECORDS] == 0


def test_after_an_epoch_bump_references_of_the_old_epoch_are_ignored(world: World) -> None:
    old, _ = world.log_request([{"n": 1}])
    world.board.control[Control.EPOCH] = 2
    new, _ = world.log_request([{"n": 2}])
    world.uploader.follow_epoch()
    world.uploader.add(old)
    assert len(world.uploader.batcher) == 0
    world.uploader.add(new)
    assert len(world.uploader.batcher) == 1


def test_a_reference_of_a_newer_epoch_makes_the_uploader_follow_the_epoch_then_take_it(world: World) -> None:
    held, _ = world.log_request([{"n": 1}])
    world.uploader.add(held)
    world.board.control[Control.EPOCH] = 2
    newer, _ = world.log_request([{"n": 2}, {"n": 3}])  # a listener saw the bump before this uploader
    assert newer.epoch == 2
    world.uploader.add(newer)
    assert len(world.uploader.batcher) == 2  # the held one dropped (the re-index puts it back), the newer taken
    assert world.row[UploaderField.ACK_EPOCH] == 2 and world.uploader.epoch == 2
    [batch] = world.uploader.batcher.take_all()
    assert [p.offset for p in batch.parts] == [newer.offset]


def test_following_a_new_epoch_drops_held_payloads_and_writes_ack_epoch(world: World) -> None:
    journaled, _ = world.log_request([{"n": 0}])
    world.uploader.hand_over([world.batch_of(journaled)])  # journaled: stays this uploader's
    ref, _ = world.log_request([{"n": 1}, {"n": 2}])
    world.uploader.add(ref)
    world.uploader.follow_epoch()  # no new epoch: keeps what it holds
    assert len(world.uploader.batcher) == 2
    world.board.control[Control.EPOCH] = 2
    world.uploader.follow_epoch()
    assert len(world.uploader.batcher) == 0
    assert world.row[UploaderField.ACK_EPOCH] == 2 and world.uploader.epoch == 2
    assert [i.parts[0].offset for i in read_all_intents(world.spool.journals_dir)] == [journaled.offset]
    assert world.uploader.sender.pending_payloads == 1


def test_a_record_that_fails_its_checksum_is_quarantined_and_recorded_as_landed(world: World) -> None:
    ref, _ = world.log_request([{"n": 1}, {"n": 2}])
    path = segment_path(world.spool.logs_dir, ref.listener, ref.segment)
    with open(path, "r+b") as f:
        f.seek(ref.offset + ref.length - 3)
        f.write(b"X")
    world.uploader.add(ref)
    assert len(world.uploader.batcher) == 0
    assert world.row[UploaderField.DAMAGED_RECORDS] == 1
    assert [p.name for p in world.spool.quarantine_dir.iterdir() if not p.name.endswith(".why")]
    assert world.landed(ref) == {(ref.offset, 0): 2}  # never deliverable: its segment may go


# -- hand over and the sender ----------------------------------------------------------------------


def test_hand_over_journals_an_intent_and_the_sender_delivers_it(world: World) -> None:
    a, lines_a = world.log_request([{"n": 1}, {"n": 2}])
    b, lines_b = world.log_request([{"n": 3}])
    batch = world.batch_of(a, b)
    world.uploader.hand_over([batch])
    [intent] = read_all_intents(world.spool.journals_dir)
    assert intent.parts == batch.parts and intent.count == 3 and world.journal.open_count == 1
    assert KEY_RE.match(intent.key), intent.key
    assert world.sink.put_count() == 0  # the sender is not running yet
    world.uploader.sender.start()
    wait_for(world.sink.put_count, WAIT_S, "the sender's put")
    wait_for(lambda: world.journal.open_count == 0, WAIT_S, "the intent's outcome")
    wait_for(world.uploader.sender.idle, WAIT_S, "the sender to be idle")
    [(key, body, encoding)] = world.sink.puts
    assert (key, encoding) == (intent.key, "gzip")
    assert gzip.decompress(body) == lines_a + lines_b
    assert world.journal_kinds() == [Kind.INTENT, Kind.LANDED]
    assert (world.row[UploaderField.UPLOADED_PAYLOADS], world.row[UploaderField.UPLOADED_OBJECTS]) == (3, 1)
    assert world.landed(a) == {(a.offset, 0): 2} and world.landed(b) == {(b.offset, 0): 1}


# -- Delivery: keys, bytes, exactly once -------------------------------------------------------------


def test_gzip_with_mtime_zero_gives_the_same_bytes_every_time() -> None:
    body = b'{"received_at":"2025-11-28T03:04:05.125Z","version":null,"payload":{"n":1}}\n' * 50
    first = formats.encode(body, "gzip", 6)
    assert formats.encode(body, "gzip", 6) == first
    assert first[4:8] == b"\0\0\0\0"  # MTIME
    assert gzip.decompress(first) == body
    assert formats.encode(body, "gzip", 1) == formats.encode(body, "gzip", 1) != first
    assert formats.encode(body, None, 6) is body


def test_a_resend_read_back_from_the_logs_goes_to_the_same_key_with_the_same_bytes(world: World) -> None:
    a, _ = world.log_request([{"n": 1}, {"n": 2}])
    b, _ = world.log_request([{"n": 3}])
    batch = world.batch_of(a, b)
    intent = world.delivery.cut(batch, world.journal)
    world.sink.crash_after_next_put = True  # it lands, and the process dies before recording it
    with pytest.raises(SimulatedCrash):
        world.delivery.deliver(intent, world.journal, batch.body())
    world.journal.close()
    successor = Journal(world.journal.dir, "none")
    [left_open] = successor.recover()
    assert left_open == intent
    assert world.delivery.deliver(left_open, successor, None) is True
    successor.close()
    first, second = world.sink.puts
    assert first == second  # same key, same bytes, same encoding: it overwrote itself
    assert list(world.sink.objects) == [intent.key]
    assert world.row[UploaderField.RESENT_OBJECTS] == 1
    assert world.open_intents() == []


# -- Delivery: sink errors -----------------------------------------------------------------------------


def test_retryable_errors_are_retried_until_the_put_succeeds_and_each_failure_is_counted(world: World) -> None:
    ref, lines = world.log_request([{"n": 1}])
    batch = world.batch_of(ref)
    intent = world.delivery.cut(batch, world.journal)
    world.sink.fail_next(3, RetryableSinkError)
    assert world.delivery.deliver(intent, world.journal, batch.body()) is True
    assert world.sink.attempts == 4
    assert {k: gzip.decompress(v) for k, v in world.sink.objects.items()} == {intent.key: lines}
    assert world.row[UploaderField.FAILED_UPLOADS] == 3
    assert world.row[UploaderField.LAST_OK_MS] >= world.row[UploaderField.LAST_FAIL_MS] > 0
    assert world.row[UploaderField.UPLOADED_OBJECTS] == 1
    assert world.open_intents() == [] and world.landed(ref) == {(ref.offset, 0): 1}


def test_retry_delays_grow_exponentially_with_full_jitter_up_to_the_maximum(world: World) -> None:
    d = Delivery("t", world.sink, world.spool, "gzip", 6, 100, 1000, world.row, deadline_ms=lambda: 0)
    for attempt, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (40, 1.0)]:
        delays = [d._backoff(attempt) for _ in range(300)]
        assert all(0 <= x <= cap for x in delays), attempt
        assert max(delays) > cap / 2 and min(delays) < cap / 2, attempt  # jitter over the whole range


def test_a_permanent_error_writes_a_dead_letter_with_the_same_key_and_closes_the_intent_as_dead(
        world: World) -> None:
    a, lines_a = world.log_request([{"n": 1}, {"n": 2}])
    b, lines_b = world.log_request([{"n": 3}])
    batch = world.batch_of(a, b)
    intent = world.delivery.cut(batch, world.journal)
    world.sink.fail_next(1, PermanentSinkError)
    assert world.delivery.deliver(intent, world.journal, batch.body()) is True
    assert world.sink.attempts == 1 and world.sink.objects == {}
    [path] = world.spool.dead_letters()
    letter = world.spool.read_dead_letter(path)
    assert letter is not None
    meta, body = letter
    assert (meta["key"], meta["count"], meta["encoding"], meta["level"]) == (intent.key, 3, "gzip", 6)
    assert body == lines_a + lines_b
    assert world.row[UploaderField.DEAD_LETTERED_PAYLOADS] == 3 and world.row[UploaderField.FAILED_UPLOADS] == 1
    assert world.row[UploaderField.UPLOADED_PAYLOADS] == 0 and world.row[UploaderField.DEAD_LETTER_BLOCKED] == 0
    assert world.journal_kinds() == [Kind.INTENT, Kind.DEAD] and world.open_intents() == []
    assert world.landed(a) == {(a.offset, 0): 2} and world.landed(b) == {(b.offset, 0): 1}


def test_uncertain_errors_are_retried_and_the_object_lands_if_one_attempt_is_left(world: World) -> None:
    ref, lines = world.log_request([{"n": 1}])
    batch = world.batch_of(ref)
    intent = world.delivery.cut(batch, world.journal)
    world.sink.fail_next(UNCERTAIN_ATTEMPTS - 1, UncertainSinkError)
    assert world.delivery.deliver(intent, world.journal, batch.body()) is True
    assert world.sink.attempts == UNCERTAIN_ATTEMPTS
    assert {k: gzip.decompress(v) for k, v in world.sink.objects.items()} == {intent.key: lines}
    assert world.spool.dead_letters() == [] and world.row[UploaderField.DEAD_LETTERED_PAYLOADS] == 0
    assert world.row[UploaderField.FAILED_UPLOADS] == UNCERTAIN_ATTEMPTS - 1
    assert world.journal_kinds() == [Kind.INTENT, Kind.LANDED]


def test_uncertain_errors_dead_letter_the_object_at_the_bound_with_the_error_as_reason(world: World) -> None:
    ref, lines = world.log_request([{"n": 1}, {"n": 2}])
    batch = world.batch_of(ref)
    intent = world.delivery.cut(batch, world.journal)
    # retryable failures in between neither count toward the bound nor reset it
    world.sink.fail_next(2, UncertainSinkError)
    world.sink.fail_next(3, RetryableSinkError)
    world.sink.fail_always(UncertainSinkError)
    assert world.delivery.deliver(intent, world.journal, batch.body()) is True
    assert world.sink.attempts == UNCERTAIN_ATTEMPTS + 3 and world.sink.objects == {}
    [path] = world.spool.dead_letters()
    letter = world.spool.read_dead_letter(path)
    assert letter is not None
    meta, body = letter
    assert (meta["key"], meta["count"], body) == (intent.key, 2, lines)
    assert meta["reason"].startswith(f"{intent.key}: fake sink refuses {intent.key}"), meta["reason"]
    assert f"refused {UNCERTAIN_ATTEMPTS} times" in meta["reason"], meta["reason"]
    assert world.row[UploaderField.FAILED_UPLOADS] == UNCERTAIN_ATTEMPTS + 3
    assert world.row[UploaderField.DEAD_LETTERED_PAYLOADS] == 2
    assert world.journal_kinds() == [Kind.INTENT, Kind.DEAD] and world.landed(ref) == {(ref.offset, 0): 2}


def test_the_uncertain_bound_is_per_put_so_a_replay_gets_the_whole_bound_again(world: World) -> None:
    world.sink.fail_always(UncertainSinkError)
    for _ in range(2):
        before = world.sink.attempts
        with pytest.raises(PermanentSinkError) as exc:
            world.delivery.put_object("k", b"data", None, 1)
        assert world.sink.attempts - before == UNCERTAIN_ATTEMPTS
        assert isinstance(exc.value.__cause__, UncertainSinkError)


def fill_spool(world: World, size: int) -> Path:
    junk = world.spool.quarantine_dir / "junk"
    junk.write_bytes(b"\0" * size)
    return junk


def test_a_dead_letter_over_the_spool_cap_blocks_and_is_retried_until_the_deadline(make_world: Callable[..., World]) -> None:
    world = make_world(spool_max_bytes=4096)
    fill_spool(world, 4096)
    ref, _ = world.log_request([{"n": 1}])
    batch = world.batch_of(ref)
    intent = world.delivery.cut(batch, world.journal)
    world.sink.fail_always(PermanentSinkError)
    world.board.control[Control.DEADLINE_MS] = now_ms() + 300
    with pytest.raises(DeadlineReached):
        world.delivery.deliver(intent, world.journal, batch.body())
    assert world.row[UploaderField.DEAD_LETTER_BLOCKED] == 1
    assert world.spool.dead_letters() == []
    assert world.row[UploaderField.DEAD_LETTERED_PAYLOADS] == 0
    assert world.open_intents() == [intent] and world.landed(ref) == {}  # nothing dropped


def test_a_blocked_dead_letter_is_written_once_the_spool_has_room_again(make_world: Callable[..., World]) -> None:
    world = make_world(spool_max_bytes=4096)
    junk = fill_spool(world, 4096)
    ref, lines = world.log_request([{"n": 1}])
    batch = world.batch_of(ref)
    intent = world.delivery.cut(batch, world.journal)
    world.sink.fail_always(PermanentSinkError)
    world.board.control[Control.DEADLINE_MS] = now_ms() + int(WAIT_S * 1000)  # only a safety net
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(world.delivery.deliver(intent, world.journal,
                                                                                  batch.body())))
    thread.start()
    try:
        wait_for(lambda: world.row[UploaderField.DEAD_LETTER_BLOCKED] == 1, WAIT_S, "DEAD_LETTER_BLOCKED")
        assert world.spool.dead_letters() == []
        junk.unlink()
    finally:
        thread.join(WAIT_S + 1)
    assert outcome == [True]
    assert world.row[UploaderField.DEAD_LETTER_BLOCKED] == 0
    [path] = world.spool.dead_letters()
    letter = world.spool.read_dead_letter(path)
    assert letter is not None and letter[0]["key"] == intent.key and letter[1] == lines
    assert world.landed(ref) == {(ref.offset, 0): 1}


def test_an_intent_whose_segment_is_gone_is_closed_as_landed_without_a_put(world: World) -> None:
    ref, _ = world.log_request([{"n": 1}])
    batch = world.batch_of(ref)
    intent = world.delivery.cut(batch, world.journal)
    path = segment_path(world.spool.logs_dir, ref.listener, ref.segment)
    path.unlink()  # what a listener does once every part of the segment landed
    path.with_suffix(".landed").unlink()
    assert world.delivery.deliver(intent, world.journal, None) is True
    assert world.sink.attempts == 0
    assert world.journal_kinds() == [Kind.INTENT, Kind.LANDED] and world.open_intents() == []
    assert world.row[UploaderField.RESENT_OBJECTS] == 0 and world.row[UploaderField.UPLOADED_OBJECTS] == 0


def test_the_drain_deadline_stops_retries_with_deadline_reached(world: World) -> None:
    ref, _ = world.log_request([{"n": 1}])
    batch = world.batch_of(ref)
    intent = world.delivery.cut(batch, world.journal)
    world.sink.fail_always(RetryableSinkError)
    world.board.control[Control.DEADLINE_MS] = now_ms() + 200
    started = time.monotonic()
    with pytest.raises(DeadlineReached):
        world.delivery.deliver(intent, world.journal, batch.body())
    assert time.monotonic() - started < WAIT_S
    assert world.sink.attempts >= 1 and world.row[UploaderField.FAILED_UPLOADS] == world.sink.attempts
    assert world.sink.objects == {} and world.spool.dead_letters() == []
    assert world.open_intents() == [intent] and world.landed(ref) == {}  # the next start sends it


def test_the_sender_stops_at_the_drain_deadline_and_says_so(world: World) -> None:
    ref, _ = world.log_request([{"n": 1}])
    world.sink.fail_always(RetryableSinkError)
    world.board.control[Control.DEADLINE_MS] = now_ms() + 100
    world.uploader.hand_over([world.batch_of(ref)])
    world.uploader.sender.start()
    world.uploader.sender.join(WAIT_S)
    assert not world.uploader.sender.is_alive()
    assert world.uploader.sender.deadline_hit
    assert len(world.open_intents()) == 1


def test_the_object_being_sent_counts_once_in_the_pending_payloads(world: World) -> None:
    ref, _ = world.log_request([{"n": 1}, {"n": 2}, {"n": 3}])
    world.sink.gate = threading.Event()
    world.uploader.hand_over([world.batch_of(ref)])
    world.uploader.sender.start()
    try:
        assert world.sink.entered.wait(WAIT_S)
        assert world.uploader.sender.pending_payloads == 3
    finally:
        world.sink.gate.set()
    wait_for(world.uploader.sender.idle, WAIT_S, "the sender to be idle")
    assert world.uploader.sender.pending_payloads == 0


def test_an_object_that_landed_just_before_a_crash_is_never_put_back_on_the_queue(world: World) -> None:
    class CrashAfterClose(Journal):
        def close_intent(self, intent_id: str, dead: bool = False) -> None:
            super().close_intent(intent_id, dead)
            raise SimulatedCrash()

    ref, _ = world.log_request([{"n": 1}])
    batch = world.batch_of(ref)
    world.journal.close()
    journal = CrashAfterClose(world.journal.dir, "none")
    intent = world.delivery.cut(batch, journal)
    with pytest.raises(SimulatedCrash):
        world.delivery.deliver(intent, journal, batch.body())
    journal.close()
    assert list(world.sink.objects) == [intent.key]  # it landed
    assert world.open_intents() == []  # the successor recovers: nothing to send again
    # what the listener's re-index puts back: every part neither in a journal nor landed
    covered: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for i in read_all_intents(world.spool.journals_dir):
        for p in i.parts:
            covered.setdefault((p.listener, p.segment, p.offset), []).append((p.first_line, p.count))
    assert world.log.uncovered(covered, None, world.intake.lock) == []


# -- the loop at the drain -----------------------------------------------------------------------------


def test_run_while_draining_with_no_listener_alive_delivers_what_it_holds_and_returns(world: World) -> None:
    left, lines_left = world.log_request([{"n": 1}])
    resend = [(world.delivery.cut(world.batch_of(left), world.journal), world.journal)]  # a predecessor's
    held, lines_held = world.log_request([{"n": 2}, {"n": 3}])
    world.uploader.add(held)
    queued = []
    for n in (4, 5):
        lines = encode_lines(NOW, None, [{"n": n}])
        assert world.intake.submit(NOW, 1, lines) is Admission.ACCEPTED
        queued.append(lines)
    assert world.intake.writer.wait_flushed(5)
    assert world.queue.depth() == 2
    world.board.control[Control.PHASE] = Phase.DRAINING
    thread = threading.Thread(target=world.uploader.run, args=(resend,), name="uploader-under-test")
    thread.start()
    try:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "run() did not return once everything was delivered"
    finally:
        world.board.control[Control.DEADLINE_MS] = 1  # a run() that hangs leaves at the deadline
        thread.join(WAIT_S)
    assert lines_of(world.sink.objects) == sorted(
        (lines_left + lines_held + b"".join(queued)).splitlines(keepends=True))
    assert len(world.sink.puts) == len(world.sink.objects) == 2  # the predecessor's object, and one batch
    assert world.row[UploaderField.UPLOADED_PAYLOADS] == 5
    assert world.row[UploaderField.RESENT_OBJECTS] == 1
    assert world.queue.depth() == 0 and len(world.uploader.batcher) == 0
    assert world.open_intents() == []


def test_at_the_drain_a_listener_coming_back_is_waited_for(world: World) -> None:
    """A dead listener's successor adopts and re-indexes its log: uploaders must not finish first."""
    from ingestd.scoreboard import ChildField, ListenerField, Role
    from ingestd.states import ChildState

    view, row = world.board.child(Role.LISTENER, 0), world.board.listener(0)
    world.board.control[Control.PHASE] = Phase.DRAINING
    assert world.uploader.can_finish()  # no listener process: nothing to wait for
    view[ChildField.STATE] = list(ChildState).index(ChildState.BACKOFF)
    assert not world.uploader.can_finish()
    view[ChildField.STATE] = list(ChildState).index(ChildState.RUNNING)
    view[ChildField.PID] = 4242
    assert not world.uploader.can_finish()  # alive, not yet quiet
    row[ListenerField.QUIET_PID] = 4242
    assert not world.uploader.can_finish()  # quiet, not yet re-indexed for this epoch
    row[ListenerField.INDEXED_EPOCH] = world.board.epoch
    assert world.uploader.can_finish()
    world.board.control[Control.PHASE] = Phase.RUNNING
    world.log_request([{"n": 1}])
    assert world.intake.submit(NOW, 1, encode_lines(NOW, None, [{"n": 2}])) is Admission.ACCEPTED
    assert world.intake.writer.wait_flushed(5)
    world.board.control[Control.PHASE] = Phase.DRAINING
    assert not world.uploader.can_finish()  # a reference still waits on the queue
