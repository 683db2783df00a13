"""The servers of a bench run: the sinks (null S3, S3-like slow S3) and the servers under test
(the Go seed design, ingestd).

Sinks. nginx from apt with ../shared/peers/nulls3/nginx.conf.template (one worker, `return 200`
with an ETag, bodies discarded) or ../shared/peers/slows3/nginx.conf.template (each PUT answered
after @LATENCY_S@, 503 SlowDown beyond @RATE@ PUT/s with a burst of @BURST@; needs Debian's
libnginx-mod-http-echo), rendered with a free port and a `stub_status` location added so that
the bench counts the requests served exactly (PUTs = requests - status reads). Without nginx (or
without the echo module, for the slow sink) bench_support/nulls3.py stands in: the same answers
from asyncio, at more CPU per request.

Servers. GoPeer runs ../shared/peers/goref (DISPATCH=sync, its delivered count from `/stats`);
Ingestd runs `ingestd --config` on a filled-in bench_support/ingestd-*.toml, optionally with
`http.server = "<front>"`, and reads its counters from `/health` and its histograms from
`/metrics`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .processes import Processes, free_port, http_get, tree_cpu, wait_port

SUPPORT = Path(__file__).resolve().parent
LISTEN_RE = re.compile(r"listening on http://(\[[^\]]+\]|[^\s:]+):(\d+)")
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def render_nginx(template: str, port: int, prefix: Path, status_path: str, values: dict[str, str]) -> tuple[str, bool]:
    """A peer's nginx template filled in: port, placeholders, temp paths under `prefix`, and an
    exact-match `stub_status` location (outside any rate limit) ahead of `location / {`.
    Returns the text and whether the status location could be added."""
    text = template.replace("@PORT@", str(port))
    for k, v in values.items():
        text = text.replace(f"@{k}@", v)
    anchor = "location / {"
    countable = anchor in text
    if countable:
        text = text.replace(anchor, f"location = {status_path} {{ stub_status; }}\n        {anchor}", 1)
    for d in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
        text = text.replace("http {", f"http {{\n    {d}_path {prefix / d};", 1)
    return text, countable


class NullS3:
    """A sink that costs next to nothing (`slow=False`), or an S3-like one: `latency_ms` per PUT
    and 503 SlowDown beyond `rate` PUT/s (burst `burst`)."""

    STATUS = "/__nulls3_status"

    def __init__(self, procs: Processes, workdir: Path, logdir: Path, kind: str, template: Path | None,
                 delay_ms: float = 0.0, name: str = "nulls3", rate: int = 0, burst: int = 0) -> None:
        self.procs, self.workdir, self.logdir = procs, workdir, logdir
        self.kind, self.template, self.delay_ms, self.name = kind, template, delay_ms, name
        self.rate, self.burst = rate, burst
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._status_reads = 0
        self.countable = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def describe(self) -> str:
        what = f"{self.kind} on {self.url}"
        if self.delay_ms:
            what += f", {self.delay_ms:g} ms per PUT"
        if self.rate:
            what += f", 503 SlowDown beyond {self.rate:,} PUT/s (burst {self.burst:,})"
        return what

    def start(self) -> NullS3:
        self.port = free_port()
        log = self.logdir / f"{self.name}.log"
        if self.kind == "nginx":
            assert self.template is not None
            prefix = self.workdir / f"nginx-{self.port}"
            (prefix / "logs").mkdir(parents=True, exist_ok=True)
            values = {"RATE": str(self.rate), "BURST": str(self.burst), "LATENCY_S": f"{self.delay_ms / 1000:.3f}"}
            text, self.countable = render_nginx(self.template.read_text(), self.port, prefix, self.STATUS, values)
            conf = prefix / "nginx.conf"
            conf.write_text(text)
            cmd = [find_nginx() or "nginx", "-c", str(conf), "-p", f"{prefix}/", "-e", str(prefix / "logs" / "error.log")]
        else:
            cmd = [sys.executable, str(SUPPORT / "nulls3.py"), "--port", str(self.port), "--delay-ms", str(self.delay_ms)]
            if self.rate:
                cmd += ["--rate", str(self.rate), "--burst", str(self.burst)]
        self.proc = self.procs.start(self.name, cmd, log_path=log)
        wait_port(self.port, self.proc, 10, f"{self.name} ({self.kind})")
        self.puts()  # fails early if the counting endpoint is missing
        return self

    def puts(self) -> int | None:
        """PUTs served so far, 503s included (None when it cannot tell)."""
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


class Server:
    kind = ""

    def __init__(self, procs: Processes, name: str) -> None:
        self.procs = procs
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stop_info: dict[str, Any] = {}
        self.config_text: str | None = None
        self.ready_s: float | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/payloads"

    def counters(self) -> dict[str, int]:
        raise NotImplementedError

    def metrics_text(self) -> str | None:
        return None

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
        t0 = time.monotonic()
        env = dict(os.environ, ADDR=f"127.0.0.1:{self.port}", S3_URL=s3_url, DISPATCH="sync", **env_extra)
        self.proc = self.procs.start(self.name, [str(binary)], env=env, log_path=logdir / f"{self.name}.log")
        wait_port(self.port, self.proc, 15, "Go peer")
        self.ready_s = time.monotonic() - t0
        return self

    def counters(self) -> dict[str, int]:
        _, body = http_get(self.port, "/stats")
        s = json.loads(body)
        return {"accepted_requests": s["requests"], "accepted_payloads": s["payloads"],
                "delivered_payloads": s["uploaded"] - s["failed"], "done_payloads": s["uploaded"],
                "objects": s["uploaded"] - s["failed"], "failed": s["failed"], "dropped": s["failed"]}


def with_front(config_text: str, front: str) -> str:
    """A config with `server = "<front>"` in its [http] table (added after the header)."""
    if re.search(r"(?m)^\s*server\s*=", config_text):
        return re.sub(r'(?m)^(\s*server\s*=\s*)"[^"]*"', lambda m: f'{m.group(1)}"{front}"', config_text, count=1)
    if re.search(r"(?m)^\[http\]\s*$", config_text):
        return re.sub(r"(?m)^\[http\]\s*$", f'[http]\nserver = "{front}"', config_text, count=1)
    return f'[http]\nserver = "{front}"\n\n' + config_text


def fronts_from_check_config(text: str) -> list[str] | None:
    """The HTTP fronts a build offers, read from the help comment of `server = ...` in
    `ingestd check-config` output (e.g. `server = "waitress"  # the HTTP front: waitress | fast`).
    None when the build has no such key; [] when it has one but lists no choices."""
    in_http = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("["):
            in_http = s == "[http]"
            continue
        if not in_http:
            continue
        m = re.match(r'server\s*=\s*"([^"]*)"\s*(?:#\s*(.*))?$', s)
        if not m:
            continue
        names: list[str] = []
        for run in re.findall(r"[A-Za-z0-9_.-]+(?:\s*(?:\||&#124;)\s*[A-Za-z0-9_.-]+)+", m.group(2) or ""):
            names += [n.strip() for n in re.split(r"\||&#124;", run)]
        current = m.group(1)
        if current and current not in names:
            names.insert(0, current)
        return list(dict.fromkeys(n for n in names if n))
    return None


class Ingestd(Server):
    kind = "ingestd"

    @staticmethod
    def render(template: Path, s3_url: str, rundir: Path, memory_dir: Path, front: str | None) -> str:
        text = (template.read_text().replace("@ENDPOINT@", s3_url).replace("@SPOOL@", str(rundir / "spool"))
                .replace("@MEMORY@", str(memory_dir)))
        return with_front(text, front) if front else text

    @staticmethod
    def env(rundir: Path) -> dict[str, str]:
        env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(rundir / "no-aws-config"),
                   AWS_SHARED_CREDENTIALS_FILE=str(rundir / "no-aws-credentials"))
        env.pop("AWS_PROFILE", None)
        env.pop("AWS_SESSION_TOKEN", None)
        return env

    @staticmethod
    def check_config(cmd: list[str], cfg: Path, rundir: Path) -> tuple[int, str]:
        """`ingestd check-config`: (exit code, output)."""
        try:
            r = subprocess.run(cmd + ["check-config", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                               cwd=rundir, env=Ingestd.env(rundir), stdin=subprocess.DEVNULL, start_new_session=True, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return 1, repr(e)
        return r.returncode, r.stdout + r.stderr

    def start(self, cmd: list[str], config_template: Path, s3_url: str, workdir: Path, memory_root: Path, logdir: Path,
              front: str | None = None) -> Ingestd:
        """Start and wait until ready (`/health/ready` 200: at least one uploader booted); the
        load may start at once (issue 10's "load starting right at readiness")."""
        rundir = workdir / self.name
        rundir.mkdir(parents=True, exist_ok=True)
        self.memory_dir = memory_root / self.name
        cfg = rundir / "config.toml"
        cfg.write_text(self.render(config_template, s3_url, rundir, self.memory_dir, front))
        self.config_text = cfg.read_text()
        if front:
            code, out = self.check_config(cmd, cfg, rundir)
            if code != 0:
                lines = [x for x in out.strip().splitlines() if x.strip()]
                raise FrontRefused(front, lines[-1] if lines else f"exit {code}")
        log = logdir / f"{self.name}.log"
        t0 = time.monotonic()
        self.proc = self.procs.start(self.name, cmd + ["--config", str(cfg)], env=self.env(rundir), cwd=rundir, log_path=log)
        deadline = t0 + 60

        def listening() -> bool:
            m = LISTEN_RE.search(log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(2))
            return m is not None

        paths = ["/health/ready", "/health"]

        def ready() -> bool:
            try:
                status, _ = http_get(self.port, paths[0], timeout=2)
            except (OSError, ValueError):
                return False
            if status == 404 and len(paths) > 1:  # an older build without /health/ready
                paths.pop(0)
            return status == 200

        self._poll_start(listening, "log 'listening on'", deadline, log)
        self._poll_start(ready, "answer ready", deadline, log)
        self.ready_s = time.monotonic() - t0
        return self

    def _poll_start(self, done: Callable[[], bool], what: str, deadline: float, log: Path) -> None:
        """Poll `done` every 20 ms until it is true; fail if ingestd exits or the deadline passes."""
        assert self.proc is not None
        while not done():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingestd exited with code {self.proc.returncode} at start; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingestd did not {what} within 60s; see {log}")
            time.sleep(0.02)

    def health(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(http_get(self.port, "/health")[1])  # 503 while full: same body
        return doc

    def counters(self) -> dict[str, int]:
        c = self.health()["counters"]
        return {"accepted_requests": c.get("accepted_requests", 0), "accepted_payloads": c["accepted_payloads"],
                "delivered_payloads": c["uploaded_payloads"],
                "done_payloads": c["uploaded_payloads"] + c.get("dead_lettered_payloads", 0),
                "objects": c["uploaded_objects"], "failed": c.get("failed_uploads", 0), "dropped": 0}

    def metrics_text(self) -> str | None:
        try:
            status, body = http_get(self.port, "/metrics")
        except OSError:
            return None
        return body.decode(errors="replace") if status == 200 else None

    def stop(self) -> dict[str, Any]:
        info = super().stop()
        memory_dir = getattr(self, "memory_dir", None)
        if memory_dir is not None:
            shutil.rmtree(memory_dir, ignore_errors=True)
        return info


class FrontRefused(RuntimeError):
    """The build refuses `http.server = "<front>"` (check-config exits non-zero)."""

    def __init__(self, front: str, message: str) -> None:
        short = re.sub(r"\s*\(known: [^)]*\)", "", message)  # the list of known keys says nothing here
        super().__init__(f'http.server = "{front}" refused by this build\'s config: {short}')
        self.front = front
        self.message = message
