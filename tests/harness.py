"""Test harness shared by the integration tests: real ingestd processes, moto's S3 server, readers.

Conventions (STYLE.md, 8 and 9): bind port 0 and read the bound port from the daemon's log,
poll readiness against a deadline (never a fixed sleep), always kill the process group in
`finally`, and reach S3 over real HTTP through moto's ThreadedMotoServer.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import requests

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
LISTEN_RE = re.compile(rb"listening on http://([^:]+):(\d+)")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):  # an inline table (e.g. one of [[auth.tenants]])
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in value) + "]"
    return repr(value)


def toml_dump(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        for key, value in table.items():
            out.append(f"{key} = {toml_value(value)}")
        out.append("")
    return "\n".join(out)


def merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in (extra or {}).items():
        out.setdefault(k, {}).update(v)
    return out


class Daemon:
    """One real `ingestd` process in its own process group."""

    def __init__(self, workdir: Path, tables: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
                 wrap: list[str] | None = None) -> None:
        self.workdir = workdir
        self.wrap = wrap or []  # a command the daemon runs under (e.g. setpriv, to drop capabilities)
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(toml_dump(tables))
        self.log_path = workdir / f"ingestd-{time.monotonic_ns()}.log"
        self.env = {**os.environ, **AWS_ENV, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, ready: bool = True) -> Daemon:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "ingestd", "--config", str(self.config_path)],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

        def bound() -> int | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"ingestd exited with {self.proc.returncode}:\n{self.log()}")
            m = LISTEN_RE.search(self.log_path.read_bytes())
            return int(m.group(2)) if m else None

        self.port = wait_for(bound, timeout, "ingestd to listen")
        if ready:
            wait_for(self.is_ready, timeout, "ingestd to become ready")
        return self

    def is_ready(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def health(self) -> dict[str, Any]:
        return requests.get(self.url + "/health", timeout=5).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill_group(self) -> None:
        """SIGKILL the whole process group (supervisor and uploaders)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def wait_uploaders_running(self, timeout: float = 30.0) -> None:
        """Until every uploader has booted (its sink built), not only been spawned."""
        wait_for(lambda: all(w["state"] == "running" for w in self.health()["workers"]), timeout,
                 "every uploader to boot")

    def uploader_pids(self) -> list[int]:
        return [w["pid"] for w in self.health()["workers"] if w["alive"]]


def post(url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> requests.Response:
    data = orjson.dumps(body) if isinstance(body, dict) else body
    h = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(url + "/v1/payloads", data=data, headers=h, timeout=timeout)


def parse_object(body: bytes, key: str) -> list[dict[str, Any]]:
    """The envelope lines of a stored object, whatever its format (Parquet read with pyarrow)."""
    if key.endswith(".parquet"):
        return parquet_envelopes(body)
    body = decoded_body(body, key)
    return [orjson.loads(line) for line in body.splitlines() if line]


def parquet_rows(body: bytes) -> list[dict[str, Any]]:
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(body)).to_pylist()  # type: ignore[no-any-return]


def parquet_envelopes(body: bytes) -> list[dict[str, Any]]:
    """Parquet rows as the NDJSON envelope they hold: received_at back to its RFC 3339 text."""
    out = []
    for row in parquet_rows(body):
        t = row["received_at"]
        stamp = t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
        out.append({"received_at": stamp, "version": row["version"], "payload": orjson.loads(row["payload"])})
    return out


def read_directory_sink(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every finished object under `root`: key -> envelope lines."""
    out = {}
    for path in sorted([*root.rglob("*.ndjson*"), *root.rglob("*.parquet")]):
        if path.name.startswith("."):
            continue
        key = path.relative_to(root).as_posix()
        out[key] = parse_object(path.read_bytes(), key)
    return out


def read_bucket(client: Any, bucket: str, prefix: str = "") -> dict[str, list[dict[str, Any]]]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = parse_object(body, obj["Key"])
    return out


def payload_ids(objects: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The `id` of every stored payload, in storage order (duplicates kept)."""
    return [line["payload"]["id"] for lines in objects.values() for line in lines]


def iter_ids(prefix: str, n: int) -> Iterator[str]:
    return (f"{prefix}-{i}" for i in range(n))


# -- added for the pipeline and HTTP-error tests ---------------------------------------------------

RECEIVED_AT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def ingestd_command() -> list[str]:
    """The installed `ingestd` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("ingestd")
    assert script.exists(), f"no ingestd console script next to {sys.executable}"
    return [str(script)]


def decoded_body(body: bytes, key: str) -> bytes:
    if key.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompress(body)
    return gzip.decompress(body) if key.endswith(".gz") else body


def read_directory_raw(root: Path) -> dict[str, bytes]:
    """Every finished object under `root`: key -> uncompressed body."""
    out = {}
    for path in sorted(root.rglob("*.ndjson*")):
        if path.name.startswith("."):
            continue
        key = path.relative_to(root).as_posix()
        out[key] = decoded_body(path.read_bytes(), key)
    return out


def read_bucket_raw(client: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object of `bucket`: key -> uncompressed body."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = decoded_body(body, obj["Key"])
    return out


def hidden_files(root: Path) -> list[Path]:
    """Dot files and *.tmp files anywhere under `root` (leftovers of unfinished writes)."""
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if p.is_file() and (p.name.startswith(".") or p.name.endswith(".tmp"))]


def logs_root(workdir: Path) -> Path:
    """Where the daemon of `workdir` keeps its request logs and journals (from its config)."""
    import tomllib

    from ingestd.config import from_mapping

    config = from_mapping(tomllib.loads((workdir / "config.toml").read_text()))
    return Path(config.spool.logs_root())


def logged_lines(root: Path) -> list[dict[str, Any]]:
    """Envelope lines still held in the request logs under `root` (a logs root, or an overflow
    copy of one): every logged payload line that is neither cancelled nor recorded as landed.
    Read-only, with the daemon's own framing."""
    from ingestd.records import Kind, parse_request, scan, slice_lines
    from ingestd.requestlog import Segment, uncovered_ranges

    out: list[dict[str, Any]] = []
    for path in sorted((root / "logs").glob("*/*.log")):
        seg = Segment(0, 0, path)
        seg.refresh_landed()
        landed: dict[int, list[tuple[int, int]]] = {}
        for (offset, first), count in seg.landed.items():
            landed.setdefault(offset, []).append((first, count))
        records = scan(path.read_bytes()).records
        cancelled = {int.from_bytes(r.body[:4], "little") for r in records if r.kind is Kind.CANCEL}
        for rec in records:
            if rec.kind is not Kind.REQUEST or rec.offset in cancelled:
                continue
            request = parse_request(rec.body, rec.flags)
            for first, count in uncovered_ranges(request.count, landed.get(rec.offset, [])):
                out += [orjson.loads(ln) for ln in slice_lines(request.lines, first, count).splitlines()]
    return out


def dead_lines(spool_root: Path) -> list[dict[str, Any]]:
    """Envelope lines of every dead letter under the spool."""
    from ingestd.config import SpoolConfig
    from ingestd.spool import Spool

    spool = Spool(SpoolConfig(path=str(spool_root)))
    out: list[dict[str, Any]] = []
    for path in spool.dead_letters():
        found = spool.read_dead_letter(path)
        assert found is not None, f"{path} is damaged"
        meta, body = found
        lines = [orjson.loads(ln) for ln in body.splitlines() if ln]
        assert len(lines) == meta["count"], f"{path}: says {meta['count']} payloads, holds {len(lines)}"
        out += lines
    return out


def spool_lines(workdir: Path) -> list[dict[str, Any]]:
    """Everything the daemon of `workdir` holds and has not landed: its logs (with a drain's
    overflow copy) and its dead letters."""
    spool_root = workdir / "spool"
    return logged_lines(logs_root(workdir)) + logged_lines(spool_root / "overflow") + dead_lines(spool_root)


class StalledServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: a sink that hangs.

    Connections are held open until `close()` so the client sees a read timeout, not a reset.
    """

    def __init__(self) -> None:
        import socket
        import threading

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.accepted = 0
        self._held: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stalled-sink", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)
            self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._sock.close()

    def __enter__(self) -> StalledServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FailingS3Server:
    """An HTTP server on 127.0.0.1 that answers every request with 503 SlowDown, S3 style.

    `requests` counts what reached it: each is one upload attempt as the store sees it.
    """

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self) -> None:
        import http.server
        import threading

        outer = self
        self.requests = 0
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_expect_100(self) -> bool:
                return True  # answer at once, without asking for the body

            def do_PUT(self) -> None:
                with outer._lock:
                    outer.requests += 1
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(outer.BODY)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(outer.BODY)
                self.close_connection = True

            do_GET = do_POST = do_HEAD = do_PUT

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="failing-s3", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FailingS3Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
