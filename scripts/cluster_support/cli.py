"""The commands of scripts/cluster.

- `up`: start the cluster and keep it running until Ctrl-C (prints where everything is).
- `rolling-restart`: start the cluster, put load on it through HAProxy, restart every host one
  after the other (SIGTERM, drain, exit 0, start, ready, back in HAProxy), stop the load, wait
  until everything acknowledged has landed, stop the hosts, and report acknowledged / landed /
  lost / duplicates by payload id and the clients' status codes. Exit 0 only when nothing was
  lost or duplicated, no 5xx reached a client and every host drained with exit 0.
- `cleanup`: remove what runs killed before their own cleanup left behind.

Exit codes: 0 passed, 1 failed (figures say why), 77 cannot run here (not root, no network
namespaces, no HAProxy), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from .balancer import Balancer, ensure_haproxy
from .common import EXIT_UNAVAILABLE, TimedOut, Unavailable, wait_for
from .hosts import Host
from .load import Ledger, Load
from .network import STATE_DIR, Network, leftovers, require_root, teardown
from .sink import Figures, SinkReader


def say(message: str) -> None:
    print(f"[cluster] {message}", flush=True)


def default_ingestd() -> list[str]:
    """The `ingestd` console script of this interpreter's environment (the repo's .venv)."""
    script = Path(sys.executable).with_name("ingestd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ingestd"]


class Cluster:
    """The network, the hosts and the balancer of one run; `close()` removes all of it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.run_id = secrets.token_hex(3)
        self.args = args
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"ingestd-cluster-{self.run_id}-", dir=base))
        self.sink_dir = self.dir / "objects"
        self.network = Network(self.run_id, args.hosts)
        self.hosts: list[Host] = []
        self.balancer: Balancer | None = None

    def start(self) -> None:
        require_root()
        binary = ensure_haproxy(install=not self.args.no_install)
        say(f"run {self.run_id} in {self.dir}")
        endpoints = self.network.create()
        say(f"network: bridge {self.network.bridge} {self.network.gateway}/24, namespaces "
            + ", ".join(f"{e.netns} ({e.address})" for e in endpoints))
        ingestd = self.args.ingestd.split() if self.args.ingestd else default_ingestd()
        for ep in endpoints:
            host = Host(ep, self.run_id, self.dir, self.sink_dir, ingestd, self.args.host_port,
                        self.args.listeners, self.args.workers, self.args.drain_timeout, self.args.lame_duck)
            self.network.state.paths.append(str(host.memory_path))
            self.network.state.save()
            self.hosts.append(host)
            host.start()
        for host in self.hosts:
            took = host.wait_ready()
            say(f"{host.name} ({host.hostname}, {host.address}:{host.port}) ready after {took:.2f}s")
        stats_socket = STATE_DIR / f"{self.run_id}.sock"
        self.balancer = Balancer(binary, self.dir, stats_socket, [(h.name, h.address, h.port) for h in self.hosts],
                                 self.args.port)
        self.network.state.marker = self.network.state.run_dir = str(self.dir)
        self.network.state.paths.append(str(stats_socket))
        self.network.state.save()
        self.balancer.start()
        assert self.balancer.proc is not None
        self.network.state.pids.append(self.balancer.proc.pid)
        self.network.state.save()
        for host in self.hosts:
            self.balancer.wait_status(host.name, "UP", 30)
        say(f"haproxy {self.balancer.url} -> {len(self.hosts)} hosts UP (config {self.balancer.config_path})")

    def stop_hosts(self) -> list[tuple[str, int | None, float]]:
        """SIGTERM every host at once and wait for their drains: (name, exit code, seconds)."""
        running = [h for h in self.hosts if h.proc is not None and h.proc.returncode is None]
        for host in running:
            host.terminate()
        return [(host.name, *host.wait_exit()) for host in running]

    def close(self, keep: bool) -> None:
        """Drain the hosts still running (SIGTERM), then kill what is left and remove everything."""
        for name, code, _ in self.stop_hosts():
            if code != 0:
                say(f"{name} exited with {code} at the final stop")
        for host in self.hosts:
            host.kill()
        if self.balancer is not None:
            self.balancer.stop()
        problems = teardown(self.network.state)
        for problem in problems:
            say(f"cleanup: {problem}")
        if keep:
            say(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Restart:
    host: str
    exit_code: int | None
    drain_s: float  # SIGTERM to exit
    ready_s: float  # start to /health/ready 200
    up_s: float  # ready to UP in HAProxy
    serving_s: float  # UP to its first payloads accepted again
    lb_drain_s: float = 0.0  # set to drain in HAProxy until its last session ended (not with --sigterm-only)


def restart(cluster: Cluster, host: Host, lb_drain: bool) -> Restart:
    """One host: out of HAProxy (unless not `lb_drain`), SIGTERM, drain, exit; start, ready, back in."""
    balancer = cluster.balancer
    assert balancer is not None
    lb_drain_s = 0.0
    if lb_drain:
        began = time.monotonic()
        balancer.set_state(host.name, "drain")
        wait_for(lambda: balancer.sessions(host.name) == 0, 30, f"haproxy to finish the sessions on {host.name}")
        lb_drain_s = time.monotonic() - began
    code, drain_s = host.stop()
    if code != 0:
        say(f"{host.name} exited with {code} after SIGTERM:\n{host.log_tail()}")
    host.start()
    ready_s = host.wait_ready()
    if lb_drain:
        balancer.set_state(host.name, "ready")
    up_s = balancer.wait_status(host.name, "UP", 30)
    began = time.monotonic()
    wait_for(lambda: host.health().get("counters", {}).get("accepted_payloads", 0) > 0, 30,
             f"{host.name} to accept payloads again")
    return Restart(host.name, code, drain_s, ready_s, up_s, time.monotonic() - began, lb_drain_s)


def wait_acked(ledger: Ledger, more: int, timeout: float, what: str) -> None:
    """Until `more` requests more than now were acknowledged: the load reached the cluster."""
    target = ledger.acked_requests + more
    wait_for(lambda: ledger.acked_requests >= target, timeout, what)


def rolling_restart(cluster: Cluster, args: argparse.Namespace) -> int:
    cluster.start()
    balancer = cluster.balancer
    assert balancer is not None
    ledger = Ledger()
    load = Load(balancer.url, ledger, cluster.run_id, args.threads, args.payloads, args.pad_bytes, args.pace)
    say(f"load: {args.threads} client threads, {args.payloads} payloads/request, keep-alive, via {balancer.url}")
    began = time.monotonic()
    load.start()
    restarts: list[Restart] = []
    try:
        wait_acked(ledger, args.settle_requests, 60, "the load to be acknowledged")
        for _ in range(args.rounds):
            for host in cluster.hosts:
                r = restart(cluster, host, lb_drain=not args.sigterm_only)
                restarts.append(r)
                out = "" if args.sigterm_only else f"out of haproxy after {r.lb_drain_s:.2f}s; "
                say(f"{r.host}: {out}SIGTERM -> exit {r.exit_code} after {r.drain_s:.2f}s of drain; ready "
                    f"{r.ready_s:.2f}s after start; UP in haproxy {r.up_s:.2f}s later; accepting after "
                    f"{r.serving_s:.2f}s")
        wait_acked(ledger, args.settle_requests, 60, "the load after the last restart")
    finally:
        load.stop()
    load_s = time.monotonic() - began
    say(f"load stopped after {load_s:.1f}s; waiting for every acknowledged payload to land")
    reader = SinkReader(cluster.sink_dir)
    settle_began = time.monotonic()
    try:
        wait_for(lambda: reader.missing(ledger) == 0, args.land_timeout, "every acknowledged payload to land",
                 interval=0.25)
    except TimedOut as e:
        say(str(e))
    landed_s = time.monotonic() - settle_began
    lb = balancer.totals()
    stops = cluster.stop_hosts()  # the last drains: anything still in a spool lands now
    figures = reader.figures(ledger)
    leftovers_n = sum(h.spool_leftovers() for h in cluster.hosts)
    report = {
        "command": " ".join(["scripts/cluster", *sys.argv[1:]]), "run_id": cluster.run_id,
        "restart": ("sigterm only" if args.sigterm_only else "out of haproxy, then sigterm")
        + (f" (lame duck {args.lame_duck:g} s)" if args.lame_duck else ""),
        "hosts": len(cluster.hosts), "threads": args.threads,
        "payloads_per_request": args.payloads, "load_s": round(load_s, 1), "landed_within_s": round(landed_s, 2),
        "figures": asdict(figures), "client_statuses": dict(sorted(ledger.statuses.items())),
        "client_5xx": ledger.server_errors(), "latency_ms": {"p50": round(ledger.percentile_ms(0.5), 1),
                                                             "p99": round(ledger.percentile_ms(0.99), 1),
                                                             "max": round(ledger.percentile_ms(1.0), 1)},
        "restarts": [{k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(r).items()} for r in restarts],
        "haproxy": lb,
        "final_stops": [{"host": n, "exit_code": c, "drain_s": round(s, 2)} for n, c, s in stops],
        "spool_leftovers": leftovers_n,
    }
    failures = verdict(figures, ledger, restarts, stops, leftovers_n)
    report["failures"] = failures
    print_report(report, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if failures else 0


def verdict(f: Figures, ledger: Ledger, restarts: list[Restart], stops: list[tuple[str, int | None, float]],
            leftovers_n: int) -> list[str]:
    failures = []
    if f.lost:
        failures.append(f"{f.lost} acknowledged payloads lost")
    if f.duplicates:
        failures.append(f"{f.duplicates} duplicate payloads in the sink")
    if ledger.server_errors():
        failures.append(f"{ledger.server_errors()} 5xx answers reached clients")
    if f.unknown:  # a client left without an answer must resend, and may then store a copy
        failures.append(f"{ledger.statuses['no answer']} requests ({f.unknown} payloads) got no answer")
    if f.refused_landed:
        failures.append(f"{f.refused_landed} payloads answered non-202 landed")
    if f.strangers:
        failures.append(f"{f.strangers} payloads landed that no client sent")
    if not f.acknowledged:
        failures.append("nothing was acknowledged")
    failures += [f"{r.host} exited {r.exit_code} after SIGTERM" for r in restarts if r.exit_code != 0]
    failures += [f"{name} exited {code} at the final stop" for name, code, _ in stops if code != 0]
    if leftovers_n:
        failures.append(f"{leftovers_n} files left in the hosts' dead-letter / overflow spools")
    return failures


def print_report(report: dict[str, Any], f: Figures) -> None:
    lb = report["haproxy"]
    statuses = ", ".join(f"{k}: {v:,}" for k, v in report["client_statuses"].items())
    print(f"\nrolling restart of {report['hosts']} hosts under load ({report['threads']} threads x "
          f"{report['payloads_per_request']} payloads/request, {report['load_s']}s)")
    print(f"  acknowledged {f.acknowledged:,}  landed {f.landed:,}  lost {f.lost:,}  duplicates {f.duplicates:,}"
          f"  (no answer {f.unknown:,}, of which landed {f.unknown_landed:,}; refused yet landed "
          f"{f.refused_landed:,}; {f.objects:,} objects, {f.stored:,} payload lines)")
    print(f"  client status codes: {statuses}; 5xx to clients: {report['client_5xx']}")
    print(f"  latency of 202s: p50 {report['latency_ms']['p50']} ms, p99 {report['latency_ms']['p99']} ms, "
          f"max {report['latency_ms']['max']} ms; everything acknowledged landed within "
          f"{report['landed_within_s']}s of the load's end")
    print(f"  haproxy: {lb['requests']:,} requests, retries {lb['retries']:,}, redispatches {lb['redispatches']:,}, "
          f"5xx from hosts {lb['server_5xx']:,}, 5xx to clients {lb['client_5xx']:,}, connection errors "
          f"{lb['server_connection_errors']:,}, response errors {lb['server_response_errors']:,}")
    print("  result: " + ("PASS" if not report["failures"] else "FAIL: " + "; ".join(report["failures"])))


def up(cluster: Cluster) -> int:
    cluster.start()
    assert cluster.balancer is not None
    say(f"POST {cluster.balancer.url}/v1/payloads; objects land in {cluster.sink_dir}; "
        f"runtime API: socat - UNIX:{cluster.balancer.stats_socket}; Ctrl-C drains, stops and removes everything"
        + ("" if cluster.args.keep else " (--keep keeps the run directory and its sink)"))
    forever = threading.Event()
    while not forever.wait(3600):
        pass
    return 0


def cleanup() -> int:
    require_root()
    states = leftovers()
    if not states:
        say("nothing left behind by earlier runs")
    failed = 0
    for state in states:
        problems = teardown(state)
        say(f"run {state.run_id}: " + ("namespaces, links and processes removed" if not problems
                                       else "; ".join(problems))
            + (f"; its directory {state.run_dir} is left for a look" if state.run_dir else ""))
        failed += bool(problems)
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hosts", type=int, default=3, help="ingestd hosts, one network namespace each (3)")
    common.add_argument("--port", type=int, default=0, help="HAProxy port on 127.0.0.1 (0: a free one)")
    common.add_argument("--host-port", type=int, default=8080, help="port of ingestd in each namespace (8080)")
    common.add_argument("--listeners", type=int, default=1, help="http.listeners of each host (1)")
    common.add_argument("--workers", type=int, default=1, help="workers.count of each host (1)")
    common.add_argument("--drain-timeout", type=float, default=10.0, help="shutdown.drain_timeout_s (10)")
    common.add_argument("--lame-duck", type=float, default=0.0,
                        help="shutdown.lame_duck_s of each host: after SIGTERM, readiness 503 while still accepting (0)")
    common.add_argument("--ingestd", default="", help="command that runs ingestd (default: the venv's ingestd)")
    common.add_argument("--workdir", default="", help="folder for the run's directory (default: the temp folder)")
    common.add_argument("--keep", action="store_true", help="keep the run's directory (configs, logs, sink)")
    common.add_argument("--no-install", action="store_true", help="do not apt-get install haproxy when missing")
    sub.add_parser("up", parents=[common], help="run the cluster until Ctrl-C")
    rr = sub.add_parser("rolling-restart", parents=[common], help="restart every host under load and count")
    rr.add_argument("--threads", type=int, default=8, help="client threads, one keep-alive connection each (8)")
    rr.add_argument("--payloads", type=int, default=5, help="payloads per request (5)")
    rr.add_argument("--pad-bytes", type=int, default=100, help="filler bytes per payload (100)")
    rr.add_argument("--pace", type=float, default=0.0, help="seconds each client waits between requests (0)")
    rr.add_argument("--rounds", type=int, default=1, help="times every host is restarted (1)")
    rr.add_argument("--settle-requests", type=int, default=300,
                    help="requests acknowledged before the first and after the last restart (300)")
    rr.add_argument("--sigterm-only", action="store_true",
                    help="do not take a host out of HAProxy (runtime API) before its SIGTERM: rely on the "
                         "health checks seeing the drain (see the README for what that costs)")
    rr.add_argument("--land-timeout", type=float, default=60.0, help="longest wait for everything to land (60)")
    rr.add_argument("--json", default="", help="also write the report to this file")
    sub.add_parser("cleanup", help="remove namespaces, links and processes left by killed runs")
    return p


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # cleanup runs in `finally` for SIGTERM and SIGHUP as for Ctrl-C (SIGINT set explicitly: a
    # shell that starts a background job without job control makes it ignore SIGINT)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        if args.command == "cleanup":
            return cleanup()
        cluster = Cluster(args)
        outcome = "interrupted or broken"
        try:
            code = up(cluster) if args.command == "up" else rolling_restart(cluster, args)
            outcome = "passed" if code == 0 else "failed"
            return code
        except Unavailable:
            outcome = "not attempted"
            raise
        finally:
            # a failed run keeps its directory (configs, logs, sink) for a look
            cluster.close(keep=args.keep or (args.command != "up" and outcome != "passed"
                                             and outcome != "not attempted"))
    except Unavailable as e:
        print(f"scripts/cluster: cannot run here: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        say("interrupted; the hosts were drained and the namespaces, links and processes of this run removed")
        return 130
    except (TimedOut, RuntimeError) as e:  # a host or HAProxy that would not start, stop or serve
        print(f"scripts/cluster: {e}", file=sys.stderr)
        return 1
