"""The bench's report of issue 10's targets, its tables, and the helpers that build its scenarios
(scripts/bench_support/report.py, servers.py, load.py): pure functions, on made-up figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from bench_support.load import make_event
from bench_support.report import (
    evaluate_targets,
    profile_label,
    profile_order,
    render_all,
    render_size_table,
)
from bench_support.servers import fronts_from_check_config, render_nginx, with_front


def scenario(key: str, delivered: float, *, rps: float | None = None, puts: float | None = 2.0, warm: bool = True,
             dropped: int = 0, hist: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": key, "base": key.split("/")[0], "requests_per_s": rps or delivered, "requests_non2xx": 0,
            "delivered_payloads_per_s": delivered, "cpu_us_per_payload": 100.0, "s3_puts_per_1000_payloads": puts,
            "latency_ms": {"p50": 1.0, "p99": 5.0}, "peak_rss_mb": 50.0, "drain_s": 0.5, "warm_up": warm,
            "dropped_payloads": dropped, "failed_puts": dropped, "accepted_payloads": 1000, "backlog_left": 0,
            "histograms": hist or {}, "machine": {"busy_pct": 90.0, "steal_pct": 0.0, "cores": {}},
            "sink": "nginx"}


OVERLOAD = {"statuses": {202: 10, 503: 900}, "socket_errors": 0, "only_202_503_429": True, "overload_factor": 26.0,
            "rss_growth_mb": 4.0, "connections": 256, "sink_delay_ms": 100.0, "answers_per_s": 910.0,
            "accepted_per_s": 10.0, "delivered_payloads_per_s": 350.0, "rss_cold_mb": 100.0, "rss_base_mb": 200.0,
            "rss_peak_mb": 204.0, "latency_ms": {"p50": 1.0, "p99": 30.0, "max": 90.0}}
LATENCY = {"latency_ms": {"p50": 2.0, "p90": 5.0, "p99": 12.0, "max": 40.0}, "achieved_fraction_of_max": 0.69,
           "histograms": {"ingestd_request_seconds": {"p50": 0.001, "p99": 0.011}}, "connections": 16,
           "fraction": 0.7, "max_requests_per_s": 9000.0, "max_definition": "min(...)", "achieved_requests_per_s": 6210.0,
           "requests_non2xx": 0}


def doc_with(**extra: Any) -> dict[str, Any]:
    sc = {
        "go-1/1024": scenario("go-1/1024", 10000.0, puts=1000.0, warm=False),
        "ingestd-1/1024": scenario("ingestd-1/1024", 9000.0, puts=2.5, warm=False),
        "go-10/1024": scenario("go-10/1024", 12000.0, rps=1200.0, puts=1000.0),
        "ingestd-10/1024": scenario("ingestd-10/1024", 30000.0, rps=3000.0, puts=1.9),
        "ingestd-10/100": scenario("ingestd-10/100", 40000.0, rps=4000.0, puts=1.5),
        "go-10-slows3/1024": scenario("go-10-slows3/1024", 3400.0, dropped=5000),
        "ingestd-10-slows3/1024": scenario("ingestd-10-slows3/1024", 30000.0),
    }
    doc: dict[str, Any] = {"stamp": "x", "sizes": [100, 1024], "scenarios": sc, "skipped": {}, "profile": {},
                           "fronts": {"note": "this build has no http.server key"},
                           "overload": {"1024": OVERLOAD}, "latency": {"1024": {"sustained": LATENCY}}}
    doc.update(extra)
    return doc


def by_target(rows: list[dict[str, Any]], pid: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["id"] == pid]


def test_each_target_has_its_figure_ratio_to_go_and_verdict() -> None:
    rows = evaluate_targets(doc_with())
    assert [r["id"] for r in rows] == ["P1", "P2", "P2", "P2", "P3", "P4", "P5", "P6"]
    p1 = by_target(rows, "P1")[0]
    assert p1["vs_go"] == "2.50x" and p1["met"] is True
    p2, fastest, moon = by_target(rows, "P2")
    assert p2["met"] is True and p2["vs_go"] == "0.90x"  # 9,000 >= 8,400
    assert fastest["met"] is None and "http.server" in fastest["note"]  # no front measured: not judged
    assert moon["met"] is False and moon["vs_go"] == "0.90x"
    p3 = by_target(rows, "P3")[0]
    assert p3["met"] is True and "ingestd-10/1024" in p3["figure"]  # 1,900 per 1 M, warmed columns only
    assert "from readiness" in p3["note"]  # the 1p column (2,500) is reported, not judged
    assert by_target(rows, "P4")[0]["met"] is True
    assert by_target(rows, "P5")[0]["met"] is True
    p6 = by_target(rows, "P6")[0]
    assert p6["met"] is False and p6["vs_go"] == "8.82x" and "dropped 5,000" in p6["figure"]


def test_the_fastest_front_counts_for_p2_and_the_moonshot() -> None:
    doc = doc_with()
    doc["scenarios"]["ingestd-1:fast/1024"] = scenario("ingestd-1:fast/1024", 17000.0, warm=False)
    _, fastest, moon = by_target(evaluate_targets(doc), "P2")
    assert fastest["met"] is True and "(fast)" in fastest["target"]
    assert moon["met"] is True and moon["vs_go"] == "1.70x"


def test_targets_not_measured_are_not_judged() -> None:
    rows = evaluate_targets({"stamp": "x", "sizes": [1024], "scenarios": {}})
    assert all(r["met"] is None for r in rows)
    assert all(r["figure"] == "not measured" for r in rows if r["id"] != "P2")


def test_overload_below_10x_or_with_other_codes_misses_p4() -> None:
    doc = doc_with()
    doc["overload"]["1024"]["overload_factor"] = 4.0
    assert by_target(evaluate_targets(doc), "P4")[0]["met"] is False
    doc = doc_with()
    doc["overload"]["100"] = dict(doc["overload"]["1024"], statuses={202: 1, 500: 1}, only_202_503_429=False)
    assert by_target(evaluate_targets(doc), "P4")[0]["met"] is False


def test_histogram_rows_appear_only_when_metrics_had_histograms() -> None:
    doc = doc_with()
    plain = "\n".join(render_size_table(doc, 1024))
    assert "/metrics" not in plain
    doc["scenarios"]["ingestd-10/1024"]["histograms"] = {"ingestd_request_seconds": {"p50": 0.002, "p99": 0.015}}
    table = "\n".join(render_size_table(doc, 1024))
    assert "ingestd_request_seconds p99 ms (/metrics)" in table and "15.0" in table


def test_the_whole_report_renders_and_serializes() -> None:
    doc = doc_with()
    text = render_all(doc)
    assert "issue 10 targets" in text and "| P6 S3-like sink" in text
    assert "/metrics request p99 11.00 ms" in text  # P5 shows the daemon's own histogram next to wrk's
    json.dumps(doc, default=str)


def test_fronts_are_read_from_check_config_help() -> None:
    out = ('[http]\nlisten = "127.0.0.1:0"  # address\n'
           'server = "waitress"  # the HTTP front: waitress | fastfront | other-one\n[auth]\nserver = "x"\n')
    assert fronts_from_check_config(out) == ["waitress", "fastfront", "other-one"]
    assert fronts_from_check_config('[http]\nserver = "waitress"  # the HTTP front\n') == ["waitress"]
    assert fronts_from_check_config('[http]\nlisten = "x"\n[auth]\nserver = "a"  # a | b\n') is None


def test_a_front_is_set_in_the_http_table() -> None:
    cfg = '[http]\nlisten = "127.0.0.1:0"\n\n[sink]\nkind = "s3"\n'
    assert with_front(cfg, "fast").startswith('[http]\nserver = "fast"\nlisten')
    assert with_front('[http]\nserver = "waitress"\n', "fast") == '[http]\nserver = "fast"\n'
    assert with_front('[sink]\nkind = "s3"\n', "fast").startswith('[http]\nserver = "fast"\n')


def test_nginx_templates_get_a_status_location_and_their_placeholders() -> None:
    template = ("http {\n    limit_req_zone $server_port zone=s3:1m rate=@RATE@r/s;\n    server {\n"
                "        listen 127.0.0.1:@PORT@;\n        location / {\n            limit_req zone=s3 burst=@BURST@;\n"
                "            echo_sleep @LATENCY_S@;\n        }\n    }\n}\n")
    text, countable = render_nginx(template, 9000, Path("/tmp/p"), "/__status",
                                   {"RATE": "3500", "BURST": "350", "LATENCY_S": "0.030"})
    assert countable and "@" not in text
    assert "location = /__status { stub_status; }" in text
    assert text.index("/__status") < text.index("location / {")  # outside the rate limit
    assert "client_body_temp_path /tmp/p/client_body_temp;" in text


@pytest.mark.parametrize("size", [100, 1024])
def test_events_are_telemetry_of_about_the_asked_size(size: int) -> None:
    events = [make_event(i, size) for i in range(20)]
    sizes = [len(json.dumps(e, separators=(",", ":"))) for e in events]
    assert all(0.8 * size <= s <= size for s in sizes)
    assert all({"device_id", "event", "ts", "seq"} <= set(e) for e in events)
    if size >= 1024:
        assert all({"user_agent", "url", "attrs", "message"} <= set(e) for e in events)
    assert all(isinstance(v, float) for e in events for v in e.get("metrics", {}).values())  # Go's struct types
    assert len({json.dumps(e) for e in events}) == len(events)  # not one event repeated


def test_profile_columns_put_the_default_front_first_then_each_front() -> None:
    keys = ["10:uvloop", "10", "1:uvloop", "1"]
    assert sorted(keys, key=profile_order) == ["1", "10", "1:uvloop", "10:uvloop"]
    assert [profile_label(k) for k in ("1", "10:uvloop")] == ["1p", "10p uvloop"]
