#!/usr/bin/env python3
"""scripts/bench.py: ingestd against the Go reference of the seed design, side by side, one run.

Run it through `scripts/bench` (which installs nginx, wrk and Go from apt when missing and makes
the bench's own venv under bench-results/.venv); `scripts/bench --help` lists the options.
Every process it starts sits in its own process group and is killed in `finally`, also on
Ctrl-C; all traffic goes to 127.0.0.1.

What runs
---------
- Null S3 (the sink, built to cost next to nothing): nginx from apt with
  ../shared/peers/nulls3/nginx.conf.template (one worker, `return 200` with an ETag, bodies
  discarded), rendered with a free port and a `stub_status` location added so that the bench
  can count the requests it served exactly (PUTs = requests - status reads). nginx is used
  because it answers a PUT for ~15 µs of CPU in C, so neither the one-PUT-per-payload Go design
  (>10k PUT/s) nor ingestd are limited by their sink. When nginx cannot be installed, the bench
  falls back to scripts/bench_support/nulls3.py (asyncio, stdlib; ~50k req/s on one core, also
  enough, but it costs more CPU on the shared two cores). The overload scenario always uses
  nulls3.py with `--delay-ms 100`: a sink slow on purpose.
- Go peer: ../shared/peers/goref built with its build.sh (cached in bench-results/cache/),
  DISPATCH=sync (bounded: a fair delivered-throughput comparison), default MAX_WORKERS (2 x CPUs)
  and MAX_QUEUE (10,000), S3_URL = the null S3. Delivered count: `GET /stats` -> uploaded - failed.
- ingestd: `<venv>/bin/ingestd --config <bench_support/ingestd-*.toml, filled in>` with the s3 sink
  on the null S3 (region us-east-1, dummy AWS credentials in the environment), listening on
  127.0.0.1:0 (the port is read from its "listening on http://HOST:PORT" log line), stopped with
  SIGTERM at the end of each scenario (drain, exit 0; exit code and stop time are recorded).
  Delivered count: `GET /health` -> counters.uploaded_payloads (+ dead_lettered_payloads).
- Load: wrk from apt (`wrk -t2 -c64 --latency -s bench_support/post.lua`), POSTing one fixed
  body `{"version":"1","token":"t","data":[...]}` of N payloads of ~100 bytes; the fallback when
  wrk is missing is bench_support/pyload.py (processes x threads, keep-alive http.client).

Scenarios (columns of the table)
--------------------------------
go-1 / go-10: the Go seed, 1 and 10 payloads per request; ingestd-1 / ingestd-10: ingestd with
its default batching (500 payloads, 1 s, gzip); seed-layout-10: ingestd with
batch.max_payloads = 1 and compression = "none" (one object per payload, as the seed writes).
Each: start the server, warm up, wait (bounded) until what the warm-up sent is delivered,
measure for --duration seconds, then poll every 50 ms (bounded by --drain-cap) until everything
accepted is delivered, then stop the server.

Figures and their definitions
-----------------------------
- requests/s: answers 2xx (ingestd 202, Go 200) per second of the measured run; other answers
  (e.g. 503) and socket errors are counted separately.
- payloads/s delivered: the increase of the server's delivered counter from the start of the
  measured run until everything it accepted was delivered (or --drain-cap ran out: then the
  server is saturated and the figure is its delivery capacity), divided by (run duration +
  that drain time). Payloads still queued after the drain cap are reported as backlog_left.
- server CPU µs per delivered payload: user+system CPU time of the server's whole process tree
  (psutil: supervisor + uploaders + multiprocessing helpers; Go: its one process), from the start
  of the run until the end of the drain, divided by the payloads delivered in that span.
- S3 PUTs per 1,000 payloads: PUTs counted by the null S3 over the same span / delivered x 1000
  (the daemons' own object counters are kept in the JSON too).
- p50 / p99 latency: wrk's, over all answers of the measured run.
- peak RSS: the largest sum of RSS over the server's process tree, sampled every 100 ms from the
  server's start to the end of the drain.

Plus ingestd-only phases:
- latency at ~70% of the maximum: on a fresh ingestd (default config, 1p, warmed up), the rate
  is held at 0.7 x the maximum of ingestd-1, where the maximum is the lower of its 2xx
  requests/s and its delivered payloads/s (what it can sustain). When ingestd-1 answered >10%
  more than it delivered, a second point at 0.7 x its 2xx requests/s is measured too. Plain wrk
  has no rate limit (wrk2 is not in Debian), so post.lua gives each of 16 connections a random
  think time (wrk's delay() hook, uniform 0..2d ms) with d calibrated by a short first run so
  that the achieved rate lands near the target; latency is measured from each send (no
  coordinated-omission correction, which is fair while the server keeps up; the achieved rate
  is reported). With the Python generator the rate is an open-loop schedule and latency is
  measured from the scheduled send (corrected).
- overload: ingestd (queue.max_items 2000, 2 uploaders, 50 payloads per object) on a null S3
  that answers each PUT 100 ms late (so it delivers at most ~1,000 payloads/s), warmed with 40
  requests (each uploader's first PUT loads botocore: tens of MB, reported as the cold RSS),
  then driven with 256 connections of 10-payload requests. Reported: every answer code seen
  (target: only 202 and 503), socket errors, the overload factor (requests offered / requests
  delivered per second), RSS growth of the tree from the warmed baseline to the peak (target
  < 50 MB). The slow null S3 is stopped before ingestd so that its drain ends quickly.
- profile (only with --profile): py-spy record --gil on listener 0 under 1-payload load for
  --profile-seconds; top frames by self and inclusive time, and self time per component
  (waitress, falcon, ingestd, logging, multiprocessing, ...); --profile-uploader adds one
  uploader. The raw collapsed stacks stay in logs/<stamp>/.

Outputs in bench-results/: bench-<stamp>.json (every figure, settings, tool versions,
definitions), bench-<stamp>.png (matplotlib chart), bench-<stamp>.txt (the printed table),
latest.{json,png,txt} copies, and logs/<stamp>/ (server and generator logs).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # only `--help` works without it: scripts/bench installs it in its venv
    psutil = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "scripts" / "bench_support"
T0 = time.monotonic()
LISTEN_RE = re.compile(r"listening on http://(\[[^\]]+\]|[^\s:]+):(\d+)")

TARGETS = {
    "ratio_10": 2.0,  # 10 payloads/request: delivered payloads/s >= 2x Go seed
    "rps_1": 4200.0,  # 1 payload/request: delivered requests/s
    "rps_1_moonshot": 16700.0,
    "puts_per_million": 2000.0,  # S3 PUTs per 1M payloads at default batch settings
    "overload_rss_mb": 50.0,
    "p99_ms": 20.0,  # at 70% of the maximum throughput
}


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------
class Processes:
    """Every process the bench starts: own session (so own process group), killed at the end."""

    interrupted = False  # set on Ctrl-C / SIGTERM: no more graceful stops, only SIGKILL

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], *, log_path: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=cwd, start_new_session=True)
        self.procs.append((name, p))
        return p

    @staticmethod
    def killpg(p: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(p.pid, sig)  # start_new_session: the group id is the leader's pid
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> tuple[int | None, float]:
        """Signal the leader only, wait; SIGKILL its group on timeout and in any case afterwards."""
        t = time.monotonic()
        code: int | None = p.poll()
        if code is None and Processes.interrupted:
            sig, timeout = signal.SIGKILL, 5.0
        if code is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                code = p.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
        self.killpg(p)  # leftovers of the group (children that outlived their parent)
        if p.poll() is None:
            p.wait(5)
        return code, time.monotonic() - t

    def kill_all(self) -> None:
        for _, p in reversed(self.procs):
            self.killpg(p)
        for _, p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the root, CPU seconds of all its descendants), user + system."""
    root_s = kids_s = 0.0
    for i, p in enumerate(tree(pid)):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        if i == 0:
            root_s = t.user + t.system
        else:
            kids_s += t.user + t.system
    return root_s, kids_s


def _cpu_split(pid: int) -> dict[str, dict[str, float]]:
    """user/system CPU seconds of the root ("supervisor") and of its other descendants ("children")."""
    out = {"supervisor": {"user": 0.0, "system": 0.0}, "children": {"user": 0.0, "system": 0.0}}
    for i, p in enumerate(tree(pid)):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        k = "supervisor" if i == 0 else "children"
        out[k]["user"] += t.user
        out[k]["system"] += t.system
    return out


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def rss_detail(pid: int) -> dict[str, float]:
    """RSS in MB per process of the tree, keyed by role and pid."""
    out: dict[str, float] = {}
    for i, p in enumerate(tree(pid)):
        try:
            cmd = " ".join(p.cmdline())
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        role = "supervisor" if i == 0 else "resource_tracker" if "resource_tracker" in cmd else "child"
        out[f"{role}-{p.pid}"] = round(rss / 2**20, 1)
    return out


class RssSampler:
    """Samples the RSS of a process tree every 100 ms in a thread; keeps the peak and the series."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        self.pid = pid
        self.period = period
        self.peak = 0
        self.series: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            rss = tree_rss(self.pid)
            self.peak = max(self.peak, rss)
            self.series.append((round(time.monotonic() - t0, 2), round(rss / 2**20, 1)))
            self._stop.wait(self.period)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------
# the null S3
# ------------------------------------------------------------------------------------------------
def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


class NullS3:
    STATUS = "/__nulls3_status"

    def __init__(self, procs: Processes, workdir: Path, logdir: Path, kind: str, template: Path | None,
                 delay_ms: float = 0.0, name: str = "nulls3") -> None:
        self.procs, self.workdir, self.logdir = procs, workdir, logdir
        self.kind, self.template, self.delay_ms, self.name = kind, template, delay_ms, name
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._status_reads = 0
        self.countable = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NullS3:
        self.port = free_port()
        log = self.logdir / f"{self.name}.log"
        if self.kind == "nginx":
            assert self.template is not None
            prefix = self.workdir / f"nginx-{self.port}"
            (prefix / "logs").mkdir(parents=True, exist_ok=True)
            text = self.template.read_text().replace("@PORT@", str(self.port))
            anchor = "location / {"
            if anchor in text:
                text = text.replace(anchor, f"location = {self.STATUS} {{ stub_status; }}\n        {anchor}", 1)
            else:
                self.countable = False  # the template changed shape: fall back to the daemons' counters
            for d in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
                text = text.replace("http {", f"http {{\n    {d}_path {prefix / d};", 1)
            conf = prefix / "nginx.conf"
            conf.write_text(text)
            cmd = [find_nginx() or "nginx", "-c", str(conf), "-p", f"{prefix}/", "-e", str(prefix / "logs" / "error.log")]
        else:
            cmd = [sys.executable, str(SUPPORT / "nulls3.py"), "--port", str(self.port), "--delay-ms", str(self.delay_ms)]
        self.proc = self.procs.start(self.name, cmd, log_path=log)
        wait_port(self.port, self.proc, 10, f"null S3 ({self.kind})")
        self.puts()  # fails early if the counting endpoint is missing
        return self

    def puts(self) -> int | None:
        """PUTs served so far (None when it cannot tell)."""
        if not self.countable:
            return None
        try:
            status, body = http_get(self.port, self.STATUS)
        except OSError:
            return None
        if status != 200:
            self.countable = False
            return None
        self._status_reads += 1
        if self.kind == "nginx":
            # "Active connections: 1 \nserver accepts handled requests\n 5 5 12 \n..."; the
            # request count includes every status read so far, this one too
            requests = int(body.decode().splitlines()[2].split()[2])
            return requests - self._status_reads
        return int(json.loads(body)["puts"])

    def cpu_s(self) -> float:
        if self.proc is None:
            return 0.0
        return sum(tree_cpu(self.proc.pid))

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGTERM, timeout=5)
            self.proc = None


# ------------------------------------------------------------------------------------------------
# the servers under test
# ------------------------------------------------------------------------------------------------
class Server:
    kind = ""

    def __init__(self, procs: Processes, name: str) -> None:
        self.procs = procs
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stop_info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/payloads"

    def counters(self) -> dict[str, int]:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return self.stop_info
        code, secs = self.procs.stop(self.proc, signal.SIGTERM, timeout=20)
        self.stop_info = {"exit_code": code, "stop_s": round(secs, 2)}
        self.proc = None
        return self.stop_info


class GoPeer(Server):
    kind = "go"

    def start(self, binary: Path, s3_url: str, logdir: Path, env_extra: dict[str, str]) -> GoPeer:
        self.port = free_port()
        env = dict(os.environ, ADDR=f"127.0.0.1:{self.port}", S3_URL=s3_url, DISPATCH="sync", **env_extra)
        self.proc = self.procs.start(self.name, [str(binary)], env=env, log_path=logdir / f"{self.name}.log")
        wait_port(self.port, self.proc, 15, "Go peer")
        return self

    def counters(self) -> dict[str, int]:
        status, body = http_get(self.port, "/stats")
        s = json.loads(body)
        return {"accepted_requests": s["requests"], "accepted_payloads": s["payloads"],
                "delivered_payloads": s["uploaded"] - s["failed"], "done_payloads": s["uploaded"],
                "objects": s["uploaded"] - s["failed"], "failed": s["failed"]}


class Ingestd(Server):
    kind = "ingestd"

    def start(self, cmd: list[str], config_template: Path, s3_url: str, workdir: Path, logdir: Path) -> Ingestd:
        rundir = workdir / self.name
        rundir.mkdir(parents=True, exist_ok=True)
        cfg = rundir / "config.toml"
        cfg.write_text(config_template.read_text().replace("@ENDPOINT@", s3_url)
                       .replace("@SPOOL@", str(rundir / "spool")))
        self.config_text = cfg.read_text()
        env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(rundir / "no-aws-config"),
                   AWS_SHARED_CREDENTIALS_FILE=str(rundir / "no-aws-credentials"))
        env.pop("AWS_PROFILE", None)
        env.pop("AWS_SESSION_TOKEN", None)
        log = logdir / f"{self.name}.log"
        self.proc = self.procs.start(self.name, cmd + ["--config", str(cfg)], env=env, cwd=rundir, log_path=log)
        deadline = time.monotonic() + 60
        while True:
            m = LISTEN_RE.search(log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(2))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingestd exited with code {self.proc.returncode} at start; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingestd did not log 'listening on' within 60s; see {log}")
            time.sleep(0.05)
        # ready = /health 200 with every uploader alive
        while True:
            try:
                status, body = http_get(self.port, "/health")
                snap = json.loads(body)
                if status == 200 and snap.get("workers") and all(w.get("alive") for w in snap["workers"]):
                    break
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingestd exited with code {self.proc.returncode} at start; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingestd not ready within 60s; see {log}")
            time.sleep(0.1)
        return self

    def counters(self) -> dict[str, int]:
        status, body = http_get(self.port, "/health")  # 503 while the queue is full: the body is the same
        c = json.loads(body)["counters"]
        return {"accepted_requests": c.get("accepted_requests", 0), "accepted_payloads": c["accepted_payloads"],
                "delivered_payloads": c["uploaded_payloads"],
                "done_payloads": c["uploaded_payloads"] + c.get("dead_lettered_payloads", 0),
                "objects": c["uploaded_objects"], "failed": c.get("failed_uploads", 0)}


# ------------------------------------------------------------------------------------------------
# load generation
# ------------------------------------------------------------------------------------------------
def make_body(n: int, path: Path, payload_bytes: int = 0) -> dict[str, Any]:
    """`n` telemetry events; with `payload_bytes`, each is grown to about that size with the
    kind of fields real events carry (a user agent, a URL, a message), not one padding string."""
    payloads = []
    for i in range(n):
        p: dict[str, Any] = {"device_id": f"d-{i:05d}", "event": "click", "ts": 1764300000123 + i, "seq": i,
                             "os": "linux", "tags": ["a", "b"], "metrics": {"ms": 12.5}}
        if payload_bytes:
            p["user_agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"
            p["url"] = f"https://app.example.com/projects/{i % 97}/dashboards/{i % 13}?tab=metrics&range=24h"
            p["attrs"] = {f"k{j}": f"value-{(i * 31 + j) % 1000:03d}" for j in range(8)}
            room = payload_bytes - len(json.dumps(p, separators=(",", ":"))) - len(',"message":""')
            words = "request handled by edge node with cache status hit and upstream latency within budget "
            p["message"] = (words * (room // len(words) + 1))[: max(0, room)]
        payloads.append(p)
    body = json.dumps({"version": "1", "token": "t", "data": payloads}, separators=(",", ":")).encode()
    path.write_bytes(body)
    sizes = [len(json.dumps(p, separators=(",", ":"))) for p in payloads]
    return {"payloads": n, "body_bytes": len(body), "payload_bytes_avg": sum(sizes) / len(sizes)}


class Load:
    def __init__(self, procs: Processes, kind: str, threads: int, connections: int, logdir: Path) -> None:
        self.procs, self.kind, self.threads, self.connections, self.logdir = procs, kind, threads, connections, logdir
        self.n = 0

    def run(self, url: str, body: Path, duration: float, *, connections: int | None = None, delay_ms: float = 0.0,
            rate: float = 0.0, count_status: bool = False) -> dict[str, Any]:
        c = connections or self.connections
        self.n += 1
        out = self.logdir / f"load-{self.n:02d}.out"
        if self.kind == "wrk":
            secs = max(1, int(round(duration)))
            cmd = ["wrk", f"-t{min(self.threads, c)}", f"-c{c}", f"-d{secs}s", "--timeout", "10s", "--latency",
                   "-s", str(SUPPORT / "post.lua"), url]
            env = dict(os.environ, BENCH_BODY=str(body), BENCH_DELAY_MS=str(delay_ms),
                       BENCH_COUNT_STATUS="1" if count_status else "0")
        else:
            secs = duration
            cmd = [sys.executable, str(SUPPORT / "pyload.py"), "--url", url, "--body-file", str(body),
                   "--connections", str(c), "--procs", str(self.threads), "--duration", str(duration)]
            if rate > 0:
                cmd += ["--rate", str(rate)]
            env = None
        p = self.procs.start(f"load-{self.n}", cmd, env=env, log_path=out)
        try:
            p.wait(secs + 60)
        except subprocess.TimeoutExpired:
            self.procs.killpg(p)
            raise RuntimeError(f"load generator hung; see {out}")
        text = out.read_text(errors="replace")
        m = re.search(r"^BENCH_JSON (\{.*\})\s*$", text, re.M)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"load generator failed (exit {p.returncode}); see {out}:\n{text[-2000:]}")
        doc: dict[str, Any] = json.loads(m.group(1))
        doc["connections"] = c
        doc["threads"] = min(self.threads, c)
        doc["generator"] = self.kind
        return doc


def ok_requests(r: dict[str, Any]) -> int:
    if "statuses" in r and r["statuses"]:
        return sum(n for code, n in r["statuses"].items() if 200 <= int(code) < 300)
    return int(r["requests"] - r["errors"]["status"])


# ------------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Processes()
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.results_dir = Path(args.out).resolve()
        self.logdir = self.results_dir / "logs" / self.stamp
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
        self.peers = Path(args.peers).resolve()
        self.doc: dict[str, Any] = {"scenarios": {}, "stamp": self.stamp}
        self.nulls3: NullS3 | None = None
        self.bodies: dict[int, Path] = {}

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        t0 = psutil.cpu_times()
        time.sleep(1.0)
        pre = _machine(t0, psutil.cpu_times())
        pre["load_avg"] = os.getloadavg()
        self.doc["preflight"] = pre
        progress(f"machine before the bench: {pre['busy_pct']:.0f}% CPU busy, load average {pre['load_avg'][0]:.1f}"
                 + ("  -- WARNING: other work is running, figures will be perturbed" if pre["busy_pct"] > 15 else ""))
        # null S3
        template = self.peers / "nulls3" / "nginx.conf.template"
        kind = a.nulls3
        if kind == "auto":
            kind = "nginx" if find_nginx() and template.exists() else "python"
        if kind == "nginx" and not (find_nginx() and template.exists()):
            raise SystemExit("--nulls3 nginx: nginx or the template is missing")
        self.nulls3 = NullS3(self.procs, self.workdir, self.logdir, kind, template if kind == "nginx" else None).start()
        progress(f"null S3: {kind} on {self.nulls3.url} (PUT counting: {'yes' if self.nulls3.countable else 'no'})")
        # load generator
        gen = a.loadgen
        if gen == "auto":
            gen = "wrk" if shutil.which("wrk") else "python"
        if gen == "wrk" and not shutil.which("wrk"):
            raise SystemExit("--loadgen wrk: wrk is missing")
        self.load = Load(self.procs, gen, a.threads, a.connections, self.logdir)
        progress(f"load generator: {gen} ({a.threads} threads, {a.connections} connections)")
        # bodies
        self.doc["bodies"] = {}
        for n in (1, 10):
            path = self.workdir / f"body-{n}.json"
            self.doc["bodies"][str(n)] = make_body(n, path, self.args.payload_bytes)
            self.bodies[n] = path
        # Go peer
        self.goref: Path | None = None
        if not a.skip_go and (not a.only or "go-" in a.only):
            self.goref = self.build_goref()
        # ingestd command
        if a.ingestd:
            self.ingestd_cmd = a.ingestd.split()
        else:
            exe = Path(sys.executable).parent / "ingestd"
            self.ingestd_cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ingestd"]
        self.doc["tools"] = self.tool_versions(kind, gen)

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
        with open(log, "wb") as f:
            r = subprocess.run(["bash", str(src / "build.sh"), str(out)], stdout=f, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=900)
        if r.returncode != 0 or not out.exists():
            progress(f"Go peer: build failed (see {log}); Go columns skipped")
            return None
        return out

    def tool_versions(self, nulls3: str, gen: str) -> dict[str, Any]:
        def run(cmd: list[str]) -> str:
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else ""
            except (OSError, subprocess.TimeoutExpired):
                return ""

        git = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
        return {
            "null_s3": nulls3, "nginx": run([find_nginx() or "nginx", "-v"]) if nulls3 == "nginx" else None,
            "loadgen": gen, "wrk": run(["wrk", "-v"]) if gen == "wrk" else None,
            "go": run(["go", "version"]) if self.goref else None,
            "ingestd": run(self.ingestd_cmd + ["--version"]), "ingestd_cmd": self.ingestd_cmd,
            "git": git + ("+dirty" if dirty else ""),
            "python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(),
            "mem_total_mb": round(psutil.virtual_memory().total / 2**20),
        }

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

    def measure(self, server: Server, name: str, ppr: int, sampler: RssSampler) -> dict[str, Any]:
        a = self.args
        assert self.nulls3 is not None
        body = self.bodies[ppr]
        progress(f"{name}: warm-up {a.warmup}s")
        self.load.run(server.url, body, a.warmup)
        settled, _, _ = self.wait_delivered(server, a.settle_cap)
        c0 = server.counters()
        root0, kids0 = tree_cpu(server.pid)
        puts0 = self.nulls3.puts()
        s3cpu0 = self.nulls3.cpu_s()
        sys0 = psutil.cpu_times()
        ru0 = _rusage()
        progress(f"{name}: measuring {a.duration}s ({self.load.kind}, {a.connections} connections, {ppr} payload(s)/request)")
        r = self.load.run(server.url, body, a.duration)
        t_run_end = time.monotonic()
        c_mid = server.counters()
        drained, t_end, c1 = self.wait_delivered(server, a.drain_cap)
        root1, kids1 = tree_cpu(server.pid)
        puts1 = self.nulls3.puts()
        s3cpu1 = self.nulls3.cpu_s()
        sys1 = psutil.cpu_times()
        ru1 = _rusage()
        run_s = r["duration_us"] / 1e6
        drain_s = t_end - t_run_end
        span = run_s + drain_s
        delivered = c1["delivered_payloads"] - c0["delivered_payloads"]
        ok = ok_requests(r)
        cpu_s = (root1 + kids1) - (root0 + kids0)
        puts = (puts1 - puts0) if (puts0 is not None and puts1 is not None) else None
        objects = c1["objects"] - c0["objects"]
        lat = r["latency_us"]
        res = {
            "name": name, "server": server.kind, "payloads_per_request": ppr,
            "config": getattr(server, "config_text", None),
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
            "cpu_s": round(cpu_s, 3), "cpu_s_root": round(root1 - root0, 3), "cpu_s_children": round(kids1 - kids0, 3),
            "cpu_us_per_payload": cpu_s * 1e6 / delivered if delivered else None,
            "cpu_us_per_request": cpu_s * 1e6 / ok if ok else None,
            "s3_puts": puts, "objects_by_server": objects,
            "s3_puts_per_1000_payloads": (puts if puts is not None else objects) * 1000 / delivered if delivered else None,
            "nulls3_cpu_s": round(s3cpu1 - s3cpu0, 3),
            "latency_ms": {k: lat[k] / 1000 for k in ("mean", "p50", "p75", "p90", "p99", "p999", "max")},
            "peak_rss_mb": round(sampler.peak / 2**20, 1),
            "machine": _machine(sys0, sys1, ours={"server": cpu_s, "null_s3": s3cpu1 - s3cpu0,
                                                  "load_generator": ru1["children"] - ru0["children"],
                                                  "bench": ru1["self"] - ru0["self"]}),
            "load": r,
        }
        progress(f"{name}: {res['requests_per_s']:,.0f} req/s, {res['delivered_payloads_per_s']:,.0f} payloads/s delivered"
                 f" (drain {drain_s:.2f}s{'' if drained else ', CAP REACHED, backlog ' + format(res['backlog_left'], ',')}),"
                 f" {_fmt(res['cpu_us_per_payload'])} µs CPU/payload, p99 {res['latency_ms']['p99']:.1f} ms,"
                 f" non-2xx {res['requests_non2xx']:,}")
        return res

    def scenario_go(self, name: str, ppr: int) -> None:
        assert self.goref is not None and self.nulls3 is not None
        progress(f"{name}: starting Go peer (DISPATCH=sync)")
        extra = {}
        if self.args.go_workers:
            extra["MAX_WORKERS"] = str(self.args.go_workers)
        srv = GoPeer(self.procs, name).start(self.goref, f"{self.nulls3.url}/bench", self.logdir, extra)
        sampler = RssSampler(srv.pid).start()
        try:
            res = self.measure(srv, name, ppr, sampler)
        finally:
            sampler.stop()
            srv.stop()
        res["stop"] = srv.stop_info
        res["go_env"] = {"DISPATCH": "sync", **extra}
        self.doc["scenarios"][name] = res

    def start_ingestd(self, name: str, config: str, s3: NullS3) -> Ingestd:
        progress(f"{name}: starting ingestd ({config})")
        return Ingestd(self.procs, name).start(self.ingestd_cmd, SUPPORT / config, f"{s3.url}", self.workdir, self.logdir)

    def scenario_ingestd(self, name: str, ppr: int, config: str) -> None:
        assert self.nulls3 is not None
        srv = self.start_ingestd(name, config, self.nulls3)
        sampler = RssSampler(srv.pid).start()
        try:
            res = self.measure(srv, name, ppr, sampler)
        finally:
            sampler.stop()
            srv.stop()
        res["stop"] = srv.stop_info
        progress(f"{name}: stopped with SIGTERM: exit {srv.stop_info.get('exit_code')} after {srv.stop_info.get('stop_s')}s")
        self.doc["scenarios"][name] = res

    # -- latency at ~70% of the maximum --------------------------------------------------------------
    def latency_phase(self) -> None:
        """On a fresh ingestd (default config, 1p): the max run may have left a backlog behind."""
        assert self.nulls3 is not None
        max_res = self.doc["scenarios"].get("ingestd-1")
        if not max_res:
            progress("latency: skipped (no ingestd-1 figures to take the maximum from)")
            return
        srv = self.start_ingestd("latency", "ingestd-default.toml", self.nulls3)
        try:
            progress(f"latency: warm-up {self.args.warmup}s at full speed")
            self.load.run(srv.url, self.bodies[1], self.args.warmup)
            self.wait_delivered(srv, self.args.settle_cap)
            # the maximum: what ingestd-1 both answered 2xx and delivered per second (sustainable)
            sustained = min(max_res["requests_per_s"], max_res["delivered_payloads_per_s"])
            self.doc["latency"] = self._latency(srv, sustained, "min(2xx requests/s, delivered payloads/s) of ingestd-1")
            self.doc["latency"]["delivered_all"] = self.wait_delivered(srv, self.args.drain_cap)[0]
            if max_res["requests_per_s"] > 1.1 * sustained:
                # the HTTP side took more than was delivered: also measure at 70% of what it answered
                progress("latency: ingestd-1 answered far more than it delivered; also at 70% of its 2xx requests/s")
                self.doc["latency_http_max"] = self._latency(srv, max_res["requests_per_s"], "2xx requests/s of ingestd-1")
        finally:
            srv.stop()

    def _latency(self, srv: Server, max_rps: float, basis: str) -> dict[str, Any]:
        a = self.args
        target = a.latency_load * max_rps
        c = a.latency_connections
        body = self.bodies[1]
        out: dict[str, Any] = {"server": srv.name, "max_requests_per_s": max_rps, "fraction": a.latency_load,
                               "max_definition": basis, "target_requests_per_s": target, "connections": c}
        if self.load.kind == "wrk":
            cycle_ms = c / target * 1000.0
            progress(f"latency: calibrating think time for {target:,.0f} req/s ({a.latency_load:.0%} of {max_rps:,.0f}),"
                     f" {c} connections, {a.latency_calibrate}s")
            cal = self.load.run(srv.url, body, a.latency_calibrate, connections=c, delay_ms=cycle_ms)
            achieved = ok_requests(cal) / (cal["duration_us"] / 1e6)
            overhead_ms = max(0.0, c / max(achieved, 1.0) * 1000.0 - cycle_ms)
            delay = max(0.0, cycle_ms - overhead_ms)
            out["method"] = ("wrk with post.lua's delay(): each connection waits a random 0..2d ms before each "
                             "request; d calibrated by a short first run; latency measured from the send")
            out["calibration"] = {"delay_ms": cycle_ms, "achieved_requests_per_s": achieved, "overhead_ms": overhead_ms}
            progress(f"latency: measuring {a.latency_duration}s with mean think time {delay:.2f} ms per connection")
            r = self.load.run(srv.url, body, a.latency_duration, connections=c, delay_ms=delay)
            out["delay_ms"] = delay
        else:
            out["method"] = ("Python generator, open-loop schedule at the target rate; latency from the scheduled "
                             "send (coordinated omission corrected)")
            progress(f"latency: measuring {a.latency_duration}s at {target:,.0f} req/s ({a.latency_load:.0%} of {max_rps:,.0f})")
            r = self.load.run(srv.url, body, a.latency_duration, connections=c, rate=target)
        achieved = ok_requests(r) / (r["duration_us"] / 1e6)
        out.update({
            "achieved_requests_per_s": achieved, "achieved_fraction_of_max": achieved / max_rps if max_rps else None,
            "requests_non2xx": int(r["requests"] - ok_requests(r)),
            "latency_ms": {k: r["latency_us"][k] / 1000 for k in ("mean", "p50", "p75", "p90", "p99", "p999", "max")},
            "load": r,
        })
        progress(f"latency: {achieved:,.0f} req/s ({out['achieved_fraction_of_max']:.0%} of max):"
                 f" p50 {out['latency_ms']['p50']:.2f} ms, p99 {out['latency_ms']['p99']:.2f} ms,"
                 f" non-2xx {out['requests_non2xx']:,}")
        return out

    # -- overload -----------------------------------------------------------------------------------
    def overload_phase(self) -> None:
        a = self.args
        name = "overload"
        slow = NullS3(self.procs, self.workdir, self.logdir, "python", None, delay_ms=a.overload_sink_delay_ms,
                      name="nulls3-slow").start()
        progress(f"{name}: slow null S3 (python, {a.overload_sink_delay_ms:.0f} ms per PUT) on {slow.url}")
        srv = self.start_ingestd(name, "ingestd-overload.toml", slow)
        try:
            # warm the daemon first (each uploader's first PUT loads botocore's models and endpoint
            # rules, tens of MB): a few requests, delivered, then the baseline
            cold = tree_rss(srv.pid)
            body = self.bodies[10].read_bytes()
            for _ in range(40):
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
                conn.request("POST", "/v1/payloads", body, {"Content-Type": "application/json"})
                conn.getresponse().read()
                conn.close()
                time.sleep(0.01)
            warmed = self.wait_delivered(srv, 5.0)[0]
            base = tree_rss(srv.pid)
            base_detail = rss_detail(srv.pid)
            c0 = srv.counters()
            sampler = RssSampler(srv.pid).start()
            progress(f"{name}: {a.overload_duration}s of 10-payload requests on {a.overload_connections} connections"
                     f" (baseline RSS {base / 2**20:.1f} MB after a warm-up{'' if warmed else ' that did not drain'})")
            r = self.load.run(srv.url, self.bodies[10], a.overload_duration, connections=a.overload_connections,
                              count_status=True)
            sampler.stop()
            end_rss = tree_rss(srv.pid)
            end_detail = rss_detail(srv.pid)
            c1 = srv.counters()
            snap = json.loads(http_get(srv.port, "/health")[1])
        finally:
            slow.stop()  # the uploaders now fail, hit the drain deadline and spill: a quick stop
            srv.stop()
        statuses = {int(k): v for k, v in (r.get("statuses") or {}).items()}
        run_s = r["duration_us"] / 1e6
        answered = sum(statuses.values())
        accepted = statuses.get(202, 0)
        sock = sum(v for k, v in r["errors"].items() if k != "status")
        delivered_pps = (c1["delivered_payloads"] - c0["delivered_payloads"]) / run_s
        res = {
            "config": srv.config_text, "sink_delay_ms": a.overload_sink_delay_ms, "connections": a.overload_connections,
            "run_s": run_s, "statuses": statuses, "socket_errors": sock,
            "only_202_and_503": set(statuses) <= {202, 503} and sock == 0,
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
        self.doc["overload"] = res
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items()))
        progress(f"{name}: answers {codes}; socket errors {sock}; {res['answers_per_s']:,.0f} answers/s,"
                 f" {delivered_pps:,.0f} payloads/s delivered ({_fmt(res['overload_factor'], 0)}x overload);"
                 f" RSS {res['rss_base_mb']} -> peak {res['rss_peak_mb']} MB (+{res['rss_growth_mb']} MB);"
                 f" stop: exit {srv.stop_info.get('exit_code')} after {srv.stop_info.get('stop_s')}s")

    # -- optional py-spy profile --------------------------------------------------------------------
    def profile_phase(self) -> None:
        """py-spy on listener 0 (and with --profile-uploader on uploader 0 too) under 1-payload load."""
        a = self.args
        assert self.nulls3 is not None
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(pyspy, os.X_OK):
            progress("profile: py-spy not found (scripts/bench --profile installs it into the bench venv); skipped")
            return
        name = "profile-ingestd-1"
        srv = self.start_ingestd(name, "ingestd-default.toml", self.nulls3)
        # the process that serves HTTP: listener 0 (the supervisor itself in builds before the
        # pure arbiter, whose /health lists it as listener 0), and with --profile-uploader uploader 0
        health = json.loads(http_get(srv.port, "/health")[1])
        targets = {"listener": health["listeners"][0]["pid"] or srv.pid}
        if a.profile_uploader and health.get("workers"):
            targets["uploader"] = health["workers"][0]["pid"]
        raws = {role: self.logdir / f"py-spy-{role}.txt" for role in targets}
        holder: dict[str, Any] = {}
        try:
            secs = a.profile_seconds
            load_secs = secs + 3
            progress(f"profile: {load_secs}s of {a.profile_payloads}-payload load; py-spy record for {secs}s on "
                     + ", ".join(f"{k} (pid {v})" for k, v in targets.items()))
            body = self.bodies[a.profile_payloads]
            t = threading.Thread(target=lambda: holder.update(r=self.load.run(srv.url, body, load_secs)))
            t.start()
            time.sleep(1.5)
            cpu0 = _cpu_split(srv.pid)
            t_prof = time.monotonic()
            spies = [self.procs.start(f"py-spy-{role}", [pyspy, "record", "--pid", str(pid), "--duration", str(secs),
                                                         "--rate", str(a.profile_rate), "--format", "raw", "--nonblocking",
                                                         "--gil",
                                                         "-o", str(raws[role])],
                                      log_path=self.logdir / f"py-spy-{role}.log") for role, pid in targets.items()]
            for sp in spies:
                sp.wait(secs + 60)
            cpu1 = _cpu_split(srv.pid)
            span = time.monotonic() - t_prof
            t.join()
            c = srv.counters()
        finally:
            srv.stop()
        prof: dict[str, Any] = {"seconds": a.profile_seconds, "rate_hz": a.profile_rate,
                                "mode": "py-spy record --gil --nonblocking: samples of the thread holding the GIL",
                                "cpu_cores_used": {k: {f: round((cpu1[k][f] - cpu0[k][f]) / span, 3)
                                                       for f in ("user", "system")} for k in cpu1}}
        if "r" in holder:
            prof["requests_per_s"] = ok_requests(holder["r"]) / (holder["r"]["duration_us"] / 1e6)
            prof["objects_per_1000_payloads"] = c["objects"] * 1000 / max(1, c["delivered_payloads"])
        for role, raw in raws.items():
            if not raw.exists():
                progress(f"profile: py-spy wrote nothing for the {role}; see {self.logdir / f'py-spy-{role}.log'}")
                continue
            summary = summarize_pyspy(raw.read_text())
            summary["raw"] = str(raw)
            prof[role] = summary
            progress(f"profile: {role}: {summary['samples']:,} samples with the GIL held ({prof['rate_hz']} Hz);"
                     " top frames by self time, then by inclusive time:")
            for row in summary["self"][:12]:
                print(f"    self {row['share']:6.1%}  {row['frame']}", flush=True)
            for row in summary["inclusive"][:20]:
                print(f"    incl {row['share']:6.1%}  {row['frame']}", flush=True)
            print("    by component (innermost frame): " + ", ".join(
                f"{r['frame']} {r['share']:.0%}" for r in summary["components_self"]), flush=True)
            print("    by component (anywhere on the stack): " + ", ".join(
                f"{r['frame']} {r['share']:.0%}" for r in summary["components_inclusive"]), flush=True)
        cores = ", ".join(f"{k} {v['user']:.2f} user + {v['system']:.2f} system" for k, v in prof["cpu_cores_used"].items())
        progress(f"profile: CPU cores used during the profile: {cores}; {prof.get('requests_per_s', 0):,.0f} req/s")
        self.doc["profile"] = prof

    # -- run all ------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        self.setup()
        self.doc["settings"] = {k: v for k, v in vars(a).items()}
        go = self.goref is not None
        plan = []
        if go:
            plan += [("go-1", lambda: self.scenario_go("go-1", 1)), ("go-10", lambda: self.scenario_go("go-10", 10))]
        plan += [
            ("ingestd-1", lambda: self.scenario_ingestd("ingestd-1", 1, "ingestd-default.toml")),
            ("ingestd-10", lambda: self.scenario_ingestd("ingestd-10", 10, "ingestd-default.toml")),
            ("seed-layout-10", lambda: self.scenario_ingestd("seed-layout-10", 10, "ingestd-seed-layout.toml")),
        ]
        if not a.skip_latency:
            plan.append(("latency", self.latency_phase))
        if not a.skip_overload:
            plan.append(("overload", self.overload_phase))
        if a.profile:
            plan.append(("profile", self.profile_phase))
        if a.only:
            wanted = set(a.only.split(","))
            plan = [(n, f) for n, f in plan if n in wanted]
        for name, step in plan:
            try:
                step()
            except (RuntimeError, OSError, ValueError, KeyError) as e:  # one broken phase must not hide the others
                progress(f"{name}: FAILED: {e!r}")
                self.doc.setdefault("failures", {})[name] = repr(e)
        self.doc["elapsed_s"] = round(time.monotonic() - T0, 1)
        self.report()

    # -- report ------------------------------------------------------------------------------------
    def report(self) -> None:
        text = render_table(self.doc)
        self.doc["targets"] = evaluate_targets(self.doc)
        text += "\n" + render_targets(self.doc["targets"])
        text += f"\nwhole bench: {self.doc['elapsed_s']:.0f}s; figures: {self.results_dir}/bench-{self.stamp}.json\n"
        print("\n" + text, flush=True)
        base = self.results_dir / f"bench-{self.stamp}"
        base.with_suffix(".txt").write_text(text)
        base.with_suffix(".json").write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        try:
            draw_chart(self.doc, base.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the figures
            print(f"chart not drawn: {e!r}", file=sys.stderr)
        for suffix in (".txt", ".json", ".png"):
            if base.with_suffix(suffix).exists():
                shutil.copyfile(base.with_suffix(suffix), self.results_dir / f"latest{suffix}")

    def close(self) -> None:
        if self.nulls3 is not None:
            self.nulls3.stop()
        self.procs.kill_all()
        shutil.rmtree(self.workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# helpers for the report
# ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _rusage() -> dict[str, float]:
    """CPU seconds of the bench itself and of its reaped children (the load generator runs)."""
    c, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return {"children": c.ru_utime + c.ru_stime, "self": me.ru_utime + me.ru_stime}


def _machine(t0: Any, t1: Any, ours: dict[str, float] | None = None) -> dict[str, Any]:
    """Machine-wide CPU over a span; with `ours`, what the processes of the bench did not use ("foreign")."""
    d = {f: getattr(t1, f) - getattr(t0, f) for f in t0._fields}
    total = sum(d.values()) or 1.0
    busy = total - d.get("idle", 0) - d.get("iowait", 0) - d.get("guest", 0) - d.get("guest_nice", 0)
    ncpu = psutil.cpu_count() or 1
    span = total / ncpu
    out: dict[str, Any] = {"busy_pct": round(100 * busy / total, 1), "steal_pct": round(100 * d.get("steal", 0) / total, 1)}
    if ours is not None and span > 0:
        kernel = d.get("irq", 0) + d.get("softirq", 0)  # loopback TCP is largely softirq: no process is charged
        out["cores"] = {k: round(v / span, 2) for k, v in ours.items()}
        out["cores"]["irq_softirq"] = round(kernel / span, 2)
        out["cores"]["foreign"] = round(max(0.0, busy - d.get("steal", 0) - kernel - sum(ours.values())) / span, 2)
    return out


def _fmt(v: Any, digits: int | None = None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, int) and digits is None:
        return f"{v:,}"
    if digits is None:
        digits = 0 if abs(v) >= 100 else (1 if abs(v) >= 10 else 2)
    return f"{v:,.{digits}f}"


def _ratio(a: Any, b: Any) -> str:
    if a is None or b is None or not b:
        return "n/a"
    return f"{a / b:.2f}x"


METRICS = [
    ("requests/s (2xx)", lambda s: s["requests_per_s"]),
    ("non-2xx answers (run)", lambda s: s["requests_non2xx"]),
    ("payloads/s delivered", lambda s: s["delivered_payloads_per_s"]),
    ("server CPU µs / delivered payload", lambda s: s["cpu_us_per_payload"]),
    ("S3 PUTs / 1,000 payloads", lambda s: s["s3_puts_per_1000_payloads"]),
    ("latency p50 ms", lambda s: s["latency_ms"]["p50"]),
    ("latency p99 ms", lambda s: s["latency_ms"]["p99"]),
    ("peak RSS MB (process tree)", lambda s: s["peak_rss_mb"]),
    ("drain after the run s", lambda s: s["drain_s"]),
]


def render_table(doc: dict[str, Any]) -> str:
    sc = doc["scenarios"]
    cols = [("Go seed 1p", "go-1", None), ("ingestd 1p", "ingestd-1", "go-1"),
            ("Go seed 10p", "go-10", None), ("ingestd 10p", "ingestd-10", "go-10"),
            ("ingestd seed layout 10p", "seed-layout-10", "go-10")]
    header = ["metric"]
    for title, key, ref in cols:
        header.append(title)
        if ref:
            header.append(f"{title.split(' 1')[0]} / Go")
    rows = [header]
    for label, get in METRICS:
        row = [label]
        for title, key, ref in cols:
            v = get(sc[key]) if key in sc else None
            row.append(_fmt(v))
            if ref:
                r = get(sc[ref]) if ref in sc else None
                row.append(_ratio(v, r))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    t = doc.get("tools", {})
    s = doc.get("settings", {})
    head = (f"ingestd bench {doc['stamp']} — {t.get('cpus')} CPUs ({t.get('cpu_model')}), git {t.get('git')};"
            f" null S3: {t.get('null_s3')}; load: {t.get('loadgen')} -t{s.get('threads')} -c{s.get('connections')},"
            f" {s.get('warmup')}s warm-up + {s.get('duration')}s run per column; 1p/10p = payloads per request;"
            f" Go seed = goref DISPATCH=sync")
    out = [head, ""] + lines
    steal = []
    for k, v in sc.items():
        m, c = v["machine"], v["machine"].get("cores", {})
        steal.append(f"{k} {m['busy_pct']:.0f}%/{m['steal_pct']:.0f}%/{c.get('load_generator', 0):.2f}/"
                     f"{c.get('null_s3', 0):.2f}/{c.get('irq_softirq', 0):.2f}/{c.get('foreign', 0):.2f}")
    out.append("")
    out.append("CPU during each column (machine busy % / steal % / cores used by: load generator / null S3 /"
               " irq+softirq (loopback TCP) / processes outside the bench): " + ", ".join(steal))
    noisy = [f"{k} ({v['machine']['cores']['foreign']:.2f} cores)" for k, v in sc.items()
             if v["machine"].get("cores", {}).get("foreign", 0) >= 0.25]
    if noisy:
        out.append("WARNING: processes outside the bench used CPU during " + ", ".join(noisy)
                   + ": those columns are perturbed; run again on a quiet machine")
    pre = doc.get("preflight")
    if pre and pre.get("busy_pct", 0) > 15:
        out.append(f"WARNING: the machine was {pre['busy_pct']:.0f}% busy before the bench started: figures are perturbed")
    ov = doc.get("overload")
    if ov:
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(ov["statuses"].items()))
        out.append(f"overload (ingestd, 10p, {ov['connections']} connections, sink {ov['sink_delay_ms']:.0f} ms/PUT,"
                   f" queue.max_items 2000): answers {codes}; socket errors {ov['socket_errors']};"
                   f" {ov['answers_per_s']:,.0f} answers/s for {ov['accepted_per_s']:,.0f} accepted/s"
                   f" and {ov['delivered_payloads_per_s']:,.0f} payloads/s delivered ({_fmt(ov['overload_factor'], 0)}x overload);"
                   f" RSS {ov['rss_cold_mb']} cold, {ov['rss_base_mb']} warmed -> peak {ov['rss_peak_mb']} MB"
                   f" (growth {ov['rss_growth_mb']} MB), p99 {ov['latency_ms']['p99']:.1f} ms")
    for key in ("latency", "latency_http_max"):
        lat = doc.get(key)
        if not lat:
            continue
        out.append(f"latency (ingestd 1p, {lat['connections']} connections, at {lat['fraction']:.0%} of"
                   f" {lat['max_requests_per_s']:,.0f} req/s = {lat['max_definition']}):"
                   f" {lat['achieved_requests_per_s']:,.0f} req/s achieved ({lat['achieved_fraction_of_max']:.0%}):"
                   f" p50 {lat['latency_ms']['p50']:.2f} ms,"
                   f" p90 {lat['latency_ms']['p90']:.2f} ms, p99 {lat['latency_ms']['p99']:.2f} ms,"
                   f" max {lat['latency_ms']['max']:.1f} ms; non-2xx {lat['requests_non2xx']:,}")
    for k, v in (doc.get("failures") or {}).items():
        out.append(f"FAILED {k}: {v}")
    return "\n".join(out) + "\n"


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    sc = doc["scenarios"]
    res: list[dict[str, Any]] = []

    def add(name: str, value: Any, target: str, met: bool | None, note: str = "") -> None:
        res.append({"target": name, "value": value, "goal": target, "met": met, "note": note})

    i10, g10 = sc.get("ingestd-10"), sc.get("go-10")
    if i10 and g10 and g10["delivered_payloads_per_s"]:
        r = i10["delivered_payloads_per_s"] / g10["delivered_payloads_per_s"]
        add("10 payloads/request: delivered payloads/s vs Go seed", f"{r:.2f}x ({i10['delivered_payloads_per_s']:,.0f} vs"
            f" {g10['delivered_payloads_per_s']:,.0f})", f">= {TARGETS['ratio_10']:.0f}x", r >= TARGETS["ratio_10"])
    else:
        add("10 payloads/request: delivered payloads/s vs Go seed", None, ">= 2x", None, "not measured")
    i1 = sc.get("ingestd-1")
    if i1:
        v = i1["delivered_payloads_per_s"]
        add("1 payload/request: delivered requests/s", f"{v:,.0f}", f">= {TARGETS['rps_1']:,.0f}"
            f" (moonshot {TARGETS['rps_1_moonshot']:,.0f})", v >= TARGETS["rps_1"],
            "moonshot met" if v >= TARGETS["rps_1_moonshot"] else "")
    puts = [s["s3_puts_per_1000_payloads"] for k, s in sc.items() if k in ("ingestd-1", "ingestd-10")
            and s["s3_puts_per_1000_payloads"] is not None]
    if puts:
        worst = max(puts) * 1000
        add("S3 PUTs per 1M payloads, default batching (worst of 1p and 10p)", f"{worst:,.0f}",
            f"<= {TARGETS['puts_per_million']:,.0f}", worst <= TARGETS["puts_per_million"])
    ov = doc.get("overload")
    if ov:
        add("overload: only 202 and 503 answers", ", ".join(f"{k}" for k in sorted(ov["statuses"])) +
            (f" + {ov['socket_errors']} socket errors" if ov["socket_errors"] else ""), "202, 503", ov["only_202_and_503"],
            f"{_fmt(ov['overload_factor'], 0)}x overload (requests offered / delivered)")
        add("overload: RSS growth", f"{ov['rss_growth_mb']} MB", f"< {TARGETS['overload_rss_mb']:.0f} MB",
            ov["rss_growth_mb"] < TARGETS["overload_rss_mb"])
    lat = doc.get("latency")
    if lat:
        add("p99 latency at 70% of max throughput (ingestd 1p)", f"{lat['latency_ms']['p99']:.2f} ms at"
            f" {lat['achieved_fraction_of_max']:.0%} of max", f"< {TARGETS['p99_ms']:.0f} ms",
            lat["latency_ms"]["p99"] < TARGETS["p99_ms"])
    return res


def render_targets(targets: list[dict[str, Any]]) -> str:
    lines = ["targets of issue 5 §2 (ratios and figures from this run):"]
    for t in targets:
        mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        note = f"; {t['note']}" if t["note"] else ""
        lines.append(f"  [{mark}] {t['target']}: {t['value']} (goal {t['goal']}{note})")
    return "\n".join(lines) + "\n"


def draw_chart(doc: dict[str, Any], path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = doc["scenarios"]
    order = [k for k in ("go-1", "ingestd-1", "go-10", "ingestd-10", "seed-layout-10") if k in sc]
    colors = {"go-1": "#7f7f7f", "go-10": "#7f7f7f", "ingestd-1": "#1f77b4", "ingestd-10": "#1f77b4",
              "seed-layout-10": "#9ecae1"}
    panels = [
        ("requests/s (2xx)", lambda s: s["requests_per_s"], False),
        ("payloads/s delivered", lambda s: s["delivered_payloads_per_s"], False),
        ("server CPU µs / delivered payload (log)", lambda s: s["cpu_us_per_payload"] or 0, True),
        ("S3 PUTs / 1,000 payloads (log)", lambda s: s["s3_puts_per_1000_payloads"] or 0, True),
        ("latency p99 ms (p50 hatched)", lambda s: s["latency_ms"]["p99"], False),
        ("peak RSS MB (process tree)", lambda s: s["peak_rss_mb"], False),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    flat = axes.flatten()
    for ax, (title, get, log) in zip(flat, panels):
        vals = [get(sc[k]) for k in order]
        bars = ax.bar(order, vals, color=[colors[k] for k in order])
        if title.startswith("latency"):
            ax.bar(order, [sc[k]["latency_ms"]["p50"] for k in order], fill=False, hatch="//", edgecolor="black")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        for b, v in zip(bars, vals):
            ax.annotate(_fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ov = doc.get("overload")
    ax = flat[6]
    if ov and ov["rss_series_mb"]:
        t, m = zip(*ov["rss_series_mb"])
        ax.plot(t, m)
        ax.axhline(ov["rss_base_mb"] + TARGETS["overload_rss_mb"], color="red", linestyle="--", linewidth=0.8)
        ax.set_ylim(bottom=0)
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(ov["statuses"].items()))
        ax.set_title(f"overload: RSS MB of the tree over time (red: +50 MB)\n({codes})", fontsize=9)
        ax.set_xlabel("s")
    else:
        ax.axis("off")
    ax = flat[7]
    ax.axis("off")
    lines = [("MET  " if t["met"] else "MISS " if t["met"] is False else "n/a  ") + f"{t['target']}: {t['value']}"
             for t in doc.get("targets", [])]
    ax.text(0, 1, "\n".join(textwrap.fill(x, 62, subsequent_indent="     ") for x in lines), va="top", fontsize=8,
            family="monospace")
    t = doc.get("tools", {})
    fig.suptitle(f"ingestd vs Go seed design — {doc['stamp']}, {t.get('cpus')} CPUs, null S3 {t.get('null_s3')},"
                 f" load {t.get('loadgen')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


COMPONENTS = [  # (name, test on a frame's file), first match wins; used on the innermost frame
    ("ingestd", lambda f: f.startswith("ingestd/")),
    ("falcon", lambda f: f.startswith("falcon/")),
    ("waitress", lambda f: f.startswith("waitress/")),
    ("logging", lambda f: f.startswith("logging/")),
    ("multiprocessing queue/pickle", lambda f: f.startswith("multiprocessing/")),
    ("threading (locks, conditions)", lambda f: f in ("threading.py", "queue.py")),
    ("botocore/boto3/urllib3", lambda f: f.startswith(("botocore/", "boto3/", "urllib3/", "s3transfer/"))),
    ("json/gzip/other stdlib", lambda f: "/" not in f or f.startswith(("json/", "email/", "http/", "urllib/",
                                                                         "encodings/", "<frozen"))),
]


def summarize_pyspy(raw: str) -> dict[str, Any]:
    """Self and inclusive shares per function, and self time per component, from py-spy's raw output."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    comp_counts: dict[str, int] = {}
    comp_incl: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread (", "process ")):
            frames = frames[1:]
        names = [re.sub(r":\d+\)$", ")", f) for f in frames]  # drop line numbers
        if not names:
            continue
        self_counts[names[-1]] = self_counts.get(names[-1], 0) + count
        for f in set(names):
            incl_counts[f] = incl_counts.get(f, 0) + count
        files = [m.group(1) if (m := re.search(r"\(([^()]*)\)$", f)) else "" for f in names]
        comp = next((c for c, test in COMPONENTS if test(files[-1])), "other")
        comp_counts[comp] = comp_counts.get(comp, 0) + count
        for c in {c for f in files for c, test in COMPONENTS[:4] if test(f)}:
            comp_incl[c] = comp_incl.get(c, 0) + count

    def top(d: dict[str, int], n: int = 25) -> list[dict[str, Any]]:
        return [{"frame": k, "samples": v, "share": v / total} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"samples": total, "self": top(self_counts), "inclusive": top(incl_counts, 40),
            "components_self": top(comp_counts, 20), "components_inclusive": top(comp_incl, 10)}


# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description="ingestd vs the Go seed design, one run, side by side")
    p.add_argument("--quick", action="store_true", help="about one minute: shorter warm-up, runs and phases")
    p.add_argument("--payload-bytes", type=int, default=0,
                   help="grow each event to about this many bytes (e.g. 1024: realistic telemetry); 0: ~130 B")
    p.add_argument("--duration", type=int, help="seconds of each measured run (default 10, quick 4)")
    p.add_argument("--warmup", type=int, help="seconds of warm-up before each run (default 2, quick 1)")
    p.add_argument("--drain-cap", type=float, help="longest wait for the backlog after a run (default 5, quick 3)")
    p.add_argument("--settle-cap", type=float, help="longest wait for the warm-up backlog (default 3, quick 2)")
    p.add_argument("--threads", type=int, default=2, help="load generator threads (wrk -t; python: processes)")
    p.add_argument("--connections", type=int, default=64, help="load generator connections (wrk -c)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--nulls3", choices=("auto", "nginx", "python"), default="auto")
    p.add_argument("--peers", default=str(ROOT.parent / "shared" / "peers"), help="folder with goref/ and nulls3/")
    p.add_argument("--ingestd", default="", help="command that runs ingestd (default: the bench venv's ingestd)")
    p.add_argument("--go-workers", type=int, default=0, help="MAX_WORKERS of the Go peer (default: its own, 2 x CPUs)")
    p.add_argument("--skip-go", action="store_true", help="no Go columns (the Go peer is not built)")
    p.add_argument("--only", default="", help="comma-separated phases to run, of: go-1, go-10, ingestd-1, ingestd-10,"
                   " seed-layout-10, latency (needs ingestd-1), overload, profile")
    p.add_argument("--skip-overload", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--overload-duration", type=int, help="seconds (default 10, quick 4)")
    p.add_argument("--overload-connections", type=int, default=256)
    p.add_argument("--overload-sink-delay-ms", type=float, default=100.0)
    p.add_argument("--latency-load", type=float, default=0.7, help="fraction of the measured max req/s")
    p.add_argument("--latency-duration", type=int, help="seconds (default 8, quick 4)")
    p.add_argument("--latency-calibrate", type=int, help="seconds of the calibration run (default 2, quick 1)")
    p.add_argument("--latency-connections", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="also profile an ingestd listener with py-spy at 1p")
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--profile-uploader", action="store_true", help="also py-spy one uploader, at the same time")
    p.add_argument("--profile-payloads", type=int, choices=(1, 10), default=1, help="payloads per request while profiling")
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    a = p.parse_args(argv)
    q = a.quick
    defaults = {"duration": (10, 4), "warmup": (2, 1), "drain_cap": (5.0, 3.0), "settle_cap": (3.0, 2.0),
                "overload_duration": (10, 4), "latency_duration": (8, 4), "latency_calibrate": (2, 1)}
    for k, (full, quick) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    return a


def main() -> int:
    args = parse_args()
    if psutil is None:
        raise SystemExit("scripts/bench.py needs psutil: run it through scripts/bench, which makes its venv")

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
