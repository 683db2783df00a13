"""systemd fit: the unit verifies, and the daemon speaks sd_notify on a real NOTIFY_SOCKET."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_unit_file_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing; .ci/run installs it")
        pytest.skip("systemd-analyze not installed")
    unit = (ROOT / "systemd" / "ingestd.service").read_text()
    exe = Path(sys.executable).with_name("ingestd")
    assert "ExecStart=/opt/ingestd/venv/bin/ingestd --config /etc/ingestd/config.toml" in unit
    # verify checks that ExecStart exists: point it at this environment's console script
    local = tmp_path / "ingestd.service"
    local.write_text(unit.replace("/opt/ingestd/venv/bin/ingestd", str(exe)))
    proc = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ingestd.service:" not in proc.stderr, proc.stderr  # no warning about our unit's lines
    for needed in ("Type=notify", "KillMode=mixed", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "StateDirectory=ingestd",
                   "LimitNOFILE=", "User=ingestd", "RuntimeDirectory=ingestd", "RuntimeDirectoryPreserve=yes"):
        assert needed in unit, needed


def _stop_timeout(unit: str) -> int:
    return int(next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("TimeoutStopSec=")))


def test_stop_timeout_outlasts_drain():
    unit = (ROOT / "systemd" / "ingestd.service").read_text()
    from ingestd.config import load

    drain = load(ROOT / "config.toml").shutdown.drain_timeout_s
    assert _stop_timeout(unit) > drain + 2  # the SPEC: exit within drain_timeout_s + 2 s


def test_sd_notify_ready_watchdog_stopping(daemon_factory, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    messages: list[str] = []

    def drain_socket() -> None:
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            pass

    try:
        d = daemon_factory(env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}).start(ready=False)

        def seen(prefix: str) -> bool:
            drain_socket()
            return any(line.startswith(prefix) for m in messages for line in m.split("\n"))

        wait_for(lambda: seen("READY=1"), 30, "READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert f"MAINPID={d.proc.pid}" in ready
        assert "STATUS=" in ready
        # the listener is bound and the uploaders are up by the time READY=1 is sent
        health = d.health()
        assert all(w["alive"] for w in health["workers"])
        before = sum(m.count("WATCHDOG=1") for m in messages)
        wait_for(lambda: seen("WATCHDOG=1") and sum(m.count("WATCHDOG=1") for m in messages) >= before + 2,
                 10, "two watchdog pings")
        d.signal(signal.SIGTERM)
        wait_for(lambda: seen("STOPPING=1"), 15, "STOPPING=1")
        assert d.wait(30) == 0
    finally:
        sock.close()
