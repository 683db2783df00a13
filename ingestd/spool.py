"""The spool: where everything acknowledged and not yet in the sink lives, and who owns what.

Two roots. The *logs root* holds the request logs and the uploader journals: on tmpfs with
`spool.durability = "memory"` (`spool.memory_path`), in `spool.path` with `"disk"`:
- `logs/<listener>/<segment>.log`: a listener's request log (`requestlog.py`), and beside each
  segment its `.landed` file, to which uploaders append what of it has landed;
- `journals/<uploader>/<n>.jnl`: an uploader's intents and outcomes (`journal.py`).

`spool.path` holds the rest:
- `.lock`: held (flock) by the running daemon, so two daemons never share a spool;
  `.replay.lock` likewise for `ingestd replay`;
- `locks/<role>-<index>.lock`: held by each child process for its life. A new daemon takes and
  drops each of them before it starts any child, so it never runs beside a child of an earlier
  daemon that is still dying;
- `dead/*.dead`: objects the sink refused for good, with their key (`ingestd replay` sends them);
- `quarantine/`: damaged bytes found in log files, kept for inspection;
- `overflow/`: with memory durability, the logs root copied to disk by a drain that could not
  deliver everything, so that it survives a reboot; moved back at the next start.

Every file is written by one owner, and files appear by atomic rename where readers may see them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from collections.abc import Iterator
from typing import IO, Any

import orjson

from .config import SpoolConfig
from .errors import SpoolLockedError
from .records import Kind, frame, scan

log = logging.getLogger(__name__)

OVERFLOW_COMPLETE = ".complete"


def write_atomically(path: Path, data: bytes, fsync: bool = True) -> None:
    """A hidden temp file in the same folder, then a rename: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_bytes(root: Path) -> int:
    """Bytes of every file under `root` (files vanishing meanwhile are skipped)."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    total += e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return total


class Lock:
    """An flock held for the life of the process (the kernel drops it at any exit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[bytes] | None = None

    def acquire(self, timeout: float = 0.0) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "ab")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._f = f
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.close()
                    return False
                time.sleep(0.05)

    def release(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Spool:
    def __init__(self, config: SpoolConfig) -> None:
        self.config = config
        self.root = Path(config.path)
        self.logs_root = Path(config.logs_root())
        self.dead_dir = self.root / "dead"
        self.quarantine_dir = self.root / "quarantine"
        self.overflow_dir = self.root / "overflow"
        self.locks_dir = self.root / "locks"
        self._daemon_lock = Lock(self.root / ".lock")

    def prepare(self) -> None:
        for d in (self.dead_dir, self.quarantine_dir, self.locks_dir, self.logs_dir, self.journals_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def logs_dir(self) -> Path:
        return self.logs_root / "logs"

    @property
    def journals_dir(self) -> Path:
        return self.logs_root / "journals"

    def listener_dir(self, index: int) -> Path:
        return self.logs_dir / str(index)

    def journal_dir(self, name: str) -> Path:
        return self.journals_dir / name

    def indexes(self, parent: Path) -> list[int]:
        """Numbered subfolders of `parent` (listener log dirs, uploader journal dirs)."""
        try:
            return sorted(int(p.name) for p in parent.iterdir() if p.is_dir() and p.name.isdigit())
        except FileNotFoundError:
            return []

    # -- ownership ------------------------------------------------------------------------------
    def lock_daemon(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._daemon_lock.acquire():
            raise SpoolLockedError(f"spool {self.root} is in use by another ingestd process")

    @contextlib.contextmanager
    def dead_letter_guard(self) -> Iterator[None]:
        """Held while one process checks the spool cap and writes a dead letter, so that two
        uploaders (or an uploader and `ingestd replay`) cannot both pass the check and together
        go over it. A `flock` (not `*.lock`: that glob is the child locks), dropped by the kernel
        if its holder dies."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks_dir / "dead-letters", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def child_lock(self, name: str) -> Lock:
        return Lock(self.locks_dir / f"{name}.lock")

    def wait_for_old_children(self, timeout: float) -> list[str]:
        """Take and drop every child lock: returns the names still held by someone at `timeout`."""
        held = []
        deadline = time.monotonic() + timeout
        for path in sorted(self.locks_dir.glob("*.lock")):
            lock = Lock(path)
            if lock.acquire(max(0.0, deadline - time.monotonic())):
                lock.release()
            else:
                held.append(path.stem)
        return held

    # -- usage -----------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """What `spool.max_bytes` counts: every file under spool.path."""
        return tree_bytes(self.root)

    # -- dead letters ------------------------------------------------------------------------------
    def write_dead_letter(self, key: str, encoding: str | None, level: int, count: int, body: bytes,
                          reason: str) -> Path:
        """The object as it would have been sent (uncompressed lines), with its key."""
        self.dead_dir.mkdir(parents=True, exist_ok=True)
        meta = orjson.dumps({"key": key, "encoding": encoding, "level": level, "count": count, "reason": reason})
        # a bounded name (keys may be up to 1,024 bytes), the same for the same key
        path = self.dead_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".dead")
        write_atomically(path, frame(Kind.INTENT, meta) + frame(Kind.REQUEST, body), fsync=True)
        return path

    def read_dead_letter(self, path: Path) -> tuple[dict[str, Any], bytes] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        found = scan(data).records
        if len(found) != 2 or found[0].kind is not Kind.INTENT:
            return None
        return orjson.loads(found[0].body), bytes(found[1].body)

    def dead_letters(self) -> list[Path]:
        return sorted(self.dead_dir.glob("*.dead"))

    # -- quarantine ------------------------------------------------------------------------------
    def quarantine(self, source: Path, data: bytes, why: str) -> Path:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        path = self.quarantine_dir / f"{int(time.time())}-{secrets.token_hex(4)}-{source.name}"
        write_atomically(path, data, fsync=False)
        write_atomically(path.with_name(path.name + ".why"), f"{source}: {why}\n".encode(), fsync=False)
        log.error("damaged bytes in %s (%s): kept in %s", source, why, path)
        return path

    # -- memory durability: overflow to disk at a drain, back at the next start -------------------
    def has_logged_data(self) -> bool:
        """Any request log segment left in the logs root."""
        return any(self.logs_dir.glob("*/*.log"))

    def save_overflow(self) -> int:
        """Copy the logs root to spool.path/overflow (fsynced), then empty it. Returns bytes."""
        if self.config.on_disk or not self.has_logged_data():
            return 0
        tmp = self.root / f".overflow.{secrets.token_hex(4)}"
        shutil.rmtree(self.overflow_dir, ignore_errors=True)
        shutil.copytree(self.logs_root, tmp, ignore=shutil.ignore_patterns(".*.tmp"))
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
        (tmp / OVERFLOW_COMPLETE).write_bytes(b"")
        os.rename(tmp, self.overflow_dir)
        fsync_dir(self.root)
        size = tree_bytes(self.overflow_dir)
        self.clear_logs_root()
        return size

    def restore_overflow(self) -> int:
        """At start: move a complete overflow back into the logs root. Returns bytes."""
        if not (self.overflow_dir / OVERFLOW_COMPLETE).exists():
            shutil.rmtree(self.overflow_dir, ignore_errors=True)  # a copy that never finished: the logs root is whole
            return 0
        size = tree_bytes(self.overflow_dir)
        if self.config.on_disk:
            target = self.root
        else:
            target = self.logs_root
            self.clear_logs_root()
        for sub in ("logs", "journals"):
            src = self.overflow_dir / sub
            if src.is_dir():
                shutil.copytree(src, target / sub, dirs_exist_ok=True)
        shutil.rmtree(self.overflow_dir)
        return size

    def clear_logs_root(self) -> None:
        shutil.rmtree(self.logs_dir, ignore_errors=True)
        shutil.rmtree(self.journals_dir, ignore_errors=True)
        if not self.config.on_disk:
            try:
                self.logs_root.rmdir()
            except OSError:
                pass

