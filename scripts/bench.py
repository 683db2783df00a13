#!/usr/bin/env python3
"""scripts/bench.py: ingestd against the Go reference of the seed design, side by side, one run.

Run it through `scripts/bench` (which installs nginx, the nginx echo module, wrk and Go from apt
when missing and makes the bench's own venv under bench-results/.venv); `scripts/bench --help`
lists the options. The code is the package scripts/bench_support/ (processes, servers, load,
scenarios, profiling, promhist, report); this file only reads the command line. Every process
it starts sits in its own process group and is killed in `finally`, also on Ctrl-C; all
traffic goes to 127.0.0.1.

What runs
---------
- Null S3 (the sink, built to cost next to nothing): nginx from apt with
  ../shared/peers/nulls3/nginx.conf.template (one worker, `return 200` with an ETag, bodies
  discarded), rendered with a free port and a `stub_status` location added so that the bench
  can count the requests it served exactly (PUTs = requests - status reads). When nginx cannot
  be installed, bench_support/nulls3.py stands in (asyncio, stdlib; more CPU per request).
- S3-like sink (issue 10's P6): ../shared/peers/slows3/nginx.conf.template (nginx + the echo
  module): every PUT answered after --slows3-latency-ms (30), 503 SlowDown beyond --slows3-rate
  (3,500) PUT/s with a burst of --slows3-burst (350); a fresh one per scenario. Without the
  echo module, nulls3.py --delay-ms --rate --burst stands in.
- Go peer: ../shared/peers/goref built with its build.sh (cached in bench-results/cache/),
  DISPATCH=sync (bounded: a fair delivered-throughput comparison), MAX_QUEUE 10,000, default
  MAX_WORKERS (2 x CPUs) on the null S3 and MAX_WORKERS=256 on the S3-like sink.
  Delivered: `GET /stats` -> uploaded - failed (a failed PUT is dropped by the seed design).
- ingestd: `<venv>/bin/ingestd --config <bench_support/ingestd-*.toml, filled in>` with the s3
  sink (dummy AWS credentials), listening on 127.0.0.1:0 (the port read from its log), its
  memory-durability logs in a /dev/shm folder of the run; `--front NAME` (default `auto`: every
  choice `ingestd check-config` lists for `http.server`) adds columns with `http.server = NAME`,
  skipped with the config's own message when the build refuses the key. Ready = `/health/ready`
  200. Delivered: `GET /health` -> counters.uploaded_payloads. Stopped with SIGTERM.
- Load: wrk from apt (`wrk -t2 -c64 --latency -s bench_support/post.lua`), POSTing one fixed
  body `{"version":"1","token":"t","data":[...]}` of 1 or 10 telemetry-like events of about
  each --payload-sizes bytes (default 100 and 1024: ids, timestamps, metrics, tags, and at 1 KB
  a user agent, a URL, attributes and a log message); bench_support/pyload.py when wrk is missing.

Scenarios and phases: see bench_support/scenarios.py. Per payload size: go-1, ingestd-1
(+ fronts) from readiness; go-10, ingestd-10 (+ fronts), seed-layout-10 after a warm-up;
go-10-slows3, ingestd-10-slows3; latency at 70% of ingestd-1's maximum; overload. Then the CPU
breakdown (py-spy over the whole tree, 1 and 10 payloads/request, at the size nearest 1 KB).

Figures and their definitions
-----------------------------
- requests/s: answers 2xx (ingestd 202, Go 200) per second of the measured run.
- payloads/s delivered: the increase of the server's delivered counter from the start of the
  measured run until everything it accepted was delivered (or --drain-cap ran out: then the
  figure is its delivery capacity), divided by (run duration + that drain time).
- server CPU µs per delivered payload: user+system CPU of the server's whole process tree
  (psutil) over the same span, divided by the payloads delivered in it.
- S3 PUTs per 1,000 payloads: PUTs counted by the sink over the same span (503s included) /
  delivered x 1000.
- p50 / p99 latency: wrk's, over all answers of the measured run; when ingestd's /metrics has
  histograms (`*_bucket{le=...}`), their p50/p99 over the same span too (PromQL's interpolation).
- peak RSS: the largest sum of RSS over the server's process tree, sampled every 100 ms.
- latency phase: the rate held at 0.7 x min(2xx req/s, delivered payloads/s) of ingestd-1 by
  post.lua's think time (calibrated by a short first run); latency measured from each send.
- overload: ingestd (queue.max_items 2000, 50 payloads per object) on a null S3 that answers each
  PUT 100 ms late, 256 connections of 10-payload requests: every answer code seen, the overload
  factor (requests offered / requests delivered per second), RSS growth from the warmed baseline.
- CPU breakdown: see bench_support/profiling.py.

Outputs in bench-results/: bench-<stamp>.json (every figure, settings, tool versions),
bench-<stamp>.png (chart), bench-<stamp>.txt (the printed tables, targets and breakdown),
latest.{json,png,txt} copies, and logs/<stamp>/ (server, generator and py-spy logs).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_support.processes import Processes, progress

try:
    import psutil as psutil_or_none
except ImportError:  # only `--help` works without it: scripts/bench installs it in its venv
    psutil_or_none = None  # type: ignore[assignment,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent


def sizes_arg(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of byte counts, e.g. 100,1024") from None
    if not sizes or any(s < 40 or s > 1_000_000 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes from 40 to 1000000 bytes")
    return list(dict.fromkeys(sizes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description="ingestd vs the Go seed design, one run, side by side")
    p.add_argument("--quick", action="store_true", help="shorter warm-up, runs and phases")
    p.add_argument("--payload-sizes", type=sizes_arg, default=None, metavar="N,N",
                   help="approximate bytes per payload, one set of scenarios each (default 100,1024)")
    p.add_argument("--payload-bytes", type=int, default=None, help="one size only (same as --payload-sizes N)")
    p.add_argument("--duration", type=int, help="seconds of each measured run (default 10, quick 4)")
    p.add_argument("--warmup", type=int, help="seconds of warm-up before each warmed run (default 2, quick 1)")
    p.add_argument("--drain-cap", type=float, help="longest wait for the backlog after a run (default 5, quick 3)")
    p.add_argument("--settle-cap", type=float, help="longest wait for the warm-up backlog (default 3, quick 2)")
    p.add_argument("--threads", type=int, default=2, help="load generator threads (wrk -t; python: processes)")
    p.add_argument("--connections", type=int, default=64, help="load generator connections (wrk -c)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--nulls3", choices=("auto", "nginx", "python"), default="auto")
    p.add_argument("--peers", default=str(ROOT.parent / "shared" / "peers"), help="folder with goref/, nulls3/, slows3/")
    p.add_argument("--ingestd", default="", help="command that runs ingestd (default: the bench venv's ingestd)")
    p.add_argument("--front", default="auto",
                   help="http.server fronts to measure besides the default (waitress), comma-separated; auto: every"
                        " choice `ingestd check-config` lists for http.server; none: no front columns. A front the"
                        " build's config refuses is skipped with the config's message")
    p.add_argument("--go-workers", type=int, default=0, help="MAX_WORKERS of the Go peer on the null S3 (default: its own, 2 x CPUs)")
    p.add_argument("--skip-go", action="store_true", help="no Go columns (the Go peer is not built)")
    p.add_argument("--only", default="", help="comma-separated phases to run: go-1, go-10, ingestd-1, ingestd-10,"
                   " ingestd-1:<front>, ingestd-10:<front>, seed-layout-10, go-10-slows3, ingestd-10-slows3, latency"
                   " (needs ingestd-1), overload, profile; families: go, front, slows3")
    p.add_argument("--skip-overload", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-slows3", action="store_true", help="no S3-like sink scenarios (P6)")
    p.add_argument("--skip-formats", action="store_true",
                   help="no object format columns (10p at the size nearest 1 KB: NDJSON+zstd, Parquet+zstd)")
    p.add_argument("--skip-profile", action="store_true", help="no CPU breakdown (py-spy)")
    p.add_argument("--slows3-latency-ms", type=float, default=30.0, help="S3-like sink: time per PUT")
    p.add_argument("--slows3-rate", type=int, default=3500, help="S3-like sink: PUT/s beyond which 503 SlowDown")
    p.add_argument("--slows3-burst", type=int, default=350, help="S3-like sink: PUTs allowed at once above the rate")
    p.add_argument("--slows3-go-workers", type=int, default=256, help="MAX_WORKERS of the Go peer on the S3-like sink")
    p.add_argument("--overload-duration", type=int, help="seconds (default 10, quick 4)")
    p.add_argument("--overload-connections", type=int, default=256)
    p.add_argument("--overload-sink-delay-ms", type=float, default=100.0)
    p.add_argument("--latency-load", type=float, default=0.7, help="fraction of the measured max req/s")
    p.add_argument("--latency-duration", type=int, help="seconds (default 8, quick 4)")
    p.add_argument("--latency-calibrate", type=int, help="seconds of the calibration run (default 2, quick 1)")
    p.add_argument("--latency-connections", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="(kept for old command lines: the CPU breakdown runs by default)")
    # kept for old command lines (the README's): the breakdown now covers listeners and uploaders at 1 and 10 payloads
    p.add_argument("--profile-uploader", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-payloads", type=int, choices=(1, 10), help=argparse.SUPPRESS)
    p.add_argument("--profile-seconds", type=int, help="py-spy seconds per payloads/request (default 10, quick 5)")
    p.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    a = p.parse_args(argv)
    q = a.quick
    defaults = {"duration": (10, 4), "warmup": (2, 1), "drain_cap": (5.0, 3.0), "settle_cap": (3.0, 2.0),
                "overload_duration": (10, 4), "latency_duration": (8, 4), "latency_calibrate": (2, 1),
                "profile_seconds": (10, 5)}
    for k, (full, quick) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    if a.payload_sizes and a.payload_bytes:
        p.error("--payload-sizes and --payload-bytes: give one")
    a.sizes = a.payload_sizes or ([a.payload_bytes] if a.payload_bytes else [100, 1024])
    a.only_set = {x.strip() for x in a.only.split(",") if x.strip()}
    return a


def main() -> int:
    args = parse_args()
    if psutil_or_none is None:
        raise SystemExit("scripts/bench.py needs psutil: run it through scripts/bench, which makes its venv")
    from bench_support.scenarios import Bench

    def on_term(signum: int, frame: Any) -> None:
        if not Processes.interrupted:
            Processes.interrupted = True
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        progress("interrupted: stopping everything the bench started")
        return 130
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
