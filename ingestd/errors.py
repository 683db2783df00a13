"""The project's exceptions and process exit codes, in one flat module that imports nothing."""

from __future__ import annotations

# Exit codes of the `ingestd` process. systemd's Restart=on-failure restarts on any non-zero
# code; operators tell the causes apart by the number.
EXIT_OK = 0
EXIT_CONFIG = 2  # the config file is missing or refused
EXIT_STARTUP = 3  # cannot listen, the spool is locked by another daemon, or its children are still alive
EXIT_CHILD_BOOT = 4  # a child (uploader, listener) cannot even start: restarting it would only loop

# Exit code of a child process that failed while booting (building its sink, taking its lock,
# recovering its files): the supervisor stops respawning after this instead of a restart storm.
CHILD_EXIT_BOOT_FAILED = 3


class IngestdError(Exception):
    """Base of every error ingestd raises on purpose."""


class ConfigError(IngestdError):
    """A config file that cannot be used; the message names the file and the key."""


class SpoolLockedError(IngestdError):
    """Another process holds the spool directory."""


class SinkError(IngestdError):
    """An upload failed."""


class RetryableSinkError(SinkError):
    """The sink may accept the same object later: 5xx, throttling, timeouts, refused connections."""


class UncertainSinkError(RetryableSinkError):
    """A refusal the sink gives no known meaning to (an S3 4xx code ingestd does not know): retried
    like any other, but only `delivery.UNCERTAIN_ATTEMPTS` times for one object, then the object is
    dead-lettered with this error as its reason."""


class PermanentSinkError(SinkError):
    """The sink will never accept this object as configured: access denied, no such bucket."""
