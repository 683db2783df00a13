"""What travels through ingestd: queue items, their NDJSON envelope lines, and the spool file format.

One `Item` per accepted request. The request handler turns the validated payloads into the
final NDJSON lines at once, so an uploader only concatenates bytes: nothing is parsed or
serialized twice.

Spool files (in-flight batches, dead letters, drain overflow, journal) are sequences of framed
records: a fixed header (magic, lengths, receive time, CRC-32) and the item's lines. A reader
stops at the first torn or corrupt record, which is what a process killed mid-write leaves.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple

import orjson


class Item(NamedTuple):
    seq: int  # order of admission in this supervisor run; 0 for items read back from a spool
    received_at: float  # seconds since the epoch, when the request was accepted
    count: int  # payloads (lines) in `lines`
    lines: bytes  # NDJSON envelope lines, each ending in b"\n"
    producer: int = 0  # which listener put it (its seq numbers are that listener's own)


STOP = Item(-1, 0.0, 0, b"")  # sentinel put on the queue once per uploader at drain


def rfc3339_ms(t: float) -> str:
    """2026-11-28T03:04:05.123Z: UTC, exactly three fraction digits."""
    ms = int(t * 1000)
    secs, frac = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:03d}Z"


def exact_dumps(value: Any) -> bytes:
    """The standard library's serializer: slower, but keeps integers beyond 64 bits exact."""
    return json.dumps(value, separators=(",", ":")).encode()


def encode_lines(received_at: float, version: str | None, payloads: Sequence[dict[str, Any]],
                 dumps: Callable[[Any], bytes] = orjson.dumps) -> bytes:
    """The object lines of one request: {"received_at", "version", "payload"} per payload."""
    head = b'{"received_at":"' + rfc3339_ms(received_at).encode() + b'","version":' + orjson.dumps(version) + b',"payload":'
    return b"".join([head + dumps(p) + b"}\n" for p in payloads])


# magic, length of lines, payload count, received_at, crc32 of lines
_HEADER = struct.Struct("<4sIIdI")
_MAGIC = b"IGD1"


def frame(item: Item) -> bytes:
    return _HEADER.pack(_MAGIC, len(item.lines), item.count, item.received_at, zlib.crc32(item.lines)) + item.lines


def write_records(f: BinaryIO, items: Sequence[Item]) -> None:
    f.write(b"".join(frame(i) for i in items))


def read_records(f: BinaryIO) -> Iterator[Item]:
    """Yield the whole records of a spool file; stop quietly at a torn or corrupt tail."""
    start = f.tell()
    size = f.seek(0, 2)
    f.seek(start)
    while True:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        magic, length, count, received_at, crc = _HEADER.unpack(header)
        if magic != _MAGIC or length > size - f.tell():  # a damaged length must not allocate GiBs
            return
        lines = f.read(length)
        if len(lines) < length or zlib.crc32(lines) != crc:
            return
        yield Item(0, received_at, count, lines)


def split_lines(item: Item, first: int) -> tuple[Item, Item]:
    """Cut an item after its `first` lines (0 < first < count)."""
    pos = -1
    for _ in range(first):
        pos = item.lines.index(b"\n", pos + 1)
    head, tail = item.lines[: pos + 1], item.lines[pos + 1 :]
    return item._replace(count=first, lines=head), item._replace(count=item.count - first, lines=tail)


def first_lines_within(item: Item, max_bytes: int) -> int:
    """How many leading lines of `item` fit in `max_bytes` (0 when even the first does not)."""
    n, pos = 0, 0
    while n < item.count:
        nxt = item.lines.index(b"\n", pos) + 1
        if nxt > max_bytes:
            break
        n, pos = n + 1, nxt
    return n
