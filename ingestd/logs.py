"""Logging to stderr for journald: one line per event, plain text or JSON (`log.format`)."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from .config import LogConfig


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self.process,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(config: LogConfig, process: str = "supervisor") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        # journald adds its own timestamp; the pid and role tell the processes apart
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{process} %(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # waitress warns "Task queue depth is N" for every request that waits for a thread: under
    # load that is thousands of lines a second (the backlog shows in latency, not in the log)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
