"""What every child process of the supervisor (uploader, listener) does first."""

from __future__ import annotations

import multiprocessing
import os
import signal

from .config import LogConfig
from .logs import setup_logging


def setup_child(log: LogConfig, role: str) -> int:
    """Ignore Ctrl-C (it reaches the whole process group; the supervisor decides), set up
    logging, and return the supervisor's pid, to notice when this process is orphaned.

    SIGINT arrives blocked (the supervisor blocks it around the spawn), so one sent while this
    process was importing is dropped here instead of killing it. The pid is the one recorded
    at spawn: os.getppid() now would already be 1 if the supervisor died during the import.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    setup_logging(log, process=role)
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()
