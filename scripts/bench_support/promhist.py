"""Histograms read from a Prometheus text exposition (`GET /metrics`), and their quantiles.

Pure functions, no I/O. The bench scrapes `/metrics` before and after a measured run, takes the
difference of every histogram's cumulative `_bucket{le="..."}` counts (so the quantiles cover
that run only), and reads p50/p99 with the same interpolation as PromQL's `histogram_quantile`.

Written defensively against the text format: `# HELP`/`# TYPE` lines are optional, label values
may hold escaped quotes, commas and braces, sample values may be `+Inf`, `NaN` or in exponent
notation and be followed by a timestamp, series of one family may carry other labels (one per
process, say: they are summed per `le`), and buckets may be out of order or (after a restart of
a process) not monotonic. Anything that does not parse is skipped, never raised.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


class Histogram(NamedTuple):
    """One histogram family, summed over its series: (upper bound, cumulative count) sorted by
    bound (the last is +Inf when the exposition had it), plus `_count` (n) and `_sum` (total) when given."""

    buckets: tuple[tuple[float, float], ...]
    n: float | None
    total: float | None


def _value(text: str) -> float | None:
    try:
        v = float(text)  # float() reads "+Inf", "-Inf", "NaN" and 1.5e-05 alike
    except ValueError:
        return None
    return None if math.isnan(v) else v


def parse_labels(text: str) -> dict[str, str] | None:
    """`a="1",le="0.5"` -> {"a": "1", "le": "0.5"}; None when it does not parse."""
    out: dict[str, str] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m:
            return None
        raw = m.group(2)
        out[m.group(1)] = raw.replace("\\\\", "\x00").replace('\\"', '"').replace("\\n", "\n").replace("\x00", "\\")
        pos = m.end()
    return out


def parse_histograms(text: str) -> dict[str, Histogram]:
    """Every family that has `_bucket` series with an `le` label, keyed by its name (without
    `_bucket`). Series that differ in other labels are added up bucket by bucket."""
    buckets: dict[str, dict[float, float]] = {}
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels_text, value_text = m.group(1), m.group(2) or "", m.group(3)
        value = _value(value_text)
        if value is None:
            continue
        if name.endswith("_bucket"):
            labels = parse_labels(labels_text)
            if labels is None or "le" not in labels:
                continue
            le = _value(labels["le"])
            if le is None:
                continue
            family = buckets.setdefault(name[: -len("_bucket")], {})
            family[le] = family.get(le, 0.0) + value
        elif name.endswith("_count"):
            counts[name[: -len("_count")]] = counts.get(name[: -len("_count")], 0.0) + value
        elif name.endswith("_sum"):
            sums[name[: -len("_sum")]] = sums.get(name[: -len("_sum")], 0.0) + value
    return {family: Histogram(tuple(sorted(b.items())), counts.get(family), sums.get(family))
            for family, b in buckets.items() if b}


def delta(after: Histogram, before: Histogram | None) -> Histogram:
    """What was observed between two scrapes. A bucket that went down (a process restarted and
    its counts began again) is taken as it is after, as PromQL's `increase` does for a reset."""
    if before is None:
        return after
    old = dict(before.buckets)
    reset = any(c < old.get(le, 0.0) for le, c in after.buckets)
    if reset:
        return after
    buckets = tuple((le, c - old.get(le, 0.0)) for le, c in after.buckets)
    n = (after.n - before.n) if after.n is not None and before.n is not None else None
    total = (after.total - before.total) if after.total is not None and before.total is not None else None
    return Histogram(buckets, n, total)


def quantile(q: float, hist: Histogram) -> float | None:
    """The q-quantile (0..1) as PromQL's histogram_quantile reads it: linear interpolation inside
    the first bucket whose cumulative count reaches the rank (from 0 for the first bucket when
    its bound is positive); a rank in the +Inf bucket gives the highest finite bound. None when
    nothing was observed or there is no finite bound."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is not within 0..1")
    pts: list[tuple[float, float]] = []
    top = 0.0
    for le, c in hist.buckets:  # cumulative counts must not go down (a scrape racing an observation)
        top = max(top, c)
        pts.append((le, top))
    if not pts:
        return None
    if not math.isinf(pts[-1][0]):  # no +Inf bucket: _count, when given, says how many there were
        pts.append((math.inf, max(top, hist.n or 0.0)))
    total = pts[-1][1]
    if total <= 0 or len(pts) < 2:
        return None
    rank = q * total
    b = next((i for i in range(len(pts) - 1) if pts[i][1] >= rank), len(pts) - 1)
    if b == len(pts) - 1:
        return pts[-2][0]
    if b == 0 and pts[0][0] <= 0:
        return pts[0][0]
    start = pts[b - 1][0] if b > 0 else 0.0
    below = pts[b - 1][1] if b > 0 else 0.0
    inside = pts[b][1] - below
    if inside <= 0:
        return pts[b][0]
    return start + (pts[b][0] - start) * (rank - below) / inside


def summarize(before_text: str | None, after_text: str, qs: tuple[float, ...] = (0.5, 0.99)) -> dict[str, dict[str, float | None]]:
    """{family: {"count": n, "p50": v, "p99": v, "mean": v}} over what was observed between the
    two scrapes (or since the start when `before_text` is None). Families with no observation in
    that span are left out; an exposition without histograms gives {}."""
    after = parse_histograms(after_text)
    before = parse_histograms(before_text) if before_text else {}
    out: dict[str, dict[str, float | None]] = {}
    for family, hist in sorted(after.items()):
        d = delta(hist, before.get(family))
        n = d.buckets[-1][1] if d.buckets and math.isinf(d.buckets[-1][0]) else d.n
        if not n:
            continue
        row: dict[str, float | None] = {"count": n}
        for q in qs:
            row[f"p{q * 100:g}"] = quantile(q, d)
        row["mean"] = d.total / n if d.total is not None and n else None
        out[family] = row
    return out


def unit_of(family: str) -> tuple[str, float]:
    """How to show a family's values: seconds as ms, everything else as it is."""
    if family.endswith("_seconds"):
        return "ms", 1000.0
    if family.endswith("_bytes"):
        return "B", 1.0
    return "", 1.0
