"""What every child process of the supervisor (listener, uploader) does first.

- It dies with the supervisor: PR_SET_PDEATHSIG asks the kernel for a SIGKILL when the parent
  goes, so a killed supervisor never leaves children serving or uploading on their own. Nothing
  is lost by that: everything acknowledged is in the logs and journals, and the next start
  delivers it. (The parent's pid is checked once after the prctl, for a parent that died
  before it.)
- It ignores SIGINT and SIGTERM: a Ctrl-C or a `kill` of the whole process group reaches every
  process, and the supervisor alone decides what happens (a drain).
- It holds `locks/<role>-<index>.lock` in the spool for its whole life, so that a new daemon
  can wait until every child of an earlier one is gone before it starts its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys

from .config import LogConfig
from .errors import CHILD_EXIT_BOOT_FAILED
from .logs import setup_logging
from .spool import Lock

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
LOCK_WAIT_S = 30.0


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the ppid checks of the main loops remain
        pass


def setup_child(log_config: LogConfig, role: str, lock: Lock) -> int:
    """Returns the supervisor's pid (the one recorded at spawn: os.getppid() may already be 1)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    die_with_parent()
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid else os.getppid()
    if os.getppid() != parent_pid:
        os._exit(1)  # the supervisor died before the prctl took effect
    setup_logging(log_config, process=role)
    if not lock.acquire(LOCK_WAIT_S):
        log.critical("%s: %s is held by another process", role, lock.path)
        sys.exit(CHILD_EXIT_BOOT_FAILED)
    return parent_pid
