"""records.py (envelope lines, record framing, `scan`) and sinks.py (KeyMaker, DirectorySink)."""

from __future__ import annotations

import errno
import os
import re
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestd.config import SinkConfig
from ingestd.errors import PermanentSinkError, RetryableSinkError
from ingestd.records import (
    HEADER,
    MAGIC,
    Kind,
    Request,
    encode_lines,
    exact_dumps,
    frame,
    lines_within,
    FLAG_TENANT,
    parse_request,
    request_record,
    rfc3339_ms,
    scan,
    slice_lines,
)
from ingestd.sinks import DirectorySink, KeyMaker, build_sink

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


# -- rfc3339_ms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, expected",
    [
        (T, "2025-11-28T03:04:05.125Z"),
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1764299045.0, "2025-11-28T03:04:05.000Z"),
        (1764299045.5, "2025-11-28T03:04:05.500Z"),
        (951782400.0625, "2000-02-29T00:00:00.062Z"),  # truncated, not rounded
        (1767225599.9990234375, "2025-12-31T23:59:59.999Z"),
    ],
)
def test_rfc3339_ms_formats_utc_with_three_fraction_digits(t: float, expected: str) -> None:
    assert rfc3339_ms(t) == expected


def test_rfc3339_ms_of_now_matches_the_format() -> None:
    s = rfc3339_ms(time.time())
    assert RFC3339_MS.match(s), s


def test_rfc3339_ms_is_utc_whatever_the_time_zone(far_time_zone: None) -> None:
    assert time.localtime(T).tm_hour != time.gmtime(T).tm_hour  # the zone is really in force
    assert rfc3339_ms(T) == "2025-11-28T03:04:05.125Z"


# -- encode_lines, exact_dumps ----------------------------------------------------------------------


def test_encode_lines_wraps_each_payload_in_the_envelope() -> None:
    payloads: list[dict[str, Any]] = [{"a": 1, "nested": {"b": [1, 2, None]}}, {}, {"s": "é\n\"x\""}]
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


def test_encode_lines_of_no_payloads_is_empty() -> None:
    assert encode_lines(T, "1", []) == b""


def test_encode_lines_uses_the_given_serializer() -> None:
    calls: list[object] = []

    def dumps(value: object) -> bytes:
        calls.append(value)
        return b'"X"'

    assert encode_lines(T, None, [{"a": 1}, {"b": 2}], dumps=dumps).count(b'"payload":"X"}\n') == 2
    assert calls == [{"a": 1}, {"b": 2}]


def test_exact_dumps_keeps_integers_beyond_64_bits_exact() -> None:
    big = 2**70 + 1
    with pytest.raises(TypeError):
        orjson.dumps({"n": big})  # why exact_dumps exists
    assert exact_dumps({"n": big, "m": -big}) == b'{"n":1180591620717411303425,"m":-1180591620717411303425}'
    [line] = encode_lines(T, None, [{"n": big}], dumps=exact_dumps).splitlines()
    assert line.endswith(b'"payload":{"n":1180591620717411303425}}')
    assert orjson.loads(line.replace(b"1180591620717411303425", b"0"))["payload"] == {"n": 0}  # still valid JSON


def test_exact_dumps_is_compact() -> None:
    assert exact_dumps({"a": [1, 2], "b": "c"}) == b'{"a":[1,2],"b":"c"}'


# -- slice_lines, lines_within ------------------------------------------------------------------------

FOUR_LINES = b"a\nbb\nccc\ndddd\n"  # lines end at 2, 5, 9, 14


@pytest.mark.parametrize(
    "first, count, expected",
    [(0, 4, FOUR_LINES), (0, 1, b"a\n"), (1, 2, b"bb\nccc\n"), (3, 1, b"dddd\n"), (2, 0, b""), (4, 0, b"")],
)
def test_slice_lines_takes_whole_lines(first: int, count: int, expected: bytes) -> None:
    assert slice_lines(FOUR_LINES, first, count) == expected


def test_slice_lines_past_the_end_is_an_error() -> None:
    with pytest.raises(ValueError):
        slice_lines(FOUR_LINES, 3, 2)


@pytest.mark.parametrize(
    "max_bytes, most, expected",
    [(0, 4, 0), (1, 4, 0), (2, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3), (14, 4, 4), (1000, 4, 4),
     (1000, 2, 2), (1000, 0, 0), (9, 1, 1)],
)
def test_lines_within_counts_the_leading_lines_that_fit(max_bytes: int, most: int, expected: int) -> None:
    assert lines_within(FOUR_LINES, max_bytes, most) == expected


# -- framing ------------------------------------------------------------------------------------------


def requests() -> list[Request]:
    return [
        Request(1000.25, 2, b'{"a":1}\n{"b":2}\n'),
        Request(1001.5, 1, b'{"c":3}\n'),
        Request(1002.0, 3, b"x\ny\nz\n"),
    ]


def framed() -> list[bytes]:
    return [request_record(r.received_at, r.count, r.lines) for r in requests()]


def parsed(data: bytes) -> list[Request]:
    return [parse_request(r.body) for r in scan(data).records]


def test_frame_layout_is_magic_kind_flags_length_crc_body() -> None:
    body = b"hello"
    data = frame(Kind.LANDED, body)
    magic, kind, flags, length, crc = HEADER.unpack_from(data)
    assert (magic, kind, flags, length) == (MAGIC, Kind.LANDED, 0, 5)
    assert data[:2] == b"GI" and data[HEADER.size :] == body
    assert crc == zlib.crc32(body, zlib.crc32(data[:8]))


def test_request_record_round_trip() -> None:
    for r in requests():
        [rec] = scan(request_record(r.received_at, r.count, r.lines)).records
        assert rec.kind is Kind.REQUEST
        assert parse_request(rec.body, rec.flags) == r


def test_a_tenant_other_than_default_travels_in_the_record_and_default_costs_nothing() -> None:
    [rec] = scan(request_record(7.5, 2, b"a\nb\n", b"acme")).records
    assert rec.flags == FLAG_TENANT
    assert parse_request(rec.body, rec.flags) == Request(7.5, 2, b"a\nb\n", "acme")
    plain = request_record(7.5, 2, b"a\nb\n")
    assert len(plain) == len(request_record(7.5, 2, b"a\nb\n", b"acme")) - 5
    assert parse_request(scan(plain).records[0].body).tenant == "default"


def test_scan_reads_every_record_with_its_offset_size_and_kind() -> None:
    parts = [frame(Kind.INTENT, b'{"id":"x"}'), request_record(5.5, 1, b"l\n"), frame(Kind.CANCEL, b""),
             frame(Kind.DEAD, b"x"), frame(Kind.LANDED, b"y" * 1000)]
    data = b"".join(parts)
    result = scan(data)
    assert result.good_end == len(data) and result.damaged == []
    assert [r.kind for r in result.records] == [Kind.INTENT, Kind.REQUEST, Kind.CANCEL, Kind.DEAD, Kind.LANDED]
    offsets = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    assert [r.offset for r in result.records] == offsets
    assert [r.size for r in result.records] == [len(p) for p in parts]
    assert [bytes(r.body) for r in result.records] == [p[HEADER.size :] for p in parts]


def test_scan_accepts_a_memoryview() -> None:
    data = b"".join(framed())
    assert [parse_request(r.body) for r in scan(memoryview(data)).records] == requests()


def test_scan_of_nothing_finds_nothing() -> None:
    result = scan(b"")
    assert (result.records, result.good_end, result.damaged) == ([], 0, [])


@pytest.mark.parametrize("cut", [1, 4, 11, 12, 13, 20, 25])
def test_torn_tail_is_reported_at_good_end(cut: int) -> None:
    whole = b"".join(framed())
    result = scan(whole[:-cut])
    assert parsed(whole[:-cut]) == requests()[:2]
    assert result.good_end == len(framed()[0]) + len(framed()[1])
    assert result.damaged == []


def test_garbage_after_the_last_record_is_a_torn_tail() -> None:
    data = b"".join(framed()) + b"GI\x01\x00garbage that no record follows"
    result = scan(data)
    assert parsed(data) == requests()
    assert result.good_end == len(b"".join(framed())) and result.damaged == []


def test_torn_tail_cut_at_good_end_leaves_a_clean_file(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"".join(framed()) + framed()[0][:7])
    good_end = scan(path.read_bytes()).good_end
    os.truncate(path, good_end)
    result = scan(path.read_bytes())
    assert result.good_end == path.stat().st_size and result.damaged == []
    assert parsed(path.read_bytes()) == requests()


def test_damage_inside_the_last_record_makes_it_a_torn_tail() -> None:
    # nothing valid follows it: indistinguishable from a write cut short, so it is cut
    first, second, third = framed()
    broken = bytearray(third)
    broken[-1] ^= 0x40
    result = scan(first + second + bytes(broken))
    assert result.good_end == len(first + second) and result.damaged == []


@pytest.mark.parametrize("where", ["body", "crc", "magic", "kind", "length"])
def test_damaged_record_in_the_middle_is_skipped_and_the_records_after_it_kept(where: str) -> None:
    first, second, third = framed()
    broken = bytearray(second)
    if where == "body":
        broken[-2] ^= 0x01  # one bit of the lines
    elif where == "crc":
        broken[8] ^= 0xFF
    elif where == "magic":
        broken[0:2] = b"XX"
    elif where == "kind":
        broken[2] = Kind.LANDED
    else:
        broken[4:8] = struct.pack("<I", 3)  # shorter than it is: its checksum no longer matches
    data = first + bytes(broken) + third
    result = scan(data)
    assert [parse_request(r.body) for r in result.records] == [requests()[0], requests()[2]]
    assert [r.offset for r in result.records] == [0, len(first) + len(second)]
    assert result.damaged == [(len(first), len(first) + len(second))]
    assert result.good_end == len(data)


def test_several_damaged_ranges_are_each_reported() -> None:
    a, b, c = framed()
    data = a + b"\x00" * 7 + b + b"GIGIGI" + c
    result = scan(data)
    assert [parse_request(r.body) for r in result.records] == requests()
    assert result.damaged == [(len(a), len(a) + 7), (len(a) + 7 + len(b), len(a) + 7 + len(b) + 6)]
    assert result.good_end == len(data)


def test_damage_at_the_start_of_a_file_keeps_the_records_after_it() -> None:
    data = b"\xff" * 5 + b"".join(framed())
    result = scan(data)
    assert parsed(data) == requests() and result.damaged == [(0, 5)]


def test_resync_skips_false_magic_inside_a_damaged_record() -> None:
    # the damaged record's own body is full of b"GI": only a *valid* record ends the damage
    lines = b'"GIGI"\n' * 20
    first = request_record(1.0, 20, lines)
    broken = bytearray(request_record(2.0, 20, lines))
    broken[HEADER.size + 3] ^= 0x10
    last = request_record(3.0, 1, b"z\n")
    result = scan(first + bytes(broken) + last)
    assert [parse_request(r.body).received_at for r in result.records] == [1.0, 3.0]
    assert result.damaged == [(len(first), len(first) + len(broken))]


def test_record_of_an_unknown_kind_is_not_a_record() -> None:
    body = b"whatever"
    head = struct.pack("<HBBI", MAGIC, 99, 0, len(body))
    alien = head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body
    first, second, _ = framed()
    result = scan(first + alien + second)
    assert parsed(first + second) == requests()[:2]
    assert [r.kind for r in result.records] == [Kind.REQUEST, Kind.REQUEST]
    assert result.damaged == [(len(first), len(first) + len(alien))]
    assert scan(first + alien).good_end == len(first)  # and at the end, a torn tail


def test_damaged_length_does_not_allocate_what_it_claims(tmp_path: Path) -> None:
    # a header whose length field was damaged (magic intact) must not make the reader allocate
    # what the field claims (up to 4 GiB) before finding the file is shorter
    first, second, third = framed()
    bad = bytearray(second)
    bad[4:8] = struct.pack("<I", 0xFFFFFFF0)
    path = tmp_path / "damaged.log"
    path.write_bytes(first + bytes(bad) + third)
    data = path.read_bytes()
    tracemalloc.start()
    try:
        result = scan(data)
        tail = scan(first + bytes(bad))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [parse_request(r.body) for r in result.records] == [requests()[0], requests()[2]]
    assert result.damaged == [(len(first), len(first) + len(second))]
    assert tail.good_end == len(first) and tail.damaged == []
    assert peak < 1024 * 1024, f"peak {peak} bytes"


# -- KeyMaker ---------------------------------------------------------------------------------------

KEY_RE = re.compile(
    r"^(?:(?P<folder>.+)/)?(?P<stamp>\d{8}T\d{9}Z)-(?P<host>[A-Za-z0-9.-]+)-(?P<id>[^/]+?)(?P<ext>\.ndjson(\.gz)?)$"
)


def test_key_is_folder_time_host_id_and_extension() -> None:
    key = KeyMaker(".ndjson.gz", host="h1").key("telemetry/raw/dt=2025-11-28/hour=03", T, "00ff00ff00ff00ff")
    assert key == "telemetry/raw/dt=2025-11-28/hour=03/20251128T030405125Z-h1-00ff00ff00ff00ff.ndjson.gz"
    m = KEY_RE.match(key)
    assert m and (m["folder"], m["host"], m["id"], m["ext"]) == (
        "telemetry/raw/dt=2025-11-28/hour=03", "h1", "00ff00ff00ff00ff", ".ndjson.gz")


def test_key_without_folder_has_no_leading_slash() -> None:
    assert KeyMaker(".ndjson", host="h").key("", T, "i") == "20251128T030405125Z-h-i.ndjson"


def test_key_time_is_utc_whatever_the_time_zone(far_time_zone: None) -> None:
    t = 1764370800.0  # 2025-11-28T23:00:00Z: already the 29th in UTC+14
    assert time.localtime(t).tm_mday == 29
    assert KeyMaker(".ndjson.gz", host="h").key("f", t, "i") == "f/20251128T230000000Z-h-i.ndjson.gz"


def test_same_time_and_intent_give_the_same_key() -> None:
    # a re-sent object after a crash must land on its own key
    assert KeyMaker(".ndjson", host="h").key("p", T, "abc") == KeyMaker(".ndjson", host="h").key("p", T, "abc")


def test_different_intents_or_hosts_give_different_keys() -> None:
    km = KeyMaker(".ndjson.gz", host="h")
    keys = {km.key("p", T, f"{i:016x}") for i in range(1000)} | {KeyMaker(".ndjson.gz", host="h2").key("p", T, f"{0:016x}")}
    assert len(keys) == 1001


def test_default_host_is_safe_for_a_key() -> None:
    km = KeyMaker(".ndjson")
    assert re.fullmatch(r"[A-Za-z0-9.-]{1,63}", km.host), km.host
    assert KEY_RE.match(km.key("p", T, "i"))


# -- DirectorySink ------------------------------------------------------------------------------------

KEY = "pre/dt=2025-11-28/hour=03/obj.ndjson.gz"


def hidden_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".")]


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_directory_sink_writes_the_object_under_its_key(tmp_path: Path) -> None:
    sink = DirectorySink(str(tmp_path / "objects"), fsync=True)
    body = b"\x1f\x8b binary \x00 body" * 100
    sink.put(KEY, body, "gzip")
    target = tmp_path / "objects" / "pre" / "dt=2025-11-28" / "hour=03" / "obj.ndjson.gz"
    assert target.read_bytes() == body
    assert files(tmp_path) == [target]  # no temp file left behind
    assert str(tmp_path / "objects") in sink.describe()


def test_directory_sink_without_fsync_and_an_empty_body(tmp_path: Path) -> None:
    sink = DirectorySink(str(tmp_path), fsync=False)
    sink.put("dt=2025-11-28/hour=03/a.ndjson", b"", None)
    sink.put("dt=2025-11-28/hour=03/b.ndjson", b"line\n", None)
    folder = tmp_path / "dt=2025-11-28" / "hour=03"
    assert sorted(p.name for p in folder.iterdir()) == ["a.ndjson", "b.ndjson"]
    assert (folder / "a.ndjson").read_bytes() == b"" and (folder / "b.ndjson").read_bytes() == b"line\n"


def test_directory_sink_put_of_the_same_key_again_overwrites_it(tmp_path: Path) -> None:
    sink = DirectorySink(str(tmp_path))
    sink.put(KEY, b"first version, longer than the second\n", "gzip")
    sink.put(KEY, b"second\n", "gzip")
    [only] = files(tmp_path)
    assert only.read_bytes() == b"second\n"
    assert hidden_files(tmp_path) == []


def test_directory_sink_exists_only_for_a_whole_object_at_its_key(tmp_path: Path) -> None:
    sink = DirectorySink(str(tmp_path))
    assert not sink.exists(KEY)
    sink.put(KEY, b"", "gzip")
    assert sink.exists(KEY)
    assert not sink.exists(KEY + ".other")
    assert not sink.exists("pre/dt=2025-11-28/hour=03")  # a folder is not an object
    (tmp_path / "pre" / "dt=2025-11-28" / "hour=03" / ".obj2.ndjson.gz.1234abcd.tmp").write_bytes(b"half")
    assert not sink.exists("pre/dt=2025-11-28/hour=03/obj2.ndjson.gz")  # a temp file is not one yet


def test_directory_sink_is_what_build_sink_makes_for_a_directory(tmp_path: Path) -> None:
    sink = build_sink(SinkConfig(kind="directory", path=str(tmp_path / "o"), fsync=False))
    assert isinstance(sink, DirectorySink) and sink.root == str(tmp_path / "o") and sink.fsync is False


def test_directory_sink_root_under_a_file_is_permanent(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(PermanentSinkError) as exc:
        DirectorySink(str(blocker / "objects")).put("dt=2025-11-28/hour=03/x.ndjson", b"data\n", None)
    assert isinstance(exc.value.__cause__, OSError) and exc.value.__cause__.errno == errno.ENOTDIR
    assert hidden_files(tmp_path) == []


def test_directory_sink_key_onto_a_directory_is_permanent_and_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "dt=2025-11-28" / "hour=03" / "x.ndjson").mkdir(parents=True)
    with pytest.raises(PermanentSinkError) as exc:
        DirectorySink(str(tmp_path)).put("dt=2025-11-28/hour=03/x.ndjson", b"data\n", None)
    assert isinstance(exc.value.__cause__, OSError) and exc.value.__cause__.errno == errno.EISDIR
    assert hidden_files(tmp_path) == []


def test_directory_sink_name_too_long_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentSinkError) as exc:
        DirectorySink(str(tmp_path)).put("dt=2025-11-28/hour=03/" + "n" * 300 + ".ndjson", b"data\n", None)
    assert isinstance(exc.value.__cause__, OSError) and exc.value.__cause__.errno == errno.ENAMETOOLONG
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    "code, retryable",
    [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, True), (errno.EAGAIN, True),
     (errno.EACCES, False), (errno.EPERM, False), (errno.EROFS, False)],
)
def test_directory_sink_maps_write_errors_to_retryable_or_permanent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, retryable: bool
) -> None:
    # a full disk, a quota or a read-only remount cannot be made for real without mounting;
    # os.write failing is where each of them shows
    def failing_write(fd: int, data: object) -> int:
        raise OSError(code, os.strerror(code))

    sink = DirectorySink(str(tmp_path))
    monkeypatch.setattr(os, "write", failing_write)
    try:
        with pytest.raises((RetryableSinkError, PermanentSinkError)) as exc:
            sink.put("dt=2025-11-28/hour=03/x.ndjson", b"data\n", None)
    finally:
        monkeypatch.undo()
    assert type(exc.value) is (RetryableSinkError if retryable else PermanentSinkError)
    assert isinstance(exc.value.__cause__, OSError) and exc.value.__cause__.errno == code
    assert "x.ndjson" in str(exc.value)
    folder = tmp_path / "dt=2025-11-28" / "hour=03"
    assert list(folder.iterdir()) == []  # neither the object nor its temp file


@pytest.mark.parametrize("cut", range(1, 30))
def test_a_record_with_a_tenant_cut_anywhere_is_a_torn_tail_and_the_ones_before_keep_their_tenant(cut: int) -> None:
    first = request_record(1.5, 1, b'{"a":1}\n', b"acme")
    last = request_record(2.5, 2, b"x\ny\n", b"globex")
    result = scan(first + last[:-cut])
    assert result.good_end == len(first) and result.damaged == []
    assert [parse_request(r.body, r.flags) for r in result.records] == [Request(1.5, 1, b'{"a":1}\n', "acme")]
