"""`ingestd athena-ddl`: the CREATE EXTERNAL TABLE that reads what this config writes.

The table's partition columns are the template's placeholders, named after the `name=` that
precedes each in its folder (`dt={date}` -> `dt`) or, bare, after the placeholder (`{tenant}`
-> `tenant`, `{payload.device_id}` -> `device_id`). Partition projection finds every partition
without a crawler or `MSCK REPAIR`: `{date}` is a date range, `{hour}` an integer 00-23,
`{tenant}` an enum of the configured tenants, and `{payload.NAME}` is *injected* (a query must
name its value: `WHERE device_id = 'abc'`; the value as it is in the key, i.e. percent-encoded
where it had to be). `storage.location.template` carries the layout, so folders need not be
Hive-style `name=value`.

NDJSON objects (`.ndjson`, `.gz`, `.zst`: Athena picks the codec from the extension) are read
with the OpenX JSON SerDe, `payload` as its JSON text (`json_extract_scalar(payload, '$.x')`);
Parquet objects with their declared typed columns too.
"""

from __future__ import annotations

import datetime as dt
import re

from .config import Config
from .partitions import KeyTemplate

_TYPES = {"string": "string", "int64": "bigint", "double": "double", "bool": "boolean", "timestamp": "timestamp"}


def _column(name: str) -> str:
    clean = re.sub(r"[^a-z0-9_]", "_", name.lower()).strip("_") or "col"
    return clean if not clean[0].isdigit() else "c_" + clean


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def partition_columns(template: KeyTemplate, taken: set[str]) -> list[tuple[str, str, int]]:
    """(column, placeholder kind, field index) for each partitioning placeholder, in key order."""
    out: list[tuple[str, str, int]] = []
    literal = ""
    for piece in template.pieces:
        if isinstance(piece, str):
            literal = piece
            continue
        kind, index = piece
        if kind == "prefix":
            literal = ""
            continue
        named = re.search(r"([A-Za-z0-9_-]+)=$", literal)
        base = named.group(1) if named else {"date": "dt", "hour": "hour", "tenant": "tenant"}.get(
            kind, template.fields[index] if index >= 0 else kind)
        column = _column(base)
        while column in taken:
            column = "part_" + column
        taken.add(column)
        out.append((column, kind, index))
        literal = ""
    return out


def location_template(template: KeyTemplate, prefix: str, columns: list[tuple[str, str, int]]) -> tuple[str, str]:
    """(the fixed head of every key, the rest with ${column} where each placeholder goes)."""
    names = iter(c[0] for c in columns)
    parts = []
    for piece in template.pieces:
        if isinstance(piece, str):
            parts.append(piece)
        elif piece[0] == "prefix":
            parts.append(prefix.strip("/"))
        else:
            parts.append("${" + next(names) + "}")
    path = "/".join(seg for seg in "".join(parts).split("/") if seg)
    head = path.split("${", 1)[0]
    head = head[: head.rfind("/") + 1] if "${" in path else (path + "/" if path else "")
    return head, path


def athena_ddl(config: Config, table: str = "ingestd_events", location: str = "", since: str = "") -> str:
    b, s = config.batch, config.sink
    template = KeyTemplate.parse(s.key_template)
    parquet = b.format == "parquet"
    data = [("received_at", "timestamp" if parquet else "string"), ("version", "string"), ("payload", "string")]
    if parquet:
        data += [(_column(name), _TYPES[kind]) for name, kind in b.parquet_columns]
    columns = partition_columns(template, {c for c, _ in data})
    root = location.rstrip("/") if location else (f"s3://{s.bucket}" if s.bucket else "s3://YOUR-BUCKET")
    head, path = location_template(template, s.prefix, columns)
    start = since or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    props = ["'projection.enabled' = 'true'"]
    for column, kind, _ in columns:
        if kind == "date":
            props += [f"'projection.{column}.type' = 'date'", f"'projection.{column}.format' = 'yyyy-MM-dd'",
                      f"'projection.{column}.range' = '{start},NOW'", f"'projection.{column}.interval' = '1'",
                      f"'projection.{column}.interval.unit' = 'DAYS'"]
        elif kind == "hour":
            props += [f"'projection.{column}.type' = 'integer'", f"'projection.{column}.range' = '0,23'",
                      f"'projection.{column}.digits' = '2'"]
        elif kind == "tenant":
            props += [f"'projection.{column}.type' = 'enum'",
                      f"'projection.{column}.values' = {_quote(','.join(config.tenancy.names))}"]
        else:
            props.append(f"'projection.{column}.type' = 'injected'")
    props.append(f"'storage.location.template' = {_quote(root + '/' + path + '/')}")
    lines = [f"CREATE EXTERNAL TABLE IF NOT EXISTS `{table}` ("]
    lines.append(",\n".join(f"  `{name}` {kind}" for name, kind in data))
    lines.append(")")
    if columns:
        lines.append("PARTITIONED BY (" + ", ".join(f"`{c}` string" for c, _, _ in columns) + ")")
    if parquet:
        lines.append("STORED AS PARQUET")
    else:
        lines.append("ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'")
    lines.append(f"LOCATION {_quote(root + '/' + head)}")
    if columns:
        lines.append("TBLPROPERTIES (\n  " + ",\n  ".join(props) + "\n)")
    return "\n".join(lines) + ";\n"
