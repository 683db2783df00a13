"""What a bench run reports: tables per payload size, the S3-like comparison, overload and
latency lines, issue 10's targets P1-P6 with their ratio to the Go design, the CPU breakdown
per payload, and the chart. Everything here reads the run's document (`doc`, also written as
JSON); nothing measures.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import promhist
from .profiling import GROUP_HELP, GROUPS

# issue 10's targets (reported, never asserted)
TARGETS = {
    "p1_ratio_10": 2.0,  # 10 payloads/request, ~1 KB: delivered payloads/s >= 2x the Go seed design
    "p2_rps_1": 8400.0,  # 1 payload/request, ~1 KB, from readiness: delivered req/s, default front
    "p2_rps_1_fastest": 16700.0,  # the same with the fastest front ingestd offers
    "p2_moonshot_ratio": 1.0,  # ... >= Go's delivered rate
    "p3_puts_per_million": 2000.0,  # S3 PUTs per 1M payloads at steady load
    "p4_overload_factor": 10.0,  # at (at least) 10x overload: only 202/503/429, RSS growth < 50 MB
    "p4_rss_mb": 50.0,
    "p5_p99_ms": 20.0,  # p99 at 70% of max
    "p6_ratio": 10.0,  # S3-like sink, 10p: delivered payloads/s >= 10x the Go design (MAX_WORKERS=256)
}


def fmt(v: Any, digits: int | None = None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) and digits is None:
        return f"{v:,}"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if digits is None:
        digits = 0 if abs(v) >= 100 else (1 if abs(v) >= 10 else 2)
    return f"{v:,.{digits}f}"


def ratio(a: Any, b: Any) -> str:
    if a is None or b is None or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def size_label(size: int) -> str:
    return f"~{size / 1024:g} KB" if size >= 1000 else f"~{size} B"


def markdown(rows: list[list[str]], align: str = "") -> list[str]:
    """A markdown table; `align` has one letter per column, l or r (default: the first column
    left-aligned, the others right-aligned: figures)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    align = align or "l" + "r" * (len(widths) - 1)
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i])
                                       for i, c in enumerate(r)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) if align[i] == "l" else "-" * (w + 1) + ":"
                                        for i, w in enumerate(widths)) + "|")
    return lines


Getter = Callable[[dict[str, Any]], Any]
METRICS: list[tuple[str, Getter]] = [
    ("requests/s (2xx)", lambda s: s["requests_per_s"]),
    ("non-2xx answers (run)", lambda s: s["requests_non2xx"]),
    ("payloads/s delivered", lambda s: s["delivered_payloads_per_s"]),
    ("server CPU µs / delivered payload", lambda s: s["cpu_us_per_payload"]),
    ("S3 PUTs / 1,000 payloads", lambda s: s["s3_puts_per_1000_payloads"]),
    ("latency p50 ms (wrk)", lambda s: s["latency_ms"]["p50"]),
    ("latency p99 ms (wrk)", lambda s: s["latency_ms"]["p99"]),
    ("peak RSS MB (process tree)", lambda s: s["peak_rss_mb"]),
    ("drain after the run s", lambda s: s["drain_s"]),
]


def histogram_rows(scenarios: list[dict[str, Any]]) -> list[tuple[str, Getter]]:
    """Rows for every histogram family that /metrics had in any of these scenarios (none: no rows)."""
    families = sorted({f for s in scenarios for f in (s.get("histograms") or {})})
    rows: list[tuple[str, Getter]] = []
    for family in families:
        unit, scale = promhist.unit_of(family)
        for q in ("p50", "p99"):
            def get(s: dict[str, Any], family: str = family, q: str = q, scale: float = scale) -> Any:
                v = (s.get("histograms") or {}).get(family, {}).get(q)
                return v * scale if v is not None else None
            rows.append((f"{family} {q}{' ' + unit if unit else ''} (/metrics)", get))
    return rows


def columns(doc: dict[str, Any], size: int) -> list[tuple[str, str, str | None]]:
    """(title, scenario key, key of the Go column it is compared with) of one size's table."""
    sc = doc["scenarios"]
    cols: list[tuple[str, str, str | None]] = []
    for ppr in (1, 10):
        go = f"go-{ppr}/{size}"
        cols.append((f"Go seed {ppr}p", go, None))
        cols.append((f"ingestd {ppr}p", f"ingestd-{ppr}/{size}", go))
        for key in sorted(k for k in sc if k.startswith(f"ingestd-{ppr}:") and k.endswith(f"/{size}")):
            cols.append((f"ingestd {ppr}p {key.split(':', 1)[1].split('/')[0]}", key, go))
    cols.append(("ingestd seed layout 10p", f"seed-layout-10/{size}", f"go-10/{size}"))
    return [c for c in cols if c[1] in sc]


def render_size_table(doc: dict[str, Any], size: int) -> list[str]:
    sc = doc["scenarios"]
    cols = columns(doc, size)
    if not cols:
        return []
    header = ["metric"]
    for title, key, ref in cols:
        header.append(title)
        if ref:
            header.append(f"{title} / Go")
    rows = [header]
    for label, get in METRICS + histogram_rows([sc[k] for _, k, _ in cols]):
        row = [label]
        for title, key, ref in cols:
            v = get(sc[key])
            row.append(fmt(v))
            if ref:
                row.append(ratio(v, get(sc[ref])) if ref in sc else "n/a")
        rows.append(row)
    return markdown(rows)


def render_slow_table(doc: dict[str, Any]) -> list[str]:
    sc = doc["scenarios"]
    sizes = [s for s in doc.get("sizes", []) if f"ingestd-10-slows3/{s}" in sc or f"go-10-slows3/{s}" in sc]
    if not sizes:
        return []
    header = ["S3-like sink, 10p"]
    for s in sizes:
        header += [f"Go MAX_WORKERS=256 {size_label(s)}", f"ingestd {size_label(s)}", "ingestd / Go"]
    rows = [header]
    lines: list[tuple[str, Getter]] = [
        ("payloads/s delivered", lambda r: r["delivered_payloads_per_s"]),
        ("requests/s (2xx)", lambda r: r["requests_per_s"]),
        ("payloads accepted (run)", lambda r: r["accepted_payloads"]),
        ("payloads dropped (Go: failed PUTs)", lambda r: r["dropped_payloads"]),
        ("PUTs refused (503 SlowDown etc.)", lambda r: r["failed_puts"]),
        ("S3 PUTs / 1,000 delivered payloads", lambda r: r["s3_puts_per_1000_payloads"]),
        ("backlog left after the drain cap", lambda r: r["backlog_left"]),
        ("server CPU µs / delivered payload", lambda r: r["cpu_us_per_payload"]),
        ("latency p50 ms (wrk)", lambda r: r["latency_ms"]["p50"]),
        ("latency p99 ms (wrk)", lambda r: r["latency_ms"]["p99"]),
        ("peak RSS MB (process tree)", lambda r: r["peak_rss_mb"]),
    ]
    for label, get in lines:
        row = [label]
        for s in sizes:
            g, i = sc.get(f"go-10-slows3/{s}"), sc.get(f"ingestd-10-slows3/{s}")
            gv, iv = (get(g) if g else None), (get(i) if i else None)
            row += [fmt(gv), fmt(iv), ratio(iv, gv)]
        rows.append(row)
    return markdown(rows)


def stored_bytes_per_payload(r: dict[str, Any]) -> float | None:
    """Mean stored object size over mean payloads per object, from the run's /metrics histograms."""
    h = r.get("histograms") or {}
    size, count = h.get("ingestd_object_bytes", {}).get("mean"), h.get("ingestd_object_payloads", {}).get("mean")
    return size / count if size and count else None


def render_formats_table(doc: dict[str, Any]) -> list[str]:
    """Issue 11: the object formats side by side (10p), NDJSON+gzip being ingestd-10."""
    sc = doc["scenarios"]
    keys = sorted(k for k in sc if k.startswith("ingestd-10-") and not k.startswith("ingestd-10-slows3"))
    if not keys:
        return []
    size = keys[0].rsplit("/", 1)[1]
    cols = [(f"ingestd-10/{size}", "NDJSON + gzip")] + [(k, k.split("/")[0].removeprefix("ingestd-10-")) for k in keys]
    cols = [(k, label) for k, label in cols if k in sc]
    base = sc.get(f"ingestd-10/{size}")
    rows = [[f"formats, 10p {size_label(int(size))}"] + [label for _, label in cols] + [f"{label} / gzip" for _, label in cols[1:]]]
    lines: list[tuple[str, Getter]] = [
        ("payloads/s delivered", lambda r: r["delivered_payloads_per_s"]),
        ("server CPU µs / delivered payload", lambda r: r["cpu_us_per_payload"]),
        ("stored bytes / payload (/metrics)", stored_bytes_per_payload),
        ("S3 PUTs / 1,000 delivered payloads", lambda r: r["s3_puts_per_1000_payloads"]),
        ("peak RSS MB (process tree)", lambda r: r["peak_rss_mb"]),
    ]
    for label, get in lines:
        vals = [get(sc[k]) for k, _ in cols]
        rows.append([label] + [fmt(v) for v in vals] + [ratio(v, get(base) if base else None) for v in vals[1:]])
    return markdown(rows)


def render_tables(doc: dict[str, Any]) -> str:
    t = doc.get("tools", {})
    s = doc.get("settings", {})
    pre = doc.get("preflight", {})
    out = [(f"ingestd bench {doc['stamp']} — {t.get('cpus')} CPUs ({t.get('cpu_model')}), git {t.get('git')},"
           f" ingestd {t.get('ingestd')}; null S3: {t.get('null_s3')}; S3-like sink: {t.get('slow_s3')};"
           f" load: {t.get('loadgen')} -t{s.get('threads')} -c{s.get('connections')}, {s.get('duration')}s run per"
           f" column (1p columns: load from readiness, no warm-up; others: {s.get('warmup')}s warm-up);"
           f" 1p/10p = payloads per request; Go seed = goref DISPATCH=sync")]
    la, lb = pre.get("load_avg"), doc.get("load_avg_end")
    if la:
        out.append(f"load averages (1/5/15 min) before the bench: {' / '.join(f'{x:.2f}' for x in la)}"
                   + (f"; after: {' / '.join(f'{x:.2f}' for x in lb)}" if lb else "")
                   + " (2 cores shared with other work: figures are noisy, read ratios within one run)")
    for size in doc.get("sizes", []):
        table = render_size_table(doc, size)
        if table:
            shape = doc.get("bodies", {}).get(f"10/{size}", {})
            out += ["", f"payloads {size_label(size)} (average {fmt(shape.get('payload_bytes_avg'), 0)} B of JSON each):", ""]
            out += table
    formats = render_formats_table(doc)
    if formats:
        out += ["", "object formats (issue 11; the same load, objects as NDJSON + gzip, NDJSON + zstd, Parquet + zstd):",
                ""] + formats
    slow = render_slow_table(doc)
    if slow:
        st = next((v["sink"] for k, v in doc["scenarios"].items() if k.startswith("ingestd-10-slows3")), "")
        out += ["", f"S3-like sink ({st}; a fresh sink per column):", ""] + slow
    sc = doc["scenarios"]
    steal = []
    for k, v in sc.items():
        m, c = v["machine"], v["machine"].get("cores", {})
        steal.append(f"{k} {m['busy_pct']:.0f}%/{m['steal_pct']:.0f}%/{c.get('load_generator', 0):.2f}/"
                     f"{c.get('null_s3', 0):.2f}/{c.get('irq_softirq', 0):.2f}/{c.get('foreign', 0):.2f}")
    if steal:
        out.append("")
        out.append("CPU during each column (machine busy % / steal % / cores used by: load generator / sink /"
                   " irq+softirq (loopback TCP) / processes outside the bench): " + ", ".join(steal))
    noisy = [f"{k} ({v['machine']['cores']['foreign']:.2f} cores)" for k, v in sc.items()
             if v["machine"].get("cores", {}).get("foreign", 0) >= 0.25]
    if noisy:
        out.append("WARNING: processes outside the bench used CPU during " + ", ".join(noisy)
                   + ": those columns are perturbed")
    if pre and pre.get("busy_pct", 0) > 15:
        out.append(f"WARNING: the machine was {pre['busy_pct']:.0f}% busy before the bench started: figures are perturbed")
    for size, ov in sorted(doc.get("overload", {}).items(), key=lambda kv: int(kv[0])):
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(ov["statuses"].items()))
        out.append(f"overload {size_label(int(size))} (ingestd, 10p, {ov['connections']} connections, sink"
                   f" {ov['sink_delay_ms']:.0f} ms/PUT, queue.max_items 2000): answers {codes}; socket errors"
                   f" {ov['socket_errors']}; {ov['answers_per_s']:,.0f} answers/s for {ov['accepted_per_s']:,.0f}"
                   f" accepted/s and {ov['delivered_payloads_per_s']:,.0f} payloads/s delivered"
                   f" ({fmt(ov['overload_factor'], 0)}x overload); RSS {ov['rss_cold_mb']} cold, {ov['rss_base_mb']}"
                   f" warmed -> peak {ov['rss_peak_mb']} MB (growth {ov['rss_growth_mb']} MB), p99"
                   f" {ov['latency_ms']['p99']:.1f} ms")
    for size, phases in sorted(doc.get("latency", {}).items(), key=lambda kv: int(kv[0])):
        for lat in phases.values():
            hist = "".join(f"; {fam} p50 {fmt(h.get('p50') and h['p50'] * promhist.unit_of(fam)[1])} /"
                           f" p99 {fmt(h.get('p99') and h['p99'] * promhist.unit_of(fam)[1])} {promhist.unit_of(fam)[0]}"
                           for fam, h in sorted((lat.get("histograms") or {}).items()))
            out.append(f"latency {size_label(int(size))} (ingestd 1p, {lat['connections']} connections, at"
                       f" {lat['fraction']:.0%} of {lat['max_requests_per_s']:,.0f} req/s = {lat['max_definition']}):"
                       f" {lat['achieved_requests_per_s']:,.0f} req/s achieved ({lat['achieved_fraction_of_max']:.0%}):"
                       f" wrk p50 {lat['latency_ms']['p50']:.2f} ms, p90 {lat['latency_ms']['p90']:.2f} ms,"
                       f" p99 {lat['latency_ms']['p99']:.2f} ms, max {lat['latency_ms']['max']:.1f} ms;"
                       f" non-2xx {lat['requests_non2xx']:,}{hist}")
    fr = doc.get("fronts") or {}
    if fr.get("note"):
        out.append(f"fronts: {fr['note']}")
    for k, v in (doc.get("skipped") or {}).items():
        out.append(f"SKIPPED {k}: {v}")
    for k, v in (doc.get("failures") or {}).items():
        out.append(f"FAILED {k}: {v}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# issue 10's targets
# ------------------------------------------------------------------------------------------------
def primary_size(doc: dict[str, Any]) -> int | None:
    sizes = doc.get("sizes") or []
    return min(sizes, key=lambda s: abs(s - 1024)) if sizes else None


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """P1-P6: one row each (P2 in three), with the figure, the goal, the ratio to the Go design
    and met (True / False / None when not measured)."""
    sc = doc["scenarios"]
    size = primary_size(doc)
    kb = size_label(size) if size else "~1 KB"
    rows: list[dict[str, Any]] = []

    def add(pid: str, what: str, figure: str | None, goal: str, vs_go: str, met: bool | None, note: str = "") -> None:
        rows.append({"id": pid, "target": what, "figure": figure or "not measured", "goal": goal, "vs_go": vs_go,
                     "met": met, "note": note})

    def dpps(key: str) -> float | None:
        r = sc.get(key)
        return r["delivered_payloads_per_s"] if r else None

    # P1
    i10, g10 = dpps(f"ingestd-10/{size}"), dpps(f"go-10/{size}")
    r1 = i10 / g10 if i10 is not None and g10 else None
    add("P1", f"10 payloads/request, {kb}: delivered payloads/s",
        f"{fmt(i10)} vs Go {fmt(g10)}" if i10 is not None else None, f">= {TARGETS['p1_ratio_10']:g}x Go",
        ratio(i10, g10), None if r1 is None else r1 >= TARGETS["p1_ratio_10"])
    for front, key in fronts_of(sc, "ingestd-10", size):
        f1 = dpps(key)
        add("P1", f"10 payloads/request, {kb}, front {front}: delivered payloads/s",
            f"{fmt(f1)} vs Go {fmt(g10)}", f">= {TARGETS['p1_ratio_10']:g}x Go", ratio(f1, g10),
            None if f1 is None or not g10 else f1 / g10 >= TARGETS["p1_ratio_10"])
    # P2
    i1, g1 = dpps(f"ingestd-1/{size}"), dpps(f"go-1/{size}")
    add("P2", f"1 payload/request, {kb}, from readiness: delivered req/s, default front (waitress)", fmt(i1) if i1 is not None else None,
        f">= {TARGETS['p2_rps_1']:,.0f}", ratio(i1, g1), None if i1 is None else i1 >= TARGETS["p2_rps_1"])
    fronts = {k.split(":", 1)[1].split("/")[0]: v["delivered_payloads_per_s"] for k, v in sc.items()
              if k.startswith("ingestd-1:") and k.endswith(f"/{size}")}
    candidates = dict(fronts)
    if i1 is not None:
        candidates["waitress"] = i1
    best_name, best = (max(candidates.items(), key=lambda kv: kv[1]) if candidates else (None, None))
    skipped = [v for k, v in (doc.get("skipped") or {}).items() if k.startswith("ingestd-1:")]
    note = ""
    if not fronts:
        note = (skipped[0] if skipped else (doc.get("fronts") or {}).get("note", "no front besides waitress measured"))
    add("P2", f"1 payload/request, {kb}, from readiness: delivered req/s, fastest front"
        + (f" ({best_name})" if best_name and fronts else ""), fmt(best) if best is not None and fronts else None,
        f">= {TARGETS['p2_rps_1_fastest']:,.0f}", ratio(best, g1) if fronts else "n/a",
        (best >= TARGETS["p2_rps_1_fastest"]) if fronts and best is not None else None, note)
    rm = best / g1 if best is not None and g1 else None
    add("P2", f"moonshot: 1 payload/request, {kb}: best ingestd delivered rate vs Go's"
        + (f" ({best_name})" if best_name else ""), f"{fmt(best)} vs Go {fmt(g1)}" if rm is not None else None,
        f">= {TARGETS['p2_moonshot_ratio']:g}x Go", ratio(best, g1), None if rm is None else rm >= TARGETS["p2_moonshot_ratio"])
    # P3: steady load = the warmed default-config columns (10p, any front); the 1p columns start
    # from readiness and their first and last objects are partly empty, so they are a note only
    puts = {k: v["s3_puts_per_1000_payloads"] * 1000 for k, v in sc.items()
            if (v.get("base") or "").split(":")[0] in ("ingestd-1", "ingestd-10")
            and v.get("s3_puts_per_1000_payloads") is not None}
    steady = {k: v for k, v in puts.items() if sc[k].get("warm_up")}
    if steady:
        worst_key = max(steady, key=lambda k: steady[k])
        worst = steady[worst_key]
        cold = {k: v for k, v in puts.items() if k not in steady}
        detail = "; ".join(x for x in (
            ", ".join(f"{k} {v:,.0f}" for k, v in sorted(steady.items())),
            ("from readiness (not steady): " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(cold.items()))) if cold else "",
        ) if x)
        add("P3", "S3 PUTs per 1 M payloads at steady load (default batching, warmed columns; worst)",
            f"{worst:,.0f} ({worst_key})", f"<= {TARGETS['p3_puts_per_million']:,.0f}",
            f"{worst / 1e6:.4f}x (Go: 1,000,000)", worst <= TARGETS["p3_puts_per_million"], detail)
    else:
        add("P3", "S3 PUTs per 1 M payloads at steady load", None, f"<= {TARGETS['p3_puts_per_million']:,.0f}", "n/a", None)
    # P4
    ovs = doc.get("overload") or {}
    if ovs:
        parts, met4 = [], True
        for s, ov in sorted(ovs.items(), key=lambda kv: int(kv[0])):
            codes = "/".join(str(k) for k in sorted(ov["statuses"]))
            factor = ov.get("overload_factor")
            parts.append(f"{size_label(int(s))}: {fmt(factor, 0)}x overload, answers {codes}"
                         + (f" + {ov['socket_errors']} socket errors" if ov["socket_errors"] else "")
                         + f", RSS +{ov['rss_growth_mb']} MB")
            met4 = (met4 and ov.get("only_202_503_429", False) and ov["rss_growth_mb"] < TARGETS["p4_rss_mb"]
                    and factor is not None and factor >= TARGETS["p4_overload_factor"])
        add("P4", "10x overload: only 202/503(/429) answers, RSS growth", "; ".join(parts),
            f"only 202/503/429, < {TARGETS['p4_rss_mb']:g} MB, at >= {TARGETS['p4_overload_factor']:g}x", "n/a (not run on Go)",
            met4)
    else:
        add("P4", "10x overload: only 202/503(/429), RSS growth", None, f"< {TARGETS['p4_rss_mb']:g} MB", "n/a", None)
    # P5
    lats = {s: v["sustained"] for s, v in (doc.get("latency") or {}).items() if v.get("sustained")}
    if lats:
        parts, met5 = [], True
        for s, lat in sorted(lats.items(), key=lambda kv: int(kv[0])):
            hist = lat.get("histograms") or {}
            req = next((h for f, h in hist.items() if f.startswith("ingestd_request_seconds")), None)
            parts.append(f"{size_label(int(s))}: {lat['latency_ms']['p99']:.2f} ms at {lat['achieved_fraction_of_max']:.0%} of max"
                         + (f" (/metrics request p99 {req['p99'] * 1000:.2f} ms)" if req and req.get("p99") is not None else ""))
            met5 = met5 and lat["latency_ms"]["p99"] < TARGETS["p5_p99_ms"]
        add("P5", "p99 latency at 70% of max (wrk, ingestd 1p)", "; ".join(parts), f"< {TARGETS['p5_p99_ms']:g} ms",
            "n/a (not run on Go)", met5)
    else:
        add("P5", "p99 latency at 70% of max", None, f"< {TARGETS['p5_p99_ms']:g} ms", "n/a", None)
    # P6
    i6, g6 = dpps(f"ingestd-10-slows3/{size}"), dpps(f"go-10-slows3/{size}")
    dropped = sc.get(f"go-10-slows3/{size}", {}).get("dropped_payloads")
    r6 = i6 / g6 if i6 is not None and g6 else None
    add("P6", f"S3-like sink, 10 payloads/request, {kb}: delivered payloads/s vs Go (MAX_WORKERS=256)",
        f"{fmt(i6)} vs Go {fmt(g6)} (Go dropped {fmt(dropped)})" if i6 is not None else None,
        f">= {TARGETS['p6_ratio']:g}x Go", ratio(i6, g6), None if r6 is None else r6 >= TARGETS["p6_ratio"])
    for front, key in fronts_of(sc, "ingestd-10-slows3", size):
        f6 = dpps(key)
        add("P6", f"S3-like sink, 10 payloads/request, {kb}, front {front}: delivered payloads/s vs Go",
            f"{fmt(f6)} vs Go {fmt(g6)}", f">= {TARGETS['p6_ratio']:g}x Go", ratio(f6, g6),
            None if f6 is None or not g6 else f6 / g6 >= TARGETS["p6_ratio"])
    return rows


def fronts_of(sc: dict[str, Any], base: str, size: int | None) -> list[tuple[str, str]]:
    """(front, scenario key) of the columns of `base` run with another front than waitress."""
    return sorted((k.split(":", 1)[1].split("/")[0], k) for k in sc
                  if k.startswith(f"{base}:") and k.endswith(f"/{size}"))


def render_targets(rows: list[dict[str, Any]]) -> str:
    table = [["target", "figure (this run)", "goal", "ratio to Go", "met?"]]
    for r in rows:
        mark = {True: "met", False: "MISSED", None: "n/a"}[r["met"]]
        figure = r["figure"] + (f" — {r['note']}" if r["note"] else "")
        table.append([f"{r['id']} {r['target']}", figure, r["goal"], r["vs_go"], mark])
    return ("issue 10 targets, P1-P6 (figures and ratios from this one run, never asserted):\n\n"
            + "\n".join(markdown(table, "lllrl")) + "\n")


# ------------------------------------------------------------------------------------------------
# CPU breakdown
# ------------------------------------------------------------------------------------------------
def profile_order(key: str) -> tuple[str, int]:
    """Profile columns: the default front first, then each front; 1p before 10p."""
    ppr, _, front = key.partition(":")
    return front, int(ppr)


def profile_label(key: str) -> str:
    ppr, _, front = key.partition(":")
    return f"{ppr}p" + (f" {front}" if front else "")


def render_profile(doc: dict[str, Any]) -> str:
    prof = {k: v for k, v in (doc.get("profile") or {}).items() if v.get("us_per_payload")}
    if not prof:
        return ""
    order = sorted(prof, key=profile_order)
    header = ["CPU µs per payload"]
    for k in order:
        header += [f"{profile_label(k)} µs", f"{profile_label(k)} share"]
    rows = [header]
    for g in GROUPS:
        row = [g]
        for k in order:
            v = prof[k]["us_per_payload"].get(g, 0.0)
            total = prof[k]["total_us_per_payload"] or 1.0
            row += [f"{v:.1f}", f"{v / total:.0%}"]
        rows.append(row)
    row = ["total (each thread's measured CPU)"]
    for k in order:
        row += [f"{prof[k]['total_us_per_payload']:.1f}", "100%"]
    rows.append(row)
    for role in ("listener", "uploader", "supervisor", "other"):
        if not any(role in prof[k].get("by_role_us_per_payload", {}) for k in order):
            continue
        row = [f"  of which {role} processes"]
        for k in order:
            v = prof[k]["by_role_us_per_payload"].get(role, 0.0)
            row += [f"{v:.1f}", f"{v / (prof[k]['total_us_per_payload'] or 1.0):.0%}"]
        rows.append(row)
    first = prof[order[0]]
    lines = [(f"CPU per payload by group (ingestd default config, waitress unless a column names its front, {size_label(first['payload_bytes'])} payloads,"
             f" null S3; {first['mode']}, {first['rate_hz']} Hz for ~{first['seconds']:.0f} s per column; each"
             " thread's measured CPU split by its own samples; per payload accepted (listeners, supervisor) or"
             " delivered (uploaders); kernel softirq time of loopback TCP not included):"), ""]
    lines += markdown(rows)
    for k in order:
        p = prof[k]
        extra = []
        if p.get("requests_per_s"):
            extra.append(f"{p['requests_per_s']:,.0f} req/s under the profiler")
        if p.get("wait_sample_share") is not None:
            extra.append(f"{p['wait_sample_share']:.0%} of samples were waits (left out)")
        if p.get("unsampled_us_per_payload"):
            extra.append(f"{p['unsampled_us_per_payload']:.1f} µs in threads without samples (in other)")
        if p.get("top_other"):
            extra.append("other's top frames: " + ", ".join(f"{f} ({n})" for f, n in p["top_other"][:3]))
        if p.get("pyspy_warnings"):
            extra.append(p["pyspy_warnings"])
        lines.append(f"{profile_label(k)}: " + "; ".join(extra))
    lines.append("groups: " + "; ".join(f"{g}: {h}" for g, h in GROUP_HELP.items()))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# chart and files
# ------------------------------------------------------------------------------------------------
_COLORS = {"go": "#7f7f7f", "ingestd": "#1f77b4", "front": "#2ca02c", "seed": "#9ecae1"}


def _color(key: str) -> str:
    base = key.split("/")[0]
    if base.startswith("go-"):
        return _COLORS["go"]
    if ":" in base:
        return _COLORS["front"]
    if base.startswith("seed"):
        return _COLORS["seed"]
    return _COLORS["ingestd"]


def draw_chart(doc: dict[str, Any], path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = doc["scenarios"]
    main = [k for k in sc if "slows3" not in k]
    labels = [k.replace("/", "\n") + " B" for k in main]
    panels: list[tuple[str, Getter, bool]] = [
        ("requests/s (2xx)", lambda s: s["requests_per_s"], False),
        ("payloads/s delivered", lambda s: s["delivered_payloads_per_s"], False),
        ("server CPU µs / delivered payload (log)", lambda s: s["cpu_us_per_payload"] or 0, True),
        ("S3 PUTs / 1,000 payloads (log)", lambda s: s["s3_puts_per_1000_payloads"] or 0, True),
        ("latency p99 ms (p50 hatched)", lambda s: s["latency_ms"]["p99"], False),
        ("peak RSS MB (process tree)", lambda s: s["peak_rss_mb"], False),
    ]
    fig = plt.figure(figsize=(24, 15))
    grid = fig.add_gridspec(3, 4)
    flat = [fig.add_subplot(grid[r, c]) for r in range(2) for c in range(4)] + [fig.add_subplot(grid[2, 0])]
    text_ax = fig.add_subplot(grid[2, 1:])
    for ax, (title, get, log) in zip(flat, panels):
        vals = [get(sc[k]) for k in main]
        bars = ax.bar(range(len(main)), vals, color=[_color(k) for k in main])
        if title.startswith("latency"):
            ax.bar(range(len(main)), [sc[k]["latency_ms"]["p50"] for k in main], fill=False, hatch="//", edgecolor="black")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        for b, v in zip(bars, vals):
            ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(main)), labels, rotation=60, fontsize=7)
    ax = flat[6]
    slow = [k for k in sc if "slows3" in k]
    if slow:
        vals = [sc[k]["delivered_payloads_per_s"] for k in slow]
        bars = ax.bar(range(len(slow)), vals, color=[_color(k) for k in slow])
        for b, k, v in zip(bars, slow, vals):
            d = sc[k].get("dropped_payloads")
            ax.annotate(fmt(v) + (f"\ndropped {d:,}" if d else ""), (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(slow)), [k.replace("/", "\n") + " B" for k in slow], rotation=30, fontsize=7)
        ax.set_title("S3-like sink (P6): payloads/s delivered")
    else:
        ax.axis("off")
    ax = flat[7]
    ovs = doc.get("overload") or {}
    if ovs:
        for size, ov in sorted(ovs.items(), key=lambda kv: int(kv[0])):
            if ov["rss_series_mb"]:
                t, m = zip(*ov["rss_series_mb"])
                ax.plot(t, m, label=f"{size_label(int(size))} (base {ov['rss_base_mb']} MB)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.set_title("overload (P4): RSS MB of the tree over time", fontsize=9)
        ax.set_xlabel("s")
    else:
        ax.axis("off")
    ax = flat[8]
    prof = {k: v for k, v in (doc.get("profile") or {}).items() if v.get("us_per_payload")}
    if prof:
        order = sorted(prof, key=profile_order)
        bottom = [0.0] * len(order)
        cmap = plt.get_cmap("tab10")
        for i, g in enumerate(GROUPS):
            vals = [prof[k]["us_per_payload"].get(g, 0.0) for k in order]
            ax.bar([profile_label(k) for k in order], vals, bottom=bottom, label=g, color=cmap(i % 10))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title("CPU µs per payload by group (py-spy)")
        ax.legend(fontsize=6)
    else:
        ax.axis("off")
    ax = text_ax
    ax.axis("off")
    lines = [("MET    " if t["met"] else "MISSED " if t["met"] is False else "n/a    ") + f"{t['id']} {t['target']}: {t['figure']}"
             for t in doc.get("targets", [])]
    ax.text(0, 1, "\n".join(textwrap.fill(x, 150, subsequent_indent="       ") for x in lines), va="top", fontsize=9,
            family="monospace")
    t = doc.get("tools", {})
    fig.suptitle(f"ingestd vs Go seed design — {doc['stamp']}, {t.get('cpus')} CPUs, null S3 {t.get('null_s3')},"
                 f" load {t.get('loadgen')}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def render_all(doc: dict[str, Any]) -> str:
    doc["targets"] = evaluate_targets(doc)
    text = render_tables(doc)
    text += "\n" + render_targets(doc["targets"])
    prof = render_profile(doc)
    if prof:
        text += "\n" + prof
    return text


def write_report(doc: dict[str, Any], results_dir: Path) -> None:
    """Print the report; write bench-<stamp>.{txt,json,png} and latest.* copies."""
    text = render_all(doc)
    text += f"\nwhole bench: {doc.get('elapsed_s', 0):.0f}s; figures: {results_dir}/bench-{doc['stamp']}.json\n"
    print("\n" + text, flush=True)
    base = results_dir / f"bench-{doc['stamp']}"
    base.with_suffix(".txt").write_text(text)
    base.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    try:
        draw_chart(doc, base.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the figures
        print(f"chart not drawn: {e!r}", file=sys.stderr)
    for suffix in (".txt", ".json", ".png"):
        if base.with_suffix(suffix).exists():
            shutil.copyfile(base.with_suffix(suffix), results_dir / f"latest{suffix}")
