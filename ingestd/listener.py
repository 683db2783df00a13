"""The HTTP listener: the Falcon app on waitress, in the supervisor or in listener processes.

`create_listener` binds the socket and builds the waitress server; the supervisor serves
through it in a thread. With `http.listeners` = N > 1, the supervisor also starts N - 1
listener processes (`run_listener`) bound to the same port with SO_REUSEPORT, so the kernel
spreads connections over N processes and N GILs. Each one is a producer of the shared queue
with its own intake (sequence numbers, ledger, journal) and its own row on the board.

A listener process follows the supervisor through the board (and leaves, spilling, when the
supervisor rebuilds a torn queue): at DRAINING it answers 503 and
waits until its queue feeder has written every accepted item into the pipe (FLUSHED), so the
supervisor's STOP sentinels land behind them; at LISTENERS_EXIT (the uploaders are gone) it
spills what no uploader read to the spool and exits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import waitress

from .app import create_app
from .board import Board, GlobalField, ProducerField
from .config import Config, bearer_tokens
from .health import Health, board_worker_views
from .jobqueue import Intake, JobQueue
from .journal import Journal
from .child import setup_child
from .spool import Spool

log = logging.getLogger(__name__)

POLL_S = 0.05


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after any exit
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def create_listener(app: Any, config: Config, sock: socket.socket) -> Any:
    h = config.http
    return waitress.create_server(
        app,
        sockets=[sock],
        threads=h.threads,
        connection_limit=h.connection_limit,
        channel_timeout=h.channel_timeout_s,
        # waitress looks for timed-out channels only every cleanup_interval (30 s by default)
        cleanup_interval=max(1, h.channel_timeout_s // 2),
        # the app answers 413 in JSON for bodies up to 4x the limit; beyond, waitress refuses
        # them itself without buffering them
        max_request_body_size=h.max_body_bytes * 4,
        asyncore_use_poll=True,
        ident="ingestd",
        expose_tracebacks=False,
        backlog=2048,
    )


def open_journal(config: Config, spool: Spool, producer: int) -> Journal | None:
    sp = config.spool
    if sp.durability != "disk":
        return None
    directory = spool.journal_dir / f"p{producer}"
    directory.mkdir(parents=True, exist_ok=True)
    moved = spool.retire_journal(directory)  # a dead predecessor's segments: sent at the next start
    if moved:
        log.warning("listener %d: %d journal segments of a previous process moved to %s",
                    producer, moved, spool.overflow_dir)
    return Journal(directory, sp.journal_fsync, sp.journal_segment_bytes)


def flush_feeder(queue: JobQueue, deadline: float) -> bool:
    """Wait until this process's queue feeder thread has written everything into the pipe."""
    queue.close()
    thread = queue._thread  # type: ignore[attr-defined]
    if thread is not None:
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()
    return True


def run_listener(index: int, config: Config, queue: JobQueue, board: Board, host: str, port: int) -> None:
    """Process target of listener `index` (>= 1)."""
    parent = setup_child(config.log, f"listener-{index}")
    spool = Spool(config.spool.path)
    journal = open_journal(config, spool, index)
    intake = Intake(queue, board, config.queue.max_bytes, journal, producer=index)
    health = Health(board, intake, config.queue.max_items, config.queue.max_bytes, board_worker_views(board),
                    supervisor_pid=parent)
    app = create_app(config, intake, health, bearer_tokens(config.auth))
    server = create_listener(app, config, bind_socket(host, port, reuse_port=True))
    threading.Thread(target=server.run, name="waitress", daemon=True).start()
    board.pset(index, ProducerField.FLUSHED, 0)
    board.pset(index, ProducerField.PID, os.getpid())
    log.info("listener %d serving http://%s:%d", index, host, port)
    last_sync = time.monotonic()
    generation = board.gget(GlobalField.QUEUE_GENERATION)
    flushed = False
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent:
            log.error("listener %d: supervisor is gone; exiting", index)
            break
        if journal is not None:
            if time.monotonic() - last_sync >= config.spool.journal_fsync_interval_ms / 1000:
                journal.sync()
                last_sync = time.monotonic()
            journal.retire(board.pget(index, ProducerField.CURSOR))
        if board.gget(GlobalField.DRAINING) and not flushed:
            flushed = True
            intake.begin_drain()  # no submit under way any more: the feeder holds them all
            deadline = time.monotonic() + config.shutdown.drain_timeout_s
            flushed = flush_feeder(queue, deadline)
            board.pset(index, ProducerField.FLUSHED, 1)
            log.info("listener %d: draining; accepted items %s the pipe", index,
                     "are all in" if flushed else "could not all be written to")
        if board.gget(GlobalField.LISTENERS_EXIT):
            break
        if board.gget(GlobalField.QUEUE_GENERATION) != generation:
            # the supervisor rebuilt a torn queue: what this process put on the old one and no
            # uploader read goes to overflow, which the restarted uploaders claim; a successor
            # is started on the new queue
            log.warning("listener %d: the queue was rebuilt; handing over and exiting", index)
            break
    left = intake.unread()
    if left:
        path = spool.write_overflow(left)
        log.warning("listener %d: %d payloads never left the queue; spilled to %s",
                    index, sum(i.count for i in left), path)
    if journal is not None:
        journal.close()
    board.pset(index, ProducerField.PID, 0)
    log.info("listener %d: exiting", index)
    os._exit(0)  # the queue's feeder may be stuck on a full pipe nobody reads any more
