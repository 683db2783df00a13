"""An uploader's journal: what it is about to write to the sink, and what became of it.

Before every PUT the uploader appends an INTENT record: the object's key, how it is encoded,
and its parts (which payload lines of which logged requests, in order). The object's bytes are
a pure function of the intent and the logs (deterministic gzip), so an intent left without an
outcome by a crash is sent again to the *same key with the same bytes*: it overwrites itself
instead of adding a copy. After the PUT, its parts are recorded as landed beside the log
segments (which is what lets the listeners delete them), and only then does LANDED (or DEAD,
once the object is safe in the dead-letter spool) close the intent: a crash in between leaves
an open intent, never landed parts that nothing records.

Files: `journals/<uploader>/<n>.jnl`, one writer each. A process never appends to a file of its
predecessor (whose tail may be torn): recovery cuts the torn tail and the new process starts
file n + 1. A file is deleted once every intent in it has an outcome and every older file is
gone. An intent whose log segment is already gone has landed (a segment is deleted only after
every part of it landed), so recovery closes it without sending it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .records import Kind, frame, scan
from .requestlog import Part

log = logging.getLogger(__name__)

ROTATE_BYTES = 1 << 20


@dataclass(frozen=True)
class Intent:
    id: str
    key: str
    encoding: str | None  # Content-Encoding of the object: "gzip" or None
    level: int  # gzip level (kept so a re-send makes the same bytes whatever the config says now)
    parts: tuple[Part, ...]
    count: int  # payloads
    size: int  # bytes of the uncompressed body
    oldest: float  # earliest received_at

    def to_json(self) -> bytes:
        return orjson.dumps({"id": self.id, "key": self.key, "encoding": self.encoding, "level": self.level,
                             "parts": [list(p) for p in self.parts], "count": self.count, "size": self.size,
                             "oldest": self.oldest})

    @classmethod
    def from_json(cls, raw: bytes | memoryview) -> Intent:
        d = orjson.loads(raw)
        return cls(d["id"], d["key"], d["encoding"], d["level"], tuple(Part(*p) for p in d["parts"]),
                   d["count"], d["size"], d["oldest"])


@dataclass
class _File:
    number: int
    path: Path
    open_intents: set[str] = field(default_factory=set)


class Journal:
    """The journal folder of one uploader index (its own, or an orphan it adopted)."""

    def __init__(self, directory: Path, fsync: str) -> None:
        self.dir = directory
        self.fsync = fsync  # always | interval | never | none
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the main thread writes intents, the sender outcomes
        self._files: list[_File] = []
        self._where: dict[str, _File] = {}  # open intent id -> its file
        self._fd = -1
        self._size = 0
        self._dirty = False
        self._next = 1

    # -- recovery ----------------------------------------------------------------------------
    def recover(self) -> list[Intent]:
        """Read every file (cutting a torn tail), return the intents without an outcome."""
        intents: dict[str, Intent] = {}
        done: set[str] = set()
        for path in sorted(self.dir.glob("*.jnl"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            if not path.stem.isdigit():
                continue
            data = path.read_bytes()
            result = scan(data)
            if result.good_end < len(data):
                log.warning("%s: torn tail of %d bytes cut", path, len(data) - result.good_end)
                os.truncate(path, result.good_end)
            if result.damaged:
                log.error("%s: %d damaged ranges skipped", path, len(result.damaged))
            f = _File(int(path.stem), path)
            self._files.append(f)
            self._next = max(self._next, f.number + 1)
            for rec in result.records:
                if rec.kind is Kind.INTENT:
                    intent = Intent.from_json(rec.body)
                    intents[intent.id] = intent
                    f.open_intents.add(intent.id)
                    self._where[intent.id] = f
                elif rec.kind in (Kind.LANDED, Kind.DEAD):
                    done.add(bytes(rec.body).decode())
        for intent_id in done:
            self._resolve(intent_id)
        self.compact()
        return [i for i in intents.values() if i.id not in done]

    # -- writing -------------------------------------------------------------------------------
    def _append(self, kind: Kind, body: bytes) -> None:
        if self._fd < 0 or self._size >= ROTATE_BYTES:
            self._rotate()
        data = frame(kind, body)
        n = os.write(self._fd, data)
        self._size += n
        if n != len(data):
            # the rest would follow a torn record: start a new file, and let the caller see the error
            self._rotate()
            raise OSError(28, "short write to the uploader journal")
        if self.fsync == "always":
            os.fdatasync(self._fd)
        else:
            self._dirty = True

    def _rotate(self) -> None:
        if self._fd >= 0:
            if self.fsync in ("always", "interval"):
                os.fdatasync(self._fd)
            os.close(self._fd)
        path = self.dir / f"{self._next}.jnl"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._files.append(_File(self._next, path))
        self._next += 1
        self._size = 0

    def intend(self, intent: Intent) -> None:
        """Durable (per the fsync policy) before the PUT: raises OSError if it cannot be written."""
        with self._lock:
            self._append(Kind.INTENT, intent.to_json())
            f = self._files[-1]
            f.open_intents.add(intent.id)
            self._where[intent.id] = f

    def close_intent(self, intent_id: str, dead: bool = False) -> None:
        with self._lock:
            self._append(Kind.DEAD if dead else Kind.LANDED, intent_id.encode())
            self._resolve(intent_id)

    def _resolve(self, intent_id: str) -> None:
        f = self._where.pop(intent_id, None)
        if f is not None:
            f.open_intents.discard(intent_id)

    def sync(self) -> None:
        """The "interval" policy's periodic flush."""
        with self._lock:
            if self._dirty and self._fd >= 0 and self.fsync == "interval":
                os.fdatasync(self._fd)
            self._dirty = False

    def compact(self) -> None:
        """Delete the oldest files while every intent in them has an outcome."""
        with self._lock:
            # the last file is the one being written, unless this process has written nothing yet
            while self._files and not self._files[0].open_intents and (self._fd < 0 or len(self._files) > 1):
                self._files.pop(0).path.unlink(missing_ok=True)

    @property
    def open_count(self) -> int:
        return len(self._where)

    def remove_if_empty(self) -> bool:
        """For an adopted orphan folder: once nothing is open, delete it whole."""
        with self._lock:
            if self._where:
                return False
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            for f in self._files:
                f.path.unlink(missing_ok=True)
            self._files.clear()
            try:
                self.dir.rmdir()
            except OSError:
                pass
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                if self.fsync in ("always", "interval"):
                    os.fdatasync(self._fd)
                os.close(self._fd)
                self._fd = -1


def read_all_intents(journals_dir: Path) -> list[Intent]:
    """Every intent in every journal (with or without an outcome): what a re-index must not
    put on the queue again. Torn and damaged records are skipped, files that vanish too."""
    out: list[Intent] = []
    for path in sorted(journals_dir.glob("*/*.jnl")):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for rec in scan(data).records:
            if rec.kind is Kind.INTENT:
                out.append(Intent.from_json(rec.body))
    return out
