"""Configuration: one frozen dataclass per TOML table, a default for every key, strict loading.

`load(path)` reads TOML with `tomllib` and refuses unknown tables, unknown keys and bad values
with a `ConfigError` that names the file and the key (as waitress' `adjustments.py` does with its
one table of settings). Each field carries a one-line `help` used by `check-config` and the README.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError

Check = Callable[[Any], str | None]  # returns an error message, or None when the value is fine


def _opt(default: Any, help: str, check: Check | None = None) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or greater"


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def _listen(v: Any) -> str | None:
    try:
        parse_listen(v)
    except ValueError as e:
        return str(e)
    return None


def _gzip_level(v: Any) -> str | None:
    return None if 1 <= v <= 9 else "must be between 1 and 9"


def _zstd_level(v: Any) -> str | None:
    return None if 1 <= v <= 19 else "must be between 1 and 19"


def _key_template(v: Any) -> str | None:
    from .partitions import KeyTemplate

    try:
        KeyTemplate.parse(v)
    except ValueError as e:
        return str(e)
    return None


PARQUET_TYPES = ("string", "int64", "double", "bool", "timestamp")


def _parquet_columns(v: Any) -> str | None:
    for name, kind in v:
        if name in ("received_at", "version", "payload"):
            return f"{name!r} is one of the lossless columns (received_at, version, payload)"
        if not name:
            return "a column needs a name"
        if kind not in PARQUET_TYPES:
            return f"column {name!r}: type must be one of " + ", ".join(PARQUET_TYPES)
    return None


DECODED_CAP = 256 * 1024 * 1024
HTTP_SERVERS = ("waitress", "uvloop")
FAST_FRONT_PACKAGES = ("uvloop", "httptools")  # the `fast` extra


def parse_listen(value: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port") into its parts; port 0 asks the kernel for a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class HttpConfig:
    listen: str = _opt("127.0.0.1:8080", "address and port to listen on (port 0: any free port)", _listen)
    max_body_bytes: int = _opt(1048576, "largest request body accepted, as sent (before gzip decoding)", _positive)
    max_decoded_bytes: int = _opt(
        0, "largest request body after gzip decoding, enforced while decoding; 0: 2 x max_body_bytes", _non_negative
    )
    max_payloads: int = _opt(10000, "most payloads accepted in one request", _positive)
    max_json_values: int = _opt(
        120000, "most JSON values in one body, counted before parsing as its commas, '[' and '{' (those inside "
        "strings too); a body with integers beyond 64 bits counts 4 times", _positive)
    max_decode_ratio: int = _opt(
        100, "a gzip body may decode to at most this many times its size, beyond its first MiB; 0: no ratio limit",
        _non_negative)
    max_payload_bytes: int = _opt(1048576, "largest payload as stored (its JSON, without the envelope)", _positive)
    max_version_bytes: int = _opt(256, "longest \"version\" string, in UTF-8 bytes (it is stored on every line)",
                                  _positive)
    threads: int = _opt(4, "worker threads per listener that run the request handler (server = uvloop: only for "
                           "encoded or large bodies, journal_fsync = always and paths other than ingest)", _positive)
    listeners: int = _opt(2, "listener processes serving HTTP on the listen port (SO_REUSEPORT)", _positive)
    connection_limit: int = _opt(1000, "most open client connections; more wait in the listen backlog", _positive)
    channel_timeout_s: int = _opt(30, "close a client connection idle this long between requests", _positive)
    request_timeout_s: int = _opt(30, "from a request's first byte to its last: a request not whole by then is cut "
                                      "(the connection closed)", _positive)
    keepalive_requests: int = _opt(1000, "close a client connection after this many requests (it reconnects: new "
                                         "connections spread over the listeners)", _positive)
    keepalive_time_s: int = _opt(60, "close a client connection after this many seconds, at its next answer",
                                 _positive)
    health_detail: bool = _opt(True, "false: /health and /metrics leave out pids, RSS and CPU of the processes")
    server: str = _opt("waitress", "the HTTP front: waitress | uvloop (ingestd's own front on uvloop and httptools, "
                                   "faster; needs the extra: pip install 'ingestd[fast]')", _one_of(*HTTP_SERVERS))
    retry_after_s: int = _opt(1, "value of Retry-After on 503 answers", _positive)

    def __post_init__(self) -> None:
        if self.max_decoded_bytes == 0:  # derived default: a few times the raw limit, far below 1 GiB
            derived = min(2 * self.max_body_bytes, max(DECODED_CAP, self.max_body_bytes))
            object.__setattr__(self, "max_decoded_bytes", derived)


TENANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_TENANT = "default"


def _tenant_name(v: Any) -> str | None:
    return None if TENANT_NAME.fullmatch(v) else "must match [A-Za-z0-9_-]{1,64}"


@dataclass(frozen=True)
class TenantConfig:
    name: str = _opt("", "tenant name, [A-Za-z0-9_-]{1,64}; `default` adds to `auth.tokens`", _tenant_name)
    tokens: tuple[str, ...] = _opt((), "bearer tokens of this tenant")
    max_payloads_per_s: int = _opt(0, "payloads per second this tenant may send to this host; 0: unlimited; "
                                      "beyond it: 429 + Retry-After", _non_negative)


@dataclass(frozen=True)
class AuthConfig:
    tokens: tuple[str, ...] = _opt((), "bearer tokens of the tenant `default`; auth is on once any token exists")
    tokens_file: str = _opt("", "file with one bearer token per line (# comments), added to `tokens`; "
                                "unreadable or without a token: refused")
    tenants: tuple[TenantConfig, ...] = _opt((), "[[auth.tenants]] tables: name, tokens, max_payloads_per_s")


@dataclass(frozen=True)
class Tenant:
    name: str
    max_payloads_per_s: int  # 0: unlimited


@dataclass(frozen=True)
class Tenancy:
    """Who may send: every token mapped to its tenant (index into `tenants`, 0 is `default`).
    Resolved once, when the config is loaded (the tokens file is read then), so every process
    of the daemon holds the same tokens."""

    tenants: tuple[Tenant, ...] = (Tenant(DEFAULT_TENANT, 0),)
    tokens: tuple[tuple[str, int], ...] = ()

    @property
    def auth_on(self) -> bool:
        return bool(self.tokens)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tenants)


@dataclass(frozen=True)
class QueueConfig:
    max_items: int = _opt(10000, "bound of the shared queue, in requests (one reference per request)", _positive)
    max_bytes: int = _opt(268435456, "bound of what is accepted and not yet landed: bytes of the request logs", _positive)


@dataclass(frozen=True)
class WorkersConfig:
    count: int = _opt(2, "uploader processes", _positive)
    heartbeat_timeout_s: float = _opt(60.0, "a child process (uploader, listener) silent this long is killed and replaced",
                                      _positive)
    restart_backoff_max_s: float = _opt(30.0, "longest wait between restarts of a crashing child process", _positive)
    boot_failures_fatal: int = _opt(5, "consecutive boot failures of a child process that stop the daemon", _positive)


@dataclass(frozen=True)
class BatchConfig:
    max_payloads: int = _opt(1000, "most payloads in one stored object (1000: at most ~1,000 PUTs per million payloads)", _positive)
    max_bytes: int = _opt(8388608, "largest uncompressed object body, envelopes included", _positive)
    max_age_ms: int = _opt(1000, "longest a received payload waits before its object is written", _positive)
    compression: str = _opt("gzip", "object compression: gzip | zstd | none (parquet: its column codec)",
                            _one_of("gzip", "zstd", "none"))
    gzip_level: int = _opt(6, "gzip level, 1 (fastest) to 9 (smallest)", _gzip_level)
    zstd_level: int = _opt(3, "zstd level, 1 (fastest) to 19 (smallest)", _zstd_level)
    format: str = _opt("ndjson", "object format: ndjson | parquet (needs the extra: pip install 'ingestd[parquet]')",
                       _one_of("ndjson", "parquet"))
    parquet_columns: tuple[tuple[str, str], ...] = _opt(
        (), "typed Parquet columns from top-level payload fields, e.g. { device_id = \"string\", seq = \"int64\" }; "
        "types: string | int64 | double | bool | timestamp", _parquet_columns)
    max_partitions: int = _opt(1000, "most partitions (key folders) with an object open at once per uploader; "
                                     "payloads of more go to the _overflow partition", _positive)
    target_object_bytes: int = _opt(0, "aim for objects of this stored (compressed) size, within max_payloads and "
                                       "max_bytes; 0: objects are bounded by those two alone", _non_negative)


@dataclass(frozen=True)
class SinkConfig:
    kind: str = _opt("directory", "where objects go: directory | s3", _one_of("directory", "s3"))
    path: str = _opt("./data/objects", "directory sink: root folder of the objects")
    fsync: bool = _opt(True, "directory sink: fsync each object before it is renamed into place")
    key_template: str = _opt("{prefix}/dt={date}/hour={hour}", "folder part of object keys: {prefix}, {date}, "
                             "{hour} (UTC, from each payload's received_at), {tenant}, {payload.NAME}", _key_template)
    prefix: str = _opt("", "value of {prefix} in key_template (no leading or trailing slash needed)")
    bucket: str = _opt("", "s3 sink: bucket name")
    region: str = _opt("", "s3 sink: region; empty: from the AWS environment")
    endpoint_url: str = _opt("", "s3 sink: endpoint of an S3-compatible store; empty: AWS")
    connect_timeout_s: float = _opt(5.0, "s3 sink: connection timeout of one attempt", _positive)
    read_timeout_s: float = _opt(30.0, "s3 sink: read timeout of one attempt", _positive)
    retry_base_ms: int = _opt(100, "first retry delay after a retryable sink error", _positive)
    retry_max_ms: int = _opt(30000, "longest retry delay (exponential backoff with full jitter)", _positive)


@dataclass(frozen=True)
class SpoolConfig:
    path: str = _opt("./data/spool", "dead letters, drain overflow, locks; with durability = disk also the logs")
    durability: str = _opt("memory", "what a 202 survives: memory (any process death) | disk (also power loss)",
                           _one_of("memory", "disk"))
    memory_path: str = _opt("", "memory durability: tmpfs folder for logs and journals; empty: /dev/shm/ingestd-<hash of path>")
    journal_fsync: str = _opt("interval", "disk durability: fdatasync always (before each 202) | interval | never",
                              _one_of("always", "interval", "never"))
    journal_fsync_interval_ms: int = _opt(1000, "disk durability, interval policy: longest time between fdatasyncs", _positive)
    segment_bytes: int = _opt(4194304, "size at which a listener starts a new log segment (also after 1 s)", _positive)
    max_bytes: int = _opt(1073741824, "cap on every file under spool.path; at the cap new requests get 503", _positive)

    @property
    def on_disk(self) -> bool:
        return self.durability == "disk"

    def logs_root(self) -> str:
        """Where request logs and uploader journals live."""
        if self.on_disk:
            return self.path
        if self.memory_path:
            return self.memory_path
        digest = hashlib.sha1(os.path.abspath(self.path).encode()).hexdigest()[:16]
        return f"/dev/shm/ingestd-{digest}"


@dataclass(frozen=True)
class ShutdownConfig:
    lame_duck_s: float = _opt(0.0, "on SIGTERM, first this long still accepting while /health/ready answers 503, so "
                                   "a load balancer takes the host out before it drains (a second SIGTERM: at once)",
                              _non_negative)
    drain_timeout_s: float = _opt(30.0, "on SIGTERM, time to deliver what is logged; the rest stays in the spool for the next start", _non_negative)


@dataclass(frozen=True)
class LogConfig:
    level: str = _opt("info", "debug | info | warning | error", _one_of("debug", "info", "warning", "error"))
    format: str = _opt("text", "text | json (one JSON object per line)", _one_of("text", "json"))


@dataclass(frozen=True)
class Config:
    http: HttpConfig = field(default_factory=HttpConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<defaults>"  # the file this config was read from
    tenancy: Tenancy = field(default_factory=Tenancy)  # resolved from [auth] at load, not a table


_NOT_TABLES = frozenset({"source", "tenancy"})


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check a TOML value against a field's type; ints are welcome where floats are asked."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint == tuple[tuple[str, str], ...]:  # an inline table of strings
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        value = tuple(value.items()) if ok else value
        if not ok:
            raise ConfigError(f"{where}: expected a table of strings, e.g. {{ name = \"string\" }}, got {value!r}")
    elif hint == tuple[TenantConfig, ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{where}: expected [[{where.strip('[]').replace('].', '.')}]] tables, got {value!r}")
        return tuple(_build_table(TenantConfig, v, f"{where}[{i}]") for i, v in enumerate(value))
    else:  # tuple[str, ...]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        name = "list of strings" if hint not in (bool, int, float, str) else hint.__name__
        raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")
    return value


def _build_table(cls: type, table: Mapping[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in table.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        value = _convert(raw, hints[key], f"{where}.{key}")
        check = known[key].metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{where}.{key}: {problem} (got {value!r})")
        values[key] = value
    return cls(**values)


def from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> Config:
    """Build a Config from parsed TOML; errors read like "FILE: [table].key: problem"."""
    tables = {f.name: f for f in dataclasses.fields(Config) if f.name not in _NOT_TABLES}
    hints = get_type_hints(Config)
    built: dict[str, Any] = {}
    try:
        for name, table in data.items():
            if name not in tables:
                raise ConfigError(f"[{name}]: unknown table (known: {', '.join(sorted(tables))})")
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: expected a table, got {type(table).__name__}")
            built[name] = _build_table(hints[name], table, f"[{name}]")
        config = Config(**built, source=source)
        _cross_check(config)
        config = dataclasses.replace(config, tenancy=resolve_tenancy(config.auth))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def _cross_check(config: Config) -> None:
    if config.sink.kind == "s3" and not config.sink.bucket:
        raise ConfigError("[sink].bucket: required when [sink].kind = \"s3\"")
    if config.batch.format == "parquet":
        from .formats import parquet_available

        if not parquet_available():
            raise ConfigError("[batch].format: \"parquet\" needs pyarrow, which is not installed: "
                              "pip install 'ingestd[parquet]'")
    elif config.batch.parquet_columns:
        raise ConfigError("[batch].parquet_columns: set, but [batch].format is not \"parquet\"")
    if config.http.server == "uvloop":
        missing = [name for name in FAST_FRONT_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"[http].server: \"uvloop\" needs {' and '.join(missing)}, not installed: "
                              "pip install 'ingestd[fast]'")
    if config.http.max_decoded_bytes < config.http.max_body_bytes:
        raise ConfigError("[http].max_decoded_bytes: must be at least [http].max_body_bytes")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and check a config file; relative paths inside it stay relative to the working dir."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return from_mapping(data, str(p))


def _check_token(token: str, where: str) -> None:
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"{where}: a token is empty or holds white space")
    if not token.isprintable() or not token.isascii():
        raise ConfigError(f"{where}: a token holds a character that cannot be sent in an HTTP header")


def read_tokens_file(path: str) -> tuple[str, ...]:
    """One token per line; blank lines and # comments skipped; the rest must be one clean token."""
    where = f"[auth].tokens_file {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot be read ({e})") from None
    tokens = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith("#"):
            _check_token(text, f"{where} line {n}")
            tokens.append(text)
    if not tokens:
        raise ConfigError(f"{where}: holds no token (auth fails closed: remove the key to run without auth)")
    return tuple(tokens)


def resolve_tenancy(auth: AuthConfig) -> Tenancy:
    """Every token with its tenant; a token listed twice anywhere refuses the config."""
    default_rate = 0
    names: list[str] = [DEFAULT_TENANT]
    owned: dict[str, int] = {}

    def own(token: str, tenant: int, where: str) -> None:
        _check_token(token, where)
        if token in owned:
            raise ConfigError(f"{where}: a token is listed twice (also in tenant {names[owned[token]]!r})")
        owned[token] = tenant

    for token in auth.tokens:
        own(token, 0, "[auth].tokens")
    if auth.tokens_file:
        for token in read_tokens_file(auth.tokens_file):
            own(token, 0, f"[auth].tokens_file {auth.tokens_file!r}")
    rates = {}
    for i, t in enumerate(auth.tenants):
        where = f"[auth].tenants[{i}] ({t.name!r})"
        if not t.name:
            raise ConfigError(f"[auth].tenants[{i}].name: required")
        if t.name == DEFAULT_TENANT:
            index = 0
            default_rate = t.max_payloads_per_s
        elif t.name in names:
            raise ConfigError(f"{where}: a second tenant of that name")
        else:
            index = len(names)
            names.append(t.name)
            rates[t.name] = t.max_payloads_per_s
        if not t.tokens:
            raise ConfigError(f"{where}.tokens: a tenant needs at least one token")
        for token in t.tokens:
            own(token, index, f"{where}.tokens")
    tenants = (Tenant(DEFAULT_TENANT, default_rate),) + tuple(Tenant(n, rates[n]) for n in names[1:])
    return Tenancy(tenants, tuple(owned.items()))


def describe(config: Config) -> str:
    """The effective config as TOML, each key with its help text, for `check-config`."""
    lines = [f"# effective config of {config.source}"]
    for table in dataclasses.fields(Config):
        if table.name in _NOT_TABLES:
            continue
        lines.append(f"\n[{table.name}]")
        section = getattr(config, table.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            text = "{}" if f.name == "parquet_columns" and not value else _toml_value(value)
            lines.append(f"{f.name} = {text}  # {f.metadata['help']}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        # JSON's string escapes are TOML's basic-string escapes; DEL must be escaped in TOML too
        return json.dumps(v).replace("\x7f", "\\u007f")
    if isinstance(v, TenantConfig):  # an inline table, its tokens redacted like the flat ones
        return "{ " + ", ".join(f"{f.name} = {_toml_value(getattr(v, f.name))}" for f in dataclasses.fields(v)) + " }"
    if isinstance(v, tuple):
        if v and isinstance(v[0], tuple):  # parquet_columns: an inline table
            return "{ " + ", ".join(f"{_toml_value(k)} = {_toml_value(t)}" for k, t in v) + " }"
        if v and isinstance(v[0], TenantConfig):
            return "[" + ", ".join(_toml_value(t) for t in v) + "]"
        return "[" + ", ".join('"<redacted>"' for _ in v) + "]"
    return repr(v)


def reference_rows() -> list[tuple[str, str, str]]:
    """(key, default, help) for every key: the source of the README's config reference."""
    rows = []
    for table in dataclasses.fields(Config):
        if table.name in _NOT_TABLES:
            continue
        for f in dataclasses.fields(get_type_hints(Config)[table.name]):
            empty = "{}" if f.name == "parquet_columns" else "[]"
            rows.append((f"{table.name}.{f.name}", _toml_value(f.default) if f.default != () else empty, f.metadata["help"]))
            if f.name == "tenants":
                for t in dataclasses.fields(TenantConfig):
                    rows.append((f"{table.name}.tenants[].{t.name}", _toml_value(t.default) if t.default != () else "[]",
                                 t.metadata["help"]))
    return rows
