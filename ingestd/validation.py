"""Request bodies: content negotiation, bounded gzip decoding, JSON / NDJSON parsing, shape checks.

Framework-free: `decode_collection` takes the header values and raw body and returns a
`Collection`, or raises `Rejection` carrying the HTTP status, a title and a description that
names the problem. The HTTP layer maps `Rejection` to a response in one place.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any, NamedTuple

import orjson

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson"})
# orjson turns integers beyond 64 bits into floats without a word. A run of 20+ digits (19
# after a minus) is the only way to write one, so only bodies holding such a run are parsed a
# second time, by the standard library, which keeps every integer exact.
_LONG_DIGITS = re.compile(rb"-\d{19,}|\d{20,}")


class Rejection(Exception):
    """A request refused as a whole: nothing of it was kept."""

    def __init__(self, status: int, title: str, description: str, retry_after: int | None = None,
                 tenant: int | None = None) -> None:
        super().__init__(f"{status} {title}: {description}")
        self.status = status
        self.title = title
        self.description = description
        self.retry_after = retry_after  # seconds, for 429 (503 answers use http.retry_after_s)
        self.tenant = tenant  # the tenant a 429 was for (counted per tenant)


class Limits(NamedTuple):
    max_body_bytes: int
    max_decoded_bytes: int
    max_payloads: int


class Collection(NamedTuple):
    version: str | None
    payloads: list[dict[str, Any]]
    exact: bool = False  # parsed by the standard library: serialize with it too (big integers)


def bad_request(description: str) -> Rejection:
    return Rejection(400, "Bad request", description)


def parse_content_type(value: str | None) -> str:
    """Return "json" or "ndjson"; anything else (or a charset other than UTF-8) is a 415."""
    if not value:
        raise Rejection(415, "Unsupported media type", "Content-Type is required: application/json or application/x-ndjson")
    media, *params = (part.strip() for part in value.split(";"))
    media = media.lower()
    for param in params:
        name, _, arg = param.partition("=")
        if name.strip().lower() == "charset" and arg.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise Rejection(415, "Unsupported media type", f"charset {arg.strip()!r} is not supported; send UTF-8")
    if media in JSON_TYPES:
        return "json"
    if media in NDJSON_TYPES:
        return "ndjson"
    raise Rejection(
        415, "Unsupported media type", f"Content-Type {media!r} is not supported; use application/json or application/x-ndjson"
    )


def decode_body(body: bytes, content_encoding: str | None, limits: Limits) -> bytes:
    """Undo Content-Encoding. gzip is decoded incrementally, so a bomb stops at the limit."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise Rejection(415, "Unsupported media type", f"Content-Encoding {encoding!r} is not supported; use gzip or none")
    limit = limits.max_decoded_bytes
    out: list[bytes] = []
    produced = 0
    data = body
    try:
        while data:  # one pass per gzip member; concatenated members are valid gzip
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            chunk = d.decompress(data, limit + 1 - produced)
            while True:
                produced += len(chunk)
                out.append(chunk)
                if produced > limit:
                    raise Rejection(413, "Payload too large", f"decoded body exceeds {limit} bytes")
                if not d.unconsumed_tail:
                    break
                chunk = d.decompress(d.unconsumed_tail, limit + 1 - produced)
            if not d.eof:
                raise bad_request("gzip body is truncated")
            data = d.unused_data
    except zlib.error as e:
        raise bad_request(f"body is labelled Content-Encoding: gzip but is not valid gzip ({e})") from None
    return b"".join(out)


Loads = Any  # orjson.loads or json.loads


def _loads(raw: bytes | memoryview, what: str, loads: Loads = orjson.loads) -> Any:
    try:
        return loads(raw)
    except orjson.JSONDecodeError as e:  # a ValueError, like json's
        raise bad_request(f"{what} is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:
        raise bad_request(f"{what} is not valid JSON: {e}") from None


def _exact_loads(raw: bytes | memoryview) -> Any:
    return json.loads(bytes(raw))


def parse_json(body: bytes, limits: Limits, loads: Loads = orjson.loads) -> Collection:
    doc = _loads(body, "body", loads)
    if not isinstance(doc, dict):
        raise bad_request("body must be a JSON object with a \"data\" array")
    version = doc.get("version")
    if "version" in doc and not isinstance(version, str):
        raise bad_request("\"version\" must be a string")
    if "token" in doc and not isinstance(doc["token"], str):
        raise bad_request("\"token\" must be a string")
    if "data" not in doc:
        raise bad_request("\"data\" is required: a non-empty array of objects")
    data = doc["data"]
    if not isinstance(data, list):
        raise bad_request("\"data\" must be an array of objects")
    if not data:
        raise bad_request("\"data\" is empty: send at least one payload")
    if len(data) > limits.max_payloads:
        raise bad_request(f"too many payloads: {len(data)} > {limits.max_payloads}")
    for i, payload in enumerate(data):
        if type(payload) is not dict:
            raise bad_request(f"data[{i}] is not a JSON object")
    return Collection(version, data)


def parse_ndjson(body: bytes, limits: Limits, loads: Loads = orjson.loads) -> Collection:
    payloads: list[dict[str, Any]] = []
    view = memoryview(body)
    start = 0
    line_no = 0
    end = len(body)
    while start < end:
        nl = body.find(b"\n", start)
        stop = end if nl < 0 else nl
        line_no += 1
        line = view[start:stop]
        start = stop + 1
        if not bytes(line).strip():
            continue
        payload = _loads(line, f"line {line_no}", loads)
        if type(payload) is not dict:
            raise bad_request(f"line {line_no} is not a JSON object")
        payloads.append(payload)
        if len(payloads) > limits.max_payloads:
            raise bad_request(f"too many payloads: more than {limits.max_payloads}")
    if not payloads:
        raise bad_request("body holds no payload: send one JSON object per line")
    return Collection(None, payloads)


def decode_collection(
    content_type: str | None, content_encoding: str | None, body: bytes, limits: Limits
) -> Collection:
    """The whole check of one ingest request body, cheapest checks first."""
    kind = parse_content_type(content_type)
    if len(body) > limits.max_body_bytes:
        raise Rejection(413, "Payload too large", f"body exceeds {limits.max_body_bytes} bytes")
    if not body:
        raise bad_request("body is empty")
    decoded = decode_body(body, content_encoding, limits)
    if not decoded:
        raise bad_request("decoded body is empty")
    parse = parse_json if kind == "json" else parse_ndjson
    collection = parse(decoded, limits)
    if _LONG_DIGITS.search(decoded):
        collection = parse(decoded, limits, _exact_loads)._replace(exact=True)
    return collection
