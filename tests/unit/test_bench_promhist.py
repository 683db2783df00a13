"""The bench's reading of Prometheus histograms from /metrics (scripts/bench_support/promhist.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from bench_support.promhist import (
    Histogram,
    delta,
    parse_histograms,
    parse_labels,
    quantile,
    summarize,
)

EXPOSITION = """\
# HELP ingestd_request_seconds Time to answer an ingest request.
# TYPE ingestd_request_seconds histogram
ingestd_request_seconds_bucket{listener="0",le="0.001"} 10
ingestd_request_seconds_bucket{listener="0",le="0.005"} 60
ingestd_request_seconds_bucket{listener="0",le="0.01"} 90
ingestd_request_seconds_bucket{listener="0",le="+Inf"} 100
ingestd_request_seconds_count{listener="0"} 100
ingestd_request_seconds_sum{listener="0"} 0.4
ingestd_request_seconds_bucket{listener="1",le="0.001"} 0
ingestd_request_seconds_bucket{listener="1",le="0.005"} 40
ingestd_request_seconds_bucket{listener="1",le="0.01"} 90
ingestd_request_seconds_bucket{listener="1",le="+Inf"} 100
ingestd_request_seconds_count{listener="1"} 100
ingestd_request_seconds_sum{listener="1"} 0.6
ingestd_accepted_payloads_total 1234.0
"""


def test_series_of_one_family_are_added_up_bucket_by_bucket() -> None:
    h = parse_histograms(EXPOSITION)["ingestd_request_seconds"]
    assert h.buckets == ((0.001, 10.0), (0.005, 100.0), (0.01, 180.0), (math.inf, 200.0))
    assert h.n == 200 and h.total == pytest.approx(1.0)


def test_quantiles_interpolate_inside_the_bucket_as_promql_does() -> None:
    h = parse_histograms(EXPOSITION)["ingestd_request_seconds"]
    # rank 100 of 200 is the top of the 0.001..0.005 bucket; rank 198 falls in +Inf
    assert quantile(0.5, h) == pytest.approx(0.005)
    assert quantile(0.25, h) == pytest.approx(0.001 + 0.004 * (50 - 10) / 90)
    assert quantile(0.99, h) == pytest.approx(0.01)  # the highest finite bound
    assert quantile(0.03, h) == pytest.approx(0.001 * 6 / 10)  # the first bucket starts at 0


def test_a_histogram_with_nothing_observed_has_no_quantile() -> None:
    assert quantile(0.5, Histogram(((0.1, 0.0), (math.inf, 0.0)), 0.0, 0.0)) is None
    assert quantile(0.5, Histogram(((math.inf, 5.0),), 5.0, 1.0)) is None  # no finite bound
    assert quantile(0.5, Histogram((), None, None)) is None


def test_buckets_out_of_order_and_not_monotonic_are_tolerated() -> None:
    text = ('x_bucket{le="+Inf"} 10\nx_bucket{le="2"} 9\nx_bucket{le="1"} 10\n')  # 1 -> 10, 2 -> 9: a racing scrape
    h = parse_histograms(text)["x"]
    assert [le for le, _ in h.buckets] == [1.0, 2.0, math.inf]
    assert quantile(0.5, h) == pytest.approx(0.5)


def test_no_inf_bucket_uses_count() -> None:
    h = parse_histograms('y_bucket{le="1"} 5\ny_bucket{le="2"} 5\ny_count 10\n')["y"]
    assert quantile(0.9, h) == pytest.approx(2.0)  # rank 9 is beyond the finite buckets
    assert quantile(0.25, h) == pytest.approx(0.5)


def test_the_text_format_is_read_defensively() -> None:
    # a timestamp after the value; quotes, commas and braces in a label value; exponent bounds;
    # NaN bound (skipped); no le (skipped); NaN count (skipped); garbage; a trailing comma
    text = """\
a_bucket{path="/v1/payloads",quote="say \\"hi\\", {ok}",le="0.5"} 3 1700000000000
a_bucket{le="1e+00"} 4
a_bucket{le="+Inf"} 4
a_bucket{le="NaN"} 7
a_bucket 9
b_bucket{le="0.1"} NaN
garbage line {{{
c_bucket{le="0.25",} 2
c_bucket{le="+Inf"} 2
"""
    hs = parse_histograms(text)
    assert hs["a"].buckets == ((0.5, 3.0), (1.0, 4.0), (math.inf, 4.0))
    assert "b" not in hs
    assert hs["c"].buckets == ((0.25, 2.0), (math.inf, 2.0))
    assert parse_labels('a="x\\\\y",b="z"') == {"a": "x\\y", "b": "z"}
    assert parse_labels('a=unquoted') is None


def test_delta_covers_only_what_was_observed_between_two_scrapes() -> None:
    before = Histogram(((0.1, 5.0), (math.inf, 6.0)), 6.0, 0.3)
    after = Histogram(((0.1, 15.0), (math.inf, 26.0)), 26.0, 1.3)
    d = delta(after, before)
    assert d.buckets == ((0.1, 10.0), (math.inf, 20.0)) and d.n == 20 and d.total == pytest.approx(1.0)
    reset = Histogram(((0.1, 1.0), (math.inf, 2.0)), 2.0, 0.1)
    assert delta(reset, before) == reset  # counts went down: a process restarted


def test_summarize_gives_p50_p99_per_family_and_nothing_without_histograms() -> None:
    before = 'h_seconds_bucket{le="0.01"} 0\nh_seconds_bucket{le="0.1"} 0\nh_seconds_bucket{le="+Inf"} 0\n'
    after = 'h_seconds_bucket{le="0.01"} 50\nh_seconds_bucket{le="0.1"} 100\nh_seconds_bucket{le="+Inf"} 100\n'
    s = summarize(before, after)
    assert s["h_seconds"]["count"] == 100
    assert s["h_seconds"]["p50"] == pytest.approx(0.01)
    assert s["h_seconds"]["p99"] == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert summarize(after, after) == {}  # nothing observed in between
    assert summarize(None, "ingestd_accepted_payloads_total 3\n") == {}
