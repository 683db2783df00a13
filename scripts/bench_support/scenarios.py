"""The scenarios of a bench run and the order they run in (`Bench.run`).

For each payload size (`--payload-sizes`, default ~100 B and ~1 KB), in this order so that each
ingestd figure is taken close in time to the Go figure it is compared with:

- go-1, ingestd-1 (and ingestd-1:<front> per front): 1 payload/request, load from readiness
  (no warm-up: issue 10's P2 counts what a daemon does from the moment it says it is ready);
- go-10, ingestd-10 (and ingestd-10:<front>), seed-layout-10: 10 payloads/request, warmed up;
- go-10-slows3 (MAX_WORKERS=256), ingestd-10-slows3: 10 payloads/request on the S3-like sink;
- latency: a fresh ingestd at 70% of ingestd-1's maximum;
- overload: ingestd on a sink that takes 100 ms per PUT, driven far beyond what it delivers.

Then the CPU profile (py-spy) of ingestd at 1 and 10 payloads/request at the size nearest 1 KB.
Each measured scenario: start the server on a fresh sink, optionally warm up, measure for
--duration seconds, then poll (bounded by --drain-cap) until everything accepted is delivered,
stop the server (SIGTERM; exit code and stop time recorded).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from . import profiling, promhist
from .load import Load, make_body, ok_requests
from .processes import (
    T0,
    Processes,
    RssSampler,
    cpu_model,
    cpu_split,
    http_post,
    machine,
    progress,
    rss_detail,
    rusage,
    thread_cpu,
    tree_cpu,
    tree_rss,
)
from .report import fmt, write_report
from .servers import (
    ECHO_MODULE,
    FrontRefused,
    GoPeer,
    Ingestd,
    NullS3,
    Server,
    find_nginx,
    fronts_from_check_config,
)

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parent.parent
STEP_ERRORS = (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError)


FORMATS = ("zstd", "parquet")  # columns beside ingestd-10 (NDJSON + gzip): bench_support/ingestd-<format>.toml


def scenario_base(key: str) -> str:
    return key.split("/", 1)[0]


def wanted(base: str, only: set[str]) -> bool:
    """Is a phase asked for by --only? Families: `front` (every ingestd-N:<front>), `slows3`
    (both S3-like scenarios), `go` (every Go scenario)."""
    if not only:
        return True
    if base in only:
        return True
    if ":" in base and ("front" in only or base.split(":", 1)[0] + ":*" in only):
        return True
    if base.endswith("-slows3") and "slows3" in only:
        return True
    return base.startswith("go-") and "go" in only


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Processes()
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.results_dir = Path(args.out).resolve()
        self.logdir = self.results_dir / "logs" / self.stamp
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
        shm = Path("/dev/shm")
        self.memory_root = Path(tempfile.mkdtemp(prefix="ingestd-bench-", dir=shm if shm.is_dir() else None))
        self.peers = Path(args.peers).resolve()
        self.doc: dict[str, Any] = {"scenarios": {}, "stamp": self.stamp, "latency": {}, "overload": {},
                                    "profile": {}, "skipped": {}, "sizes": args.sizes}
        self.nulls3: NullS3 | None = None
        self.bodies: dict[tuple[int, int], Path] = {}
        self.goref: Path | None = None
        self.fronts: list[str] = []

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        t0 = psutil.cpu_times()
        time.sleep(1.0)
        pre = machine(t0, psutil.cpu_times())
        pre["load_avg"] = os.getloadavg()
        self.doc["preflight"] = pre
        progress(f"machine before the bench: {pre['busy_pct']:.0f}% CPU busy, load averages"
                 f" {' / '.join(f'{x:.2f}' for x in pre['load_avg'])} (1/5/15 min)"
                 + ("  -- WARNING: other work is running, figures will be perturbed" if pre["busy_pct"] > 15 else ""))
        template = self.peers / "nulls3" / "nginx.conf.template"
        kind = a.nulls3
        if kind == "auto":
            kind = "nginx" if find_nginx() and template.exists() else "python"
        if kind == "nginx" and not (find_nginx() and template.exists()):
            raise SystemExit("--nulls3 nginx: nginx or the template is missing")
        self.nulls3 = NullS3(self.procs, self.workdir, self.logdir, kind, template if kind == "nginx" else None).start()
        progress(f"null S3: {self.nulls3.describe()} (PUT counting: {'yes' if self.nulls3.countable else 'no'})")
        self.slow_template = self.peers / "slows3" / "nginx.conf.template"
        self.slow_kind = "nginx" if (find_nginx() and self.slow_template.exists() and ECHO_MODULE.exists()) else "python"
        if self.slow_kind == "python":
            progress(f"S3-like sink: nginx{'' if find_nginx() else ' (missing)'} without {ECHO_MODULE.name}"
                     f"{'' if ECHO_MODULE.exists() else ' (missing: apt-get install libnginx-mod-http-echo)'}:"
                     " bench_support/nulls3.py stands in (same latency, rate and 503 SlowDown)")
        gen = a.loadgen
        if gen == "auto":
            gen = "wrk" if shutil.which("wrk") else "python"
        if gen == "wrk" and not shutil.which("wrk"):
            raise SystemExit("--loadgen wrk: wrk is missing")
        self.load = Load(self.procs, gen, a.threads, a.connections, self.logdir)
        progress(f"load generator: {gen} ({a.threads} threads, {a.connections} connections)")
        self.doc["bodies"] = {}
        for size in a.sizes:
            for n in (1, 10):
                path = self.workdir / f"body-{n}-{size}.json"
                shape = make_body(n, path, size)
                self.doc["bodies"][f"{n}/{size}"] = shape
                self.bodies[(n, size)] = path
            progress(f"bodies ~{size} B: payloads of {self.doc['bodies'][f'10/{size}']['payload_bytes_avg']:.0f} B"
                     f" on average; 1p body {self.doc['bodies'][f'1/{size}']['body_bytes']:,} B,"
                     f" 10p body {self.doc['bodies'][f'10/{size}']['body_bytes']:,} B")
        if not a.skip_go and any(wanted(b, a.only_set) for b in ("go-1", "go-10", "go-10-slows3")):
            self.goref = self.build_goref()
        if a.ingestd:
            self.ingestd_cmd = a.ingestd.split()
        else:
            exe = Path(sys.executable).parent / "ingestd"
            self.ingestd_cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ingestd"]
        self.fronts = self.find_fronts()
        self.doc["tools"] = self.tool_versions(kind, gen)

    def find_fronts(self) -> list[str]:
        """The fronts to measure besides the default: --front NAME[,NAME] as given, or with
        `auto` the choices that `ingestd check-config` lists in the help of `http.server`."""
        a = self.args
        info: dict[str, Any] = {"requested": a.front}
        self.doc["fronts"] = info
        if a.front in ("", "none"):
            info["note"] = "--front none: no front scenarios"
            return []
        if a.front != "auto":
            names = [n.strip() for n in a.front.split(",") if n.strip()]
            info["measured"] = names
            return names
        rundir = self.workdir / "check-config"
        rundir.mkdir(parents=True, exist_ok=True)
        cfg = rundir / "config.toml"
        cfg.write_text(Ingestd.render(SUPPORT / "ingestd-default.toml", "http://127.0.0.1:9", rundir,
                                      self.memory_root / "check-config", None))
        code, out = Ingestd.check_config(self.ingestd_cmd, cfg, rundir)
        found = fronts_from_check_config(out) if code == 0 else None
        if found is None:
            info["note"] = ("this build has no http.server key (check-config does not list it): only the default"
                            " front (waitress) is measured; --front NAME tries a front anyway")
            progress(f"fronts: {info['note']}")
            return []
        names = [n for n in found if n != "waitress"]
        info["found"] = found
        info["measured"] = names
        if not names:
            info["note"] = f"http.server offers only {', '.join(found) or 'waitress'}: no other front to measure"
        progress(f"fronts: http.server offers {', '.join(found)}; measuring {', '.join(names) or 'no other'}")
        return names

    def build_goref(self) -> Path | None:
        src = self.peers / "goref"
        if not (src / "build.sh").exists():
            progress(f"Go peer: {src}/build.sh not found; Go columns skipped")
            return None
        h = hashlib.sha256()
        for f in ("main.go", "go.mod", "build.sh"):
            if (src / f).exists():
                h.update((src / f).read_bytes())
        out = self.results_dir / "cache" / f"goref-{h.hexdigest()[:12]}"
        if out.exists():
            progress(f"Go peer: cached build {out.relative_to(self.results_dir)}")
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        progress("Go peer: building with build.sh (installs golang-go from apt when missing)")
        log = self.logdir / "goref-build.log"
        with open(log, "wb") as build_log:
            r = subprocess.run(["bash", str(src / "build.sh"), str(out)], stdout=build_log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=900, check=False)
        if r.returncode != 0 or not out.exists():
            progress(f"Go peer: build failed (see {log}); Go columns skipped")
            return None
        return out

    def tool_versions(self, nulls3: str, gen: str) -> dict[str, Any]:
        def run(cmd: list[str]) -> str:
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, check=False)
                return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else ""
            except (OSError, subprocess.TimeoutExpired):
                return ""

        git = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
        pyspy = self.pyspy()
        return {
            "null_s3": nulls3, "slow_s3": self.slow_kind,
            "nginx": run([find_nginx() or "nginx", "-v"]) if nulls3 == "nginx" else None,
            "loadgen": gen, "wrk": run(["wrk", "-v"]) if gen == "wrk" else None,
            "go": run(["go", "version"]) if self.goref else None,
            "py-spy": run([pyspy, "--version"]) if pyspy else None,
            "ingestd": run(self.ingestd_cmd + ["--version"]), "ingestd_cmd": self.ingestd_cmd,
            "git": git + ("+dirty" if dirty else ""),
            "python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "mem_total_mb": round(psutil.virtual_memory().total / 2**20),
        }

    @staticmethod
    def pyspy() -> str | None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        return exe if os.access(exe, os.X_OK) else None

    # -- servers and sinks ------------------------------------------------------------------------
    def slow_sink(self, name: str) -> NullS3:
        a = self.args
        template = self.slow_template if self.slow_kind == "nginx" else None
        return NullS3(self.procs, self.workdir, self.logdir, self.slow_kind, template, delay_ms=a.slows3_latency_ms,
                      name=name, rate=a.slows3_rate, burst=a.slows3_burst).start()

    def start_ingestd(self, name: str, config: str, s3: NullS3, front: str | None = None) -> Ingestd:
        progress(f"{name}: starting ingestd ({config}{f', http.server = {front!r}' if front else ''})")
        srv = Ingestd(self.procs, name)
        try:
            return srv.start(self.ingestd_cmd, SUPPORT / config, s3.url, self.workdir, self.memory_root, self.logdir,
                             front)
        except BaseException:
            srv.stop()
            raise

    # -- one measured scenario ---------------------------------------------------------------------
    def wait_delivered(self, server: Server, cap: float) -> tuple[bool, float, dict[str, int]]:
        deadline = time.monotonic() + cap
        while True:
            c = server.counters()
            t = time.monotonic()
            if c["done_payloads"] >= c["accepted_payloads"]:
                return True, t, c
            if t >= deadline:
                return False, t, c
            time.sleep(0.05)

    def measure(self, server: Server, key: str, ppr: int, size: int, sampler: RssSampler, sink: NullS3,
                warm: bool) -> dict[str, Any]:
        a = self.args
        body = self.bodies[(ppr, size)]
        settled = None
        if warm:
            progress(f"{key}: warm-up {a.warmup}s")
            self.load.run(server.url, body, a.warmup)
            settled, _, _ = self.wait_delivered(server, a.settle_cap)
        c0 = server.counters()
        metrics0 = server.metrics_text()
        root0, kids0 = tree_cpu(server.pid)
        puts0 = sink.puts()
        s3cpu0 = sink.cpu_s()
        sys0 = psutil.cpu_times()
        ru0 = rusage()
        progress(f"{key}: measuring {a.duration}s ({self.load.kind}, {a.connections} connections, {ppr} payload(s)"
                 f"/request of ~{size} B{'' if warm else ', load from readiness'})")
        r = self.load.run(server.url, body, a.duration)
        t_run_end = time.monotonic()
        c_mid = server.counters()
        drained, t_end, c1 = self.wait_delivered(server, a.drain_cap)
        root1, kids1 = tree_cpu(server.pid)
        puts1 = sink.puts()
        s3cpu1 = sink.cpu_s()
        sys1 = psutil.cpu_times()
        ru1 = rusage()
        metrics1 = server.metrics_text()
        run_s = r["duration_us"] / 1e6
        drain_s = t_end - t_run_end
        span = run_s + drain_s
        delivered = c1["delivered_payloads"] - c0["delivered_payloads"]
        ok = ok_requests(r)
        cpu_s = (root1 + kids1) - (root0 + kids0)
        puts = (puts1 - puts0) if (puts0 is not None and puts1 is not None) else None
        objects = c1["objects"] - c0["objects"]
        failed = c1["failed"] - c0["failed"]
        lat = r["latency_us"]
        hist = promhist.summarize(metrics0, metrics1) if metrics1 and "_bucket" in metrics1 else {}
        res = {
            "name": key, "base": scenario_base(key), "server": server.kind, "payloads_per_request": ppr,
            "payload_bytes": size, "config": server.config_text, "warm_up": warm,
            "ready_s": round(server.ready_s, 3) if server.ready_s is not None else None,
            "settled_before_run": settled,
            "run_s": round(run_s, 3), "drain_s": round(drain_s, 3), "drained": drained,
            "requests_ok": ok, "requests_non2xx": int(r["requests"] - ok),
            "socket_errors": sum(v for k, v in r["errors"].items() if k != "status"),
            "requests_per_s": ok / run_s,
            "accepted_payloads": c1["accepted_payloads"] - c0["accepted_payloads"],
            "accepted_payloads_per_s": (c_mid["accepted_payloads"] - c0["accepted_payloads"]) / run_s,
            "delivered_payloads": delivered,
            "delivered_payloads_per_s": delivered / span if span > 0 else 0.0,
            "delivered_in_run_payloads_per_s": (c_mid["delivered_payloads"] - c0["delivered_payloads"]) / run_s,
            "backlog_left": c1["accepted_payloads"] - c1["done_payloads"],
            "failed_puts": failed, "dropped_payloads": c1["dropped"] - c0["dropped"],
            "cpu_s": round(cpu_s, 3), "cpu_s_root": round(root1 - root0, 3), "cpu_s_children": round(kids1 - kids0, 3),
            "cpu_us_per_payload": cpu_s * 1e6 / delivered if delivered else None,
            "cpu_us_per_request": cpu_s * 1e6 / ok if ok else None,
            "s3_puts": puts, "objects_by_server": objects,
            "s3_puts_per_1000_payloads": (puts if puts is not None else objects) * 1000 / delivered if delivered else None,
            "sink": sink.describe(), "nulls3_cpu_s": round(s3cpu1 - s3cpu0, 3),
            "latency_ms": {k: lat[k] / 1000 for k in ("mean", "p50", "p75", "p90", "p99", "p999", "max")},
            "histograms": hist,
            "peak_rss_mb": round(sampler.peak / 2**20, 1),
            "machine": machine(sys0, sys1, ours={"server": cpu_s, "null_s3": s3cpu1 - s3cpu0,
                                                 "load_generator": ru1["children"] - ru0["children"],
                                                 "bench": ru1["self"] - ru0["self"]}),
            "load_avg": os.getloadavg(),
            "load": r,
        }
        extra = ""
        if res["failed_puts"]:
            extra = f", failed PUTs {res['failed_puts']:,}" + (f" (dropped {res['dropped_payloads']:,})"
                                                               if res["dropped_payloads"] else " (retried)")
        progress(f"{key}: {res['requests_per_s']:,.0f} req/s, {res['delivered_payloads_per_s']:,.0f} payloads/s delivered"
                 f" (drain {drain_s:.2f}s{'' if drained else ', CAP REACHED, backlog ' + format(res['backlog_left'], ',')}),"
                 f" {fmt(res['cpu_us_per_payload'])} µs CPU/payload, p99 {res['latency_ms']['p99']:.1f} ms,"
                 f" non-2xx {res['requests_non2xx']:,}{extra}"
                 + (f"; /metrics: {', '.join(sorted(hist))}" if hist else ""))
        return res

    def scenario(self, key: str, kind: str, ppr: int, size: int, *, config: str = "ingestd-default.toml",
                 front: str | None = None, slow: bool = False, go_workers: int = 0, warm: bool = True) -> None:
        sink = self.slow_sink(f"slows3-{key.replace('/', '-')}") if slow else self.nulls3
        assert sink is not None
        srv: Server | None = None
        try:
            if slow:
                progress(f"{key}: S3-like sink: {sink.describe()}")
            if kind == "go":
                assert self.goref is not None
                extra = {"MAX_WORKERS": str(go_workers)} if go_workers else {}
                progress(f"{key}: starting Go peer (DISPATCH=sync{', MAX_WORKERS=' + str(go_workers) if go_workers else ''})")
                srv = GoPeer(self.procs, key.replace("/", "-")).start(self.goref, f"{sink.url}/bench", self.logdir, extra)
            else:
                srv = self.start_ingestd(key.replace("/", "-").replace(":", "-"), config, sink, front)
            sampler = RssSampler(srv.pid).start()
            try:
                res = self.measure(srv, key, ppr, size, sampler, sink, warm)
            finally:
                sampler.stop()
                srv.stop()
            res["stop"] = srv.stop_info
            if kind == "go":
                res["go_env"] = {"DISPATCH": "sync", **({"MAX_WORKERS": str(go_workers)} if go_workers else {})}
            else:
                res["front"] = front or "waitress (default)"
                progress(f"{key}: stopped with SIGTERM: exit {srv.stop_info.get('exit_code')} after"
                         f" {srv.stop_info.get('stop_s')}s")
            self.doc["scenarios"][key] = res
        finally:
            if srv is not None:
                srv.stop()
            if slow:
                sink.stop()

    # -- latency at ~70% of the maximum --------------------------------------------------------------
    def latency_phase(self, size: int) -> None:
        """On a fresh ingestd (default config, 1p): the max run may have left a backlog behind."""
        assert self.nulls3 is not None
        max_res = self.doc["scenarios"].get(f"ingestd-1/{size}")
        if not max_res:
            progress(f"latency/{size}: skipped (no ingestd-1/{size} figures to take the maximum from)")
            return
        srv = self.start_ingestd(f"latency-{size}", "ingestd-default.toml", self.nulls3)
        out: dict[str, Any] = {}
        try:
            progress(f"latency/{size}: warm-up {self.args.warmup}s at full speed")
            self.load.run(srv.url, self.bodies[(1, size)], self.args.warmup)
            self.wait_delivered(srv, self.args.settle_cap)
            # the maximum: what ingestd-1 both answered 2xx and delivered per second (sustainable)
            sustained = min(max_res["requests_per_s"], max_res["delivered_payloads_per_s"])
            out["sustained"] = self._latency(srv, size, sustained, "min(2xx requests/s, delivered payloads/s) of ingestd-1")
            out["sustained"]["delivered_all"] = self.wait_delivered(srv, self.args.drain_cap)[0]
            if max_res["requests_per_s"] > 1.1 * sustained:
                progress(f"latency/{size}: ingestd-1 answered far more than it delivered; also at 70% of its 2xx requests/s")
                out["http_max"] = self._latency(srv, size, max_res["requests_per_s"], "2xx requests/s of ingestd-1")
        finally:
            srv.stop()
            self.doc["latency"][str(size)] = out

    def _latency(self, srv: Ingestd, size: int, max_rps: float, basis: str) -> dict[str, Any]:
        a = self.args
        target = a.latency_load * max_rps
        c = a.latency_connections
        body = self.bodies[(1, size)]
        out: dict[str, Any] = {"server": srv.name, "payload_bytes": size, "max_requests_per_s": max_rps,
                               "fraction": a.latency_load, "max_definition": basis, "target_requests_per_s": target,
                               "connections": c}
        if self.load.kind == "wrk":
            cycle_ms = c / target * 1000.0
            progress(f"latency/{size}: calibrating think time for {target:,.0f} req/s ({a.latency_load:.0%} of"
                     f" {max_rps:,.0f}), {c} connections, {a.latency_calibrate}s")
            cal = self.load.run(srv.url, body, a.latency_calibrate, connections=c, delay_ms=cycle_ms)
            achieved = ok_requests(cal) / (cal["duration_us"] / 1e6)
            overhead_ms = max(0.0, c / max(achieved, 1.0) * 1000.0 - cycle_ms)
            delay = max(0.0, cycle_ms - overhead_ms)
            out["method"] = ("wrk with post.lua's delay(): each connection waits a random 0..2d ms before each "
                             "request; d calibrated by a short first run; latency measured from the send")
            out["calibration"] = {"delay_ms": cycle_ms, "achieved_requests_per_s": achieved, "overhead_ms": overhead_ms}
            progress(f"latency/{size}: measuring {a.latency_duration}s with mean think time {delay:.2f} ms per connection")
            metrics0 = srv.metrics_text()
            r = self.load.run(srv.url, body, a.latency_duration, connections=c, delay_ms=delay)
            out["delay_ms"] = delay
        else:
            out["method"] = ("Python generator, open-loop schedule at the target rate; latency from the scheduled "
                             "send (coordinated omission corrected)")
            progress(f"latency/{size}: measuring {a.latency_duration}s at {target:,.0f} req/s"
                     f" ({a.latency_load:.0%} of {max_rps:,.0f})")
            metrics0 = srv.metrics_text()
            r = self.load.run(srv.url, body, a.latency_duration, connections=c, rate=target)
        metrics1 = srv.metrics_text()
        achieved = ok_requests(r) / (r["duration_us"] / 1e6)
        out.update({
            "achieved_requests_per_s": achieved, "achieved_fraction_of_max": achieved / max_rps if max_rps else None,
            "requests_non2xx": int(r["requests"] - ok_requests(r)),
            "latency_ms": {k: r["latency_us"][k] / 1000 for k in ("mean", "p50", "p75", "p90", "p99", "p999", "max")},
            "histograms": promhist.summarize(metrics0, metrics1) if metrics1 and "_bucket" in metrics1 else {},
            "load": r,
        })
        progress(f"latency/{size}: {achieved:,.0f} req/s ({out['achieved_fraction_of_max']:.0%} of max):"
                 f" p50 {out['latency_ms']['p50']:.2f} ms, p99 {out['latency_ms']['p99']:.2f} ms,"
                 f" non-2xx {out['requests_non2xx']:,}")
        return out

    # -- overload -----------------------------------------------------------------------------------
    def overload_phase(self, size: int) -> None:
        a = self.args
        name = f"overload/{size}"
        slow = NullS3(self.procs, self.workdir, self.logdir, "python", None, delay_ms=a.overload_sink_delay_ms,
                      name=f"nulls3-slow-{size}").start()
        progress(f"{name}: slow null S3 ({slow.describe()})")
        srv: Ingestd | None = None
        try:
            srv = self.start_ingestd(f"overload-{size}", "ingestd-overload.toml", slow)
            # warm the daemon first (each uploader's first PUT loads botocore's models and endpoint
            # rules, tens of MB): a few requests, delivered, then the baseline
            cold = tree_rss(srv.pid)
            body = self.bodies[(10, size)].read_bytes()
            for _ in range(40):
                http_post(srv.port, "/v1/payloads", body)
                time.sleep(0.01)
            warmed = self.wait_delivered(srv, 5.0)[0]
            base = tree_rss(srv.pid)
            base_detail = rss_detail(srv.pid)
            c0 = srv.counters()
            sampler = RssSampler(srv.pid).start()
            progress(f"{name}: {a.overload_duration}s of 10-payload requests on {a.overload_connections} connections"
                     f" (baseline RSS {base / 2**20:.1f} MB after a warm-up{'' if warmed else ' that did not drain'})")
            try:
                r = self.load.run(srv.url, self.bodies[(10, size)], a.overload_duration,
                                  connections=a.overload_connections, count_status=True)
            finally:
                sampler.stop()
            end_rss = tree_rss(srv.pid)
            end_detail = rss_detail(srv.pid)
            c1 = srv.counters()
            snap = srv.health()
        finally:
            slow.stop()  # the uploaders now fail, hit the drain deadline and spill: a quick stop
            if srv is not None:
                srv.stop()
        statuses = {int(k): v for k, v in (r.get("statuses") or {}).items()}
        run_s = r["duration_us"] / 1e6
        answered = sum(statuses.values())
        accepted = statuses.get(202, 0)
        sock = sum(v for k, v in r["errors"].items() if k != "status")
        delivered_pps = (c1["delivered_payloads"] - c0["delivered_payloads"]) / run_s
        res = {
            "payload_bytes": size, "config": srv.config_text, "sink_delay_ms": a.overload_sink_delay_ms,
            "connections": a.overload_connections, "run_s": run_s, "statuses": statuses, "socket_errors": sock,
            "only_202_503_429": set(statuses) <= {202, 503, 429} and sock == 0,
            "answers_per_s": answered / run_s, "accepted_per_s": accepted / run_s,
            "rejected_503_per_s": statuses.get(503, 0) / run_s,
            "delivered_payloads_per_s": delivered_pps,
            "overload_factor": (answered / run_s) / (delivered_pps / 10) if delivered_pps else None,
            "overload_definition": "requests offered (answered) per second / requests delivered per second",
            "queue_at_end": snap.get("queue"),
            "rss_cold_mb": round(cold / 2**20, 1),
            "rss_base_mb": round(base / 2**20, 1), "rss_peak_mb": round(sampler.peak / 2**20, 1),
            "rss_end_mb": round(end_rss / 2**20, 1), "rss_growth_mb": round((sampler.peak - base) / 2**20, 1),
            "rss_base_by_process_mb": base_detail, "rss_end_by_process_mb": end_detail,
            "rss_series_mb": sampler.series,
            "latency_ms": {k: r["latency_us"][k] / 1000 for k in ("p50", "p99", "max")},
            "stop": srv.stop_info, "load": r,
        }
        self.doc["overload"][str(size)] = res
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items()))
        progress(f"{name}: answers {codes}; socket errors {sock}; {res['answers_per_s']:,.0f} answers/s,"
                 f" {delivered_pps:,.0f} payloads/s delivered ({fmt(res['overload_factor'], 0)}x overload);"
                 f" RSS {res['rss_base_mb']} -> peak {res['rss_peak_mb']} MB (+{res['rss_growth_mb']} MB);"
                 f" stop: exit {srv.stop_info.get('exit_code')} after {srv.stop_info.get('stop_s')}s")

    # -- CPU per payload by group (py-spy) ----------------------------------------------------------
    def profile_phase(self, size: int) -> None:
        """One ingestd per front (default config, null S3); for 1 and then 10 payloads/request:
        warm up, then py-spy over the whole tree while the load runs, and each thread's CPU over
        the same span. Results keyed "1", "10" (default front) and "1:<front>", "10:<front>"."""
        assert self.nulls3 is not None
        pyspy = self.pyspy()
        if not pyspy:
            progress("profile: py-spy not found (scripts/bench installs it into the bench venv); CPU breakdown skipped")
            self.doc["skipped"]["profile"] = "py-spy not found"
            return
        for front in [None, *self.fronts]:
            tag = f":{front}" if front else ""
            try:
                srv = self.start_ingestd(f"profile{tag.replace(':', '-')}-{size}", "ingestd-default.toml", self.nulls3,
                                         front)
            except FrontRefused as e:
                progress(f"profile{tag}: SKIPPED: {e}")
                self.doc["skipped"][f"profile{tag}/{size}"] = str(e)
                continue
            try:
                for ppr in (1, 10):
                    out = self._profile_one(srv, pyspy, ppr, size, tag)
                    out["front"] = front or "waitress (default)"
                    self.doc["profile"][f"{ppr}{tag}"] = out
            finally:
                srv.stop()

    def _profile_one(self, srv: Ingestd, pyspy: str, ppr: int, size: int, tag: str = "") -> dict[str, Any]:
        a = self.args
        body = self.bodies[(ppr, size)]
        name = f"profile {ppr}p{tag}/{size}"
        progress(f"{name}: warm-up {a.warmup}s")
        self.load.run(srv.url, body, a.warmup)
        self.wait_delivered(srv, a.settle_cap)
        secs = a.profile_seconds
        raw = self.logdir / f"py-spy-{ppr}p{tag.replace(':', '-')}-{size}.txt"
        spylog = raw.with_suffix(".log")
        holder: dict[str, Any] = {}

        def load() -> None:
            try:
                holder["r"] = self.load.run(srv.url, body, secs + 3)
            except STEP_ERRORS as e:
                holder["error"] = repr(e)

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            time.sleep(1.5)
            health = srv.health()
            roles = {srv.pid: "supervisor"}
            roles.update({w["pid"]: "listener" for w in health.get("listeners", []) if w.get("pid")})
            roles.update({w["pid"]: "uploader" for w in health.get("workers", []) if w.get("pid")})
            c0 = srv.counters()
            cpu0 = thread_cpu(srv.pid)
            split0 = cpu_split(srv.pid)
            t0 = time.monotonic()
            progress(f"{name}: py-spy record {secs}s at {a.profile_rate} Hz over the whole tree")
            spy = self.procs.start(f"py-spy-{ppr}", [pyspy, "record", "--pid", str(srv.pid), "--subprocesses",
                                                     "--threads", "--nonblocking", "--rate", str(a.profile_rate),
                                                     "--duration", str(secs), "--format", "raw", "-o", str(raw)],
                                   log_path=spylog)
            try:
                spy.wait(secs + 60)
            except subprocess.TimeoutExpired:
                self.procs.killpg(spy)
            span = time.monotonic() - t0
            cpu1 = thread_cpu(srv.pid)
            split1 = cpu_split(srv.pid)
            c1 = srv.counters()
        finally:
            t.join(secs + 90)
        self.wait_delivered(srv, a.drain_cap)
        accepted = c1["accepted_payloads"] - c0["accepted_payloads"]
        delivered = c1["delivered_payloads"] - c0["delivered_payloads"]
        out: dict[str, Any] = {"payloads_per_request": ppr, "payload_bytes": size, "seconds": round(span, 2),
                               "rate_hz": a.profile_rate, "accepted_payloads": accepted,
                               "delivered_payloads": delivered, "raw": str(raw),
                               "mode": "py-spy record --subprocesses --threads --nonblocking (no --native, no --gil,"
                                       " no --idle)",
                               "cpu_cores_used": {k: {f: round((split1[k][f] - split0[k][f]) / span, 3)
                                                      for f in ("user", "system")} for k in split1}}
        if "r" in holder:
            out["requests_per_s"] = ok_requests(holder["r"]) / (holder["r"]["duration_us"] / 1e6)
        log_text = spylog.read_text(errors="replace")
        behind = [ln for ln in log_text.splitlines() if "behind in sampling" in ln]
        if behind:
            out["pyspy_warnings"] = f"{len(behind)} 'behind in sampling' warnings (the machine was busy)"
        if not raw.exists() or accepted <= 0:
            out["error"] = f"py-spy wrote nothing or no payload was accepted; see {self.logdir}"
            progress(f"{name}: {out['error']}")
            return out
        samples = profiling.parse_raw(raw.read_text(errors="replace"))
        cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
        breakdown = profiling.attribute(samples, cpu, roles, {"listener": accepted, "supervisor": accepted,
                                                              "uploader": delivered or accepted})
        breakdown["top_other"] = profiling.top_frames(samples, profiling.OTHER, 5)
        out.update(breakdown)
        measured = sum(max(0.0, v) for v in cpu.values())
        out["measured_cpu_us_per_payload"] = measured * 1e6 / accepted
        groups = ", ".join(f"{g} {v:.1f}" for g, v in breakdown["us_per_payload"].items() if v >= 0.05)
        progress(f"{name}: {breakdown['samples']:,} samples; µs CPU per payload by group: {groups};"
                 f" total {breakdown['total_us_per_payload']:.1f}")
        return out

    # -- run all ------------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, Callable[[], None]]]:
        a = self.args
        go = self.goref is not None
        steps: list[tuple[str, Callable[[], None]]] = []

        def add(key: str, fn: Callable[[], None]) -> None:
            if wanted(scenario_base(key), a.only_set):
                steps.append((key, fn))

        def sc(key: str, kind: str, ppr: int, size: int, **kw: Any) -> None:
            add(key, lambda: self.scenario(key, kind, ppr, size, **kw))

        def phase(key: str, fn: Callable[[int], None], size: int) -> None:
            add(key, lambda: fn(size))

        for size in a.sizes:

            if go:
                sc(f"go-1/{size}", "go", 1, size, warm=False, go_workers=a.go_workers)
            sc(f"ingestd-1/{size}", "ingestd", 1, size, warm=False)
            for front in self.fronts:
                sc(f"ingestd-1:{front}/{size}", "ingestd", 1, size, warm=False, front=front)
            if go:
                sc(f"go-10/{size}", "go", 10, size, go_workers=a.go_workers)
            sc(f"ingestd-10/{size}", "ingestd", 10, size)
            for front in self.fronts:
                sc(f"ingestd-10:{front}/{size}", "ingestd", 10, size, front=front)
            sc(f"seed-layout-10/{size}", "ingestd", 10, size, config="ingestd-seed-layout.toml")
            if not a.skip_slows3:
                if go:
                    sc(f"go-10-slows3/{size}", "go", 10, size, slow=True, go_workers=a.slows3_go_workers)
                sc(f"ingestd-10-slows3/{size}", "ingestd", 10, size, slow=True)
                for front in self.fronts:
                    sc(f"ingestd-10-slows3:{front}/{size}", "ingestd", 10, size, slow=True, front=front)
            if not a.skip_latency:
                phase(f"latency/{size}", self.latency_phase, size)
            if not a.skip_overload:
                phase(f"overload/{size}", self.overload_phase, size)
        near_1k = min(a.sizes, key=lambda s: abs(s - 1024))
        if not a.skip_formats:  # issue 11: CPU, memory and stored bytes per payload of each format
            for fmt in FORMATS:
                sc(f"ingestd-10-{fmt}/{near_1k}", "ingestd", 10, near_1k, config=f"ingestd-{fmt}.toml")
        if not a.skip_profile:
            phase(f"profile/{near_1k}", self.profile_phase, near_1k)
        return steps

    def run(self) -> None:
        self.setup()
        self.doc["settings"] = {k: v for k, v in vars(self.args).items() if k != "only_set"}
        steps = self.plan()
        progress(f"plan: {len(steps)} phases: {', '.join(k for k, _ in steps)}")
        for key, step in steps:
            try:
                step()
            except FrontRefused as e:
                progress(f"{key}: SKIPPED: {e}")
                self.doc["skipped"][key] = str(e)
            except STEP_ERRORS as e:  # one broken phase must not hide the others
                progress(f"{key}: FAILED: {e!r}")
                self.doc.setdefault("failures", {})[key] = repr(e)
        self.doc["load_avg_end"] = os.getloadavg()
        self.doc["elapsed_s"] = round(time.monotonic() - T0, 1)
        write_report(self.doc, self.results_dir)

    def close(self) -> None:
        if self.nulls3 is not None:
            self.nulls3.stop()
        self.procs.kill_all()
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.memory_root, ignore_errors=True)
