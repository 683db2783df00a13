"""Histograms for /metrics: fixed buckets in the scoreboard, one set per child, summed when read.

What an operator tunes with: how long the app takes over an ingest request
(`ingestd_request_seconds`, by status class), how long a payload waits from its acceptance until
its object has landed (`ingestd_landing_seconds`, one sample per payload), how long each PUT
attempt takes (`ingestd_put_seconds`, by outcome), and what the objects are like
(`ingestd_object_bytes` as stored, `ingestd_object_payloads`).

Where the counts live, and why there rather than in prometheus_client's multiprocess mode (a
file per pid, merged when read):

- Each child's histograms are a block of 64-bit integers in its own scoreboard row (one bucket
  counter per bucket, then the sum). Only that child writes them; aligned 64-bit stores are
  atomic, so no lock is shared across processes and a SIGKILL can leave nothing held, at worst
  one observation with its bucket counted and its sum not yet added.
- A row belongs to a child *index*, not to a pid: a restarted child goes on counting where its
  predecessor stopped. Every count stays monotonic across restarts without a merge step, and
  the memory is fixed however many restarts happen (no files of dead pids to merge or cap).
- Readers (whichever listener answers /metrics) sum the rows. Buckets are stored per bucket,
  not cumulative, and `_count` is their total as read, so an exposition always agrees with
  itself (`le="+Inf"` = `_count`) even while children write.
- Sums are integers in a unit fixed per histogram (nanoseconds for handling and PUT times,
  milliseconds for landing delays, bytes, payloads): no float rounding drifts, and no unit
  overflows 64 bits in decades of traffic.

The price: buckets are fixed in this module, not configurable; a new start of the daemon starts
from zero (new shared memory), which Prometheus reads as a counter reset, as it does for every
other ingestd counter.

Threads: a listener's handler threads share its set, so a process-local lock serializes their
observations (a read-modify-write of shared memory is not atomic between threads; the lock is
never held across processes). An uploader observes from its sender thread, plus the cut of
each object from its main thread.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

NS = 1e-9
MS = 1e-3


class Spec(NamedTuple):
    """One histogram as exposed: name, help, the unit its sum is stored in, and its buckets."""

    name: str
    help: str
    unit: float  # base units (seconds, bytes, payloads) per stored unit: NS, MS or 1
    bounds: tuple[float, ...]  # upper bounds of the buckets in base units, ascending (+Inf is implied)
    label: str = ""  # name of the label that tells its series apart ("" for one series)


class Series(NamedTuple):
    spec: Spec
    value: str = ""  # the label's value


def slots(series: Sequence[Series]) -> int:
    """64-bit integers a set of `series` takes: a counter per bucket, +Inf, and the sum."""
    return sum(len(s.spec.bounds) + 2 for s in series)


REQUEST = Spec(
    "ingestd_request_seconds",
    "Time the app took over an ingest request (POST /v1/payloads), from the call with the whole body "
    "to the answer, by status class; refusals decided from the headers at the edge are not timed.",
    NS, (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    "status")
LANDING = Spec(
    "ingestd_landing_seconds",
    "Time from a payload's received_at to its object landing in the sink (recorded as landed); one "
    "sample per payload.",
    MS, (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0))
PUT = Spec(
    "ingestd_put_seconds",
    "Time of each PUT attempt to the sink, by outcome (error: every failed attempt, retried or not).",
    NS, (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    "outcome")
OBJECT_BYTES = Spec(
    "ingestd_object_bytes",
    "Size of each object landed in the sink, as stored (compressed).",
    1, tuple(float(2**k) for k in range(8, 27)))  # 256 B .. 64 MiB
OBJECT_PAYLOADS = Spec(
    "ingestd_object_payloads",
    "Payloads in each object landed in the sink.",
    1, (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0))

SPECS = (REQUEST, LANDING, PUT, OBJECT_BYTES, OBJECT_PAYLOADS)
LISTENER_SERIES = (Series(REQUEST, "2xx"), Series(REQUEST, "4xx"), Series(REQUEST, "5xx"))
UPLOADER_SERIES = (Series(LANDING), Series(PUT, "ok"), Series(PUT, "error"), Series(OBJECT_BYTES),
                   Series(OBJECT_PAYLOADS))
LISTENER_SLOTS = slots(LISTENER_SERIES)
UPLOADER_SLOTS = slots(UPLOADER_SERIES)
# the le label of each bucket, as Go (and prometheus_client) writes a float
_LE = {spec: [floatToGoString(b) for b in (*spec.bounds, float("inf"))]  # type: ignore[no-untyped-call]
       for spec in SPECS}


class Histogram:
    """One series in shared memory: bucket counters, +Inf, then the sum, all in stored units."""

    __slots__ = ("base", "bounds", "series", "sum_at", "view")

    def __init__(self, view: memoryview, base: int, series: Series) -> None:
        self.series = series
        self.view = view
        self.base = base  # where its first bucket counter is in `view`
        self.bounds = [round(b / series.spec.unit) for b in series.spec.bounds]  # in stored units
        self.sum_at = base + len(self.bounds) + 1

    def observe(self, value: int) -> None:
        """Add a sample of `value` (stored units, >= 0). Callers serialize their threads."""
        view = self.view
        view[self.base + bisect_left(self.bounds, value)] += 1
        view[self.sum_at] += value

    def add(self, counts: Sequence[int], total: int) -> None:
        """Add samples counted per bucket already (+Inf last), and their sum."""
        view = self.view
        for i, n in enumerate(counts):
            if n:
                view[self.base + i] += n
        view[self.sum_at] += total

    def read(self) -> tuple[list[int], int]:
        """(count per bucket, +Inf last; the sum), in stored units."""
        return self.view[self.base:self.sum_at].tolist(), self.view[self.sum_at]


class HistogramSet:
    """The histograms of one scoreboard row: `series` laid out in order from `base` in `raw`, an
    array of 64-bit integers (the scoreboard's RawArray, or a private one)."""

    def __init__(self, raw: Any, base: int, series: Sequence[Series]) -> None:
        view = memoryview(raw).cast("B").cast("q")
        self.histograms: list[Histogram] = []
        for s in series:
            self.histograms.append(Histogram(view, base, s))
            base += len(s.spec.bounds) + 2

    @classmethod
    def detached(cls, series: Sequence[Series]) -> HistogramSet:
        """A set in private memory, which no /metrics reads (replay, tests)."""
        return cls(bytearray(8 * slots(series)), 0, series)

    def get(self, spec: Spec, value: str = "") -> Histogram:
        for h in self.histograms:
            if h.series == (spec, value):
                return h
        raise KeyError(f"{spec.name}{{{spec.label}={value!r}}} is not in this set")


class RequestTiming:
    """`ingestd_request_seconds` of one listener, shared by its handler threads. `observe` is on
    every ingest request's path, so it is written out flat: one lookup, one bisect, two adds."""

    def __init__(self, histograms: HistogramSet, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.clock = clock  # what a handler reads when a request starts
        ok, refused, failed = (histograms.get(REQUEST, c) for c in ("2xx", "4xx", "5xx"))
        self._view = ok.view
        self._bounds = ok.bounds
        # by status // 100 (1xx and 3xx are never answered here): its series' first bucket and sum
        self._at = [(h.base, h.sum_at) for h in (failed, failed, ok, failed, refused, failed)]
        self._lock = threading.Lock()

    @classmethod
    def detached(cls) -> RequestTiming:
        return cls(HistogramSet.detached(LISTENER_SERIES))

    def observe(self, status: int, started_ns: int) -> None:
        """One request answered `status` (100-599), begun at `started_ns` of `clock`."""
        elapsed = self.clock() - started_ns
        base, sum_at = self._at[status // 100]
        i = base + bisect_left(self._bounds, elapsed)
        view = self._view
        with self._lock:
            view[i] += 1
            view[sum_at] += elapsed


class DeliveryHistograms:
    """An uploader's (or replay's) histograms: landing delays, PUT attempts, objects.

    The landing delay is per payload: every piece of a logged request in an object counts its
    payloads with its own request's received_at. The pieces are known when the object is cut
    (`cut`, main thread), the delay once it has landed (`landed`, sender thread). An object cut
    by an earlier process (sent again after a crash) counts every payload from the object's
    oldest received_at, an upper bound.

    Cost: an object of P pieces costs a sort and a few passes in C at the cut, and at landing
    one bisect per bucket, not per piece (the payloads within a bucket's bound are those
    received since `now - bound`)."""

    WAITING_MOST = 256  # objects cut and not yet landed whose pieces are kept; beyond, the oldest go

    def __init__(self, histograms: HistogramSet, clock: Callable[[], float] = time.time,
                 clock_ns: Callable[[], int] = time.perf_counter_ns) -> None:
        self.clock = clock
        self.clock_ns = clock_ns  # what a PUT attempt reads when it starts
        self._landing = histograms.get(LANDING)
        self._put = {True: histograms.get(PUT, "ok"), False: histograms.get(PUT, "error")}
        self._bytes = histograms.get(OBJECT_BYTES)
        self._payloads = histograms.get(OBJECT_PAYLOADS)
        # intent id -> received_at of its pieces (ascending), payloads up to each, and
        # sum of payloads x (received_at - the oldest)
        self._waiting: dict[str, tuple[list[float], list[int], float]] = {}
        self._lock = threading.Lock()

    @classmethod
    def detached(cls) -> DeliveryHistograms:
        return cls(HistogramSet.detached(UPLOADER_SERIES))

    def cut(self, intent_id: str, pieces: list[tuple[float, int]]) -> None:
        """The (received_at, payloads) of each piece of a new object (the list is taken over).
        One piece needs no keeping: its received_at is the object's oldest."""
        if len(pieces) < 2:
            return
        pieces.sort()
        times = [r for r, _ in pieces]
        oldest = times[0]
        kept = (times, list(accumulate(n for _, n in pieces)), sum((r - oldest) * n for r, n in pieces))
        with self._lock:
            waiting = self._waiting
            waiting[intent_id] = kept
            while len(waiting) > self.WAITING_MOST:  # dead-lettered objects never land: bounded
                del waiting[next(iter(waiting))]

    def put(self, ok: bool, started_ns: int) -> None:
        """One PUT attempt begun at `started_ns` of `clock_ns` ended (`ok`: without an error)."""
        elapsed = self.clock_ns() - started_ns
        with self._lock:
            self._put[ok].observe(elapsed)

    def landed(self, intent_id: str, oldest: float, count: int, stored_bytes: int) -> None:
        """An object of `count` payloads and `stored_bytes` is in the sink and recorded so."""
        now = self.clock()
        with self._lock:
            times, upto, later = self._waiting.pop(intent_id, ([oldest], [count], 0.0))
            total = upto[-1]
            counts = []
            within = 0  # payloads waiting at most the bounds so far: received at or after now - bound
            for bound in LANDING.bounds:
                i = bisect_left(times, now - bound)
                n = total - (upto[i - 1] if i else 0)
                counts.append(n - within)
                within = n
            counts.append(total - within)
            # after a clock stepped back, a negative delay counts in the first bucket, and the
            # sum never shrinks
            waited_ms = max(0, round((total * (now - times[0]) - later) * 1000))
            self._landing.add(counts, waited_ms)
            self._bytes.observe(stored_bytes)
            self._payloads.observe(count)


# -- exposition -------------------------------------------------------------------------------------


class _Collector:
    def __init__(self, sets: Iterable[HistogramSet]) -> None:
        self.sets = list(sets)

    def collect(self) -> Iterator[Metric]:
        totals: dict[Series, tuple[list[int], int]] = {}
        for hs in self.sets:
            for h in hs.histograms:
                counts, total = h.read()
                seen = totals.get(h.series)
                if seen is None:
                    totals[h.series] = (counts, total)
                else:
                    totals[h.series] = ([a + b for a, b in zip(seen[0], counts)], seen[1] + total)
        for spec in SPECS:
            family = HistogramMetricFamily(spec.name, spec.help, labels=[spec.label] if spec.label else None)
            for series, (counts, total) in totals.items():
                if series.spec is not spec:
                    continue
                buckets: list[tuple[str, float]] = []
                running = 0
                for le, n in zip(_LE[spec], counts):
                    running += n
                    buckets.append((le, running))
                family.add_metric([series.value] if spec.label else [], buckets, total * spec.unit)
            yield family


def render(sets: Iterable[HistogramSet]) -> bytes:
    """Prometheus text of the histograms of `sets`, summed series by series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(sets))
    return generate_latest(registry)


# -- reading an exposition back (tests, the bench) --------------------------------------------------


class Observed(NamedTuple):
    """One series as scraped: cumulative counts per upper bound (+Inf last), count and sum."""

    buckets: tuple[tuple[float, float], ...]
    observations: float  # _count
    sum: float

    def __sub__(self, earlier: Observed) -> Observed:
        """What was observed between two scrapes."""
        return Observed(tuple((b, n - m) for (b, n), (_, m) in zip(self.buckets, earlier.buckets)),
                        self.observations - earlier.observations, self.sum - earlier.sum)

    def quantile(self, q: float) -> float | None:
        """The q-quantile estimated as Prometheus' histogram_quantile does (linear within the
        bucket; the highest finite bound if it falls in +Inf); None without observations."""
        if not self.observations:
            return None
        rank = q * self.observations
        lower, below = 0.0, 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank:
                if bound == float("inf"):
                    return lower
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return lower


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], Observed]]:
    """Every histogram of an exposition: name -> (labels but le) -> what it holds."""
    out: dict[str, dict[tuple[tuple[str, str], ...], Observed]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        parts: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            p = parts.setdefault(labels, {"buckets": [], "count": 0.0, "sum": 0.0})
            if s.name.endswith("_bucket"):
                p["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                p["count"] = s.value
            elif s.name.endswith("_sum"):
                p["sum"] = s.value
        out[family.name] = {k: Observed(tuple(sorted(p["buckets"])), p["count"], p["sum"]) for k, p in parts.items()}
    return out
