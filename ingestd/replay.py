"""`ingestd replay`: upload what sits in the spool and remove what landed. Safe to run twice.

With the daemon stopped (the spool lock is free), everything is replayed: dead letters, drain
overflow and in-flight files. With the daemon running, only dead letters (the rest is the
daemon's). A file is rewritten after each object that lands, so a replay that fails half-way
and is run again sends nothing twice. Retryable errors are retried until `--deadline`.
"""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

from .batching import Batcher
from .board import Board, GlobalField, now_ms
from .config import Config
from .errors import PermanentSinkError, SpoolLockedError
from .records import frame
from .sinks import KeyMaker, build_sink
from .spool import Spool, read_file, write_atomically
from .uploader import DrainDeadline, Uploader, encode_object

log = logging.getLogger(__name__)


def replay(config: Config, deadline_s: float = 120.0) -> int:
    spool = Spool(config.spool.path, fsync=True)
    spool.prepare()
    try:
        spool.lock(".replay.lock")
    except SpoolLockedError:
        log.error("another replay is running on %s", spool.root)
        return 1
    try:
        spool.lock()
        daemon_running = False
    except SpoolLockedError:
        daemon_running = True
        log.info("the daemon is running: replaying dead letters only")
    files = list(spool.dead_dir.glob("*.rec"))
    if not daemon_running:
        files += list(spool.overflow_dir.glob("*.rec")) + list(spool.inflight_dir.glob("slot-*.rec"))
    board = Board(multiprocessing.get_context("spawn"), 1)
    board.gset(GlobalField.DRAIN_DEADLINE_MS, now_ms() + int(deadline_s * 1000))
    uploader = Uploader(0, config, None, board, build_sink(config.sink), None, spool)
    keys = KeyMaker(config.sink.prefix, config.batch.compression == "gzip")
    sent = objects = failed = 0
    for path in sorted(files):
        try:
            n, k = replay_file(path, config, uploader, keys, spool)
            sent, objects = sent + n, objects + k
        except (PermanentSinkError, DrainDeadline) as e:
            failed += 1
            log.error("replay of %s stopped: %s; the rest stays in the file", path, e or "deadline passed")
    print(f"replayed {sent} payloads in {objects} objects from {len(files) - failed} of {len(files)} files"
          f" ({failed} left in {spool.root})")
    return 1 if failed else 0


def replay_file(path: Path, config: Config, uploader: Uploader, keys: KeyMaker, spool: Spool) -> tuple[int, int]:
    b = config.batch
    batcher = Batcher(b.max_payloads, b.max_bytes, b.max_age_ms / 1000.0, lambda: 0.0)
    for item in read_file(path):
        batcher.add(item)
    batches = batcher.take_all()
    sent = 0
    for i, batch in enumerate(batches):
        key, body, encoding = encode_object(batch, b, keys)
        uploader.put_with_retry(key, body, encoding, batch.count)
        sent += batch.count
        rest = [item for later in batches[i + 1 :] for item in later.items]
        if rest:
            write_atomically(path, b"".join(frame(it) for it in rest), fsync=True)
        log.info("replayed %d payloads from %s to %s", batch.count, path.name, key)
    spool.remove(path)
    return sent, len(batches)
