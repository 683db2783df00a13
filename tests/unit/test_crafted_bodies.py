"""validation.py against crafted bodies: every limit that bounds the cost of one request, each
with the request just at it (accepted) and just over it (refused, naming the limit and its key).

- NDJSON lines, blank ones included, are counted before any is parsed (http.max_payloads);
- JSON values are over-estimated before parsing: commas + '[' + '{' (http.max_json_values),
  four times dearer on the exact path (integers beyond 64 bits);
- gzip decodes to at most http.max_decode_ratio times its size beyond RATIO_FLOOR;
- a payload is at most http.max_payload_bytes as stored, and nested at most MAX_DEPTH levels;
- "version", stored on every line, is at most http.max_version_bytes.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.config import HttpConfig
from ingestd.records import encode_lines
from ingestd.validation import (
    EXACT_COST,
    MAX_DEPTH,
    RATIO_FLOOR,
    Collection,
    Limits,
    Rejection,
    decode_body,
    decode_collection,
    encode_collection,
    needs_exact,
)

JSON = "application/json"
NDJSON = "application/x-ndjson"
MiB = 1 << 20
BIG = 123456789012345678901234  # beyond 64 bits: sends a body down the exact path
LIMITS = Limits(max_body_bytes=MiB, max_decoded_bytes=8 * MiB, max_payloads=100)


def refused(body: bytes, content_type: str = JSON, encoding: str | None = None, limits: Limits = LIMITS) -> Rejection:
    with pytest.raises(Rejection) as exc:
        decode_collection(content_type, encoding, body, limits)
    return exc.value


def values_of(body: bytes) -> int:
    return body.count(b",") + body.count(b"[") + body.count(b"{")


# -- the keys ------------------------------------------------------------------------------------------


def test_limits_default_to_the_config_defaults_and_are_built_from_the_config() -> None:
    h = HttpConfig()
    assert Limits(h.max_body_bytes, h.max_decoded_bytes, h.max_payloads) == Limits.from_config(h)
    custom = HttpConfig(max_body_bytes=10, max_decoded_bytes=20, max_payloads=3, max_json_values=4,
                        max_decode_ratio=5, max_payload_bytes=6, max_version_bytes=7)
    assert Limits.from_config(custom) == Limits(10, 20, 3, 4, 5, 6, 7)


# -- NDJSON lines, blank ones included -------------------------------------------------------------------


def test_ndjson_lines_at_max_payloads_pass_one_more_blank_line_is_400() -> None:
    limits = LIMITS._replace(max_payloads=5)
    at = b'{"a":1}\n\n{"b":2}\n  \n{"c":3}\n'  # 5 lines, 3 payloads
    assert decode_collection(NDJSON, None, at, limits).payloads == [{"a": 1}, {"b": 2}, {"c": 3}]
    r = refused(at + b"\n", NDJSON, limits=limits)  # 6 lines, still 3 payloads
    assert r.status == 400
    assert "6 lines" in r.description and "blank lines count" in r.description
    assert "http.max_payloads" in r.description and "5" in r.description


def test_a_last_line_without_newline_counts() -> None:
    limits = LIMITS._replace(max_payloads=5)
    assert len(decode_collection(NDJSON, None, b"{}\n" * 4 + b"{}", limits).payloads) == 5
    assert refused(b"{}\n" * 5 + b"{}", NDJSON, limits=limits).status == 400


def test_blank_ndjson_lines_are_refused_in_one_pass() -> None:
    """4 MiB of blank lines (the issue's 0.8 s of CPU): refused before any line is looked at."""
    body = gzip.compress(b"\n" * (4 * MiB), 9)
    limits = LIMITS._replace(max_payloads=10_000, max_decode_ratio=0)  # the ratio would refuse it first
    began = time.process_time()
    r = refused(body, NDJSON, "gzip", limits)
    took = time.process_time() - began
    assert r.status == 400 and "4194304 lines" in r.description
    assert took < 0.2, f"{took:.3f} s"


# -- JSON values, counted before parsing ---------------------------------------------------------------


def numbers(n: int) -> bytes:
    """A collection counting exactly n + 4 values: two '{', two '[' and n commas."""
    return b'{"data":[{"a":[' + b"0," * n + b"0]}]}"


def test_values_at_the_limit_pass_one_over_is_413() -> None:
    limits = LIMITS._replace(max_json_values=1000)
    at, over = numbers(996), numbers(997)
    assert values_of(at) == 1000 and values_of(over) == 1001 and len(at) > 1000
    assert len(decode_collection(JSON, None, at, limits).payloads[0]["a"]) == 997
    r = refused(over, limits=limits)
    assert r.status == 413
    assert "1001 JSON values" in r.description and "http.max_json_values (1000)" in r.description


def test_values_limit_holds_for_ndjson_and_gzip() -> None:
    limits = LIMITS._replace(max_json_values=1000)
    line = lambda n: b'{"b":0,"a":[' + b"[]," * (n - 1) + b"[]]}\n"
    at, over = line(499), line(500)
    assert values_of(at) == 1000 and values_of(over) == 1002
    assert decode_collection(NDJSON, "gzip", gzip.compress(at), limits).payloads
    assert refused(gzip.compress(over), NDJSON, "gzip", limits).status == 413


def test_commas_and_brackets_inside_strings_count_too() -> None:
    """The count is an over-estimate, as documented: a string of commas counts its commas."""
    limits = LIMITS._replace(max_json_values=1000)
    body = orjson.dumps({"data": [{"csv": "," * 997}]})
    assert values_of(body) == 1000
    assert decode_collection(JSON, None, body, limits).payloads
    r = refused(orjson.dumps({"data": [{"csv": "," * 998}]}), limits=limits)
    assert r.status == 413 and "http.max_json_values" in r.description


def test_the_exact_path_counts_four_times() -> None:
    limits = LIMITS._replace(max_json_values=4000)
    most = 4000 // EXACT_COST
    body = lambda n: b'{"data":[{"big":%d,"a":[' % BIG + b"0," * n + b"0]}]}"
    at, over = body(most - 5), body(most - 4)  # 2 '{', 2 '[', one comma after "big", n commas
    assert values_of(at) == most and values_of(over) == most + 1
    c = decode_collection(JSON, None, at, limits)
    assert c.exact and c.payloads[0]["big"] == BIG
    r = refused(over, limits=limits)
    assert r.status == 413
    assert "beyond 64 bits" in r.description and f"at most {most}" in r.description
    assert "http.max_json_values (4000)" in r.description
    # the same count without a big integer is far under the plain limit
    assert decode_collection(JSON, None, over.replace(b"%d" % BIG, b"1"), limits).payloads


def test_an_envelope_of_many_empty_payloads_is_refused_before_parsing() -> None:
    """The issue's 350 k `{}` (+32 MiB before the max_payloads check): now refused on a count."""
    body = b'{"data":[' + b"{}," * 349_000 + b"{}]}"
    limits = Limits(MiB, 4 * MiB, 10_000)  # the defaults
    tracemalloc.start()
    try:
        r = refused(body, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status == 413 and "http.max_json_values" in r.description
    assert peak < 256 * 1024, peak  # refused on a count of its bytes: nothing parsed, nothing copied


def count_values(value: Any) -> int:
    """The values a document creates, an object's member (key and value) counting once."""
    if isinstance(value, dict):
        return 1 + sum(count_values(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(count_values(v) for v in value)
    return 1


CHARS = list('ab,[]{}"\\ 0é')
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(
    alphabet=st.sampled_from(CHARS), max_size=6)
documents = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(alphabet=st.sampled_from(CHARS), max_size=4), c, max_size=4), max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(documents, st.booleans())
def test_the_count_is_never_below_the_values_a_body_creates(doc: Any, pretty: bool) -> None:
    body = json.dumps(doc, indent=1 if pretty else None).encode()
    assert values_of(body) + 1 >= count_values(doc)


# -- gzip ratio ------------------------------------------------------------------------------------------


def gzip_decoding_to(ratio: int, extra: int) -> bytes:
    """A gzip body decoding to exactly `ratio` times its size plus `extra` bytes, beyond
    RATIO_FLOOR: random bytes (which do not compress) and spaces (which do), the number of spaces
    fitted by iteration (the compressed size barely moves with it)."""
    head = random.Random(5).randbytes(200_000)
    spaces = 2 * MiB
    for _ in range(50):
        body = gzip.compress(head + b" " * spaces, 6, mtime=0)
        target = ratio * len(body) + extra
        if len(head) + spaces == target:
            assert target > RATIO_FLOOR
            return body
        spaces = target - len(head)
    raise AssertionError("no fixed point")


def test_decoded_size_at_the_ratio_passes_one_byte_over_is_413() -> None:
    limits = LIMITS._replace(max_decode_ratio=10)
    at = gzip_decoding_to(10, 0)
    assert len(decode_body(at, "gzip", limits)) == 10 * len(at)
    over = gzip_decoding_to(10, 1)
    with pytest.raises(Rejection) as exc:
        decode_body(over, "gzip", limits)
    r = exc.value
    assert r.status == 413
    assert f"gzip body of {len(over)} bytes" in r.description and "http.max_decode_ratio (10)" in r.description
    assert decode_body(over, "gzip", limits._replace(max_decode_ratio=11))  # one more: it fits


def test_a_body_decoding_to_the_floor_passes_whatever_its_ratio() -> None:
    limits = LIMITS._replace(max_decode_ratio=2)
    at = gzip.compress(b" " * RATIO_FLOOR, 9)
    assert len(at) * 2 < RATIO_FLOOR  # a ratio of ~1000
    assert len(decode_body(at, "gzip", limits)) == RATIO_FLOOR
    with pytest.raises(Rejection) as exc:
        decode_body(gzip.compress(b" " * (RATIO_FLOOR + 1), 9), "gzip", limits)
    assert exc.value.status == 413 and "http.max_decode_ratio" in exc.value.description


def test_the_ratio_counts_every_gzip_member() -> None:
    member = gzip.compress(b" " * (RATIO_FLOOR // 2), 9)
    limits = LIMITS._replace(max_decode_ratio=100)
    assert len(decode_body(member * 2, "gzip", limits)) == RATIO_FLOOR
    with pytest.raises(Rejection) as exc:
        decode_body(member * 3, "gzip", limits)
    assert exc.value.status == 413 and "http.max_decode_ratio" in exc.value.description


def test_ratio_zero_is_no_ratio_limit_and_the_decoded_limit_still_holds() -> None:
    body = gzip.compress(b" " * (2 * MiB), 9)
    limits = LIMITS._replace(max_decode_ratio=0, max_decoded_bytes=2 * MiB)
    assert len(decode_body(body, "gzip", limits)) == 2 * MiB
    with pytest.raises(Rejection) as exc:
        decode_body(body, "gzip", limits._replace(max_decoded_bytes=2 * MiB - 1))
    assert "http.max_decoded_bytes" in exc.value.description and "ratio" not in exc.value.description


def test_the_issue_gzip_bodies_are_refused_while_decoding() -> None:
    """4 KB of gzip decoding to 4 MiB: blank lines, and one payload of 1.4 M `[]`."""
    limits = Limits(MiB, 4 * MiB, 10_000)  # the defaults
    blank = gzip.compress(b"\n" * (4 * MiB - 1), 9)
    lists = gzip.compress(b'{"data":[{"a":[' + b"[]," * 1_398_000 + b"[]]}]}", 9)
    for body, ctype in ((blank, NDJSON), (lists, JSON)):
        assert len(body) < 8000
        tracemalloc.start()
        try:
            r = refused(body, ctype, "gzip", limits)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status == 413 and "http.max_decode_ratio" in r.description
        assert peak < 3 * MiB, peak  # stopped at the floor (1 MiB), not at 4 MiB


# -- a payload as stored ----------------------------------------------------------------------------------


def stored_payloads(lines: bytes) -> list[bytes]:
    return [orjson.dumps(orjson.loads(line)["payload"]) for line in lines.splitlines()]


def payload_of_size(size: int) -> dict[str, str]:
    return {"s": "x" * (size - len(b'{"s":""}'))}


def test_payload_at_max_payload_bytes_is_stored_one_byte_over_is_413() -> None:
    limits = LIMITS._replace(max_payload_bytes=1000)
    at = decode_collection(JSON, None, orjson.dumps({"version": "v1", "data": [payload_of_size(1000)]}), limits)
    lines = encode_collection(0.0, at, limits)
    assert lines == encode_lines(0.0, "v1", at.payloads)
    assert [len(p) for p in stored_payloads(lines)] == [1000]
    over = decode_collection(JSON, None, orjson.dumps({"data": [payload_of_size(1001)]}), limits)
    with pytest.raises(Rejection) as exc:
        encode_collection(0.0, over, limits)
    r = exc.value
    assert r.status == 413
    assert "payload 1 of 1 is 1001 bytes as stored" in r.description
    assert "http.max_payload_bytes (1000)" in r.description


def test_each_payload_is_bounded_not_their_sum() -> None:
    limits = LIMITS._replace(max_payload_bytes=1000)
    sizes = [1000, 1000, 1000]
    c = decode_collection(NDJSON, None, b"".join(orjson.dumps(payload_of_size(s)) + b"\n" for s in sizes), limits)
    assert [len(p) for p in stored_payloads(encode_collection(0.0, c, limits))] == sizes
    c = decode_collection(NDJSON, None, b"".join(orjson.dumps(payload_of_size(s)) + b"\n" for s in (999, 1001, 10)),
                          limits)
    with pytest.raises(Rejection) as exc:
        encode_collection(0.0, c, limits)
    assert "payload 2 of 3 is 1001 bytes" in exc.value.description


def test_the_stored_size_counts_what_serialization_adds() -> None:
    """1e15 is stored as 1000000000000000.0; on the exact path "é" as "\\u00e9". The limit is
    on the stored bytes, not on what was sent."""
    limits = LIMITS._replace(max_payload_bytes=1000)
    floats = b'{"data":[{"f":[' + b",".join([b"1e15"] * 60) + b"]}]}"
    assert len(floats) < 400
    with pytest.raises(Rejection) as exc:
        encode_collection(0.0, decode_collection(JSON, None, floats, limits), limits)
    assert exc.value.status == 413 and "as stored" in exc.value.description
    accents = orjson.dumps({"data": [{"n": 1, "s": "é" * 200}]}).replace(b'"n":1', b'"n":%d' % BIG)
    c = decode_collection(JSON, None, accents, limits)
    assert c.exact and len(accents) < 500
    with pytest.raises(Rejection) as exc:
        encode_collection(0.0, c, limits)
    assert exc.value.status == 413


# -- nesting ----------------------------------------------------------------------------------------------


def nested(levels: int) -> bytes:
    """A payload object nested `levels` deep (the object itself is level 1)."""
    return b'{"a":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


@pytest.mark.parametrize("exact", [False, True], ids=["orjson", "exact"])
@pytest.mark.parametrize("kind", ["json", "ndjson"])
def test_a_payload_at_max_depth_is_stored_one_level_deeper_is_400(exact: bool, kind: str) -> None:
    def body(levels: int) -> tuple[str, bytes]:
        payload = nested(levels)
        if exact:
            payload = payload.replace(b'{"a":', b'{"n":%d,"a":' % BIG)
        if kind == "json":
            return JSON, b'{"data":[{},' + payload + b"]}"
        return NDJSON, b"{}\n" + payload + b"\n"

    ctype, at = body(MAX_DEPTH)
    c = decode_collection(ctype, None, at, LIMITS)
    assert c.exact == exact
    lines = encode_collection(0.0, c, LIMITS)
    assert len(lines.splitlines()) == 2
    ctype, over = body(MAX_DEPTH + 1)
    with pytest.raises(Rejection) as exc:
        encode_collection(0.0, decode_collection(ctype, None, over, LIMITS), LIMITS)
    r = exc.value
    assert r.status == 400
    assert f"payload 2 of 2 is nested more than {MAX_DEPTH} levels" in r.description


def test_orjson_refuses_what_is_deeper_than_max_depth() -> None:
    """MAX_DEPTH is orjson's: a deeper payload would be a 500 at encode time without the check."""
    orjson.dumps(orjson.loads(nested(MAX_DEPTH)))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(orjson.loads(nested(MAX_DEPTH + 1)))


# -- version ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["v", "é", "𝄞"], ids=["ascii", "2-byte", "4-byte"])
def test_version_at_max_version_bytes_passes_one_byte_over_is_400(unit: str) -> None:
    limits = LIMITS._replace(max_version_bytes=256)
    at = unit * (256 // len(unit.encode()))
    assert len(at.encode()) == 256
    assert decode_collection(JSON, None, orjson.dumps({"version": at, "data": [{}]}), limits).version == at
    r = refused(orjson.dumps({"version": at + "v", "data": [{}]}), limits=limits)
    assert r.status == 400
    assert "257 bytes" in r.description and "http.max_version_bytes (256)" in r.description


def test_a_long_version_is_refused_before_it_is_repeated_on_every_line() -> None:
    """A 900 KB version and 10,000 `{}` would store 9 GB of lines; the body is 930 KB."""
    body = b'{"version":"' + b"v" * 900_000 + b'","data":[' + b"{}," * 9_999 + b"{}]}"
    r = refused(body, limits=Limits(MiB, 4 * MiB, 10_000))
    assert r.status == 400 and "http.max_version_bytes" in r.description


# -- the exact path is found as before --------------------------------------------------------------------

_LONG_DIGITS = re.compile(rb"-\d{19,}|\d{20,}")  # what validation.py searched with before


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"1", b"0", b"9", b"-", b"a", b" ", b".", b"1" * 18, b"2" * 19, b"3" * 20]),
                max_size=12))
def test_needs_exact_finds_the_runs_the_regular_expression_found(parts: list[bytes]) -> None:
    body = b"".join(parts)
    assert needs_exact(body) == bool(_LONG_DIGITS.search(body))


@pytest.mark.parametrize("body, exact", [
    (b"1" * 19, False), (b"1" * 20, True), (b"-" + b"1" * 18, False), (b"-" + b"1" * 19, True),
    (b"x-1234567890123456789x", True), (b"1234567890.1234567890", False), (b"12345678901234567890.5", True),
])
def test_needs_exact_edges(body: bytes, exact: bool) -> None:
    assert needs_exact(body) is exact


def test_collections_round_trip_unchanged() -> None:
    body = orjson.dumps({"version": "1", "data": [{"a": [1, {"b": "c"}]}, {"n": 1.5}]})
    c = decode_collection(JSON, None, body, LIMITS)
    assert c == Collection("1", [{"a": [1, {"b": "c"}]}, {"n": 1.5}])
    assert encode_collection(1.0, c, LIMITS) == encode_lines(1.0, "1", c.payloads)
