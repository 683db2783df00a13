"""histograms.py: buckets in shared memory, what the request and delivery hooks observe, and the
Prometheus text they render, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import bisect
import multiprocessing
import random
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingestd.histograms import (
    LANDING,
    LISTENER_SERIES,
    LISTENER_SLOTS,
    OBJECT_BYTES,
    OBJECT_PAYLOADS,
    PUT,
    REQUEST,
    SPECS,
    UPLOADER_SERIES,
    UPLOADER_SLOTS,
    DeliveryHistograms,
    HistogramSet,
    Observed,
    RequestTiming,
    parse,
    render,
)
from ingestd.scoreboard import Role, Scoreboard, TenantField

MS = 1_000_000  # nanoseconds


def board(listeners: int = 2, uploaders: int = 2, tenants: int = 1) -> Scoreboard:
    return Scoreboard(multiprocessing.get_context("spawn"), listeners, uploaders, tenants)


class Clock:
    def __init__(self, now: float = 0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ClockNs:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def scraped(b: Scoreboard) -> dict[str, dict[tuple[tuple[str, str], ...], Observed]]:
    return parse(render(b.all_histograms()).decode())


# -- buckets ------------------------------------------------------------------------------------


def test_a_value_on_a_bound_counts_in_that_bucket_and_one_beyond_every_bound_in_inf() -> None:
    hs = HistogramSet.detached(UPLOADER_SERIES)
    h = hs.get(OBJECT_PAYLOADS)
    for v in (0, 1, 2, 3, 500, 501, 10_000, 10_001, 10**9):
        h.observe(v)
    counts, total = h.read()
    bounds = OBJECT_PAYLOADS.bounds
    assert len(counts) == len(bounds) + 1
    by_bound = dict(zip((*bounds, float("inf")), counts))
    assert by_bound[1.0] == 2  # 0 and 1: le is inclusive
    assert by_bound[2.0] == 1
    assert by_bound[5.0] == 1  # 3
    assert by_bound[500.0] == 1
    assert by_bound[1000.0] == 1  # 501
    assert by_bound[10000.0] == 1
    assert by_bound[float("inf")] == 2
    assert total == 0 + 1 + 2 + 3 + 500 + 501 + 10_000 + 10_001 + 10**9


def test_time_bounds_are_kept_in_the_stored_unit_exactly() -> None:
    h = HistogramSet.detached(LISTENER_SERIES).get(REQUEST, "2xx")
    h.observe(50_000)  # 50 us exactly: the first bucket (5e-05)
    h.observe(50_001)
    counts, total = h.read()
    assert counts[:2] == [1, 1] and total == 100_001


def test_adding_counts_per_bucket_equals_one_observation_at_a_time() -> None:
    one = HistogramSet.detached(UPLOADER_SERIES).get(OBJECT_PAYLOADS)
    added = HistogramSet.detached(UPLOADER_SERIES).get(OBJECT_PAYLOADS)
    values = [0, 1, 1, 7, 500, 20_000]
    for v in values:
        one.observe(v)
    counts = [0] * (len(OBJECT_PAYLOADS.bounds) + 1)
    for v in values:
        counts[bisect.bisect_left(added.bounds, v)] += 1
    added.add(counts, sum(values))
    assert one.read() == added.read()


@pytest.mark.parametrize("seed", range(20))
def test_landing_by_bisecting_bounds_equals_counting_every_payload(seed: int) -> None:
    rng = random.Random(seed)
    now = 1_764_299_045.125
    pieces = [(now - rng.choice([rng.uniform(0, 2), rng.uniform(0, 4000), 0.05, 1.0]), rng.randint(1, 20))
              for _ in range(rng.randint(2, 300))]
    hs = HistogramSet.detached(UPLOADER_SERIES)
    d = DeliveryHistograms(hs, clock=Clock(now))
    d.cut("obj", list(pieces))
    d.landed("obj", min(r for r, _ in pieces), sum(n for _, n in pieces), 1)
    expected = [0] * (len(LANDING.bounds) + 1)
    for r, n in pieces:
        expected[bisect.bisect_left(LANDING.bounds, now - r)] += n
    counts, total_ms = hs.get(LANDING).read()
    assert counts == expected
    assert total_ms == pytest.approx(sum((now - r) * n for r, n in pieces) * 1000, abs=1)


def test_every_series_has_its_own_slots_in_the_row() -> None:
    hs = HistogramSet.detached(UPLOADER_SERIES)
    for i, h in enumerate(hs.histograms):
        h.observe(i + 1)
    assert [h.read()[1] for h in hs.histograms] == list(range(1, len(UPLOADER_SERIES) + 1))
    assert [sum(h.read()[0]) for h in hs.histograms] == [1] * len(UPLOADER_SERIES)


# -- the scoreboard's region ------------------------------------------------------------------------


def test_histograms_come_after_every_other_field_and_rows_do_not_overlap() -> None:
    b = board(listeners=2, uploaders=3, tenants=2)
    start = len(b.raw) - 2 * LISTENER_SLOTS - 3 * UPLOADER_SLOTS
    b.tenant_row(1, 1)[TenantField.RATE_LIMITED] = 5  # the board's last field before the histograms
    assert b.raw[start - 1] == 5
    sets = b.all_histograms()
    assert len(sets) == 5
    for hs in sets:
        for h in hs.histograms:
            h.observe(7)
    assert list(b.raw[:start - 1]) == [0] * (start - 1)  # nothing of the board's own fields was touched
    assert sum(b.raw[start:]) == (1 + 7) * sum(len(hs.histograms) for hs in sets)  # one count, one sum each


def test_a_restarted_child_goes_on_counting_where_its_predecessor_stopped() -> None:
    b = board()
    first = DeliveryHistograms(b.histograms(Role.UPLOADER, 1), clock=Clock(10.0))
    first.landed("a", 9.5, 4, 1000)
    successor = DeliveryHistograms(b.histograms(Role.UPLOADER, 1), clock=Clock(20.0))  # a new process, same row
    successor.landed("b", 19.0, 6, 3000)
    obs = scraped(b)
    assert obs["ingestd_object_payloads"][()].observations == 2
    assert obs["ingestd_object_payloads"][()].sum == 10
    assert obs["ingestd_landing_seconds"][()].observations == 10
    assert obs["ingestd_landing_seconds"][()].sum == pytest.approx(4 * 0.5 + 6 * 1.0)


# -- the request hook ---------------------------------------------------------------------------------


def test_requests_are_timed_by_status_class() -> None:
    clock = ClockNs()
    hs = HistogramSet.detached(LISTENER_SERIES)
    timing = RequestTiming(hs, clock=clock)
    for status, took in ((202, 80_000), (202, 2 * MS), (400, 30_000), (429, 10_000), (503, 5_000), (500, 1)):
        clock.now = 1_000 * MS
        started = timing.clock()
        clock.now += took
        timing.observe(status, started)
    assert hs.get(REQUEST, "2xx").read()[1] == 80_000 + 2 * MS
    assert sum(hs.get(REQUEST, "2xx").read()[0]) == 2
    assert hs.get(REQUEST, "4xx").read()[1] == 40_000
    assert hs.get(REQUEST, "5xx").read()[1] == 5_001


def test_handler_threads_lose_no_observation() -> None:
    b = board()
    timing = RequestTiming(b.histograms(Role.LISTENER, 0))
    per_thread = 20_000

    def hammer() -> None:
        for _ in range(per_thread):
            timing.observe(202, timing.clock())

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert scraped(b)["ingestd_request_seconds"][(("status", "2xx"),)].observations == 4 * per_thread


# -- the delivery hooks --------------------------------------------------------------------------------


def test_landing_counts_each_payload_from_its_own_request() -> None:
    hs = HistogramSet.detached(UPLOADER_SERIES)
    clock = Clock(100.0)
    d = DeliveryHistograms(hs, clock=clock)
    d.cut("obj", [(99.9, 3), (99.0, 1), (98.0, 2)])  # three requests' pieces in one object
    d.landed("obj", 98.0, 6, 4096)
    counts, total_ms = hs.get(LANDING).read()
    assert sum(counts) == 6
    assert total_ms == 3 * 100 + 1 * 1000 + 2 * 2000
    by_bound = dict(zip((*LANDING.bounds, float("inf")), counts))
    assert (by_bound[0.1], by_bound[1.0], by_bound[2.0]) == (3, 1, 2)
    sizes, stored = hs.get(OBJECT_BYTES).read()
    assert dict(zip(OBJECT_BYTES.bounds, sizes))[4096.0] == 1 and sum(sizes) == 1 and stored == 4096
    assert hs.get(OBJECT_PAYLOADS).read()[1] == 6


def test_an_object_of_an_earlier_process_counts_from_its_oldest_payload_and_a_clock_step_back_as_zero() -> None:
    hs = HistogramSet.detached(UPLOADER_SERIES)
    clock = Clock(50.0)
    d = DeliveryHistograms(hs, clock=clock)
    d.landed("resent", 40.0, 5, 100)  # never cut by this process
    assert hs.get(LANDING).read()[1] == 5 * 10_000
    d.cut("future", [(60.0, 1), (61.0, 1)])  # received "after" now: the wall clock stepped back
    d.landed("future", 60.0, 2, 100)
    counts, total = hs.get(LANDING).read()
    assert total == 5 * 10_000 and counts[0] == 2


def test_pieces_of_objects_that_never_land_are_not_kept_forever() -> None:
    d = DeliveryHistograms.detached()
    for i in range(d.WAITING_MOST * 3):
        d.cut(f"o{i}", [(1.0, 1), (2.0, 1)])
    assert len(d._waiting) == d.WAITING_MOST
    d.cut("single", [(1.0, 1)])  # one piece: its received_at is the object's oldest, nothing kept
    assert "single" not in d._waiting


def test_put_attempts_are_timed_by_outcome() -> None:
    hs = HistogramSet.detached(UPLOADER_SERIES)
    ns = ClockNs()
    d = DeliveryHistograms(hs, clock_ns=ns)
    for ok, took in ((False, 30_000 * MS), (False, 2 * MS), (True, 40 * MS)):
        started = d.clock_ns()
        ns.now += took
        d.put(ok, started)
    assert hs.get(PUT, "error").read()[1] == 30_002 * MS
    assert hs.get(PUT, "ok").read()[1] == 40 * MS


# -- exposition -----------------------------------------------------------------------------------------


def test_the_exposition_sums_every_row_and_parses_back() -> None:
    b = board(listeners=2, uploaders=2)
    ns = ClockNs()
    for i in range(2):
        timing = RequestTiming(b.histograms(Role.LISTENER, i), clock=ns)
        for took in (100_000, 300_000, 7 * MS):
            timing.observe(202, ns.now - took)
    timing.observe(503, ns.now - 20_000)
    for i in range(2):
        d = DeliveryHistograms(b.histograms(Role.UPLOADER, i), clock=Clock(10.0), clock_ns=ns)
        d.put(True, ns.now - 20 * MS)
        d.landed(f"x{i}", 9.0, 100 * (i + 1), 50_000)
    text = render(b.all_histograms()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {s.name for s in SPECS}
    for spec in SPECS:
        assert families[spec.name].type == "histogram"
        assert families[spec.name].documentation == spec.help
    request = {(s.name, s.labels.get("status"), s.labels.get("le")): s.value
               for s in families["ingestd_request_seconds"].samples}
    assert request[("ingestd_request_seconds_count", "2xx", None)] == 6
    assert request[("ingestd_request_seconds_bucket", "2xx", "0.0001")] == 2  # cumulative: 100 us twice
    assert request[("ingestd_request_seconds_bucket", "2xx", "0.0005")] == 4
    assert request[("ingestd_request_seconds_bucket", "2xx", "+Inf")] == 6
    assert request[("ingestd_request_seconds_sum", "2xx", None)] == pytest.approx(2 * 0.0074)
    assert request[("ingestd_request_seconds_count", "5xx", None)] == 1
    assert request[("ingestd_request_seconds_count", "4xx", None)] == 0  # every series is there from the start
    obs = parse(text)
    assert obs["ingestd_object_payloads"][()].sum == 300
    assert obs["ingestd_object_payloads"][()].observations == 2
    assert obs["ingestd_landing_seconds"][()].observations == 300
    assert obs["ingestd_landing_seconds"][()].sum == pytest.approx(300.0)
    assert obs["ingestd_object_bytes"][()].sum == 100_000
    assert obs["ingestd_put_seconds"][(("outcome", "ok"),)].observations == 2
    assert obs["ingestd_put_seconds"][(("outcome", "error"),)].observations == 0
    for series in obs.values():
        for o in series.values():
            cumulative = [n for _, n in o.buckets]
            assert cumulative == sorted(cumulative) and cumulative[-1] == o.observations
            assert o.buckets[-1][0] == float("inf")


def test_quantiles_are_estimated_as_prometheus_does() -> None:
    o = Observed(((0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (float("inf"), 40.0)), 40.0, 5.0)
    assert o.quantile(0.25) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert o.quantile(0.5) == pytest.approx(0.15)  # rank 20: half-way through (0.1, 0.2]
    assert o.quantile(0.875) == pytest.approx(0.35)
    assert Observed(((1.0, 0.0), (float("inf"), 0.0)), 0.0, 0.0).quantile(0.5) is None
    beyond = Observed(((1.0, 1.0), (2.0, 1.0), (float("inf"), 4.0)), 4.0, 100.0)
    assert beyond.quantile(0.99) == 2.0  # in +Inf: the highest finite bound


def test_two_scrapes_give_what_happened_between_them() -> None:
    b = board()
    timing = RequestTiming(b.histograms(Role.LISTENER, 1))
    for _ in range(3):
        timing.observe(202, timing.clock())
    before = scraped(b)["ingestd_request_seconds"][(("status", "2xx"),)]
    for _ in range(5):
        timing.observe(202, timing.clock())
    between = scraped(b)["ingestd_request_seconds"][(("status", "2xx"),)] - before
    assert between.observations == 5 and between.buckets[-1][1] == 5
