"""The shared queue survives SIGKILL of a consumer: real processes, real signals."""

from __future__ import annotations

import multiprocessing
import os
import signal

from ingestd.board import Board, GlobalField, ProducerField
from ingestd.jobqueue import Intake, JobQueue
from ingestd.records import Item
from tests.harness import wait_for


def _wait_forever_in_take(q: JobQueue, board: Board) -> None:
    while True:
        q.take(board, 0, 0.5, lambda item: None)


def _noop(item: Item) -> None:
    pass


def test_consumer_killed_while_waiting_leaks_the_lock_and_repair_releases_it():
    ctx = multiprocessing.get_context("spawn")
    board = Board(ctx, 2)
    q = JobQueue(10, ctx=ctx)
    child = ctx.Process(target=_wait_forever_in_take, args=(q, board))
    child.start()
    try:
        wait_for(lambda: board.gget(GlobalField.LOCK_STATE) == 2 * 1 + 0, 30, "the child to hold the read lock")
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        q.put(Item(1, 0.0, 1, b"{}\n"))
        # the dead child still owns the lock: a plain consumer would hang here forever
        assert q.take(board, 1, 0.3, _noop) is None
        assert q.repair_after_death(board, 0) is True
        item = q.take(board, 1, 10, _noop)
        assert item is not None and item.seq == 1
        assert board.pget(0, ProducerField.CURSOR) == 1
        assert board.gget(GlobalField.LOCK_STATE) == 0
    finally:
        if child.is_alive():
            child.kill()
        q.cancel_join_thread()
        q.close()


def test_death_mid_message_asks_for_a_rebuild_and_the_ledger_refills_a_new_queue():
    ctx = multiprocessing.get_context("spawn")
    board = Board(ctx, 2)
    q = JobQueue(10, ctx=ctx)
    intake = Intake(q, board, 1 << 20)
    for i in range(3):
        assert intake.submit(float(i), 1, b'{"n":%d}\n' % i).value == "accepted"
    first = q.take(board, 1, 10, _noop)
    assert first is not None and first.seq == 1
    assert intake.depth() == 2  # the ledger keeps exactly what is still in the pipe
    board.gset(GlobalField.LOCK_STATE, 2 * (0 + 1) + 1)  # slot 0 "died" mid-message
    assert q.repair_after_death(board, 0) is False
    fresh = JobQueue(10, ctx=ctx)
    assert intake.replace_queue(fresh) == 2
    got = [fresh.take(board, 1, 10, _noop) for _ in range(2)]
    assert [g.seq for g in got if g] == [2, 3]
    for queue in (q, fresh):
        queue.cancel_join_thread()
        queue.close()
