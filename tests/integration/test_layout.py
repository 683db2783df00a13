"""What lands in the bucket: partitions by tenant and payload field, `_missing` and `_overflow`,
hostile field values, zstd and Parquet read back exactly, dead letters and replay of partitioned
objects, and `ingestd athena-ddl` against the real command. Real daemons over real HTTP; S3 is
moto's server."""

from __future__ import annotations

import io
import os
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from tests.faults import (  # noqa: F401 (fault_proxy is a fixture)
    FaultProxy, Ledger, check_delivery, counters, fault_proxy, run_ingestd, s3_tables, sigterm, unique_prefix)
from tests.harness import decoded_body, parquet_rows, parse_object, payload_ids, read_bucket, read_directory_sink, wait_for

pytestmark = pytest.mark.slow

TENANTS = [{"name": "acme", "tokens": ["acme-token"]}, {"name": "globex", "tokens": ["globex-token"]}]
HOSTILE = ["../../etc", "a/b", "_missing", "_overflow", "..", ".", "x" * 300, "é ✓", "%2F", "a\\b", "\x00nul"]


def send(url: str, token: str, payloads: list[dict[str, Any]], version: str | None = "1") -> None:
    doc: dict[str, Any] = {"data": payloads}
    if version is not None:
        doc["version"] = version
    r = requests.post(url + "/v1/payloads", data=orjson.dumps(doc), timeout=10,
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert r.status_code == 202, r.text


def folder_of(key: str) -> list[str]:
    return key.split("/")[:-1]


def test_payloads_are_routed_by_tenant_and_field_with_missing_and_hostile_values_contained(daemon_factory, tmp_path):
    d = daemon_factory({
        "auth": {"tenants": TENANTS},
        "sink": {"prefix": "tele", "key_template": "{prefix}/tenant={tenant}/app={payload.app}/dt={date}/hour={hour}"},
        "batch": {"compression": "zstd", "zstd_level": 5},
    }).start()
    sent: dict[str, tuple[str, Any]] = {}  # id -> (tenant, app as sent, or a marker for missing)
    values: list[Any] = ["web", "ios", 7, 2.5, True, None, "", {"x": 1}, [1]] + HOSTILE
    for tenant, token in (("acme", "acme-token"), ("globex", "globex-token")):
        batch = []
        for i, app in enumerate(values + ["<absent>"]):
            pid = f"{tenant}-{i}"
            payload: dict[str, Any] = {"id": pid, "n": i}
            if app != "<absent>":
                payload["app"] = app
            batch.append(payload)
            sent[pid] = (tenant, app)
        send(d.url, token, batch)
    wait_for(lambda: counters(d)["uploaded_payloads"] >= len(sent), 20, "every payload to land")
    sigterm(d)

    root = tmp_path / "objects"
    objects = read_directory_sink(root)
    assert objects and all(key.endswith(".ndjson.zst") for key in objects)
    ids = payload_ids(objects)
    assert Counter(ids) == Counter(list(sent)), "lost or duplicated payloads"
    for key, lines in objects.items():
        parts = folder_of(key)
        assert parts[0] == "tele" and len(parts) == 5, key  # nothing escaped its folder or added one
        assert parts[3].startswith("dt=") and parts[4].startswith("hour=")
        for line in lines:
            tenant, app = sent[line["payload"]["id"]]
            assert parts[1] == f"tenant={tenant}", key
            if app in (None, "", "<absent>") or isinstance(app, dict | list):
                assert parts[2] == "app=_missing", (key, app)
            elif isinstance(app, bool):
                assert parts[2] == f"app={'true' if app else 'false'}"
            elif isinstance(app, str) and len(app) < 100:
                assert urllib.parse.unquote(parts[2].removeprefix("app=")) == app, (key, app)
                assert app not in ("_missing", "_overflow") or parts[2] == f"app=%5F{app[1:]}"
            elif isinstance(app, str):
                assert len(parts[2]) <= len("app=") + 128
            else:
                assert parts[2] == f"app={orjson.dumps(app).decode()}"
    # every file stayed under the sink root, in a folder of the template's depth
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root.resolve())
        if path.is_file():
            assert len(path.relative_to(root).parts) == 6, path


def test_beyond_max_partitions_payloads_go_to_overflow_and_health_and_metrics_say_so(daemon_factory, tmp_path):
    d = daemon_factory({
        "workers": {"count": 1},
        "sink": {"key_template": "dev={payload.dev}"},
        "batch": {"max_partitions": 3, "max_age_ms": 1500, "compression": "none"},
    }).start()
    r = requests.post(d.url + "/v1/payloads", json={"data": [{"dev": f"d{i}", "i": i} for i in range(10)]}, timeout=10)
    assert r.status_code == 202
    def four_open() -> dict[str, Any] | None:
        h = d.health()
        return h if h["workers"][0]["open_partitions"] == 4 else None

    health = wait_for(four_open, 10, "four open partitions")
    assert health["counters"]["overflow_payloads"] == 7
    metrics = requests.get(d.url + "/metrics", timeout=5).text
    assert "ingestd_overflow_payloads_total 7.0" in metrics and "ingestd_open_partitions 4.0" in metrics
    wait_for(lambda: counters(d)["uploaded_payloads"] >= 10, 20, "every payload to land")
    sigterm(d)
    objects = read_directory_sink(tmp_path / "objects")
    by_folder = {k.split("/")[0]: sorted(ln["payload"]["i"] for ln in v) for k, v in objects.items()}
    assert by_folder == {"dev=d0": [0], "dev=d1": [1], "dev=d2": [2], "dev=_overflow": [3, 4, 5, 6, 7, 8, 9]}


def test_parquet_objects_in_s3_hold_every_payload_exactly_and_the_ddl_reads_them(daemon_factory, s3, bucket, moto_server,
                                                                                tmp_path):
    pytest.importorskip("pyarrow")
    tables = s3_tables(bucket, moto_server)
    tables["sink"]["key_template"] = "{prefix}/dev={payload.device}/dt={date}/hour={hour}"
    tables["batch"] = {"format": "parquet", "compression": "zstd",
                       "parquet_columns": {"device": "string", "seq": "int64", "temp": "double", "ok": "bool"}}
    tables["spool"] = {"durability": "disk"}
    d = daemon_factory(tables).start()
    payloads = [{"id": f"p{i}", "device": f"dev{i % 3}", "seq": i, "temp": i / 4, "ok": i % 2 == 0,
                 "text": "é\"\\\n✓", "nested": {"list": [1, {"two": None}]}} for i in range(30)]
    payloads += [{"id": "big", "device": "dev0", "seq": 2**70}, {"id": "bad", "device": None, "seq": "7", "temp": "x"}]
    body = b'{"version": "9", "data": [' + b",".join(
        orjson.dumps(p) if p["id"] != "big" else b'{"id":"big","device":"dev0","seq":1180591620717411303424}'
        for p in payloads) + b"]}"
    r = requests.post(d.url + "/v1/payloads", data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 202, r.text
    wait_for(lambda: counters(d)["uploaded_payloads"] >= len(payloads), 20, "every payload to land")
    sigterm(d)

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys and all(k.endswith(".parquet") for k in keys)
    rows_by_id: dict[str, tuple[str, dict[str, Any]]] = {}
    for key in keys:
        raw = s3.get_object(Bucket=bucket, Key=key)
        assert raw.get("ContentEncoding") in (None, ""), "a Parquet object carries no Content-Encoding"
        for row in parquet_rows(raw["Body"].read()):
            assert row["payload"] is not None
            rows_by_id[orjson.loads(row["payload"])["id"]] = (key, row)
    assert sorted(rows_by_id) == sorted(p["id"] for p in payloads)
    for p in payloads:
        key, row = rows_by_id[p["id"]]
        if p["id"] == "big":
            assert row["payload"] == '{"id":"big","device":"dev0","seq":1180591620717411303424}'
            assert row["seq"] is None  # beyond int64: null, the payload column keeps it exact
            continue
        assert orjson.loads(row["payload"]) == p
        assert row["version"] == "9"
        assert f"/dev={p['device'] if p['device'] else '_missing'}/" in key
        if p["id"] == "bad":
            assert (row["device"], row["seq"], row["temp"], row["ok"]) == (None, None, None, None)
        else:
            assert (row["device"], row["seq"], row["temp"], row["ok"]) == (p["device"], p["seq"], p["temp"], p["ok"])
    assert len({str(parquet_schema(s3, bucket, k)) for k in keys}) == 1, "objects of one table differ in schema"

    out = run_ingestd(["athena-ddl", "--config", str(d.config_path), "--since", "2026-01-01"], d.workdir)
    assert out.returncode == 0, out.stderr
    ddl = out.stdout
    assert "STORED AS PARQUET" in ddl and "`seq` bigint" in ddl and "`ok` boolean" in ddl
    assert "PARTITIONED BY (`dev` string, `dt` string, `hour` string)" in ddl
    assert f"'storage.location.template' = 's3://{bucket}/telemetry/dev=${{dev}}/dt=${{dt}}/hour=${{hour}}/'" in ddl
    # every key fits the location template
    import re

    pattern = re.escape("telemetry/dev=${dev}/dt=${dt}/hour=${hour}/").replace(r"\$\{dev\}", "[^/]+")
    pattern = pattern.replace(r"\$\{dt\}", r"\d{4}-\d\d-\d\d").replace(r"\$\{hour\}", r"\d\d")
    assert all(re.match(pattern + r"[^/]+\.parquet$", k) for k in keys), keys


def parquet_schema(s3: Any, bucket: str, key: str) -> Any:
    import pyarrow.parquet as pq

    return pq.read_schema(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def test_dead_letters_of_partitioned_zstd_objects_replay_to_their_own_keys(daemon_factory, fault_proxy: FaultProxy,
                                                                           s3, bucket):
    fault_proxy.set_mode("403")
    tables = s3_tables(bucket, fault_proxy.url)
    tables["sink"]["key_template"] = "{prefix}/{tenant}/{payload.pad}/{date}"
    tables["batch"] = {"compression": "zstd", "max_payloads": 10, "max_age_ms": 200}
    d = daemon_factory(tables).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix("dead-zstd"), 12, 4, pad=1)
    assert ledger.statuses == {202: 12}, ledger.statuses
    wait_for(lambda: counters(d)["dead_lettered_payloads"] >= ledger.acked_payloads, 15, "dead letters")
    sigterm(d, 15)
    fault_proxy.set_mode(None)
    r = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert f"replayed {ledger.acked_payloads} payloads" in r.stdout, r.stdout
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys and all(k.startswith("telemetry/default/p/") and k.endswith(".ndjson.zst") for k in keys), keys
    for key in keys:
        obj = s3.get_object(Bucket=bucket, Key=key)
        assert obj["ContentEncoding"] == "zstd"
    check_delivery("dead-letter-zstd-partitioned-replay", ledger, payload_ids(read_bucket(s3, bucket)))


def test_a_parquet_config_without_pyarrow_is_refused_saying_how_to_install(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[batch]\nformat = "parquet"\n')
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "pyarrow").mkdir()
    (blocker / "pyarrow" / "__init__.py").write_text("raise ImportError('pyarrow hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    r = run_ingestd(["check-config", "--config", str(config)], tmp_path, env=env)
    assert r.returncode == 2
    assert "pip install 'ingestd[parquet]'" in r.stderr and "[batch].format" in r.stderr


def test_directory_objects_of_every_format_read_back_exactly(daemon_factory, tmp_path):
    pytest.importorskip("pyarrow")
    for fmt, compression, ext in [("ndjson", "zstd", ".ndjson.zst"), ("parquet", "gzip", ".parquet"),
                                  ("parquet", "none", ".parquet"), ("ndjson", "none", ".ndjson")]:
        sink = tmp_path / f"objects-{fmt}-{compression}"
        d = daemon_factory({"sink": {"path": str(sink)}, "batch": {"format": fmt, "compression": compression}}).start()
        payloads = [{"id": f"{fmt}-{compression}-{i}", "v": [i, {"é": None}], "f": 0.1 * i} for i in range(25)]
        r = requests.post(d.url + "/v1/payloads", json={"data": payloads}, timeout=10)
        assert r.status_code == 202
        wait_for(lambda: counters(d)["uploaded_payloads"] >= 25, 20, f"{fmt}/{compression} objects")
        sigterm(d)
        objects = read_directory_sink(sink)
        assert objects and all(k.endswith(ext) for k in objects), list(objects)
        got = [ln for lines in objects.values() for ln in lines]
        assert [ln["payload"] for ln in got] == payloads
        assert all(ln["version"] is None and ln["received_at"].endswith("Z") for ln in got)
        if compression == "zstd":
            raw = (sink / next(iter(objects))).read_bytes()
            assert parse_object(raw, "x.ndjson.zst") == [orjson.loads(x) for x in decoded_body(raw, ".zst").splitlines()]


def test_objects_aim_at_the_stored_size_target(daemon_factory, tmp_path):
    d = daemon_factory({"workers": {"count": 1},
                        "batch": {"target_object_bytes": 20000, "max_payloads": 100000, "max_age_ms": 3000}}).start()
    n = 20000
    payloads = [{"id": i, "msg": f"event {i} from a sensor in zone {i % 7}", "vals": [i, i * 2, i * 3]} for i in range(n)]
    with requests.Session() as s:
        for chunk in range(0, n, 500):
            r = s.post(d.url + "/v1/payloads", json={"data": payloads[chunk : chunk + 500]}, timeout=10)
            assert r.status_code == 202
    wait_for(lambda: counters(d)["uploaded_payloads"] >= n, 30, "every payload to land")
    sigterm(d)
    # in the order they were written (one uploader sends in the order it cuts)
    paths = sorted((tmp_path / "objects").rglob("*.ndjson.gz"), key=lambda p: p.stat().st_mtime_ns)
    sizes = [p.stat().st_size for p in paths]
    print(f"  stored object sizes for a 20,000-byte target: {sizes}")
    # the first object is measured as soon as it is cut; only the objects cut from the same
    # request (500 payloads: ~47 KB, so at most 3 of 20,000 uncompressed bytes) come before the
    # ratio is known; from then on objects follow it; the last holds what was left
    on = [15000 <= s <= 26000 for s in sizes]
    assert sum(on) >= 3 and max(sizes) <= 26000, sizes
    assert on.index(True) <= 3, sizes
    assert on[on.index(True) : -1].count(False) <= 2, sizes


def test_tenants_survive_a_sigkill_of_the_tree_in_the_log_and_route_after_the_restart(daemon_factory, tmp_path):
    """The tenant travels in the log record: what a killed tree left logged is routed to its
    tenant's folder by the next start, each payload once."""
    tables = {"auth": {"tenants": TENANTS}, "sink": {"key_template": "tenant={tenant}/{payload.kind}"},
              "batch": {"max_age_ms": 60000, "max_payloads": 1000}}  # hold objects open
    d = daemon_factory(tables).start()
    sent = {}
    for i in range(20):
        tenant = ("acme", "globex")[i % 2]
        payloads = [{"id": f"{tenant}-{i}-{k}", "kind": ("a", "b")[k % 2]} for k in range(3)]
        send(d.url, f"{tenant}-token", payloads)
        sent.update({p["id"]: (tenant, p["kind"]) for p in payloads})
    wait_for(lambda: sum(w["pending_payloads"] for w in d.health()["workers"]) == len(sent), 10,
             "uploaders to take every payload")
    d.kill_group()
    assert read_directory_sink(tmp_path / "objects") == {}
    tables["batch"] = {"max_age_ms": 100}
    d2 = daemon_factory(tables).start()
    wait_for(lambda: len(payload_ids(read_directory_sink(tmp_path / "objects"))) >= len(sent), 30, "redelivery")
    sigterm(d2)
    objects = read_directory_sink(tmp_path / "objects")
    assert Counter(payload_ids(objects)) == Counter(list(sent))
    for key, lines in objects.items():
        for line in lines:
            tenant, kind = sent[line["payload"]["id"]]
            assert folder_of(key) == [f"tenant={tenant}", kind], key
    print(f"  tenants after a tree SIGKILL: acknowledged={len(sent)} landed={len(payload_ids(objects))} "
          f"duplicates={len(payload_ids(objects)) - len(set(payload_ids(objects)))}")
