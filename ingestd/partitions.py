"""Partitions: which folder of the bucket each payload goes to (`sink.key_template`).

A template is the folder part of a key, e.g. `"{prefix}/tenant={tenant}/dt={date}/hour={hour}"`.
It is parsed and checked once, at config load (`KeyTemplate.parse`: an unknown placeholder or
an unsafe literal refuses the config, naming it). Every placeholder partitions: two payloads
share an object only if every placeholder renders the same for both. `{date}` and `{hour}`
come from each payload's own `received_at` (so an object never spans two hours), `{tenant}`
from the request's token, `{payload.NAME}` from a top-level field of the payload.

Field values become one path segment each, never a way out of the prefix: bytes outside
`[A-Za-z0-9._-]` are percent-encoded (`/` too), `.` and `..` are encoded, a value longer than
128 bytes keeps its first 111 and a hash of the whole, and the literal values `_missing` and
`_overflow` are escaped (`%5Fmissing`) so they cannot pose as the partitions ingestd itself
uses: `_missing` for a field that is absent, null, empty, an object or an array (the payload is
kept, never dropped), and `_overflow` for every field once an uploader has
`batch.max_partitions` partitions open.

`Router` is what an uploader (and `replay`) uses: it cuts one logged request into runs of
consecutive lines that share a partition (`Route`s), parsing a payload only when the template
names one of its fields.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from urllib.parse import quote

import orjson

from .records import line_fields, needs_exact

DEFAULT_TEMPLATE = "{prefix}/dt={date}/hour={hour}"
MISSING = "_missing"
OVERFLOW = "_overflow"
MAX_SEGMENT = 128
_HASHED_HEAD = MAX_SEGMENT - 17  # head kept of a long value; "-" and 16 hex digits of its hash follow
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FIELD = re.compile(r"payload\.([^{}]+)")
_LITERAL_OK = re.compile(r"[A-Za-z0-9._=/-]*")
_NAMES = ("prefix", "date", "hour", "tenant")


@functools.lru_cache(maxsize=4096)  # field values repeat: devices, apps, regions
def safe_segment(text: str) -> str:
    """`text` made into one safe path segment (see the module docstring)."""
    if text in (MISSING, OVERFLOW):
        return "%5F" + text[1:]
    out = quote(text, safe="").replace("~", "%7E")
    if out in (".", ".."):
        return out.replace(".", "%2E")
    if len(out) > MAX_SEGMENT:
        head = out[:_HASHED_HEAD]
        cut = head.rfind("%", len(head) - 2)
        if cut >= 0:  # never end in half an escape
            head = head[:cut]
        out = head + "-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return out


def field_segment(value: Any) -> str:
    """The segment of one payload field's value: strings as they are, numbers as orjson writes
    them, booleans as true/false; anything else (or nothing) is `_missing`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return safe_segment(value) if value else MISSING
    if isinstance(value, int):
        return safe_segment(str(value))
    if isinstance(value, float):
        return safe_segment(orjson.dumps(value).decode())
    return MISSING


class KeyTemplate:
    """A parsed `sink.key_template`."""

    def __init__(self, pieces: tuple[str | tuple[str, int], ...], fields: tuple[str, ...], source: str) -> None:
        self.pieces = pieces  # literal text, or (placeholder name, field index for payload.NAME else -1)
        self.fields = fields  # the payload fields it names, each once, in order of appearance
        self.source = source

    @classmethod
    def parse(cls, template: str) -> KeyTemplate:
        """Raises ValueError naming what is wrong."""
        pieces: list[str | tuple[str, int]] = []
        fields: list[str] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(template):
            pieces.append(template[pos : m.start()])
            name = m.group(1)
            field = _FIELD.fullmatch(name)
            if field:
                fname = field.group(1)
                if fname not in fields:
                    fields.append(fname)
                pieces.append(("payload", fields.index(fname)))
            elif name in _NAMES:
                pieces.append((name, -1))
            else:
                raise ValueError(f"unknown placeholder {{{name}}} (known: {{prefix}}, {{date}}, {{hour}}, "
                                 f"{{tenant}}, {{payload.NAME}})")
            pos = m.end()
        pieces.append(template[pos:])
        for literal in pieces:
            if not isinstance(literal, str):
                continue
            if "{" in literal or "}" in literal:
                raise ValueError(f"an unmatched brace in {literal!r}")
            if not _LITERAL_OK.fullmatch(literal):
                raise ValueError(f"literal text {literal!r} may hold only A-Z a-z 0-9 . _ = / -")
        rendered = "".join(p if isinstance(p, str) else "x" for p in pieces)
        if any(seg in (".", "..") for seg in rendered.split("/")):
            raise ValueError("a folder named . or .. would leave the prefix")
        return cls(tuple(p for p in pieces if p != ""), tuple(fields), template)

    @property
    def uses_tenant(self) -> bool:
        return ("tenant", -1) in self.pieces

    def render(self, prefix: str, hour: int, tenant: str, values: tuple[str, ...]) -> str:
        """The folder, slashes between segments only (an empty prefix drops its slash).
        `hour`: hours since the epoch; `values`: the fields' segments, in `fields` order."""
        stamp = time.gmtime(hour * 3600)
        out = []
        for p in self.pieces:
            if isinstance(p, str):
                out.append(p)
            elif p[0] == "payload":
                out.append(values[p[1]])
            elif p[0] == "prefix":
                out.append(prefix.strip("/"))
            elif p[0] == "date":
                out.append(time.strftime("%Y-%m-%d", stamp))
            elif p[0] == "hour":
                out.append(f"{stamp.tm_hour:02d}")
            else:
                out.append(tenant)
        return "/".join(seg for seg in "".join(out).split("/") if seg)


class PartitionKey(NamedTuple):
    hour: int  # hours since the epoch (UTC)
    tenant: str
    values: tuple[str, ...]  # segments of the template's payload fields


class Route(NamedTuple):
    first: int  # first line of the run, within the lines given
    count: int  # type: ignore[assignment]
    start: int  # byte offsets of the run within the lines given
    end: int
    key: PartitionKey


class Router:
    """Cuts requests into runs of lines per partition and renders partition folders."""

    FOLDER_CACHE = 4096

    def __init__(self, template: KeyTemplate, prefix: str) -> None:
        self.template = template
        self.prefix = prefix
        self.tenant_matters = template.uses_tenant
        self._folders: dict[PartitionKey, str] = {}

    @property
    def by_field(self) -> bool:
        return bool(self.template.fields)

    def overflow(self, key: PartitionKey) -> PartitionKey:
        return key._replace(values=(OVERFLOW,) * len(key.values))

    def folder(self, key: PartitionKey) -> str:
        found = self._folders.get(key)
        if found is None:
            if len(self._folders) >= self.FOLDER_CACHE:
                self._folders.clear()
            found = self._folders[key] = self.template.render(self.prefix, key.hour, key.tenant, key.values)
        return found

    def whole(self, received_at: float, tenant: str) -> PartitionKey:
        """The partition of a whole request (a template without payload fields)."""
        return PartitionKey(int(received_at // 3600), tenant if self.tenant_matters else "", ())

    def routes(self, received_at: float, tenant: str, lines: bytes, count: int) -> Iterator[Route]:
        """Runs of consecutive lines of one request that share a partition, in order (a template
        with payload fields; without, the whole request is `whole`)."""
        hour = int(received_at // 3600)
        tenant = tenant if self.tenant_matters else ""
        run_key: PartitionKey | None = None
        run_first = run_start = pos = 0
        loads = json.loads if needs_exact(lines) else orjson.loads  # one scan for the whole request
        for n in range(count):
            end = lines.index(b"\n", pos) + 1
            key = PartitionKey(hour, tenant, self.values(lines[pos:end], loads))
            if key != run_key:
                if run_key is not None:
                    yield Route(run_first, n - run_first, run_start, pos, run_key)
                run_key, run_first, run_start = key, n, pos
            pos = end
        if run_key is not None:
            yield Route(run_first, count - run_first, run_start, pos, run_key)

    def values(self, line: bytes, loads: Callable[[bytes], Any]) -> tuple[str, ...]:
        payload = loads(line_fields(line)[2])
        if not isinstance(payload, dict):
            return (MISSING,) * len(self.template.fields)
        return tuple(field_segment(payload.get(name)) for name in self.template.fields)
