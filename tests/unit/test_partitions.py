"""partitions.py (key templates, safe segments, routing), `batching.Partitions` (a batcher per
partition, bounded together), formats.py (zstd, Parquet) and athena.py (the DDL)."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import re
import urllib.parse

import orjson
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from ingestd import formats
from ingestd.athena import athena_ddl
from ingestd.batching import Partitions
from ingestd.config import BatchConfig, Config, SinkConfig, from_mapping
from ingestd.errors import ConfigError
from ingestd.partitions import MISSING, OVERFLOW, KeyTemplate, PartitionKey, Router, field_segment, safe_segment
from ingestd.records import encode_lines, exact_dumps
from ingestd.requestlog import Part

T = 1764299045.125  # 2025-11-28T03:04:05.125Z
HOUR = int(T // 3600)


class FakeClock:
    def __init__(self, now: float = T) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lines_of(*payloads: object, t: float = T, version: str | None = "1") -> bytes:
    return encode_lines(t, version, list(payloads), dumps=exact_dumps)  # type: ignore[arg-type]


# -- templates -------------------------------------------------------------------------------------


def test_default_template_renders_todays_layout_and_an_empty_prefix_drops_its_slash() -> None:
    tpl = KeyTemplate.parse("{prefix}/dt={date}/hour={hour}")
    assert tpl.render("telemetry/raw", HOUR, "", ()) == "telemetry/raw/dt=2025-11-28/hour=03"
    assert tpl.render("", HOUR, "", ()) == "dt=2025-11-28/hour=03"
    assert tpl.render("/p/", HOUR, "", ()) == "p/dt=2025-11-28/hour=03"


def test_date_and_hour_are_utc() -> None:
    tpl = KeyTemplate.parse("{date}/{hour}")
    assert tpl.render("", int(1764370800 // 3600), "", ()) == "2025-11-28/23"  # the 29th in UTC+14


@pytest.mark.parametrize("template, problem", [
    ("{prefix}/{day}", "unknown placeholder {day}"),
    ("{prefix}/{payload.}", "unknown placeholder {payload.}"),
    ("{prefix}/x}", "unmatched brace"),
    ("{prefix}/{date", "unmatched brace"),
    ("{prefix}/../{date}", "leave the prefix"),
    ("./{date}", "leave the prefix"),
    ("{prefix}/a b/{date}", "may hold only"),
    ("{prefix}/%2F/{date}", "may hold only"),
])
def test_bad_templates_are_refused_naming_the_problem(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        KeyTemplate.parse(template)


def test_a_bad_template_refuses_the_config_naming_the_key_and_placeholder() -> None:
    with pytest.raises(ConfigError, match=r"\[sink\]\.key_template: unknown placeholder \{region\}"):
        from_mapping({"sink": {"key_template": "{prefix}/{region}"}}, "f.toml")


def test_fields_are_listed_once_in_order() -> None:
    tpl = KeyTemplate.parse("{payload.app}/{tenant}/{payload.device}/{payload.app}-{date}")
    assert tpl.fields == ("app", "device") and tpl.uses_tenant


# -- field values and safe segments ------------------------------------------------------------------


@pytest.mark.parametrize("value, segment", [
    ("eu-west", "eu-west"), (42, "42"), (-1.5, "-1.5"), (1e300, "1e%2B300"), (True, "true"), (False, "false"),
    (2**70, str(2**70)),
    (None, MISSING), ("", MISSING), ({"a": 1}, MISSING), ([1], MISSING),
    ("_missing", "%5Fmissing"), ("_overflow", "%5Foverflow"), ("_other", "_other"),
    ("a/b", "a%2Fb"), ("..", "%2E%2E"), (".", "%2E"), ("../../etc", "..%2F..%2Fetc"), ("é", "%C3%A9"),
    ("a b%c~", "a%20b%25c%7E"), ("\x00", "%00"),
])
def test_field_values_become_one_safe_segment(value: object, segment: str) -> None:
    assert field_segment(value) == segment


@given(st.text(max_size=300))
def test_any_text_becomes_a_bounded_segment_that_cannot_leave_its_folder(text: str) -> None:
    seg = safe_segment(text)
    assert re.fullmatch(r"[A-Za-z0-9._%-]{1,128}", seg) or (text == "" and seg == "")
    assert seg not in (".", "..", MISSING, OVERFLOW) and "/" not in seg
    if len(seg) < 111:  # not shortened: it decodes back to the value
        assert urllib.parse.unquote(seg, errors="surrogatepass") == text


def test_a_value_of_128_bytes_is_kept_and_one_of_129_is_shortened() -> None:
    assert safe_segment("v" * 128) == "v" * 128
    over = safe_segment("v" * 129)
    assert len(over) == 128 and over != "v" * 128 and over.startswith("v" * 111 + "-")


def test_long_values_keep_a_head_and_a_hash_so_distinct_values_stay_distinct() -> None:
    a, b = "x" * 200 + "a", "x" * 200 + "b"
    sa, sb = safe_segment(a), safe_segment(b)
    assert len(sa) == len(sb) == 128 and sa != sb and sa.startswith("x" * 100)
    escaped = safe_segment("é" * 100)  # never ends in half an escape
    assert len(escaped) <= 128 and re.fullmatch(r"(%C3%A9)+(%C3)?-[0-9a-f]{16}", escaped)


# -- routing ---------------------------------------------------------------------------------------------


def test_without_payload_fields_a_request_is_one_partition() -> None:
    router = Router(KeyTemplate.parse("{prefix}/{tenant}/dt={date}"), "p")
    assert not router.by_field and router.whole(T, "acme") == PartitionKey(HOUR, "acme", ())
    assert router.folder(router.whole(T, "acme")) == "p/acme/dt=2025-11-28"


def test_tenant_is_ignored_by_a_template_without_it() -> None:
    router = Router(KeyTemplate.parse("{date}"), "")
    assert router.whole(T, "acme") == PartitionKey(HOUR, "", ())


def test_a_request_is_cut_into_runs_of_consecutive_lines_per_field_value() -> None:
    router = Router(KeyTemplate.parse("{payload.dev}"), "")
    payloads = [{"dev": "a"}, {"dev": "a"}, {"dev": "b"}, {}, {"dev": "a"}, {"dev": 2**70}]
    lines = lines_of(*payloads)
    routes = list(router.routes(T, "", lines, len(payloads)))
    assert [(r.first, r.count, r.key.values) for r in routes] == [
        (0, 2, ("a",)), (2, 1, ("b",)), (3, 1, (MISSING,)), (4, 1, ("a",)), (5, 1, (str(2**70),))]
    assert b"".join(lines[r.start : r.end] for r in routes) == lines


def test_a_payload_that_needs_the_exact_serializer_is_routed_by_its_exact_value() -> None:
    router = Router(KeyTemplate.parse("{payload.n}"), "")
    lines = encode_lines(T, None, [{"n": 2**80}], dumps=exact_dumps)
    assert [r.key.values for r in router.routes(T, "", lines, 1)] == [(str(2**80),)]


# -- Partitions: a batcher per partition, bounded together ------------------------------------------------


def partitions(template: str = "{payload.dev}", max_payloads: int = 100, max_bytes: int = 1 << 20,
               max_partitions: int = 10, clock: FakeClock | None = None) -> Partitions:
    return Partitions(Router(KeyTemplate.parse(template), ""), max_payloads, max_bytes, 1.0, clock or FakeClock(),
                      max_partitions)


def add(p: Partitions, offset: int, *payloads: dict[str, object], t: float = T, tenant: str = "default") -> None:
    p.add(Part(0, 1, offset, 0, len(payloads)), t, tenant, lines_of(*payloads, t=t))


def devs(batch_lines: bytes) -> list[object]:
    return [orjson.loads(ln)["payload"].get("dev") for ln in batch_lines.splitlines()]


def test_payloads_of_different_partitions_never_share_an_object() -> None:
    p = partitions()
    add(p, 0, {"dev": "a", "i": 0}, {"dev": "b", "i": 1}, {"dev": "a", "i": 2})
    add(p, 100, {"dev": "b", "i": 3})
    assert p.open_partitions == 2 and len(p) == 4
    batches = {b.folder: b for b in p.take_all()}
    assert set(batches) == {"a", "b"}
    assert devs(batches["a"].body()) == ["a", "a"] and devs(batches["b"].body()) == ["b", "b"]
    # each part names exactly the lines it holds
    assert [(x.offset, x.first_line, x.count) for x in batches["a"].parts] == [(0, 0, 1), (0, 2, 1)]
    assert [(x.offset, x.first_line, x.count) for x in batches["b"].parts] == [(0, 1, 1), (100, 0, 1)]
    assert p.open_partitions == 0 and len(p) == 0


def test_an_object_never_spans_two_hours() -> None:
    p = partitions("{prefix}/dt={date}/hour={hour}")
    add(p, 0, {"a": 1}, t=T)
    add(p, 100, {"a": 2}, t=T + 3600)
    assert sorted(b.folder for b in p.take_all()) == ["dt=2025-11-28/hour=03", "dt=2025-11-28/hour=04"]


def test_beyond_max_partitions_payloads_go_to_the_overflow_partition_and_are_counted() -> None:
    p = partitions(max_partitions=3)
    for i in range(6):
        add(p, i * 100, {"dev": f"d{i}", "i": i})
    assert p.overflow_payloads == 3 and p.open_partitions == 4  # three, and the overflow one
    batches = {b.folder: b for b in p.take_all()}
    assert set(batches) == {"d0", "d1", "d2", OVERFLOW}
    assert devs(batches[OVERFLOW].body()) == ["d3", "d4", "d5"]


def test_a_partition_that_is_already_open_takes_its_payloads_even_at_the_limit() -> None:
    p = partitions(max_partitions=1)
    add(p, 0, {"dev": "a"})
    add(p, 100, {"dev": "a"})
    assert p.overflow_payloads == 0 and [b.count for b in p.take_all()] == [2]


def test_without_payload_fields_there_is_no_overflow() -> None:
    p = partitions("{tenant}", max_partitions=1)
    add(p, 0, {"a": 1}, tenant="x")
    add(p, 100, {"a": 1}, tenant="y")
    assert p.overflow_payloads == 0 and sorted(b.folder for b in p.take_all()) == ["x", "y"]


def test_all_open_partitions_together_hold_at_most_max_bytes() -> None:
    one = len(lines_of({"dev": "d00", "pad": "x" * 100}))
    p = partitions(max_bytes=one * 10, max_partitions=100)
    for i in range(50):
        add(p, i * 1000, {"dev": f"d{i % 20:02d}", "pad": "x" * 100})
        assert p._held <= one * 10
    batches = p.take_all()
    assert sum(b.count for b in batches) == 50 and all(b.size <= one * 10 for b in batches)


def test_a_partition_whose_objects_are_handed_over_is_forgotten_and_the_age_rule_holds_per_partition() -> None:
    clock = FakeClock()
    p = partitions(clock=clock)
    add(p, 0, {"dev": "a"})
    clock.now += 0.5
    add(p, 100, {"dev": "b"}, t=T + 0.5)
    assert p.due_at() == T + 1.0
    clock.now = T + 1.0
    assert [b.folder for b in p.take_ready()] == ["a"] and p.open_partitions == 1
    clock.now = T + 1.5
    assert [b.folder for b in p.take_ready()] == ["b"] and p.open_partitions == 0 and p.due_at() is None


def test_a_lower_object_bound_applies_to_open_partitions_too() -> None:
    p = partitions(max_bytes=1 << 20)
    add(p, 0, {"dev": "a", "pad": "x" * 500})
    p.set_object_bytes(1000)
    add(p, 100, {"dev": "a", "pad": "x" * 500}, {"dev": "a", "pad": "x" * 500})
    sizes = [b.size for b in p.take_all()]
    assert len(sizes) >= 2 and all(s <= 1000 for s in sizes[:-1])


# -- formats --------------------------------------------------------------------------------------------


BODY = lines_of({"dev": "a", "n": 1, "t": 1.5}, {"dev": "b", "n": 2**70, "ok": True}, version=None) + encode_lines(
    T + 0.001, "v2", [{"n": 2**70}], dumps=exact_dumps)


def test_extensions_and_content_encodings() -> None:
    assert [formats.extension(e) for e in (None, "gzip", "zstd", "parquet-zstd")] == [
        ".ndjson", ".ndjson.gz", ".ndjson.zst", ".parquet"]
    assert [formats.content_encoding(e) for e in (None, "gzip", "zstd", "parquet-gzip")] == [None, "gzip", "zstd", None]
    assert formats.encoding_of("ndjson", "none") is None and formats.encoding_of("parquet", "none") == "parquet-none"


def test_zstd_and_gzip_objects_decode_to_the_exact_lines_and_are_the_same_bytes_every_time() -> None:
    z = formats.encode(BODY, "zstd", 3)
    assert zstandard.ZstdDecompressor().decompress(z) == BODY and formats.encode(BODY, "zstd", 3) == z
    assert gzip.decompress(formats.encode(BODY, "gzip", 6)) == BODY


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
def test_parquet_objects_hold_every_payload_exactly(codec: str) -> None:
    import pyarrow.parquet as pq

    data = formats.encode(BODY, f"parquet-{codec}", 3)
    table = pq.read_table(io.BytesIO(data))
    assert table.column_names == ["received_at", "version", "payload"]
    rows = table.to_pylist()
    assert [r["payload"] for r in rows] == [ln.split(b',"payload":', 1)[1][:-1].decode() for ln in BODY.splitlines()]
    assert [json.loads(r["payload"]) for r in rows] == [{"dev": "a", "n": 1, "t": 1.5},
                                                                   {"dev": "b", "n": 2**70, "ok": True}, {"n": 2**70}]
    assert [r["version"] for r in rows] == [None, None, "v2"]
    assert rows[0]["received_at"] == dt.datetime(2025, 11, 28, 3, 4, 5, 125000, tzinfo=dt.timezone.utc)
    assert rows[2]["received_at"] == dt.datetime(2025, 11, 28, 3, 4, 5, 126000, tzinfo=dt.timezone.utc)


def test_parquet_typed_columns_are_null_where_a_value_is_missing_or_does_not_convert() -> None:
    import pyarrow.parquet as pq

    columns = (("dev", "string"), ("n", "int64"), ("t", "double"), ("ok", "bool"), ("when", "timestamp"))
    body = lines_of({"dev": "a", "n": 1, "t": 1.5, "ok": True, "when": "2026-01-02T03:04:05Z"},
                    {"dev": 7, "n": 2**70, "t": "x", "ok": 1, "when": 1767323045},
                    {"n": 1.5, "t": 2, "when": "not a time"}, [1, 2])
    table = pq.read_table(io.BytesIO(formats.encode(body, "parquet-zstd", 3, columns)))
    assert [str(table.schema.field(n).type) for n, _ in columns] == ["string", "int64", "double", "bool",
                                                                     "timestamp[ms, tz=UTC]"]
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert table.select([n for n, _ in columns]).to_pylist() == [
        {"dev": "a", "n": 1, "t": 1.5, "ok": True, "when": when},
        {"dev": "7", "n": None, "t": None, "ok": None, "when": when},
        {"dev": None, "n": None, "t": 2.0, "ok": None, "when": None},
        {"dev": None, "n": None, "t": None, "ok": None, "when": None},
    ]


def test_parquet_columns_that_collide_or_have_unknown_types_refuse_the_config() -> None:
    with pytest.raises(ConfigError, match=r"parquet_columns: 'payload' is one of the lossless columns"):
        from_mapping({"batch": {"format": "parquet", "parquet_columns": {"payload": "string"}}})
    with pytest.raises(ConfigError, match=r"column 'x': type must be one of"):
        from_mapping({"batch": {"format": "parquet", "parquet_columns": {"x": "decimal"}}})
    with pytest.raises(ConfigError, match=r"parquet_columns: set, but \[batch\]\.format is not"):
        from_mapping({"batch": {"parquet_columns": {"x": "string"}}})


# -- athena-ddl -----------------------------------------------------------------------------------------


def test_ddl_of_the_default_layout_projects_date_and_hour_over_ndjson() -> None:
    ddl = athena_ddl(Config(sink=SinkConfig(kind="s3", bucket="bkt", prefix="tele")), since="2026-11-01")
    assert ddl.startswith("CREATE EXTERNAL TABLE IF NOT EXISTS `ingestd_events` (\n  `received_at` string,")
    assert "PARTITIONED BY (`dt` string, `hour` string)" in ddl
    assert "ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'" in ddl
    assert "LOCATION 's3://bkt/tele/'" in ddl
    assert "'projection.dt.range' = '2026-11-01,NOW'" in ddl and "'projection.hour.digits' = '2'" in ddl
    assert "'storage.location.template' = 's3://bkt/tele/dt=${dt}/hour=${hour}/'" in ddl
    assert ddl.rstrip().endswith(");")


def test_ddl_of_a_parquet_layout_by_tenant_and_field() -> None:
    config = from_mapping({
        "sink": {"kind": "s3", "bucket": "bkt", "key_template": "{tenant}/{payload.device}/{date}-{hour}"},
        "batch": {"format": "parquet", "parquet_columns": {"device": "string", "seq": "int64", "Temp C": "double"}},
        "auth": {"tenants": [{"name": "acme", "tokens": ["t-1"]}]},
    })
    ddl = athena_ddl(config, table="t", location="s3://other/", since="2026-01-01")
    assert "`received_at` timestamp," in ddl and "`seq` bigint" in ddl and "`temp_c` double" in ddl
    assert "STORED AS PARQUET" in ddl
    # a partition column never shadows a data column
    assert "PARTITIONED BY (`tenant` string, `part_device` string, `dt` string, `hour` string)" in ddl
    assert "'projection.tenant.values' = 'default,acme'" in ddl
    assert "'projection.part_device.type' = 'injected'" in ddl
    assert "LOCATION 's3://other/'" in ddl
    assert "'storage.location.template' = 's3://other/${tenant}/${part_device}/${dt}-${hour}/'" in ddl


def test_default_batch_and_sink_keys() -> None:
    b, s = BatchConfig(), SinkConfig()
    assert (b.compression, b.format, b.max_partitions, b.zstd_level, b.parquet_columns) == ("gzip", "ndjson", 1000, 3, ())
    assert s.key_template == "{prefix}/dt={date}/hour={hour}"


def test_the_bounds_of_the_new_keys_are_accepted() -> None:
    c = from_mapping({"batch": {"zstd_level": 19, "max_partitions": 1, "target_object_bytes": 0, "compression": "zstd"},
                      "shutdown": {"lame_duck_s": 0}})
    assert (c.batch.zstd_level, c.batch.max_partitions) == (19, 1)
    assert from_mapping({"batch": {"zstd_level": 1}}).batch.zstd_level == 1
