"""HAProxy from Debian in front of the hosts: installed when missing, configured from
`haproxy.cfg.template`, run in the foreground in the root namespace on 127.0.0.1, and read
through its runtime API (the stats socket): server states, retries, redispatches, 5xx answers.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import string
import subprocess
import time
from pathlib import Path

from .common import Unavailable, run, wait_for

TEMPLATE = Path(__file__).with_name("haproxy.cfg.template")
BACKEND = "ingestd"
FRONTEND = "ingest"


def find_haproxy() -> str | None:
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


def ensure_haproxy(install: bool = True) -> str:
    """The haproxy binary; installs Debian's package first when it is missing (root and apt)."""
    found = find_haproxy()
    if found:
        return found
    if not install:
        raise Unavailable("haproxy is not installed (apt-get install haproxy)")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("haproxy is not installed and cannot be installed here (needs root and apt-get)")
    print("[cluster] apt-get install haproxy", flush=True)
    # keep apt from starting a system-wide haproxy (as scripts/bench does for nginx)
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "haproxy"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
            if proc.returncode != 0:
                raise Unavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    found = find_haproxy()
    if not found:
        raise Unavailable("apt-get installed haproxy but no haproxy binary was found")
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 right now (HAProxy cannot report a port 0 it was given)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(servers: list[tuple[str, str, int]], bind: str, stats_socket: Path) -> str:
    lines = "\n".join(f"    server {name} {address}:{port}" for name, address, port in servers)
    return string.Template(TEMPLATE.read_text()).substitute(bind=bind, stats_socket=str(stats_socket),
                                                            servers=lines)


class Balancer:
    """One HAProxy process of this run, and its runtime API."""

    def __init__(self, binary: str, run_dir: Path, stats_socket: Path, servers: list[tuple[str, str, int]],
                 port: int = 0) -> None:
        self.binary = binary
        self.run_dir = run_dir
        self.servers = servers
        self.wanted_port = port
        self.port = 0
        self.config_path = run_dir / "haproxy.cfg"
        self.log_path = run_dir / "haproxy.log"
        self.stats_socket = stats_socket  # a unix socket path: at most 97 bytes for HAProxy
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        attempts = 1 if self.wanted_port else 5  # a free port can be taken before HAProxy binds it
        for attempt in range(attempts):
            self.port = self.wanted_port or free_port()
            self.config_path.write_text(render(self.servers, f"127.0.0.1:{self.port}", self.stats_socket))
            check = run([self.binary, "-c", "-f", str(self.config_path)], check=False)
            if check.returncode != 0:
                raise RuntimeError(f"haproxy refused {self.config_path}: {check.stdout}{check.stderr}")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.config_path)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            try:
                wait_for(self._serving, timeout, "haproxy to listen")
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
            self.command("show info")
            return True
        except OSError:
            return False

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One command of the runtime API (the stats socket closes after answering it)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """`show stat` as {(proxy, server): row}; server is FRONTEND/BACKEND for the totals."""
        text = self.command("show stat").lstrip("# ")
        return {(row["pxname"], row["svname"]): row for row in csv.DictReader(io.StringIO(text))}

    def server_status(self, name: str) -> str:
        """UP, DOWN, DRAIN, MAINT, or with a transition ("UP 1/2"); "" when unreadable."""
        try:
            return self.stats().get((BACKEND, name), {}).get("status", "")
        except OSError:
            return ""

    def wait_status(self, name: str, status: str, timeout: float) -> float:
        began = time.monotonic()
        wait_for(lambda: self.server_status(name) == status, timeout, f"haproxy to see {name} {status}")
        return time.monotonic() - began

    def set_state(self, name: str, state: str) -> None:
        """`ready`, `drain` or `maint` for server `name` (the runtime API's `set server`)."""
        answer = self.command(f"set server {BACKEND}/{name} state {state}").strip()
        if answer:
            raise RuntimeError(f"haproxy: set server {name} state {state}: {answer}")

    def sessions(self, name: str) -> int:
        return int(self.stats()[(BACKEND, name)]["scur"] or 0)

    def totals(self) -> dict[str, int]:
        """What HAProxy counted: retries, redispatches, and 5xx it answered to clients."""
        st = self.stats()
        back, front = st[(BACKEND, "BACKEND")], st[(FRONTEND, "FRONTEND")]

        def num(row: dict[str, str], key: str) -> int:
            return int(row.get(key) or 0)

        return {"retries": num(back, "wretr"), "redispatches": num(back, "wredis"),
                "requests": num(front, "req_tot"), "client_5xx": num(front, "hrsp_5xx"),
                "server_5xx": sum(num(row, "hrsp_5xx") for (px, sv), row in st.items()
                                  if px == BACKEND and sv != "BACKEND"),
                "server_connection_errors": num(back, "econ"), "server_response_errors": num(back, "eresp")}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

