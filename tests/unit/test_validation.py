"""validation.py: content negotiation, bounded gzip decoding, JSON / NDJSON shape checks."""

from __future__ import annotations

import gzip
import json
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from ingestd.records import encode_lines, exact_dumps
from ingestd.validation import (
    Collection,
    Limits,
    Rejection,
    decode_body,
    decode_collection,
    parse_content_type,
)

LIMITS = Limits(max_body_bytes=64 * 1024, max_decoded_bytes=256 * 1024, max_payloads=100)
JSON = "application/json"
NDJSON = "application/x-ndjson"
MiB = 1 << 20

# hypothesis keeps its example database and caches out of the working directory
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ingestd-unit-hypothesis")


def reject(body: bytes, content_type: str | None = JSON, encoding: str | None = None,
           limits: Limits = LIMITS) -> Rejection:
    with pytest.raises(Rejection) as exc:
        decode_collection(content_type, encoding, body, limits)
    r = exc.value
    assert r.title and r.description
    return r


def doc(**fields: Any) -> bytes:
    return orjson.dumps(fields)


# -- accepted shapes ----------------------------------------------------------------------------


def test_json_collection_is_decoded() -> None:
    body = doc(version="1.2", token="t", data=[{"a": 1}, {"b": [1, 2]}])
    assert decode_collection(JSON, None, body, LIMITS) == Collection("1.2", [{"a": 1}, {"b": [1, 2]}])


def test_version_and_token_are_optional() -> None:
    assert decode_collection(JSON, None, doc(data=[{}]), LIMITS) == Collection(None, [{}])


def test_extra_top_level_keys_are_ignored() -> None:
    assert decode_collection(JSON, None, doc(data=[{"x": 1}], other=5), LIMITS).payloads == [{"x": 1}]


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/json;charset=UTF-8",
     'application/json; charset="utf-8"', "Application/JSON", "application/json; charset=utf8"],
)
def test_json_content_types_accepted(content_type: str) -> None:
    assert parse_content_type(content_type) == "json"
    assert decode_collection(content_type, None, doc(data=[{"a": 1}]), LIMITS).payloads == [{"a": 1}]


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/ndjson",
                                          "application/x-ndjson; charset=utf-8"])
def test_ndjson_content_types_accepted(content_type: str) -> None:
    assert parse_content_type(content_type) == "ndjson"


# -- 400 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{not json", "not valid JSON"),
        (b'{"data": [{}]', "not valid JSON"),
        (b"[]", "JSON object"),
        (b'"data"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"version": "1"}', '"data" is required'),
        (b'{"data": {"a": 1}}', '"data" must be an array'),
        (b'{"data": "x"}', '"data" must be an array'),
        (b'{"data": null}', '"data" must be an array'),
        (b'{"data": []}', '"data" is empty'),
        (b'{"data": [{}, 1]}', "data[1]"),
        (b'{"data": [{}, {}, []]}', "data[2]"),
        (b'{"data": [null]}', "data[0]"),
        (b'{"data": ["{}"]}', "data[0]"),
        (b'{"version": 2, "data": [{}]}', '"version"'),
        (b'{"version": null, "data": [{}]}', '"version"'),
        (b'{"version": ["1"], "data": [{}]}', '"version"'),
        (b'{"token": 5, "data": [{}]}', '"token"'),
        (b'{"token": null, "data": [{}]}', '"token"'),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_bad_json_shapes_are_400(body: bytes, words: str) -> None:
    r = reject(body)
    assert r.status == 400
    assert words in r.description


def test_empty_body_is_400() -> None:
    r = reject(b"")
    assert r.status == 400 and "empty" in r.description
    assert reject(b"", NDJSON).status == 400


def test_payload_count_at_limit_passes_one_over_fails() -> None:
    limits = LIMITS._replace(max_payloads=5)
    assert len(decode_collection(JSON, None, doc(data=[{}] * 5), limits).payloads) == 5
    r = reject(doc(data=[{}] * 6), limits=limits)
    assert r.status == 400 and "too many payloads" in r.description


def test_gzip_label_on_plain_body_is_400() -> None:
    r = reject(doc(data=[{}]), encoding="gzip")
    assert r.status == 400 and "gzip" in r.description


def test_truncated_gzip_is_400() -> None:
    z = gzip.compress(doc(data=[{"a": "x" * 1000}]))
    for cut in (len(z) - 4, len(z) // 2, 12):
        r = reject(z[:cut], encoding="gzip")
        assert r.status == 400, cut


def test_gzip_with_trailing_garbage_is_400() -> None:
    r = reject(gzip.compress(doc(data=[{}])) + b"garbage!", encoding="gzip")
    assert r.status == 400


def test_gzip_of_empty_body_is_400() -> None:
    r = reject(gzip.compress(b""), encoding="gzip")
    assert r.status == 400 and "empty" in r.description


@pytest.mark.parametrize("number", [b"123456789012345678901234567890", b"-9223372036854775809",
                                    b"18446744073709551616"])
def test_integers_beyond_64_bits_are_refused_or_kept_exactly(number: bytes) -> None:
    body = b'{"data": [{"big": ' + number + b', "ok": 1}]}'
    try:
        c = decode_collection(JSON, None, body, LIMITS)
    except Rejection as r:
        assert r.status == 400
        return
    assert c.exact  # the app serializes such a collection with exact_dumps
    [line] = encode_lines(0.0, c.version, c.payloads, exact_dumps).splitlines()
    assert json.loads(line)["payload"] == json.loads(b'{"big": ' + number + b', "ok": 1}')


def test_long_digit_runs_in_strings_keep_the_payload() -> None:
    body = b'{"data": [{"id": "123456789012345678901234567890", "n": 1.5, "s": "\xc3\xa9"}]}'
    c = decode_collection(JSON, None, body, LIMITS)
    [line] = encode_lines(0.0, c.version, c.payloads, exact_dumps if c.exact else orjson.dumps).splitlines()
    assert orjson.loads(line)["payload"] == {"id": "123456789012345678901234567890", "n": 1.5, "s": "\u00e9"}


# -- 413 -----------------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid JSON collection of exactly `size` bytes."""
    base = doc(data=[{"p": ""}])
    body = doc(data=[{"p": "x" * (size - len(base))}])
    assert len(body) == size
    return body


def test_raw_body_at_limit_passes_one_over_is_413() -> None:
    limits = LIMITS._replace(max_body_bytes=1000)
    assert decode_collection(JSON, None, padded(1000), limits).payloads[0]["p"] == "x" * (1000 - 19)
    r = reject(padded(1001), limits=limits)
    assert r.status == 413


def test_raw_limit_applies_to_the_compressed_size() -> None:
    limits = LIMITS._replace(max_body_bytes=1000, max_decoded_bytes=100_000)
    body = padded(50_000)
    z = gzip.compress(body)
    assert len(z) < 1000
    assert decode_collection(JSON, "gzip", z, limits).payloads[0]["p"].startswith("xxx")


def test_decoded_body_at_limit_passes_one_over_is_413() -> None:
    limits = LIMITS._replace(max_decoded_bytes=5000)
    assert len(decode_body(gzip.compress(padded(5000)), "gzip", limits)) == 5000
    assert decode_collection(JSON, "gzip", gzip.compress(padded(5000)), limits).payloads
    r = reject(gzip.compress(padded(5001)), encoding="gzip", limits=limits)
    assert r.status == 413


def _zero_bomb(total: int, unit: int = 1 << 16) -> bytes:
    """gzip of `total` zero bytes (one member), built without compressing it all."""
    zeros = b"\0" * unit
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)  # identical for every further unit
    tail = c.flush()[:-8]
    n = total // unit
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(zeros, crc)
    return first + block * (n - 1) + tail + struct.pack("<II", crc, total & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    b = _zero_bomb(100 * MiB)
    assert len(b) < 200_000
    return b


def test_bomb_helper_is_valid_gzip() -> None:
    assert gzip.decompress(_zero_bomb(4 * MiB)) == b"\0" * (4 * MiB)


def test_gzip_bomb_is_413_with_bounded_memory(bomb: bytes) -> None:
    limits = Limits(max_body_bytes=MiB, max_decoded_bytes=MiB, max_payloads=10)
    tracemalloc.start()
    try:
        with pytest.raises(Rejection) as exc:
            decode_collection(JSON, "gzip", bomb, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.value.status == 413
    # 100 MiB were on offer; decoding must stop near the 1 MiB limit
    assert peak < 4 * MiB, peak


def test_decode_body_stops_exactly_at_the_limit() -> None:
    two = _zero_bomb(2 * MiB)
    # a ratio of ~1000: the ratio limit (tested in test_crafted_bodies.py) is off to reach this one
    limits = Limits(max_body_bytes=MiB, max_decoded_bytes=2 * MiB, max_payloads=10, max_decode_ratio=0)
    assert decode_body(two, "gzip", limits) == b"\0" * (2 * MiB)
    with pytest.raises(Rejection) as exc:
        decode_body(two, "gzip", limits._replace(max_decoded_bytes=2 * MiB - 1))
    assert exc.value.status == 413


def test_decoded_limit_counts_across_gzip_members() -> None:
    limits = LIMITS._replace(max_decoded_bytes=100_000)
    member = gzip.compress(b" " * 40_000)
    assert len(decode_body(member * 2, "gzip", limits)) == 80_000
    with pytest.raises(Rejection) as exc:
        decode_body(member * 3, "gzip", limits)
    assert exc.value.status == 413


def test_concatenated_gzip_members_decode() -> None:
    body = doc(version="v", data=[{"a": 1}, {"b": 2}])
    z = gzip.compress(body[:10]) + gzip.compress(body[10:])
    assert decode_collection(JSON, "gzip", z, LIMITS) == Collection("v", [{"a": 1}, {"b": 2}])
    nd = gzip.compress(b'{"a":1}\n') + gzip.compress(b'{"b":2}\n')
    assert decode_collection(NDJSON, "gzip", nd, LIMITS).payloads == [{"a": 1}, {"b": 2}]


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "x-gzip", " gzip "])
def test_gzip_encoding_names(encoding: str) -> None:
    assert decode_collection(JSON, encoding, gzip.compress(doc(data=[{"z": 1}])), LIMITS).payloads == [{"z": 1}]


@pytest.mark.parametrize("encoding", [None, "identity", "IDENTITY"])
def test_identity_encoding(encoding: str | None) -> None:
    assert decode_body(b"abc", encoding, LIMITS) == b"abc"


# -- 415 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "", "text/plain", "application/xml", "multipart/form-data; boundary=x",
     "application/json; charset=latin-1", "application/json; charset=utf-16",
     "application/x-ndjson; charset=iso-8859-1", "application/jsonx"],
)
def test_unsupported_content_type_is_415(content_type: str | None) -> None:
    r = reject(doc(data=[{}]), content_type=content_type)
    assert r.status == 415


@pytest.mark.parametrize("encoding", ["deflate", "br", "compress", "zstd"])
def test_unsupported_content_encoding_is_415(encoding: str) -> None:
    r = reject(zlib.compress(doc(data=[{}])), encoding=encoding)
    assert r.status == 415
    assert encoding in r.description


def test_content_type_is_checked_before_the_body() -> None:
    assert reject(b"", content_type="text/plain").status == 415


# -- NDJSON --------------------------------------------------------------------------------------


def test_ndjson_lines_and_blank_lines() -> None:
    body = b'{"a":1}\n\n   \n{"b":2}\r\n{"c":3}'
    assert decode_collection(NDJSON, None, body, LIMITS) == Collection(None, [{"a": 1}, {"b": 2}, {"c": 3}])


def test_ndjson_non_object_line_names_its_line_number() -> None:
    r = reject(b'{"a":1}\n\n[1,2]\n{"b":2}\n', NDJSON)
    assert r.status == 400 and "line 3" in r.description


def test_ndjson_malformed_line_names_its_line_number() -> None:
    r = reject(b'{"a":1}\n{"b":\n', NDJSON)
    assert r.status == 400 and "line 2" in r.description


def test_ndjson_only_blank_lines_is_400() -> None:
    assert reject(b"\n\n  \n", NDJSON).status == 400


def test_ndjson_too_many_lines() -> None:
    limits = LIMITS._replace(max_payloads=3)
    assert len(decode_collection(NDJSON, None, b"{}\n" * 3, limits).payloads) == 3
    r = reject(b"{}\n" * 4, NDJSON, limits=limits)
    assert r.status == 400 and "too many payloads" in r.description


def test_ndjson_envelope_is_not_unwrapped() -> None:
    # an NDJSON line is a payload, even when it looks like a collection
    c = decode_collection(NDJSON, None, doc(version="1", data=[{}]), LIMITS)
    assert c == Collection(None, [{"version": "1", "data": [{}]}])


# -- properties ----------------------------------------------------------------------------------

# An alphabet with what JSON must escape or treat with care; a fixed alphabet also spares
# hypothesis building its unicode tables (seconds on a fresh machine).
CHARS = list('abcXYZ09 _-"\\/\n\t\r\x00\x1f\x7fé€\u2028\ufeff😀\U0010ffff')


def texts(max_size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=st.sampled_from(CHARS), max_size=max_size)


json_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | texts(12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts(6), children, max_size=3),
    max_leaves=8,
)
payloads = st.lists(st.dictionaries(texts(6), json_values, max_size=4), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(payloads, st.none() | texts(10), st.booleans(), st.booleans())
def test_payloads_round_trip_through_decode_and_encode(
    data: list[dict[str, Any]], version: str | None, ndjson: bool, gzipped: bool
) -> None:
    if ndjson:
        body = b"".join(orjson.dumps(p) + b"\n" for p in data)
        content_type = NDJSON
        version = None
    else:
        body = orjson.dumps({"data": data} if version is None else {"version": version, "data": data})
        content_type = JSON
    if gzipped:
        body = gzip.compress(body)
    limits = Limits(10 * MiB, 10 * MiB, 100)
    collection = decode_collection(content_type, "gzip" if gzipped else None, body, limits)
    assert collection.version == version
    dumps = exact_dumps if collection.exact else orjson.dumps  # as the app does
    lines = encode_lines(1764299045.125, collection.version, collection.payloads, dumps)
    assert lines.endswith(b"\n")
    decoded = [orjson.loads(ln) for ln in lines.split(b"\n")[:-1]]
    assert [d["payload"] for d in decoded] == data
    assert all(d["version"] == version and d["received_at"] == "2025-11-28T03:04:05.125Z" for d in decoded)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([JSON, NDJSON]), st.sampled_from([None, "gzip"]),
       st.booleans())
def test_arbitrary_bytes_only_raise_rejection(body: bytes, content_type: str, encoding: str | None,
                                              wrap: bool) -> None:
    if wrap and encoding == "gzip":
        body = gzip.compress(body)  # valid gzip, arbitrary content
    limits = Limits(200, 400, 5)
    try:
        c = decode_collection(content_type, encoding, body, limits)
    except Rejection as r:
        assert r.status in (400, 413, 415)
    else:
        assert 1 <= len(c.payloads) <= 5
        assert all(type(p) is dict for p in c.payloads)
