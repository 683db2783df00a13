"""records.py (envelope lines, spool framing) and sinks.KeyMaker / DirectorySink."""

from __future__ import annotations

import errno
import io
import os
import re
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from ingestd.errors import PermanentSinkError, RetryableSinkError
from ingestd.records import (
    Item,
    encode_lines,
    first_lines_within,
    frame,
    read_records,
    rfc3339_ms,
    split_lines,
    write_records,
)
from ingestd.sinks import DirectorySink, KeyMaker

RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
# 2025-11-28T03:04:05.125Z, a time whose fraction is exact in binary
T = 1764299045.125


@pytest.fixture
def far_time_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run under a zone far from UTC, then put the process's zone back."""
    monkeypatch.setenv("TZ", "IGD-14")  # POSIX notation for UTC+14; needs no tz database
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


# -- rfc3339_ms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, expected",
    [
        (T, "2025-11-28T03:04:05.125Z"),
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1764299045.0, "2025-11-28T03:04:05.000Z"),
        (1764299045.5, "2025-11-28T03:04:05.500Z"),
        (951782400.0625, "2000-02-29T00:00:00.062Z"),
        (1767225599.9990234375, "2025-12-31T23:59:59.999Z"),
    ],
)
def test_rfc3339_ms(t: float, expected: str) -> None:
    assert rfc3339_ms(t) == expected


def test_rfc3339_ms_format_for_now() -> None:
    s = rfc3339_ms(time.time())
    assert RFC3339_MS.match(s), s


def test_rfc3339_ms_is_utc_whatever_the_time_zone(far_time_zone: None) -> None:
    assert time.localtime(T).tm_hour != time.gmtime(T).tm_hour  # the zone is really in force
    assert rfc3339_ms(T) == "2025-11-28T03:04:05.125Z"


# -- encode_lines -------------------------------------------------------------------------------


def test_encode_lines_envelope() -> None:
    payloads = [{"a": 1, "nested": {"b": [1, 2, None]}}, {}, {"s": "é\n\"x\""}]
    lines = encode_lines(T, "2.1", payloads)
    assert lines.endswith(b"\n") and lines.count(b"\n") == 3
    docs = [orjson.loads(ln) for ln in lines.splitlines()]
    assert [d["payload"] for d in docs] == payloads
    for d in docs:
        assert list(d) == ["received_at", "version", "payload"]
        assert d["received_at"] == "2025-11-28T03:04:05.125Z"
        assert d["version"] == "2.1"


def test_encode_lines_without_version_writes_null() -> None:
    [line] = encode_lines(T, None, [{"k": "v"}]).splitlines()
    assert orjson.loads(line) == {"received_at": "2025-11-28T03:04:05.125Z", "version": None, "payload": {"k": "v"}}
    assert b'"version":null' in line


def test_encode_lines_escapes_the_version() -> None:
    [line] = encode_lines(T, 'v"1\\\n', [{}]).splitlines()
    assert orjson.loads(line)["version"] == 'v"1\\\n'


# -- framing ------------------------------------------------------------------------------------


def items() -> list[Item]:
    return [
        Item(1, 1000.25, 2, b'{"a":1}\n{"b":2}\n'),
        Item(2, 1001.5, 1, b'{"c":3}\n'),
        Item(3, 1002.0, 3, b"x\ny\nz\n"),
    ]


def comparable(its: list[Item]) -> list[tuple[float, int, bytes]]:
    return [(i.received_at, i.count, i.lines) for i in its]


def test_frame_round_trip() -> None:
    buf = io.BytesIO()
    write_records(buf, items())
    assert buf.getvalue() == b"".join(frame(i) for i in items())
    buf.seek(0)
    back = list(read_records(buf))
    assert comparable(back) == comparable(items())
    assert all(i.seq == 0 for i in back)


def test_empty_file_reads_nothing() -> None:
    assert list(read_records(io.BytesIO(b""))) == []


@pytest.mark.parametrize("cut", [1, 4, 10, 27, 28, 30])
def test_torn_tail_stops_cleanly(cut: int) -> None:
    data = b"".join(frame(i) for i in items())
    back = list(read_records(io.BytesIO(data[:-cut])))
    assert comparable(back) == comparable(items()[:2])


def test_corrupt_crc_stops_reading() -> None:
    first, second, third = (frame(i) for i in items())
    broken = bytearray(second)
    broken[-2] ^= 0x01  # one bit of the lines
    back = list(read_records(io.BytesIO(first + bytes(broken) + third)))
    assert comparable(back) == comparable(items()[:1])


def test_bad_magic_stops_reading() -> None:
    first, second, _ = (frame(i) for i in items())
    back = list(read_records(io.BytesIO(first + b"XXXX" + second[4:])))
    assert comparable(back) == comparable(items()[:1])


def test_corrupt_length_field_stops_reading_with_bounded_memory(tmp_path: Path) -> None:
    # a header whose length field was damaged (magic intact) must not make the reader
    # allocate what the field claims (up to 4 GiB) before finding the file is shorter
    good = frame(items()[0])
    bad = bytearray(frame(items()[1]))
    bad[4:8] = (0xFFFFFFF0).to_bytes(4, "little")
    path = tmp_path / "corrupt.rec"
    path.write_bytes(good + bytes(bad))
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            back = list(read_records(f))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert comparable(back) == comparable(items()[:1])
    assert peak < 16 * 1024 * 1024, f"peak {peak} bytes"


# -- split_lines, first_lines_within -------------------------------------------------------------


def test_split_lines() -> None:
    item = Item(9, 5.5, 4, b"a\nbb\nccc\ndddd\n")
    head, tail = split_lines(item, 1)
    assert head == Item(9, 5.5, 1, b"a\n")
    assert tail == Item(9, 5.5, 3, b"bb\nccc\ndddd\n")
    head, tail = split_lines(item, 3)
    assert head == Item(9, 5.5, 3, b"a\nbb\nccc\n")
    assert tail == Item(9, 5.5, 1, b"dddd\n")


@pytest.mark.parametrize("max_bytes, expected", [(0, 0), (1, 0), (2, 1), (4, 1), (5, 2), (8, 2), (9, 3), (14, 4),
                                                  (1000, 4)])
def test_first_lines_within(max_bytes: int, expected: int) -> None:
    item = Item(1, 0.0, 4, b"a\nbb\nccc\ndddd\n")  # lines end at 2, 5, 9, 14
    assert first_lines_within(item, max_bytes) == expected


# -- KeyMaker -----------------------------------------------------------------------------------

KEY_RE = re.compile(r"^(?:(?P<prefix>.+)/)?dt=(?P<date>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/(?P<seg>[^/]+)\.ndjson(?P<gz>\.gz)?$")


def test_key_layout_with_prefix() -> None:
    key = KeyMaker("telemetry/raw", True, unique=lambda: "u1").key(T)
    m = KEY_RE.match(key)
    assert m, key
    assert m["prefix"] == "telemetry/raw"
    assert (m["date"], m["hour"]) == ("2025-11-28", "03")
    assert m["gz"] == ".gz"
    assert "u1" in m["seg"]


def test_key_prefix_slashes_are_trimmed() -> None:
    key = KeyMaker("/p/", False, unique=lambda: "u").key(T)
    assert key.startswith("p/dt=2025-11-28/hour=03/")
    assert key.endswith(".ndjson") and not key.endswith(".gz")
    assert "//" not in key


def test_key_without_prefix_has_no_leading_slash() -> None:
    key = KeyMaker("", False, unique=lambda: "u").key(T)
    assert key.startswith("dt=2025-11-28/hour=03/")
    m = KEY_RE.match(key)
    assert m and m["prefix"] is None and m["gz"] is None


def test_key_date_and_hour_are_utc_whatever_the_time_zone(far_time_zone: None) -> None:
    t = 1764370800.0  # 2025-11-28T23:00:00Z: already the 29th in UTC+14
    assert time.localtime(t).tm_mday == 29
    key = KeyMaker("", True, unique=lambda: "u").key(t)
    assert key.startswith("dt=2025-11-28/hour=23/")


def test_key_uses_the_injected_unique() -> None:
    counter = iter(range(3))
    km = KeyMaker("p", False, unique=lambda: f"n{next(counter)}")
    keys = [km.key(T) for _ in range(3)]
    assert [KEY_RE.match(k)["seg"].endswith(f"n{i}") for i, k in enumerate(keys)] == [True] * 3  # type: ignore[index]


def test_default_keys_are_unique() -> None:
    km = KeyMaker("p", True)
    keys = {km.key(T) for _ in range(10_000)}
    assert len(keys) == 10_000
    assert all(KEY_RE.match(k) for k in list(keys)[:100])


def test_default_keys_differ_between_key_makers() -> None:
    # two processes (or restarts) building keys in the same millisecond
    a, b = KeyMaker("p", True), KeyMaker("p", True)
    assert a.key(T) != b.key(T)


# -- DirectorySink ------------------------------------------------------------------------------


def hidden_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".")]


def test_directory_sink_writes_the_object(tmp_path: Path) -> None:
    sink = DirectorySink(str(tmp_path / "objects"), fsync=True)
    key = "pre/dt=2025-11-28/hour=03/seg.ndjson.gz"
    body = b"\x1f\x8b binary \x00 body" * 100
    sink.put(key, body, "gzip")
    target = tmp_path / "objects" / "pre" / "dt=2025-11-28" / "hour=03" / "seg.ndjson.gz"
    assert target.read_bytes() == body
    assert hidden_files(tmp_path) == []
    assert [p for p in (tmp_path / "objects").rglob("*") if p.is_file()] == [target]
    assert str(tmp_path / "objects") in sink.describe()


def test_directory_sink_without_fsync_and_empty_body(tmp_path: Path) -> None:
    sink = DirectorySink(str(tmp_path), fsync=False)
    sink.put("dt=2025-11-28/hour=03/a.ndjson", b"", None)
    sink.put("dt=2025-11-28/hour=03/b.ndjson", b"line\n", None)
    folder = tmp_path / "dt=2025-11-28" / "hour=03"
    assert sorted(p.name for p in folder.iterdir()) == ["a.ndjson", "b.ndjson"]
    assert (folder / "b.ndjson").read_bytes() == b"line\n"


def test_directory_sink_root_under_a_file_is_permanent(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    sink = DirectorySink(str(blocker / "objects"))
    with pytest.raises(PermanentSinkError) as exc:
        sink.put("dt=2025-11-28/hour=03/x.ndjson", b"data\n", None)
    assert isinstance(exc.value.__cause__, OSError) and exc.value.__cause__.errno == errno.ENOTDIR
    assert hidden_files(tmp_path) == []


def test_directory_sink_key_onto_a_directory_is_permanent(tmp_path: Path) -> None:
    (tmp_path / "dt=2025-11-28" / "hour=03" / "x.ndjson").mkdir(parents=True)
    with pytest.raises(PermanentSinkError):
        DirectorySink(str(tmp_path)).put("dt=2025-11-28/hour=03/x.ndjson", b"data\n", None)
    assert hidden_files(tmp_path) == []  # the temp file was removed


def test_directory_sink_transient_error_is_retryable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(RetryableSinkError) as exc:
        DirectorySink(str(tmp_path)).put("dt=2025-11-28/hour=03/x.ndjson", b"data\n", None)
    monkeypatch.undo()
    assert not isinstance(exc.value, PermanentSinkError)
    folder = tmp_path / "dt=2025-11-28" / "hour=03"
    assert list(folder.iterdir()) == []  # neither the object nor its temp file
