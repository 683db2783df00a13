"""`ingestd replay`: upload what sits in the spool, remove what landed. Safe to run twice."""

from __future__ import annotations

import logging

from .config import Config

log = logging.getLogger(__name__)


def replay(config: Config) -> int:
    log.error("replay is not implemented yet")
    return 1
