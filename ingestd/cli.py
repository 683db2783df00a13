"""Command line: `ingestd --config FILE`, `ingestd check-config`, `ingestd replay`, `ingestd athena-ddl`,
`--version`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import Config, describe, load
from .errors import EXIT_CONFIG, ConfigError
from .logs import setup_logging

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "config.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingestd", description="HTTP ingestion daemon: JSON telemetry to S3 in batches.")
    p.add_argument("--version", action="version", version=f"ingestd {__version__}")
    p.add_argument("--config", default=None, help=f"config file (default: {DEFAULT_CONFIG} if it exists, else built-in defaults)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("run", help="run the daemon in the foreground (the default)")
    sub.add_parser("check-config", help="validate the config file and print the effective config")
    sub.add_parser("replay", help="deliver what sits in the spool (dead letters; with the daemon stopped, also the logs)")
    ddl = sub.add_parser("athena-ddl", help="print the Athena CREATE EXTERNAL TABLE for the configured layout and format")
    ddl.add_argument("--table", default="ingestd_events", help="table name (default: ingestd_events)")
    ddl.add_argument("--location", default="", help="s3://bucket the keys start in (default: s3://<sink.bucket>)")
    ddl.add_argument("--since", default="", help="first date of the date projection, YYYY-MM-DD (default: today, UTC)")
    for sp in sub.choices.values():
        sp.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    return p


def _load(path: str | None) -> Config:
    if path is None:
        return load(DEFAULT_CONFIG) if os.path.exists(DEFAULT_CONFIG) else Config()
    return load(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _load(args.config)
    except ConfigError as e:
        print(f"ingestd: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    command = args.command or "run"
    if command == "check-config":
        sys.stdout.write(describe(config))
        return 0
    if command == "athena-ddl":
        from .athena import athena_ddl

        sys.stdout.write(athena_ddl(config, args.table, args.location, args.since))
        return 0
    setup_logging(config.log)
    if command == "replay":
        from .replay import replay

        return replay(config)
    from .supervisor import Supervisor

    return Supervisor(config).run()
