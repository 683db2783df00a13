"""States of an uploader slot, as the supervisor sees it. Imports nothing (supervisor's `states.py`)."""

from __future__ import annotations

import enum


class SlotState(enum.Enum):
    STARTING = "starting"  # spawned, not yet booted (sink built, in-flight spool loaded)
    RUNNING = "running"
    BACKOFF = "backoff"  # died; waiting before the next start
    STOPPING = "stopping"  # told to drain (STOP sentinel sent)
    EXITED = "exited"  # drained and gone
    FATAL = "fatal"  # could not boot, too many times in a row: not restarted again
