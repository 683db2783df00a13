#!/usr/bin/env python3
"""Fallback load generator of `scripts/bench` when wrk is missing (standard library only).

`--procs` processes × (`--connections` / procs) threads, each with one keep-alive
`http.client` connection, POST the same body over and over for `--duration` seconds.

Without `--rate` each connection sends its next request as soon as the answer is in (closed
loop, like wrk). With `--rate R` (requests/s over all connections) each connection follows a
fixed schedule (connection i sends at start + k·C/R) and latency is measured from the
*scheduled* send time, so a stalled server is charged for the requests it delayed (the
coordinated-omission correction of wrk2).

Prints one line `BENCH_JSON {...}` in the same shape as scripts/bench_support/post.lua
(requests, duration_us, errors, latency_us percentiles, statuses). Python's GIL makes it
costlier than wrk per request: compare servers within one run, with the same generator.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import threading
import time
from array import array
from collections import Counter
from urllib.parse import urlsplit


def _worker(url: str, body: bytes, ctype: str, n_threads: int, duration: float, rate_per_conn: float,
            start_at: float, out: "multiprocessing.Queue[tuple[bytes, dict[int, int], dict[str, int]]]") -> None:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    lat = array("d")
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}

    def run(i: int) -> None:
        my_lat = array("d")
        my_status: Counter[int] = Counter()
        my_err: Counter[str] = Counter()
        conn = http.client.HTTPConnection(host, port, timeout=5)
        interval = 1.0 / rate_per_conn if rate_per_conn > 0 else 0.0
        # spread the connections' schedules over one interval
        next_at = start_at + (interval * i / max(1, n_threads) if interval else 0.0)
        end = start_at + duration
        while True:
            if interval:
                now = time.time()
                if next_at >= end:
                    break
                if next_at > now:
                    time.sleep(next_at - now)
                t0 = next_at
                next_at += interval
            else:
                t0 = time.time()
                if t0 >= end:
                    break
            try:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                my_status[resp.status] += 1
                my_lat.append(time.time() - t0)
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
            except TimeoutError:
                my_err["timeout"] += 1
                conn.close()
            except (ConnectionError, http.client.HTTPException, OSError):
                my_err["read"] += 1
                conn.close()
                time.sleep(0.01)
        conn.close()
        with lock:
            lat.extend(my_lat)
            statuses.update(my_status)
            errors.update(my_err)

    time.sleep(max(0.0, start_at - time.time()))
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((lat.tobytes(), dict(statuses), dict(errors)))


def pct(sorted_lat: list[float], p: float) -> int:
    if not sorted_lat:
        return 0
    k = min(len(sorted_lat) - 1, max(0, int(round(p / 100.0 * len(sorted_lat) + 0.5)) - 1))
    return int(sorted_lat[k] * 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body-file", required=True)
    p.add_argument("--content-type", default="application/json")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=0.0, help="requests/s over all connections; 0: as fast as possible")
    args = p.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read()
    procs = max(1, min(args.procs, args.connections))
    per = [args.connections // procs + (1 if i < args.connections % procs else 0) for i in range(procs)]
    rate_per_conn = args.rate / args.connections if args.rate > 0 else 0.0
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.3  # let every process start before the clock runs
    workers = [ctx.Process(target=_worker, args=(args.url, body, args.content_type, n, args.duration, rate_per_conn,
                                                 start_at, out)) for n in per]
    for w in workers:
        w.start()
    lat = array("d")
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for _ in workers:
        raw, st, er = out.get()
        chunk = array("d")
        chunk.frombytes(raw)
        lat.extend(chunk)
        statuses.update(st)
        errors.update(er)
    for w in workers:
        w.join()
    duration = args.duration
    s = sorted(lat)
    n = len(s)
    mean = sum(s) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in s) / n if n else 0.0
    doc = {
        "requests": sum(statuses.values()),
        "duration_us": int(duration * 1e6),
        "bytes": 0,
        "errors": {"connect": 0, "read": errors.get("read", 0), "write": 0,
                   "status": sum(v for k, v in statuses.items() if k > 399), "timeout": errors.get("timeout", 0)},
        "latency_us": {"mean": mean * 1e6, "stdev": var ** 0.5 * 1e6, "max": int(s[-1] * 1e6) if n else 0,
                       "p50": pct(s, 50), "p75": pct(s, 75), "p90": pct(s, 90), "p99": pct(s, 99), "p999": pct(s, 99.9)},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "generator": "python",
    }
    print("BENCH_JSON " + json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
