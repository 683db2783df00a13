"""Request bodies: content negotiation, bounded gzip decoding, JSON / NDJSON parsing, shape checks,
and the encoding of what is stored.

Framework-free: `decode_collection` takes the header values and raw body and returns a
`Collection`, or raises `Rejection` carrying the HTTP status, a title and a description that
names the problem. `encode_collection` turns a collection into its stored lines, refusing what
cannot be stored. The HTTP layer maps `Rejection` to a response in one place.

Bounded cost per request (SPEC): whatever a body holds, what it costs is bounded before the
costly steps run. Decoding stops at `max_decoded_bytes` and at `max_decode_ratio` times the
compressed size; an NDJSON body's lines (blank ones too) are counted before any is parsed; the
JSON values a body can create are over-estimated by counting three bytes (`,` `[` `{`), which
bounds parsing, whose cost is per value (a Python object each), before it starts; and what is
stored is bounded too: a payload at `max_payload_bytes`, the `version` repeated on each of its
lines at `max_version_bytes`. Each check that needs more than a comparison runs only on bodies
big enough to fail it, so a small body pays nothing for them.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, NamedTuple

import orjson

from .config import HttpConfig
from .records import encode_lines, exact_dumps, needs_exact

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson"})
# The standard library's parse and serialization cost about four times orjson's per value.
EXACT_COST = 4
# orjson serializes at most 254 levels of nesting (the payload object is level 1).
MAX_DEPTH = 254
# A gzip body may always decode to this much, whatever its ratio (a raw body of this size costs
# the same): the ratio limit bites on bodies that decode beyond it.
RATIO_FLOOR = 1 << 20


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


_D = HttpConfig  # the defaults of the keys below (a dataclass field's default is its class attribute)


class Limits(NamedTuple):
    max_body_bytes: int
    max_decoded_bytes: int
    max_payloads: int
    max_json_values: int = _D.max_json_values
    max_decode_ratio: int = _D.max_decode_ratio  # 0: no ratio limit
    max_payload_bytes: int = _D.max_payload_bytes
    max_version_bytes: int = _D.max_version_bytes

    @classmethod
    def from_config(cls, http: HttpConfig) -> Limits:
        return cls(http.max_body_bytes, http.max_decoded_bytes, http.max_payloads, http.max_json_values,
                   http.max_decode_ratio, http.max_payload_bytes, http.max_version_bytes)


class Collection(NamedTuple):
    version: str | None
    payloads: list[dict[str, Any]]
    exact: bool = False  # parsed by the standard library: serialize with it too (big integers)


def bad_request(description: str) -> Rejection:
    return Rejection(400, "Bad request", description)


def too_large(description: str) -> Rejection:
    return Rejection(413, "Payload too large", description)


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
    """Undo Content-Encoding. gzip is decoded incrementally, so a bomb stops at the limit: the
    smaller of max_decoded_bytes and (past RATIO_FLOOR) max_decode_ratio x the compressed size."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise Rejection(415, "Unsupported media type", f"Content-Encoding {encoding!r} is not supported; use gzip or none")
    limit = limits.max_decoded_bytes
    ratio = limits.max_decode_ratio
    by_ratio = ratio > 0 and max(RATIO_FLOOR, ratio * len(body)) < limit
    if by_ratio:
        limit = max(RATIO_FLOOR, ratio * len(body))
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
                    if by_ratio:
                        raise too_large(
                            f"gzip body of {len(body)} bytes decodes to more than {limit} bytes: over "
                            f"http.max_decode_ratio ({ratio}) times its size (bodies decoding beyond "
                            f"{RATIO_FLOOR} bytes); send it less compressed, or in smaller requests")
                    raise too_large(f"decoded body exceeds {limit} bytes (http.max_decoded_bytes)")
                if not d.unconsumed_tail:
                    break
                chunk = d.decompress(d.unconsumed_tail, limit + 1 - produced)
            if not d.eof:
                raise bad_request("gzip body is truncated")
            data = d.unused_data
    except zlib.error as e:
        raise bad_request(f"body is labelled Content-Encoding: gzip but is not valid gzip ({e})") from None
    return b"".join(out)


def count_lines(decoded: bytes, limits: Limits) -> None:
    """An NDJSON body's lines, blank ones included, are at most max_payloads: counted before any
    is parsed (a body of blank lines costs one pass over its bytes, not one loop turn a line)."""
    most = limits.max_payloads
    if len(decoded) <= most:  # a line takes at least one byte
        return
    lines = decoded.count(b"\n") + (not decoded.endswith(b"\n"))
    if lines > most:
        raise bad_request(f"too many payloads: {lines} lines (blank lines count) > {most} (http.max_payloads)")


def count_values(decoded: bytes, limits: Limits, exact: bool) -> None:
    """Refuse, before parsing, a body that may hold more JSON values than max_json_values.

    Every value but the first of an array or object follows a comma, and every array or object
    opens with "[" or "{": commas + "[" + "{" + 1 is at least the number of values (an object's
    member, key and value, counting once), more when such bytes sit inside strings. Each of these
    bytes is one byte of the body, so a body shorter than the limit cannot be over it."""
    most = limits.max_json_values // EXACT_COST if exact else limits.max_json_values
    if len(decoded) <= most:
        return
    values = decoded.count(b",") + decoded.count(b"[") + decoded.count(b"{")
    if values > most:
        why = (f" (a body with integers beyond 64 bits is parsed twice and counts {EXACT_COST} times: at most "
               f"{most})" if exact else "")
        raise too_large(f"body may hold {values} JSON values (its commas, '[' and '{{'), over "
                        f"http.max_json_values ({limits.max_json_values}){why}; send fewer payloads per request")


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
    if version is not None and len(version) * 4 > limits.max_version_bytes:  # a char is at most 4 bytes
        size = len(version.encode(errors="surrogatepass"))
        if size > limits.max_version_bytes:
            raise bad_request(f"\"version\" is {size} bytes long, over http.max_version_bytes "
                              f"({limits.max_version_bytes}): it is stored with every payload")
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
        raise bad_request(f"too many payloads: {len(data)} > {limits.max_payloads} (http.max_payloads)")
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
            raise bad_request(f"too many payloads: more than {limits.max_payloads} (http.max_payloads)")
    if not payloads:
        raise bad_request("body holds no payload: send one JSON object per line")
    return Collection(None, payloads)


def decode_collection(
    content_type: str | None, content_encoding: str | None, body: bytes, limits: Limits
) -> Collection:
    """The whole check of one ingest request body, cheapest checks first."""
    kind = parse_content_type(content_type)
    if len(body) > limits.max_body_bytes:
        raise too_large(f"body exceeds {limits.max_body_bytes} bytes (http.max_body_bytes)")
    if not body:
        raise bad_request("body is empty")
    decoded = decode_body(body, content_encoding, limits)
    if not decoded:
        raise bad_request("decoded body is empty")
    if kind == "ndjson":
        count_lines(decoded, limits)
    count_values(decoded, limits, exact=False)
    exact = needs_exact(decoded)
    if exact:
        count_values(decoded, limits, exact=True)
    parse = parse_json if kind == "json" else parse_ndjson
    collection = parse(decoded, limits)  # orjson's checks hold on the exact path too
    if exact:
        del collection  # not two parses held at once
        collection = parse(decoded, limits, _exact_loads)._replace(exact=True)
        # orjson refuses to store deeper payloads (encode_collection); the standard library would
        # not, so the exact path checks here, where few brackets spare it the walk
        if decoded.count(b"[") + decoded.count(b"{") > MAX_DEPTH:
            for i, p in enumerate(collection.payloads):
                if _deeper_than(p, MAX_DEPTH):
                    raise _too_deep(i, len(collection.payloads))
    return collection


def _deeper_than(value: Any, most: int) -> bool:
    """Is `value` (level 1) nested more than `most` levels deep? Iterative: no recursion limit."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > most:
            return True
        children = v.values() if type(v) is dict else v
        stack.extend((c, depth + 1) for c in children if type(c) is dict or type(c) is list)
    return False


def encode_collection(received_at: float, collection: Collection, limits: Limits) -> bytes:
    """The stored lines of a collection (`records.encode_lines`), refusing a payload nested more
    than MAX_DEPTH levels (400) or larger than max_payload_bytes as stored (413)."""
    payloads = collection.payloads
    if collection.exact:  # its depth was checked by decode_collection
        lines = encode_lines(received_at, collection.version, payloads, exact_dumps)
    else:
        try:
            lines = encode_lines(received_at, collection.version, payloads)
        except orjson.JSONEncodeError:  # orjson's own depth limit: find the payload to name it
            deep = [i for i, p in enumerate(payloads) if _deeper_than(p, MAX_DEPTH)]
            if not deep:
                raise
            raise _too_deep(deep[0], len(payloads)) from None
    check_payload_sizes(lines, len(payloads), limits)
    return lines


def _too_deep(i: int, n: int) -> Rejection:
    return bad_request(f"payload {i + 1} of {n} is nested more than {MAX_DEPTH} levels deep (the payload object "
                       f"is level 1), more than can be stored")


_PAYLOAD_KEY = b',"payload":'


def check_payload_sizes(lines: bytes, count: int, limits: Limits) -> None:
    """Each of `count` stored lines holds one payload: refuse one whose JSON is over
    max_payload_bytes. Every line starts with the same envelope head, so when all the payloads
    together fit, each does, and the lines need not be walked."""
    most = limits.max_payload_bytes
    if len(lines) <= most:  # a payload is shorter than its line
        return
    head = lines.index(_PAYLOAD_KEY) + len(_PAYLOAD_KEY)  # a JSON string cannot hold `,"` unescaped
    frame = head + 2  # the head, and "}\n" after the payload
    if len(lines) - count * frame <= most:
        return
    start = 0
    for i in range(count):
        end = lines.index(b"\n", start) + 1  # serialized JSON holds no raw newline
        size = end - start - frame
        if size > most:
            raise too_large(f"payload {i + 1} of {count} is {size} bytes as stored, over "
                            f"http.max_payload_bytes ({most})")
        start = end
