"""Sinks: where finished objects go. The `Sink` protocol, the key layout, and the directory sink.

Keys are `<folder>/<name><extension>`: the folder is the object's partition, rendered from
`sink.key_template` (partitions.py; by default `<prefix>/dt=YYYY-MM-DD/hour=HH`, UTC), the
extension says its format (formats.py). The name is the time, the host name and the intent's id (64 random bits drawn when the object is
first cut): unique across hosts, processes and restarts, so two objects never share a key, and
fixed by the intent, so the re-send of an object after a crash lands on its own key.

The S3 sink lives in `s3sink.py`, the one module that imports boto3.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import time
from typing import Protocol

from .config import SinkConfig
from .errors import PermanentSinkError, RetryableSinkError


class Sink(Protocol):
    def put(self, key: str, body: bytes, content_encoding: str | None) -> None:
        """Store one object; raise RetryableSinkError or PermanentSinkError."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key` (raise RetryableSinkError when it cannot tell)."""

    def describe(self) -> str:
        """Where objects go, for log lines."""


def _safe_host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:63] or "host"


class KeyMaker:
    """Builds object keys from an object's folder, oldest receive time and intent id."""

    def __init__(self, extension: str, host: str | None = None) -> None:
        self.extension = extension
        self.host = host or _safe_host()

    def key(self, folder: str, t: float, intent_id: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f"{int(t * 1000) % 1000:03d}Z"
        name = f"{stamp}-{self.host}-{intent_id}{self.extension}"
        return f"{folder}/{name}" if folder else name


# errno values that will not heal by waiting: retrying them only delays the dead letter
_PERMANENT_ERRNO = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


class DirectorySink:
    """Objects as files under a root folder: written to a hidden temp file, then renamed."""

    def __init__(self, root: str, fsync: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.fsync = fsync

    def describe(self) -> str:
        return f"directory {self.root}"

    def exists(self, key: str) -> bool:
        return os.path.isfile(os.path.join(self.root, *key.split("/")))

    def put(self, key: str, body: bytes, content_encoding: str | None) -> None:
        path = os.path.join(self.root, *key.split("/"))
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            if self.fsync:  # the rename itself survives a power cut once the folder is synced
                dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            kind = PermanentSinkError if e.errno in _PERMANENT_ERRNO else RetryableSinkError
            raise kind(f"cannot write {path}: {e.strerror or e}") from e


def build_sink(config: SinkConfig) -> Sink:
    """Called inside each uploader process: every process owns its own client."""
    if config.kind == "s3":
        from .s3sink import S3Sink  # boto3 is imported only where it is used

        return S3Sink(config)
    return DirectorySink(config.path, fsync=config.fsync)
