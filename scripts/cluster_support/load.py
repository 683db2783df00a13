"""The load: client threads posting to the balancer over keep-alive connections, every payload
with an id unique in the run, and a ledger of what each answer said about those ids.

- acknowledged: answered 202 (must land, exactly once);
- refused: any other answer (nothing was kept: must never land);
- unknown: no answer (connection cut after sending: may land, at most once).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from urllib.parse import urlsplit


class Ledger:
    """What the clients sent and what each answer was, by payload id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acked: list[str] = []
        self.refused: list[str] = []
        self.unknown: list[str] = []
        self.statuses: Counter[str] = Counter()  # "202", "503", …, "no answer"
        self.latencies_ms: list[float] = []

    def record(self, status: int, ids: list[str], latency_ms: float) -> None:
        with self._lock:
            self.statuses[str(status) if status else "no answer"] += 1
            if status == 202:
                self.acked += ids
                self.latencies_ms.append(latency_ms)
            elif status:
                self.refused += ids
            else:
                self.unknown += ids

    @property
    def acked_requests(self) -> int:
        with self._lock:
            return self.statuses["202"]

    def server_errors(self) -> int:
        with self._lock:
            return sum(n for status, n in self.statuses.items() if status.startswith("5"))

    def percentile_ms(self, q: float) -> float:
        with self._lock:
            values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


class Load:
    """`threads` clients, each on its own keep-alive connection, posting `payloads` payloads per
    request as fast as answers come back (or every `pace_s`), until `stop()`."""

    def __init__(self, url: str, ledger: Ledger, run_id: str, threads: int, payloads: int, pad_bytes: int = 100,
                 pace_s: float = 0.0, timeout_s: float = 30.0) -> None:
        u = urlsplit(url)
        assert u.hostname and u.port, url
        self.host, self.port = u.hostname, u.port
        self.ledger = ledger
        self.run_id = run_id
        self.payloads = payloads
        self.pad = "x" * pad_bytes
        self.pace_s = pace_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), name=f"load-{t}", daemon=True)
                         for t in range(threads)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop sending and wait for the answers of the requests in flight."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"client threads still waiting for answers: {alive}")

    def _body(self, ids: list[str], r: int) -> bytes:
        data = [{"id": i, "seq": r, "pad": self.pad} for i in ids]
        return json.dumps({"version": "cluster-1", "data": data}, separators=(",", ":")).encode()

    def _run(self, t: int) -> None:
        conn: http.client.HTTPConnection | None = None
        headers = {"Content-Type": "application/json"}
        r = 0
        try:
            while not self._stop.is_set():
                ids = [f"{self.run_id}-t{t}-r{r}-p{i}" for i in range(self.payloads)]
                body = self._body(ids, r)
                r += 1
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
                began = time.monotonic()
                try:
                    conn.request("POST", "/v1/payloads", body=body, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    status, closing = resp.status, resp.will_close
                except (OSError, http.client.HTTPException):
                    status, closing = 0, True
                self.ledger.record(status, ids, (time.monotonic() - began) * 1000)
                if closing:
                    conn.close()
                    conn = None
                if self.pace_s:
                    self._stop.wait(self.pace_s)  # rate shaping, not synchronization
        finally:
            if conn is not None:
                conn.close()
