"""States of a child process as the supervisor sees it, and the moves allowed between them.

Imports nothing (supervisor's `states.py`). `Child.transition` refuses any move not listed
here, so a wrong move is a loud bug instead of a silent one.
"""

from __future__ import annotations

import enum


class ChildState(enum.Enum):
    STOPPED = "stopped"  # never started
    STARTING = "starting"  # spawned, not yet booted (listener serving / uploader's sink built)
    RUNNING = "running"
    BACKOFF = "backoff"  # died; waiting before the next start
    STOPPING = "stopping"  # asked to finish (drain) or killed at the drain deadline
    EXITED = "exited"  # gone for good, as asked
    FATAL = "fatal"  # could not boot, too many times in a row: not restarted again


S = ChildState
ALLOWED: dict[ChildState, frozenset[ChildState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.FATAL, S.STOPPING, S.EXITED}),
    S.RUNNING: frozenset({S.BACKOFF, S.STOPPING, S.EXITED}),
    S.BACKOFF: frozenset({S.STARTING, S.EXITED}),
    S.STOPPING: frozenset({S.EXITED, S.BACKOFF, S.FATAL}),
    S.EXITED: frozenset(),
    S.FATAL: frozenset(),
}
LIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING})
