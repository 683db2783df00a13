"""refqueue.py: references through the queue's pipe, its bound, and the property it exists for:
consumer processes SIGKILLed at any moment leave nothing that stops the others."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing.context import ForkContext, SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from queue import Empty, Full

import pytest

from ingestd.refqueue import REF_SIZE, REFS_PER_WRITE, Ref, RefQueue, epoch_tag
from tests.harness import wait_for

SPAWN: SpawnContext = multiprocessing.get_context("spawn")
# Processes that are started only to be killed are forked: a spawned one costs a fresh
# interpreter (a few hundred ms), and the kill loops start ten of them.
FORK: ForkContext = multiprocessing.get_context("fork")
PACKED = struct.Struct("<HHIIIII")  # the layout of Ref.pack(), for reading what consumers wrote


def ref(n: int) -> Ref:
    """A distinct, valid reference for every n (each field different, so a torn one shows)."""
    return Ref(n % 7, n % 65536, n // 3, n * 24, 100 + n % 1000, n % 5, 1 + n % 9)


def refs(start: int, count: int) -> list[Ref]:
    return [ref(n) for n in range(start, start + count)]


@pytest.fixture
def make_queue() -> Iterator[Callable[..., RefQueue]]:
    made: list[RefQueue] = []

    def make(max_items: int = 1000, ctx: SpawnContext | ForkContext = SPAWN) -> RefQueue:
        q = RefQueue(max_items, ctx=ctx)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def fill(q: RefQueue) -> int:
    """try_put until the pipe refuses; returns how many went in."""
    n = 0
    while q.try_put(ref(n)):
        n += 1
        assert n < 1_000_000, "the pipe never filled"
    return n


def drain(q: RefQueue) -> list[Ref]:
    out: list[Ref] = []
    while True:
        got = q.take(500, 0)
        if not got:
            return out
        out += got


def task_is_waiting(path: str) -> bool:
    """The task of /proc `path` sleeps in select/poll (where take waits)."""
    try:
        stat = Path(path, "stat").read_text()
        wchan = Path(path, "wchan").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state == "S" and ("poll" in wchan or "select" in wchan or wchan == "0")  # "0": the kernel hides it


# -- Ref ------------------------------------------------------------------------------------------------


def test_a_reference_is_24_bytes_and_packs_every_field() -> None:
    r = Ref(65535, 65535, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1)
    assert REF_SIZE == 24 and len(r.pack()) == 24
    assert PACKED.unpack(ref(12345).pack()) == tuple(ref(12345))
    assert REFS_PER_WRITE * REF_SIZE <= 4096  # PIPE_BUF: one write is atomic
    assert r.segment_key == (65535, 2**32 - 1)


def test_epoch_tag_keeps_the_low_16_bits() -> None:
    assert [epoch_tag(e) for e in (0, 7, 65535, 65536, 65543)] == [0, 7, 65535, 0, 7]


# -- producers and consumers in one process -------------------------------------------------------------------


def test_put_and_take_round_trip_in_order(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue()
    sent = refs(0, 50) + [Ref(65535, 65535, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1)]
    for r in sent:
        assert q.try_put(r)
    assert q.take(1000, 0) == sent
    assert q.take(1000, 0) == []


def test_depth_is_exact(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue()
    assert q.depth() == 0
    for r in refs(0, 5):
        q.try_put(r)
    assert q.depth() == 5
    assert len(q.take(2, 0)) == 2
    assert q.depth() == 3
    assert q.put_many(refs(5, 300)) == 300
    assert q.depth() == 303
    drain(q)
    assert q.depth() == 0


def test_take_returns_at_most_most(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue()
    q.put_many(refs(0, 10))
    assert q.take(3, 0) == refs(0, 3)
    assert q.take(1, 0) == refs(3, 1)
    assert q.take(100, 1.0) == refs(4, 6)  # what is there, without waiting for more


def test_take_of_an_empty_queue_returns_nothing_after_the_timeout(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue()
    start = time.monotonic()
    assert q.take(10, 0) == []
    assert time.monotonic() - start < 0.1  # no timeout: no wait
    start = time.monotonic()
    assert q.take(10, 0.2) == []
    assert 0.2 <= time.monotonic() - start < 5


def test_take_wakes_up_when_a_reference_arrives(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue()
    got: list[list[Ref]] = []
    tid: list[int] = []

    def consumer() -> None:
        tid.append(threading.get_native_id())
        got.append(q.take(10, 30.0))

    t = threading.Thread(target=consumer, daemon=True)
    began = time.monotonic()
    t.start()
    wait_for(lambda: tid and task_is_waiting(f"/proc/self/task/{tid[0]}"), 5, "the consumer waiting in take",
             interval=0.005)
    assert q.try_put(ref(1))
    t.join(timeout=10)
    assert not t.is_alive() and got == [[ref(1)]]
    assert time.monotonic() - began < 10


def test_try_put_returns_false_when_the_pipe_is_full_and_never_blocks(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue(max_items=10)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(fill(q)), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "try_put blocked on a full pipe"
    [n] = result
    assert n > 10  # the pipe, not max_items, refuses: producers check depth() themselves
    assert n * REF_SIZE <= q.pipe_bytes
    assert q.depth() == n
    assert not q.try_put(ref(n))  # still full, still no wait
    assert drain(q) == refs(0, n)  # nothing torn, nothing lost
    assert q.try_put(ref(0))


def test_put_many_writes_whole_chunks_and_returns_how_many_fit(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue(max_items=10)
    many = refs(0, 20_000)
    n = q.put_many(many)
    assert 0 < n < len(many)
    assert n % REFS_PER_WRITE == 0  # a chunk goes in whole or not at all
    assert q.depth() == n
    assert q.put_many(many[n:]) == 0  # full: nothing, at once
    assert drain(q) == many[:n]
    assert q.put_many([]) == 0
    assert q.put_many(many[:5]) == 5 and q.take(10, 0) == many[:5]


def test_pipe_is_sized_for_four_times_max_items(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue(max_items=1000)
    assert q.pipe_bytes >= 4 * 1000 * REF_SIZE
    assert fill(q) >= 4 * 1000


def test_max_items_beyond_what_a_pipe_can_hold_is_warned_about(make_queue: Callable[..., RefQueue],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ingestd.refqueue"):
        q = make_queue(max_items=10_000_000)
    assert q.pipe_bytes < 10_000_000 * REF_SIZE
    assert any("that is the real bound" in r.getMessage() for r in caplog.records)


def test_queue_is_shared_only_by_starting_a_process() -> None:
    q = RefQueue(10, ctx=SPAWN)
    try:
        with pytest.raises(RuntimeError):
            pickle.dumps(q)
    finally:
        q.close()


# -- the stock interface ---------------------------------------------------------------------------------------


def test_stock_interface_put_get_qsize_empty_full(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue(max_items=3)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put(ref(1))
    q.put_nowait(ref(2))
    assert q.qsize() == 2 and not q.empty() and not q.full()
    q.put(ref(3), block=True, timeout=1)
    assert q.full()
    assert q.get() == ref(1)
    assert q.get(timeout=1) == ref(2)
    assert q.get_nowait() == ref(3)
    assert q.empty()
    with pytest.raises(Empty):
        q.get_nowait()
    start = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout=0.1)
    assert time.monotonic() - start >= 0.1


def test_stock_put_on_a_full_pipe_raises_full_at_once(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue(max_items=10)
    fill(q)
    with pytest.raises(Full):
        q.put(ref(0), block=True, timeout=30)
    with pytest.raises(Full):
        q.put_nowait(ref(0))


def test_stock_put_nowait_on_a_queue_that_reports_full_raises_full(make_queue: Callable[..., RefQueue]) -> None:
    q = make_queue(max_items=3)
    for n in range(3):
        q.put_nowait(ref(n))
    assert q.full()
    with pytest.raises(Full):
        q.put_nowait(ref(3))


# -- several processes ------------------------------------------------------------------------------------------


def consume(queue: RefQueue, out: str, stop: str) -> None:
    """Consumer process: append what it takes, packed, to `out`; leave once `stop` exists and
    the queue is empty."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            got = queue.take(37, 0.02)
            if got:
                os.write(fd, b"".join(r.pack() for r in got))
            elif os.path.exists(stop):
                return
    finally:
        os.close(fd)


def wait_in_take(queue: RefQueue, ready_fd: int) -> None:
    """Victim process: say it is about to take, then wait in take until it is killed."""
    os.write(ready_fd, b"r")
    got = queue.take(REFS_PER_WRITE, 60.0)
    os._exit(3 if got else 4)  # never reached when killed in time


def read_taken(paths: list[Path], whole: bool = True) -> list[Ref]:
    """The references consumers wrote to `paths`. `whole=False` for files still being written or
    whose writer was killed: a trailing partial reference is left out."""
    out: list[Ref] = []
    for path in paths:
        data = path.read_bytes() if path.exists() else b""
        if whole:
            assert len(data) % REF_SIZE == 0, f"{path}: a partial reference"
        else:
            data = data[: len(data) - len(data) % REF_SIZE]
        out += [Ref(*fields) for fields in PACKED.iter_unpack(data)]
    return out


def have_taken(paths: list[Path], n: int) -> bool:
    return len(read_taken(paths, whole=False)) == n


def produce(q: RefQueue, items: list[Ref], timeout: float = 20.0) -> None:
    """Put every item, waiting (against a deadline) while the pipe is full."""
    deadline = time.monotonic() + timeout
    done = 0
    while done < len(items):
        n = q.put_many(items[done:])
        done += n
        if not n:
            assert time.monotonic() < deadline, f"the consumers stopped taking ({done} of {len(items)} put)"
            time.sleep(0.001)  # backoff of a poll against the deadline, not a synchronization


def start(ctx: SpawnContext | ForkContext, target: Callable[..., None], *args: object) -> BaseProcess:
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def stop_all(procs: list[BaseProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=10)


def finish(q: RefQueue, consumers: list[BaseProcess], stop: Path) -> None:
    wait_for(lambda: q.depth() == 0, 20, "the consumers to empty the queue", interval=0.005)
    stop.write_bytes(b"")
    for p in consumers:
        p.join(timeout=20)
        assert p.exitcode == 0, f"consumer exit code {p.exitcode}"


def test_consumer_processes_move_every_reference_exactly_once(make_queue: Callable[..., RefQueue],
                                                                tmp_path: Path) -> None:
    q = make_queue(max_items=200)  # a small pipe, so the producer waits for the consumers often
    stop = tmp_path / "stop"
    outs = [tmp_path / f"consumer-{i}.bin" for i in range(3)]
    consumers = [start(SPAWN, consume, q, str(out), str(stop)) for out in outs]
    try:
        wait_for(lambda: all(out.exists() for out in outs), 20, "every consumer to start", interval=0.005)
        sent = refs(0, 30_000)
        produce(q, sent)
        finish(q, consumers, stop)
    finally:
        stop_all(consumers)
    taken = read_taken(outs)
    assert len(taken) == len(sent)
    assert sorted(taken) == sorted(sent)  # none lost, none twice, none torn
    assert sum(1 for out in outs if out.stat().st_size) >= 2, "the consumers did not share the work"


def test_consumer_killed_while_waiting_in_take_does_not_stop_the_others(make_queue: Callable[..., RefQueue],
                                                                         tmp_path: Path) -> None:
    q = make_queue(max_items=200)
    stop = tmp_path / "stop"
    outs = [tmp_path / f"survivor-{i}.bin" for i in range(2)]
    survivors = [start(SPAWN, consume, q, str(out), str(stop)) for out in outs]
    victims: list[BaseProcess] = []
    sent: list[Ref] = []
    try:
        wait_for(lambda: all(out.exists() for out in outs), 20, "the survivors to start", interval=0.005)
        for round_ in range(10):
            ready_r, ready_w = os.pipe()
            try:
                victim = start(FORK, wait_in_take, q, ready_w)
                victims.append(victim)
                os.close(ready_w)
                assert os.read(ready_r, 1) == b"r"
            finally:
                os.close(ready_r)
            assert victim.pid is not None
            wait_for(partial(task_is_waiting, f"/proc/{victim.pid}"), 5, "the victim waiting in take", interval=0.002)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(timeout=10)
            assert victim.exitcode == -signal.SIGKILL
            batch = refs(round_ * 1000, 1000)
            produce(q, batch)
            sent += batch
            wait_for(partial(have_taken, outs, len(sent)), 20, f"the survivors to take round {round_}'s references",
                     interval=0.005)
        finish(q, survivors, stop)
    finally:
        stop_all(survivors + victims)
    assert sorted(read_taken(outs)) == sorted(sent)


def test_consumers_killed_while_taking_never_tear_or_repeat_a_reference(make_queue: Callable[..., RefQueue],
                                                                        tmp_path: Path) -> None:
    # what a killed consumer had read is gone (the re-index finds it again); everything else
    # arrives whole, once, and the queue goes on working
    q = make_queue(max_items=200, ctx=FORK)
    stop = tmp_path / "stop"
    outs = [tmp_path / f"survivor-{i}.bin" for i in range(2)]
    victim_outs = [tmp_path / f"victim-{i}.bin" for i in range(10)]
    survivors = [start(FORK, consume, q, str(out), str(stop)) for out in outs]
    victims: list[BaseProcess] = []
    sent: list[Ref] = []
    try:
        for round_ in range(10):
            victim = start(FORK, consume, q, str(victim_outs[round_]), str(tmp_path / "never"))
            victims.append(victim)
            batch = refs(round_ * 2000, 2000)
            produce(q, batch)
            sent += batch
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)  # wherever it is: waiting, reading, writing
            victim.join(timeout=10)
        last = refs(100_000, 3000)  # no victim left: every one of these must arrive
        produce(q, last)
        sent += last
        finish(q, survivors, stop)
    finally:
        stop_all(survivors + victims)
    taken = read_taken(outs) + read_taken(victim_outs, whole=False)
    assert len(set(taken)) == len(taken), "a reference was taken twice"
    assert set(taken) <= set(sent), "a reference arrived torn"
    assert set(last) <= set(read_taken(outs))
    assert len(sent) - len(taken) <= 10 * 37  # at most one take per killed victim is lost
