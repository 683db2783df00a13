"""Delivery: one object from intent to outcome. Used by uploaders and `ingestd replay` alike.

`Delivery.cut` turns a batch into an `Intent` (key from the batch's partition folder, its oldest
payload and a fresh id) and journals it; `Delivery.deliver` encodes the object (formats.py: the
same intent always gives the same NDJSON bytes), puts it with exponential backoff and full jitter until it lands
or the deadline passes, and records the outcome: LANDED, or DEAD once a permanent refusal has
been written to the dead-letter spool. Either way the parts are then recorded as landed beside
their log segments, which lets the listeners delete them. A refusal the sink gives no known
meaning to (UncertainSinkError: an S3 code ingestd does not know) is retried too, but only
UNCERTAIN_ATTEMPTS times for the object: the last one counts as permanent, and the dead letter
keeps it (code and message) as its reason.

What cannot be recorded (a full disk under the journal or the dead-letter spool, the spool
cap) is retried like a sink error: nothing is ever dropped, and meanwhile the queue fills and
the daemon answers 503.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from . import formats
from .batching import Batch
from .config import Config
from .errors import (
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
    UncertainSinkError,
)
from .histograms import DeliveryHistograms
from .journal import Intent, Journal
from .requestlog import Part, append_landed, read_parts
from .scoreboard import Row, UploaderField, now_ms
from .sinks import KeyMaker, Sink
from .spool import Spool

log = logging.getLogger(__name__)

# How many uncertain refusals (UncertainSinkError) one object gets, counted over all the attempts
# of one `put_object` call (other failures in between do not reset it), before it is dead-lettered.
# A module constant, not a config key: the dead letter keeps the reason and `ingestd replay` sends it.
UNCERTAIN_ATTEMPTS = 5


class DeadlineReached(Exception):
    """The drain deadline passed before the object landed: it stays in the logs and journal."""


class Delivery:
    def __init__(self, name: str, sink: Sink, spool: Spool, encoding: str | None, level: int,
                 retry_base_ms: int, retry_max_ms: int, row: Row, deadline_ms: Callable[[], int],
                 sleep: Callable[[float], None] = time.sleep, alive: Callable[[], None] = lambda: None,
                 columns: tuple[tuple[str, str], ...] = (), host: str | None = None) -> None:
        self.name = name  # "uploader 1", "replay": for log lines
        self.sink = sink
        self.spool = spool
        self.encoding = encoding  # formats.py: of objects cut from now on
        self.level = level
        self.columns = columns  # Parquet's typed columns
        self.keys = KeyMaker(formats.extension(encoding), host)
        self.stored_ratio = 0.0  # stored / uncompressed size of recent objects (a moving average; 0: none yet)
        self.retry_base_ms = retry_base_ms
        self.retry_max_ms = retry_max_ms
        self.row = row
        self.deadline_ms = deadline_ms  # 0: none
        self.sleep = sleep
        self.alive = alive  # heartbeat while waiting
        self.histograms = DeliveryHistograms.detached()  # run_uploader gives it its scoreboard row's

    @classmethod
    def for_config(cls, name: str, config: Config, sink: Sink, spool: Spool, row: Row,
                   deadline_ms: Callable[[], int], alive: Callable[[], None] = lambda: None) -> Delivery:
        """The delivery of the objects this config cuts (uploaders and `replay`)."""
        b, s = config.batch, config.sink
        level = b.zstd_level if b.compression == "zstd" else b.gzip_level
        return cls(name, sink, spool, formats.encoding_of(b.format, b.compression), level, s.retry_base_ms,
                   s.retry_max_ms, row, deadline_ms=deadline_ms, alive=alive, columns=b.parquet_columns)

    def cut(self, batch: Batch, journal: Journal) -> Intent:
        """The intent of `batch`, journaled (raises OSError when the journal cannot be written)."""
        intent_id = secrets.token_hex(8)
        intent = Intent(intent_id, self.keys.key(batch.folder, batch.oldest, intent_id), self.encoding, self.level,
                        batch.parts, batch.count, batch.size, batch.oldest)
        journal.intend(intent)
        self.histograms.cut(intent_id, [(p.received_at, p.part.count) for p in batch.pieces])
        return intent

    def encode(self, body: bytes, encoding: str | None, level: int) -> bytes:
        """The object's stored bytes (formats.py)."""
        data = formats.encode(body, encoding, level, self.columns)
        if body:
            ratio = len(data) / len(body)
            self.stored_ratio = 0.5 * (self.stored_ratio or ratio) + 0.5 * ratio
        return data

    def deliver(self, intent: Intent, journal: Journal, body: bytes | None = None) -> bool:
        """Put the object of `intent` and record the outcome. `body` is read back from the logs
        when not given (a re-send). Returns True once the outcome is recorded; raises
        DeadlineReached when the deadline passes first."""
        count = intent.count
        if body is None:
            rebuilt = read_parts(self.spool.logs_dir, intent.parts)
            if rebuilt is None:
                # a segment of it is gone: segments are deleted only once every part landed,
                # so this object landed before the crash that left its intent open; what of it
                # was not yet recorded as landed (in the segments still there) is recorded now
                self._close(intent, journal)
                return True
            if rebuilt.damaged and self._damaged(intent, rebuilt.damaged):
                self._close(intent, journal)  # it landed whole before the crash
                return True
            body, count = rebuilt.body, rebuilt.count
            self.row.add(UploaderField.RESENT_OBJECTS)
            log.info("%s: sending %s again (%d payloads, left open by an earlier process)", self.name, intent.key,
                     count)
        data = self.encode(body, intent.encoding, intent.level)
        try:
            self.put_object(intent.key, data, formats.content_encoding(intent.encoding), count)
        except PermanentSinkError as e:
            self._dead_letter(intent, journal, body, count, str(e))
            return True
        self._close(intent, journal)
        self.histograms.landed(intent.id, intent.oldest, count, len(data))
        self.row.add(UploaderField.UPLOADED_PAYLOADS, count)
        self.row.add(UploaderField.UPLOADED_OBJECTS)
        self.row[UploaderField.LAST_OK_MS] = now_ms()
        log.debug("%s: wrote %s (%d payloads, %d bytes)", self.name, intent.key, count, len(data))
        return True

    def _damaged(self, intent: Intent, damaged: list[Part]) -> bool:
        """Parts of an open intent fail their checksum: the object cannot be rebuilt as it was.
        If it landed before the crash, it is whole in the sink: True. If not, the caller sends
        what can be rebuilt to the same key (never to a new one: no duplicates)."""
        self.row.add(UploaderField.DAMAGED_RECORDS, len(damaged))
        self.spool.quarantine(Path(intent.key), intent.to_json(),
                              f"parts fail their checksum and cannot be sent again: {[list(p) for p in damaged]}")
        try:
            return self.sink.exists(intent.key)
        except SinkError as e:
            log.error("%s: cannot tell whether %s landed (%s): sending what is left of it", self.name, intent.key, e)
            return False

    def put_object(self, key: str, data: bytes, encoding: str | None, count: int) -> None:
        """Put with exponential backoff and full jitter on retryable errors, until the deadline.
        Raises PermanentSinkError on a permanent refusal, and on the UNCERTAIN_ATTEMPTS-th
        uncertain one (its message then says how many attempts were made)."""
        attempt = uncertain = 0
        while True:
            started = self.histograms.clock_ns()
            try:
                self.sink.put(key, data, encoding)
                self.histograms.put(True, started)
                return
            except RetryableSinkError as e:
                self.histograms.put(False, started)
                self.row.add(UploaderField.FAILED_UPLOADS)
                self.row[UploaderField.LAST_FAIL_MS] = now_ms()
                if isinstance(e, UncertainSinkError):
                    uncertain += 1
                    if uncertain >= UNCERTAIN_ATTEMPTS:
                        raise PermanentSinkError(f"{e} (refused {uncertain} times with an error of unknown meaning; "
                                                 f"giving up)") from e
                attempt += 1
                delay = self._backoff(attempt)
                log.warning("%s: upload of %s failed (attempt %d, %d payloads), retrying in %.2fs: %s",
                            self.name, key, attempt, count, delay, e)
                self._wait(delay)
            except PermanentSinkError:
                self.histograms.put(False, started)
                self.row.add(UploaderField.FAILED_UPLOADS)
                self.row[UploaderField.LAST_FAIL_MS] = now_ms()
                raise

    def _dead_letter(self, intent: Intent, journal: Journal, body: bytes, count: int, reason: str) -> None:
        def write() -> None:
            with self.spool.dead_letter_guard():  # the check and the write, one process at a time
                used = self.spool.used_bytes()
                # besides the body: its metadata (the key twice, with the reason) and two frames
                if used + len(body) + 2 * len(intent.key) + len(reason) + 256 > self.spool.config.max_bytes:
                    raise OSError(28, f"spool.max_bytes reached ({used} of {self.spool.config.max_bytes} bytes used)")
                path = self.spool.write_dead_letter(intent.key, intent.encoding, intent.level, count, body,
                                                    f"{intent.key}: {reason}")
            log.error("%s: sink refused %s for good (%s); %d payloads dead-lettered to %s", self.name, intent.key,
                      reason, count, path)

        self._retry(write, intent, "dead letter", blocked=True)
        self._close(intent, journal, dead=True)
        self.row.add(UploaderField.DEAD_LETTERED_PAYLOADS, count)

    def _close(self, intent: Intent, journal: Journal, dead: bool = False) -> None:
        """Record the parts as landed beside their segments, THEN close the intent. In this order
        a crash in between leaves an open intent, which is sent again to its own key (or, its
        segments gone, closed without a PUT): never parts that landed and that nothing records,
        which a re-index would put back on the queue."""
        self._retry(lambda: append_landed(self.spool.logs_dir, list(intent.parts)), intent, "landed record")
        self._retry(lambda: journal.close_intent(intent.id, dead=dead), intent, "journal")

    def _retry(self, action: Callable[[], object], intent: Intent, what: str, blocked: bool = False) -> None:
        """Run a local write until it succeeds (disk full heals; the deadline ends the wait)."""
        attempt = 0
        while True:
            try:
                action()
                if blocked:
                    self.row[UploaderField.DEAD_LETTER_BLOCKED] = 0
                return
            except OSError as e:
                attempt += 1
                if blocked:
                    self.row[UploaderField.DEAD_LETTER_BLOCKED] = 1
                delay = self._backoff(attempt)
                log.error("%s: cannot write the %s of %s (%s); retrying in %.2fs", self.name, what, intent.key, e, delay)
                self._wait(delay)

    def _backoff(self, attempt: int) -> float:
        cap = min(self.retry_max_ms, self.retry_base_ms * 2 ** min(attempt - 1, 30)) / 1000.0
        return random.uniform(0, cap)

    def _wait(self, delay: float) -> None:
        """Sleep between retries, heartbeating; give up at the deadline."""
        end = time.monotonic() + delay
        while True:
            self.alive()
            deadline = self.deadline_ms()
            if deadline and now_ms() >= deadline:
                raise DeadlineReached()
            left = end - time.monotonic()
            if left <= 0:
                return
            self.sleep(min(left, 0.1))
