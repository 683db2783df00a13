"""Small helpers every part of scripts/cluster uses: polling against a deadline, running a
command and the one error that means "this machine cannot run a cluster"."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_UNAVAILABLE = 77  # not root, no network namespaces, no HAProxy: the run was not attempted


class Unavailable(Exception):
    """A prerequisite is missing (root, `ip netns`, HAProxy); the message says which."""


class TimedOut(Exception):
    """Something polled for did not happen before its deadline."""


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; raise TimedOut naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimedOut(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run(cmd: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a short system command (ip, haproxy -c) and capture its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc
