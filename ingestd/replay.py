"""`ingestd replay`: deliver what sits in the spool, through the daemon's own `Delivery`.

While the daemon runs (it holds the spool lock), only dead letters are replayed: everything
else is the daemon's, and it delivers it itself. With the daemon stopped, replay takes the
spool lock (so a daemon cannot start meanwhile) and runs the daemon's recovery in one process:
open intents of every journal are sent again to their own keys, then every part of the logs
that is neither landed nor journaled is batched, journaled and sent like an uploader would,
then landed segments and finished journals are deleted. A dead letter is removed after its
object landed at the key it was refused at. Everything is recorded as it goes, so a replay that
is interrupted and run again sends nothing twice.
"""

from __future__ import annotations

import array
import logging
import os
import threading

from .batching import Partitions
from .config import Config
from .delivery import DeadlineReached, Delivery
from .errors import PermanentSinkError, SpoolLockedError
from .journal import Journal, read_all_intents
from .requestlog import Covered, RequestLog, read_record, segment_path
from .scoreboard import Row, UploaderField, now_ms
from . import formats
from .sinks import build_sink
from .spool import Lock, Spool

log = logging.getLogger(__name__)


def replay(config: Config, deadline_s: float = 120.0) -> int:
    spool = Spool(config.spool)
    spool.prepare()
    if not Lock(spool.root / ".replay.lock").acquire():
        log.error("another replay is running on %s", spool.root)
        return 1
    try:
        spool.lock_daemon()
        daemon_running = False
    except SpoolLockedError:
        daemon_running = True
        log.info("the daemon is running: replaying dead letters only (it delivers the rest itself)")
    deadline = now_ms() + int(deadline_s * 1000)
    row = Row(array.array("q", [0] * len(UploaderField)), 0)
    delivery = Delivery.for_config("replay", config, build_sink(config.sink), spool, row, deadline_ms=lambda: deadline)
    try:
        if not daemon_running:
            held = spool.wait_for_old_children(10.0)
            if held:
                log.error("processes of an earlier ingestd still hold %s: not replaying beside them", ", ".join(held))
                return 1
            spool.restore_overflow()
            replay_logs(config, spool, delivery)
        dead, failed = replay_dead_letters(spool, delivery)
    except DeadlineReached:
        print(f"replay stopped at its deadline ({deadline_s:.0f}s); what is left stays in the spool")
        return 1
    sent = row[UploaderField.UPLOADED_PAYLOADS]
    print(f"replayed {sent} payloads in {row[UploaderField.UPLOADED_OBJECTS]} objects "
          f"({row[UploaderField.RESENT_OBJECTS]} objects sent again to their own key, {dead} dead letters); "
          f"{failed} dead letters refused again")
    return 1 if failed else 0


def replay_logs(config: Config, spool: Spool, delivery: Delivery) -> None:
    fsync = config.spool.journal_fsync if config.spool.on_disk else "none"
    journals = [Journal(spool.journal_dir(str(k)), fsync) for k in spool.indexes(spool.journals_dir)]
    for journal in journals:
        for intent in journal.recover():
            delivery.deliver(intent, journal)
    listeners = spool.indexes(spool.logs_dir)
    if not listeners:
        return
    free = max([config.workers.count - 1, *spool.indexes(spool.journals_dir)]) + 1
    own = Journal(spool.journal_dir(str(free)), fsync)  # an orphan index: an uploader adopts it if replay dies
    logs = RequestLog(spool.logs_dir, max(listeners) + 1, "none", config.spool.segment_bytes,
                      quarantine=spool.quarantine)
    for listener in listeners:
        logs.adopt(listener)
    covered: Covered = {}
    for intent in read_all_intents(spool.journals_dir):
        for p in intent.parts:
            covered.setdefault((p.listener, p.segment, p.offset), []).append((p.first_line, p.count))
    lock = threading.Lock()
    batcher = Partitions.for_config(config, lambda: 0.0)
    fds: dict[tuple[int, int], int] = {}
    try:
        for part in logs.uncovered(covered, None, lock):
            ref = logs.ref(part, 0)
            fd = fds.get(ref.segment_key)
            if fd is None:
                fd = fds[ref.segment_key] = os.open(segment_path(spool.logs_dir, ref.listener, ref.segment), os.O_RDONLY)
            got = read_record(fd, ref)
            if got is None:
                spool.quarantine(segment_path(spool.logs_dir, ref.listener, ref.segment), b"",
                                 f"record at offset {ref.offset} fails its checksum")
                continue
            batcher.add(part, got.received_at, got.tenant, got.lines)
            for batch in batcher.take_ready():
                delivery.deliver(delivery.cut(batch, own), own, batch.body())
        for batch in batcher.take_all():
            delivery.deliver(delivery.cut(batch, own), own, batch.body())
    finally:
        for fd in fds.values():
            os.close(fd)
    logs.collect(lock)
    for journal in [*journals, own]:
        journal.compact()
        journal.remove_if_empty()
    if not spool.has_logged_data() and not config.spool.on_disk:
        spool.clear_logs_root()


def replay_dead_letters(spool: Spool, delivery: Delivery) -> tuple[int, int]:
    """Send each dead letter to its own key; returns (sent, refused again)."""
    sent = failed = 0
    for path in spool.dead_letters():
        found = spool.read_dead_letter(path)
        if found is None:
            spool.quarantine(path, path.read_bytes(), "damaged dead letter: its checksums fail")
            path.unlink(missing_ok=True)
            failed += 1
            continue
        meta, body = found
        key, encoding = meta["key"], meta["encoding"]
        data = delivery.encode(body, encoding, meta.get("level", 6))
        try:
            delivery.put_object(key, data, formats.content_encoding(encoding), meta["count"])
        except PermanentSinkError as e:
            log.error("%s: refused again (%s); left in place", path, e)
            failed += 1
            continue
        path.unlink(missing_ok=True)
        delivery.row.add(UploaderField.UPLOADED_PAYLOADS, meta["count"])
        delivery.row.add(UploaderField.UPLOADED_OBJECTS)
        sent += 1
        log.info("replayed dead letter %s to %s", path.name, key)
    return sent, failed

