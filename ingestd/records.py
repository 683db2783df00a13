"""What travels through ingestd on disk: envelope lines, and the checksummed record framing
that every log, journal and spool file uses.

The request handler turns the validated payloads of a request into their final NDJSON lines
at once (`encode_lines`), so nothing downstream parses or serializes a payload again: an
uploader only concatenates bytes.

Framing: every file ingestd writes and reads back (request logs, uploader journals, dead
letters) is a sequence of records `header | body`, the header holding a magic number, the
record's kind, the body's length and a CRC-32 over the header fields and the body. `scan`
reads a file back and trusts nothing: a record whose checksum fails is either a *torn tail*
(nothing valid follows it: what a process killed mid-write, a full disk or a power cut
leaves) or *damage* (a valid record follows it). Torn tails are cut by whoever recovers the
file and nothing is ever appended after one; damaged ranges are skipped and reported, and the
valid records around them are kept.
"""

from __future__ import annotations

import enum
import json
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import orjson


def rfc3339_ms(t: float) -> str:
    """2026-11-28T03:04:05.123Z: UTC, exactly three fraction digits."""
    ms = int(t * 1000)
    secs, frac = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:03d}Z"


def exact_dumps(value: Any) -> bytes:
    """The standard library's serializer: slower, but keeps integers beyond 64 bits exact."""
    return json.dumps(value, separators=(",", ":")).encode()


# orjson turns integers beyond 64 bits into floats without a word. A run of 20+ digits (19
# after a minus) is the only way to write one, so only bodies holding such a run are parsed a
# second time, by the standard library, which keeps every integer exact. The run is looked for
# in a copy where every digit is "0" and every other byte but "-" a space: two substring
# searches, ~2 ms a MiB (a regular expression took ~40).
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else b if b == 0x2D else 0x20 for b in range(256))
_RUN_20, _MINUS_RUN_19 = b"0" * 20, b"-" + b"0" * 19
def needs_exact(decoded: bytes) -> bool:
    """Does the body hold a run of digits that may be an integer beyond 64 bits?"""
    masked = decoded.translate(_DIGITS)
    return _RUN_20 in masked or _MINUS_RUN_19 in masked


def encode_lines(received_at: float, version: str | None, payloads: Sequence[dict[str, Any]],
                 dumps: Callable[[Any], bytes] = orjson.dumps) -> bytes:
    """The object lines of one request: {"received_at", "version", "payload"} per payload."""
    head = b'{"received_at":"' + rfc3339_ms(received_at).encode() + b'","version":' + orjson.dumps(version) + b',"payload":'
    return b"".join([head + dumps(p) + b"}\n" for p in payloads])


_VERSION_AT = len(b'{"received_at":"') + 24 + len(b'","version":')  # where `encode_lines` puts the version
_PAYLOAD_MARK = b',"payload":'  # never inside the version: a quote in a JSON string is escaped


def line_fields(line: bytes) -> tuple[bytes, bytes, bytes]:
    """(received_at text, version JSON, payload JSON) of one stored line, newline or not:
    cut at the places `encode_lines` wrote them, nothing parsed."""
    end = len(line) - (2 if line.endswith(b"\n") else 1)
    mark = line.index(_PAYLOAD_MARK, _VERSION_AT)
    return line[16:_VERSION_AT - 12], line[_VERSION_AT:mark], line[mark + len(_PAYLOAD_MARK) : end]


def slice_lines(lines: bytes, first: int, count: int) -> bytes:
    """Lines `first` .. `first + count` of a block of newline-terminated lines."""
    start = 0
    for _ in range(first):
        start = lines.index(b"\n", start) + 1
    end = start
    for _ in range(count):
        end = lines.index(b"\n", end) + 1
    return lines[start:end]


def lines_within(lines: bytes, max_bytes: int, most: int) -> int:
    """How many leading lines (at most `most`) fit in `max_bytes` (0 when even the first does not)."""
    n, pos = 0, 0
    while n < most:
        nxt = lines.index(b"\n", pos) + 1
        if nxt > max_bytes:
            break
        n, pos = n + 1, nxt
    return n


class Kind(enum.IntEnum):
    REQUEST = 1  # request log: one accepted request (received_at, count, lines)
    CANCEL = 2  # request log: a request appended and then refused (its offset)
    INTENT = 3  # uploader journal: an object about to be written (key, parts)
    LANDED = 4  # uploader journal: that object is in the sink
    DEAD = 5  # uploader journal: that object went to the dead-letter spool


MAGIC = 0x4947  # b"GI" on disk
# magic, kind, flags (FLAG_TENANT), body length, crc32 of the first 8 header bytes and the body
HEADER = struct.Struct("<HBBII")
_MAGIC_BYTES = struct.pack("<H", MAGIC)
_REQUEST = struct.Struct("<dI")  # received_at, payload count; the lines follow
RECORD_OVERHEAD = HEADER.size + _REQUEST.size  # what a request's record adds to its lines
# header flag of a REQUEST record whose tenant is not `default`: one length byte and the
# tenant's name (ASCII, at most 64 bytes) sit between the count and the lines
FLAG_TENANT = 0x01
DEFAULT_TENANT = "default"


def frame(kind: Kind, body: bytes) -> bytes:
    head = struct.pack("<HBBI", MAGIC, kind, 0, len(body))
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def request_record(received_at: float, count: int, lines: bytes, tenant: bytes = b"") -> bytes:
    """`frame(Kind.REQUEST, ...)` without copying the lines twice (it runs once per request).
    `tenant`: the tenant's name, empty for `default` (records of older versions have none)."""
    body_head = _REQUEST.pack(received_at, count)
    flags = 0
    if tenant:
        body_head += bytes((len(tenant),)) + tenant
        flags = FLAG_TENANT
    head = struct.pack("<HBBI", MAGIC, Kind.REQUEST, flags, len(body_head) + len(lines))
    crc = zlib.crc32(lines, zlib.crc32(body_head, zlib.crc32(head)))
    return b"".join((head, struct.pack("<I", crc), body_head, lines))


class Request(NamedTuple):
    received_at: float
    count: int  # type: ignore[assignment]
    lines: bytes
    tenant: str = DEFAULT_TENANT


def parse_request(body: bytes | memoryview, flags: int = 0) -> Request:
    received_at, count = _REQUEST.unpack_from(body)
    if not flags & FLAG_TENANT:
        return Request(received_at, count, bytes(body[_REQUEST.size :]))
    n = body[_REQUEST.size]
    start = _REQUEST.size + 1
    return Request(received_at, count, bytes(body[start + n :]), bytes(body[start : start + n]).decode("ascii", "replace"))


class Record(NamedTuple):
    offset: int  # where the record starts in its file
    size: int  # header and body
    kind: Kind
    body: memoryview
    flags: int = 0


def _record_at(data: bytes | memoryview, pos: int) -> Record | None:
    """The valid record starting at `pos`, or None."""
    if len(data) - pos < HEADER.size:
        return None
    magic, kind, flags, length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or end > len(data):  # a damaged length never allocates: it is checked against the file
        return None
    view = memoryview(data)
    body = view[pos + HEADER.size : end]
    if zlib.crc32(body, zlib.crc32(view[pos : pos + 8])) != crc:
        return None
    try:
        return Record(pos, end - pos, Kind(kind), body, flags)
    except ValueError:
        return None


class Scan(NamedTuple):
    records: list[Record]
    good_end: int  # end of the last valid record: where a torn tail starts (== len(data) if none)
    damaged: list[tuple[int, int]]  # byte ranges skipped because valid records follow them


def scan(data: bytes | memoryview) -> Scan:
    """Read every valid record of a file's contents; see the module docstring."""
    records: list[Record] = []
    damaged: list[tuple[int, int]] = []
    pos, size = 0, len(data)
    raw = bytes(data) if isinstance(data, memoryview) else data
    while pos < size:
        rec = _record_at(data, pos)
        if rec is not None:
            records.append(rec)
            pos += rec.size
            continue
        # not a valid record here: look for the next one that is
        nxt = raw.find(_MAGIC_BYTES, pos + 1)
        while nxt >= 0 and _record_at(data, nxt) is None:
            nxt = raw.find(_MAGIC_BYTES, nxt + 1)
        if nxt < 0:
            return Scan(records, pos, damaged)  # torn tail
        damaged.append((pos, nxt))
        pos = nxt
    return Scan(records, pos, damaged)
