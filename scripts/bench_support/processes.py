"""Processes the bench starts, and what it reads about them and the machine.

Every process is started in its own session (so its own process group) and killed, group and
all, at the end of its phase and again in the bench's `finally`; every wait is bounded. CPU and
RSS are read with psutil over a process's whole tree (the daemon's children included).
"""

from __future__ import annotations

import http.client
import os
import platform
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # only `--help` works without it: scripts/bench installs it in its venv
    psutil = None  # type: ignore[assignment,unused-ignore]

T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


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
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
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


def http_post(port: int, path: str, body: bytes, timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
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


def thread_cpu(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds (user + system) of every thread of the tree, keyed by (pid, OS thread id)."""
    out: dict[tuple[int, int], float] = {}
    for p in tree(pid):
        try:
            for t in p.threads():
                out[(p.pid, t.id)] = t.user_time + t.system_time
        except psutil.Error:
            continue
    return out


def cpu_split(pid: int) -> dict[str, dict[str, float]]:
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
        self._thread.join(5)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def rusage() -> dict[str, float]:
    """CPU seconds of the bench itself and of its reaped children (the load generator runs)."""
    c, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return {"children": c.ru_utime + c.ru_stime, "self": me.ru_utime + me.ru_stime}


def machine(t0: Any, t1: Any, ours: dict[str, float] | None = None) -> dict[str, Any]:
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
