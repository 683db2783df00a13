"""Formats: how an object's payload lines become its stored bytes.

An object is described by one *encoding* string, kept in its intent and in a dead letter, so
that a re-send encodes it as it was first cut whatever the config says by then:

| encoding        | stored as                                 | key ends in   | Content-Encoding |
|-----------------|-------------------------------------------|---------------|------------------|
| None            | NDJSON                                    | `.ndjson`     | -                |
| `gzip`          | NDJSON, gzip (mtime 0)                    | `.ndjson.gz`  | gzip             |
| `zstd`          | NDJSON, zstd (one frame, content size)    | `.ndjson.zst` | zstd             |
| `parquet-<c>`   | Parquet, column codec c: gzip, zstd, none | `.parquet`    | -                |

NDJSON encodings are pure functions of the lines and the level: the same intent always gives the
same bytes. Parquet objects hold the same payloads in the same order (see `ParquetLayout`).
pyarrow is imported only where a Parquet object is written, and only installed with the extra
`ingestd[parquet]`.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
from collections.abc import Sequence
from typing import Any

import orjson

from .records import line_fields, needs_exact

COLUMN_TYPES = ("string", "int64", "double", "bool", "timestamp")
LOSSLESS_COLUMNS = ("received_at", "version", "payload")
_INT64 = (-(2**63), 2**63 - 1)


def encoding_of(format: str, compression: str) -> str | None:
    """The encoding string of the config's `batch.format` and `batch.compression`."""
    if format == "parquet":
        return f"parquet-{compression}"
    return None if compression == "none" else compression


def content_encoding(encoding: str | None) -> str | None:
    return encoding if encoding in ("gzip", "zstd") else None


def extension(encoding: str | None) -> str:
    if encoding is not None and encoding.startswith("parquet-"):
        return ".parquet"
    return {None: ".ndjson", "gzip": ".ndjson.gz", "zstd": ".ndjson.zst"}[encoding]


def encode(body: bytes, encoding: str | None, level: int, columns: Sequence[tuple[str, str]] = ()) -> bytes:
    """The stored bytes of an object whose NDJSON lines are `body`."""
    if encoding is None:
        return body
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=level, mtime=0)
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=level).compress(body)
    if encoding.startswith("parquet-"):
        return ParquetLayout(columns).encode(body, encoding.removeprefix("parquet-"), level)
    raise ValueError(f"unknown object encoding {encoding!r}")


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _to_string(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return orjson.dumps(v).decode()
    return None


def _to_int64(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and _INT64[0] <= v <= _INT64[1] else None


def _to_double(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def _to_bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _to_timestamp(v: Any) -> dt.datetime | None:
    """An RFC 3339 / ISO 8601 string (no zone: UTC) or a number of seconds since the epoch."""
    try:
        if isinstance(v, str):
            t = dt.datetime.fromisoformat(v)
            return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return dt.datetime.fromtimestamp(v, dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        pass
    return None


CONVERT = {"string": _to_string, "int64": _to_int64, "double": _to_double, "bool": _to_bool,
           "timestamp": _to_timestamp}


class ParquetLayout:
    """Lossless columns `received_at` (timestamp ms, UTC), `version` (string) and `payload` (the
    payload's JSON text as stored), then one typed column per `batch.parquet_columns` entry, from
    the payload's top-level field of that name: null where it is missing or does not convert
    (strings take numbers and booleans as their JSON text). Every object of one config has the
    same schema."""

    def __init__(self, columns: Sequence[tuple[str, str]]) -> None:
        self.columns = tuple(columns)

    def schema(self) -> Any:
        import pyarrow as pa

        kinds = {"string": pa.string(), "int64": pa.int64(), "double": pa.float64(), "bool": pa.bool_(),
                 "timestamp": pa.timestamp("ms", tz="UTC")}
        return pa.schema([pa.field("received_at", pa.timestamp("ms", tz="UTC"), nullable=False),
                          pa.field("version", pa.string()), pa.field("payload", pa.string(), nullable=False)]
                         + [pa.field(name, kinds[kind]) for name, kind in self.columns])

    def encode(self, body: bytes, codec: str, level: int) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        received: list[int] = []
        versions: list[str | None] = []
        payloads: list[str] = []
        typed: list[list[Any]] = [[] for _ in self.columns]
        seconds: dict[bytes, int] = {}
        loads = json.loads if needs_exact(body) else orjson.loads  # one scan of the object, not one a line
        for line in body.splitlines():
            stamp, version, payload = line_fields(line)
            whole = seconds.get(stamp[:19])
            if whole is None:
                whole = seconds[stamp[:19]] = int(dt.datetime.fromisoformat(stamp[:19].decode() + "+00:00").timestamp())
            received.append(whole * 1000 + int(stamp[20:23]))
            versions.append(orjson.loads(version))
            payloads.append(payload.decode())
            if self.columns:
                value = loads(payload)
                fields = value if isinstance(value, dict) else {}
                for out, (name, kind) in zip(typed, self.columns):
                    out.append(CONVERT[kind](fields.get(name)))
        schema = self.schema()
        arrays = [pa.array(received, pa.timestamp("ms", tz="UTC")), pa.array(versions, pa.string()),
                  pa.array(payloads, pa.string())]
        arrays += [pa.array(values, schema.field(name).type) for values, (name, _) in zip(typed, self.columns)]
        table = pa.Table.from_arrays(arrays, schema=schema)
        buf = io.BytesIO()
        kwargs: dict[str, Any] = {"compression": codec.upper() if codec != "none" else "NONE"}
        if codec != "none":
            kwargs["compression_level"] = level
        pq.write_table(table, buf, **kwargs)
        return buf.getvalue()
