"""Fault servers and bookkeeping for the failure-handling tests.

- `FaultProxy`: an HTTP proxy in front of moto's S3 server that forwards every request, except
  while a fault mode is on: "500" (InternalError), "503" (SlowDown), "403" (AccessDenied),
  "404" (NoSuchBucket), "400-expired" (ExpiredToken), "400-request-expired" (RequestExpired),
  "400-unknown" (WeirdNewError, a code no client knows), "409" (OperationAborted) or "hang"
  (read the request, never answer). Modes switch at run time, or for the first N requests only;
  every answer is counted by outcome, and every request is kept in `seen` (method, path,
  headers, body, outcome) so a test can check what the daemon sent.
- `RestartableMoto`: a ThreadedMotoServer on a fixed port that can be stopped (the port then
  refuses connections, and connections already open are cut) and started again on the same port.
  moto's backends are process-global, so buckets and objects survive the restart.
- The TCP server that accepts and never answers is `tests.harness.StalledServer` (the
  `stalled_sink` fixture of conftest.py), reused rather than duplicated.
- `Ledger` / `Load`: clients that post payloads with unique ids and remember what was
  acknowledged (202), refused (any other answer) or unknown (no answer); `check_delivery`
  compares that with what landed and prints `scenario: acknowledged=N landed=N duplicates=N`.

Everything binds 127.0.0.1, runs in threads of the test process and is stopped by its fixture.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import requests
from moto.server import ThreadedMotoServer

from tests.harness import AWS_ENV, wait_for

# -- the fault-injecting proxy ------------------------------------------------------------------

FAULTS: dict[str, tuple[int, str, str]] = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
    "404": (404, "NoSuchBucket", "The specified bucket does not exist"),
    "400-expired": (400, "ExpiredToken", "The provided token has expired."),
    "400-request-expired": (400, "RequestExpired", "Request has expired."),
    "400-unknown": (400, "WeirdNewError", "Something no client has heard of went wrong."),
    "409": (409, "OperationAborted",
            "A conflicting conditional operation is currently in progress against this resource. Try again."),
}
MODES = (*FAULTS, "hang")


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it, and what became of it (a FAULTS key, "hang",
    "forwarded" or "upstream_error")."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    outcome: str


HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "expect", "host", "content-length"})


class FaultProxy:
    """Forward to `upstream` (an http:// URL), or answer with the current fault."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        assert u.scheme == "http" and u.hostname and u.port, upstream
        self.upstream = (u.hostname, u.port)
        self._lock = threading.Condition()
        self._mode: str | None = None
        self._first_n = 0
        self._first_mode: str | None = None
        self._hang_generation = 0  # bumped to let hung requests go (their connection is then closed)
        self._stopped = False
        self.counts: Counter[str] = Counter()
        self.methods: Counter[str] = Counter()
        self._seen: list[Seen] = []

        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control -------------------------------------------------------------------------------
    def set_mode(self, mode: str | None) -> None:
        """None forwards everything; a mode in MODES answers every request with that fault."""
        assert mode is None or mode in MODES, mode
        with self._lock:
            self._mode = mode
            if mode != "hang":
                self._hang_generation += 1
            self._lock.notify_all()

    def fail_first(self, n: int, mode: str) -> None:
        """The next `n` requests get `mode`; then the current mode applies again."""
        assert mode in FAULTS, mode
        with self._lock:
            self._first_n, self._first_mode = n, mode

    def count(self, outcome: str) -> int:
        with self._lock:
            return self.counts[outcome]

    def seen(self, method: str | None = None) -> list[Seen]:
        """The requests received so far (of `method` only, when given), oldest first."""
        with self._lock:
            return [r for r in self._seen if method is None or r.method == method]

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- used by the handler ---------------------------------------------------------------------
    def _decide(self, method: str) -> str | None:
        with self._lock:
            self.methods[method] += 1
            if self._first_n > 0:
                self._first_n -= 1
                return self._first_mode
            return self._mode

    def _record(self, outcome: str, request: _ProxyHandler, body: bytes) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self._remember(outcome, request, body)

    def _remember(self, outcome: str, request: _ProxyHandler, body: bytes) -> None:
        """Keep the request in `seen` (the caller holds the lock)."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        self._seen.append(Seen(request.command, request.path, headers, body, outcome))

    def _hang(self, request: _ProxyHandler, body: bytes) -> None:
        """Block until the hang is lifted or the proxy stops (then the caller drops the connection)."""
        with self._lock:
            self.counts["hang"] += 1
            self._remember("hang", request, body)
            generation = self._hang_generation
            while not self._stopped and self._hang_generation == generation:
                self._lock.wait(0.5)


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 does, and "Expect: 100-continue" is honoured

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence per-request lines
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        mode = self.owner._decide(self.command)
        if mode == "hang":
            self.owner._hang(self, body)
            self.close_connection = True  # never answered: the client sees its read timeout or a close
            return
        if mode is not None:
            self._answer_fault(*FAULTS[mode])
            self.owner._record(mode, self, body)
            return
        self._forward(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def _answer_fault(self, status: int, code: str, message: str) -> None:
        extra = ""
        if code == "NoSuchBucket":
            extra = f"<BucketName>{self.path.lstrip('/').split('/')[0].split('?')[0]}</BucketName>"
        rid = uuid.uuid4().hex[:16].upper()
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"{extra}<RequestId>{rid}</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", rid)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=30)
        try:
            send_body = body if body or self.command in ("PUT", "POST") else None
            conn.request(self.command, self.path, body=send_body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reason, upstream_headers = resp.status, resp.reason, resp.getheaders()
        except OSError:
            self.owner._record("upstream_error", self, body)
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        finally:
            conn.close()
        self.owner._record("forwarded", self, body)
        self.send_response(status, reason)
        length = None
        for k, v in upstream_headers:
            if k.lower() == "content-length":
                length = v
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@pytest.fixture
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's moto server, in forward mode."""
    proxy = FaultProxy(moto_server)
    try:
        yield proxy
    finally:
        proxy.close()


# -- moto that goes away and comes back ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def port_bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class RestartableMoto:
    """A moto S3 server on one fixed port that can be stopped and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: ThreadedMotoServer | None = None
        self._conns: list[socket.socket] = []
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        assert self._server is None
        wait_for(lambda: port_bindable(self.port), timeout, f"port {self.port} to be free again")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        # ThreadedMotoServer.start() waits forever when the bind fails in its thread: bound it
        starter = threading.Thread(target=server.start, daemon=True)
        starter.start()
        starter.join(timeout)
        assert not starter.is_alive(), f"moto did not start on port {self.port}"
        # Keep the accepted sockets: werkzeug keeps serving open keep-alive connections after
        # shutdown(), and a real outage cuts them too. `_server` is moto's werkzeug server.
        wsgi = server._server
        assert wsgi is not None
        accept = wsgi.get_request

        def tracking_accept() -> tuple[socket.socket, Any]:
            conn, addr = accept()
            self._conns.append(conn)
            return conn, addr

        wsgi.get_request = tracking_accept  # type: ignore[method-assign]
        self._server = server
        self.starts += 1
        wait_for(lambda: not port_refuses(self.port), timeout, "moto to accept connections")

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()  # shutdown(); werkzeug closes the listening socket as serve_forever ends
        self._server = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conns.clear()
        wait_for(lambda: port_refuses(self.port), 10, f"port {self.port} to refuse connections")


@pytest.fixture
def restartable_moto() -> Iterator[RestartableMoto]:
    moto = RestartableMoto()
    moto.start()
    try:
        yield moto
    finally:
        moto.stop()


# -- clients that remember what was acknowledged ----------------------------------------------------

def unique_prefix(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


class Ledger:
    """Every payload id sent, sorted by the answer its request got."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acked: list[str] = []
        self.refused: list[str] = []
        self.unknown: list[str] = []  # no answer (connection error, timeout): may or may not land
        self.statuses: Counter[int] = Counter()
        self.problems: list[str] = []  # answers that break the contract (checked by the tests)

    def record(self, status: int, ids: list[str], resp: requests.Response | None = None) -> None:
        with self._lock:
            self.statuses[status] += 1
            if status == 202:
                self.acked.extend(ids)
                if resp is not None and resp.json() != {"accepted": len(ids)}:
                    self.problems.append(f"202 body {resp.text!r} for {len(ids)} payloads")
            elif status == 0:
                self.unknown.extend(ids)
            else:
                self.refused.extend(ids)
                if status == 503 and resp is not None and not resp.headers.get("Retry-After"):
                    self.problems.append("503 without Retry-After")

    def send(self, url: str, ids: list[str], pad: int = 0, session: Any = None, timeout: float = 10.0) -> int:
        body = orjson.dumps({"version": "1", "data": [{"id": x, "pad": "p" * pad} for x in ids]})
        try:
            resp = (session or requests).post(url + "/v1/payloads", data=body,
                                              headers={"Content-Type": "application/json"}, timeout=timeout)
        except requests.RequestException:
            self.record(0, ids)
            return 0
        self.record(resp.status_code, ids, resp)
        return resp.status_code

    def send_many(self, url: str, prefix: str, requests_n: int, payloads: int, pad: int = 0,
                  until: Callable[[int], bool] | None = None) -> list[int]:
        """Send requests one after another; stop early once `until(status)` is true."""
        out = []
        with requests.Session() as session:
            for r in range(requests_n):
                status = self.send(url, [f"{prefix}-r{r}-p{i}" for i in range(payloads)], pad, session)
                out.append(status)
                if until is not None and until(status):
                    break
        return out

    @property
    def acked_payloads(self) -> int:
        with self._lock:
            return len(self.acked)


class Load:
    """Client threads posting in parallel into one Ledger. By default a thread stops at its
    first no-answer; with `persist` it opens a new connection and goes on (a daemon being killed
    and restarted under it), until `stop()` or its request count."""

    def __init__(self, url: str, ledger: Ledger, prefix: str, threads: int, requests_per_thread: int,
                 payloads: int, pad: int = 0, pace_s: float = 0.0, persist: bool = False) -> None:
        self.url = url
        self.ledger = ledger
        self.persist = persist
        self._done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(f"{prefix}-t{t}", requests_per_thread, payloads,
                                                                  pad, pace_s), daemon=True)
                         for t in range(threads)]

    def _run(self, prefix: str, n: int, k: int, pad: int, pace_s: float) -> None:
        session = requests.Session()
        try:
            for r in range(n):
                if self._stop.is_set():
                    return
                status = self.ledger.send(self.url, [f"{prefix}-r{r}-p{i}" for i in range(k)], pad, session)
                with self._lock:
                    self._done += 1
                if status == 0:
                    if not self.persist:
                        return
                    session.close()
                    session = requests.Session()
                    self._stop.wait(0.05)  # a dead port refuses at once: pace the retries, not a sync
                if pace_s:
                    time.sleep(pace_s)  # rate shaping, not synchronization
        finally:
            session.close()

    def stop(self) -> None:
        self._stop.set()

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not self.running, "client threads did not finish"

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def done(self) -> int:
        with self._lock:
            return self._done


def check_delivery(scenario: str, ledger: Ledger, stored: list[str], allow_duplicates: bool = False
                   ) -> dict[str, int]:
    """Every acknowledged id landed; nothing refused landed; nothing landed that was not sent;
    and (the SPEC: exactly once, crashes included) nothing landed twice."""
    counts = Counter(stored)
    acked = set(ledger.acked)
    unknown = set(ledger.unknown)
    figures = {"acknowledged": len(acked), "landed": sum(1 for x in acked if counts[x]),
               "duplicates": sum(c - 1 for c in counts.values()),
               "unknown": len(unknown), "unknown_landed": sum(1 for x in unknown if counts[x])}
    print(f"\n{scenario}: acknowledged={figures['acknowledged']} landed={figures['landed']} "
          f"duplicates={figures['duplicates']} unknown={figures['unknown']} (of which landed "
          f"{figures['unknown_landed']}) (answers {dict(ledger.statuses)}, stored {len(stored)})")
    missing = sorted(x for x in acked if not counts[x])
    assert not missing, f"{scenario}: {len(missing)} acknowledged payloads never landed, e.g. {missing[:5]}"
    refused_landed = sorted(x for x in set(ledger.refused) if counts[x])
    assert not refused_landed, f"{scenario}: payloads answered non-202 landed: {refused_landed[:5]}"
    sent = acked | set(ledger.refused) | set(ledger.unknown)
    strangers = sorted(x for x in counts if x not in sent)
    assert not strangers, f"{scenario}: payloads landed that were never sent: {strangers[:5]}"
    assert len(ledger.acked) == len(acked), f"{scenario}: the test sent an id twice"
    assert not ledger.problems, f"{scenario}: contract broken by answers: {ledger.problems[:5]}"
    if not allow_duplicates:
        dup = sorted(x for x, c in counts.items() if c > 1)
        assert not dup, f"{scenario}: {len(dup)} payloads stored more than once, e.g. {dup[:5]}"
    return figures


def settle(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> bool:
    """Like wait_for, but answers False at the deadline so the caller can report precisely."""
    try:
        wait_for(predicate, timeout, "settle", interval)
        return True
    except AssertionError:
        return False


# -- processes and /proc --------------------------------------------------------------------------

def run_ingestd(args: list[str], cwd: Path, timeout: float = 90.0, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Run an `ingestd` command to completion in its own process group (killed on timeout)."""
    proc = subprocess.Popen([sys.executable, "-m", "ingestd", *args], cwd=cwd, env={**(env or os.environ), **AWS_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the highest resident set size the process ever had (catches transient spikes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def health_status(url: str) -> tuple[int, dict[str, Any]]:
    r = requests.get(url + "/health", timeout=5)
    return r.status_code, r.json()


def s3_tables(bucket: str, endpoint: str, **sink: Any) -> dict[str, dict[str, Any]]:
    """An S3 sink with quick timeouts and quick retries, so fault tests take seconds."""
    return {"sink": {"kind": "s3", "bucket": bucket, "endpoint_url": endpoint, "region": "us-east-1",
                     "prefix": "telemetry", "connect_timeout_s": 0.5, "read_timeout_s": 1.0,
                     "retry_base_ms": 50, "retry_max_ms": 500, **sink}}


# -- shared by the fault tests -----------------------------------------------------------------------------

BATCH = {"max_payloads": 20, "max_age_ms": 100}  # small, quick objects


def counters(d: Any) -> dict[str, int]:
    return d.health()["counters"]  # type: ignore[no-any-return]


def sigterm(d: Any, timeout: float = 30.0) -> float:
    """SIGTERM, wait for exit 0; returns how long the drain took."""
    began = time.monotonic()
    d.signal(signal.SIGTERM)
    code = d.wait(timeout)
    assert code == 0, f"exit {code}\n{d.log()}"
    return time.monotonic() - began
