"""One ingestd host of the cluster: its config, and the real `ingestd --config` process inside
its network namespace.

The process is started as `ip netns exec NS unshare --uts -- sh -c 'hostname H; exec ingestd …'`:
`ip netns exec`, `unshare` (without --fork) and `sh` all exec, so the pid we hold is the
ingestd supervisor itself and SIGTERM goes straight to it. The private UTS namespace gives
each host its own host name, which ingestd writes into every object key (sinks.KeyMaker), as
separate machines would; keys are unique without it (each holds a 64-bit random intent id),
the name tells an operator which host wrote an object.

Each host has its own spool (and tmpfs log folder) under the run directory and writes into the
one directory sink shared by all hosts. It runs in its own session: stopping it signals its
pid, and cleanup kills its process group.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import TimedOut, wait_for
from .network import Endpoint

LISTEN_RE = re.compile(rb"listening on http://([^:\s]+):(\d+)")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def toml_dump(tables: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def get(address: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET over a fresh connection: (status, body); (0, b"") when nothing answered."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


class Host:
    """One ingestd daemon in its namespace; started again on the same config and spool."""

    def __init__(self, endpoint: Endpoint, run_id: str, run_dir: Path, sink_dir: Path, ingestd: list[str],
                 port: int, listeners: int, workers: int, drain_timeout_s: float, lame_duck_s: float = 0.0) -> None:
        self.endpoint = endpoint
        self.name = f"h{endpoint.index}"
        self.hostname = f"ingestd-{self.name}"
        self.port = port
        self.ingestd = ingestd
        self.drain_timeout_s = drain_timeout_s + lame_duck_s
        self.dir = run_dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.memory_path = Path("/dev/shm") / f"ingestd-cluster-{run_id}-{self.name}"
        self.config_path = self.dir / "ingestd.toml"
        self.log_path = self.dir / "ingestd.log"
        self.config_path.write_text(toml_dump({
            "http": {"listen": f"{endpoint.address}:{port}", "listeners": listeners},
            "workers": {"count": workers},
            "batch": {"max_age_ms": 250},
            "sink": {"kind": "directory", "path": str(sink_dir)},
            "spool": {"path": str(self.dir / "spool"), "memory_path": str(self.memory_path)},
            "shutdown": {"drain_timeout_s": drain_timeout_s, "lame_duck_s": lame_duck_s},
        }))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._terminated = False
        self._term_at = 0.0

    @property
    def address(self) -> str:
        return self.endpoint.address

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.endpoint.netns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", self.hostname,
                *self.ingestd, "--config", str(self.config_path)]

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._terminated = False
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return LISTEN_RE.search(f.read()) is not None

    def ready(self) -> bool:
        return get(self.address, self.port, "/health/ready")[0] == 200

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Until this start listens and answers /health/ready with 200; returns the seconds taken."""
        began = time.monotonic()
        try:
            wait_for(self._listening, timeout, f"{self.name} to listen")
            wait_for(self.ready, max(1.0, timeout - (time.monotonic() - began)), f"{self.name} to be ready")
        except TimedOut as e:
            raise TimedOut(f"{e}\n{self.log_tail()}") from None
        return time.monotonic() - began

    def health(self) -> dict[str, Any]:
        status, body = get(self.address, self.port, "/health")
        if not status:
            return {}
        parsed: dict[str, Any] = json.loads(body)
        return parsed

    def terminate(self) -> None:
        """SIGTERM once: the drain begins (a second one would tell it to stop waiting for the sink)."""
        assert self.proc is not None
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self._term_at = time.monotonic()
            os.kill(self.proc.pid, signal.SIGTERM)

    def wait_exit(self) -> tuple[int | None, float]:
        """Wait for the drain after `terminate`: (exit code, seconds since SIGTERM); None when it
        did not exit within drain_timeout_s + 10 s (it is then killed)."""
        assert self.proc is not None
        try:
            code: int | None = self.proc.wait(max(0.0, self._term_at + self.drain_timeout_s + 10 - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        return code, time.monotonic() - self._term_at

    def stop(self) -> tuple[int | None, float]:
        self.terminate()
        return self.wait_exit()

    def kill(self) -> None:
        """SIGKILL the host's process group (cleanup; the namespace sweep catches the rest)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def spool_leftovers(self) -> int:
        """Files left in the spool's dead-letter and overflow folders (0 after a clean drain)."""
        spool = self.dir / "spool"
        return sum(1 for d in ("dead", "overflow") for p in (spool / d).rglob("*") if p.is_file()) \
            if spool.exists() else 0
