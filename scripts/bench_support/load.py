"""The load: request bodies of telemetry-like events, and the generator that sends them.

wrk from apt (`wrk -t2 -c64 --latency -s post.lua`) POSTs one fixed body over and over; the
fallback when wrk is missing is pyload.py (processes x threads, keep-alive http.client). Both
print one `BENCH_JSON {...}` line that `Load.run` returns as a dict.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from .processes import Processes

SUPPORT = Path(__file__).resolve().parent

_EVENTS = ("click", "view", "scroll", "error", "purchase", "login")
_OS = ("linux", "android", "ios", "windows", "macos")
_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
)
_WORDS = ("request handled by edge node eu-west-3b with cache status hit and upstream latency within budget; "
          "retries 0, tls resumed, payload validated against schema v12, queue depth nominal, "
          "feature flags checkout_v2 dark_mode search_suggest enabled for cohort b; ")


def _compact(doc: Any) -> int:
    return len(json.dumps(doc, separators=(",", ":")))


def make_event(i: int, size: int) -> dict[str, Any]:
    """One telemetry event of about `size` bytes of compact JSON (within a few bytes for sizes
    from ~90 up): the fields devices send (ids, timestamps, counters, a user agent, a URL,
    attributes, a log message), added in that order while they fit, then a message cut to fit: no padding.
    Types match the Go seed's Payload struct where the names overlap (tags: strings, metrics:
    numbers), so both servers accept the same bodies; Go keeps only its struct's fields."""
    ev: dict[str, Any] = {"device_id": f"d-{(i * 7919) % 100000:05d}", "event": _EVENTS[i % len(_EVENTS)],
                          "ts": 1764300000123 + i * 37, "seq": i}
    optional: list[tuple[str, Any]] = [
        ("metrics", {"ms": round(3.5 + (i * 13) % 400 / 10, 1)}),
        ("os", _OS[i % len(_OS)]),
        ("tags", ["web", "eu"] if i % 2 else ["app"]),
        ("app", f"3.{i % 20}.{i % 7}"),
        ("session", f"s-{(i * 104729) % 16**8:08x}"),
        ("user_agent", _AGENTS[i % len(_AGENTS)]),
        ("url", f"https://app.example.com/projects/{i % 97}/dashboards/{i % 13}?tab=metrics&range=24h"),
        ("attrs", {f"k{j}": f"value-{(i * 31 + j) % 1000:03d}" for j in range(8)}),
        ("geo", {"country": "FR", "region": "IDF", "asn": 3215 + i % 50}),
    ]
    for key, value in optional:  # a field that does not fit is left out; a smaller later one may fit
        if _compact({**ev, key: value}) <= size:
            ev[key] = value
    room = size - _compact(ev) - len(',"message":""')
    if room >= 4:
        start = (i * 17) % len(_WORDS)
        text = (_WORDS[start:] + _WORDS) * (room // len(_WORDS) + 1)
        ev["message"] = text[:room].rstrip()
    return ev


def make_body(n: int, path: Path, payload_bytes: int) -> dict[str, Any]:
    """A request body `{"version", "token", "data": [n events]}` written to `path`, and its shape."""
    payloads = [make_event(i, payload_bytes) for i in range(n)]
    body = json.dumps({"version": "1", "token": "t", "data": payloads}, separators=(",", ":")).encode()
    path.write_bytes(body)
    sizes = [_compact(p) for p in payloads]
    return {"payloads": n, "body_bytes": len(body), "payload_bytes_avg": sum(sizes) / len(sizes),
            "payload_bytes_target": payload_bytes, "example": payloads[0]}


class Load:
    def __init__(self, procs: Processes, kind: str, threads: int, connections: int, logdir: Path) -> None:
        self.procs, self.kind, self.threads, self.connections, self.logdir = procs, kind, threads, connections, logdir
        self.n = 0

    def run(self, url: str, body: Path, duration: float, *, connections: int | None = None, delay_ms: float = 0.0,
            rate: float = 0.0, count_status: bool = False) -> dict[str, Any]:
        c = connections or self.connections
        secs: float
        self.n += 1
        out = self.logdir / f"load-{self.n:02d}.out"
        if self.kind == "wrk":
            secs = max(1, round(duration))
            cmd = ["wrk", f"-t{min(self.threads, c)}", f"-c{c}", f"-d{secs}s", "--timeout", "10s", "--latency",
                   "-s", str(SUPPORT / "post.lua"), url]
            env = dict(os.environ, BENCH_BODY=str(body), BENCH_DELAY_MS=str(delay_ms),
                       BENCH_COUNT_STATUS="1" if count_status else "0")
        else:
            secs = duration
            cmd = [sys.executable, str(SUPPORT / "pyload.py"), "--url", url, "--body-file", str(body),
                   "--connections", str(c), "--procs", str(self.threads), "--duration", str(duration)]
            if rate > 0:
                cmd += ["--rate", str(rate)]
            env = None
        p = self.procs.start(f"load-{self.n}", cmd, env=env, log_path=out)
        try:
            p.wait(secs + 60)
        except subprocess.TimeoutExpired:
            self.procs.killpg(p)
            raise RuntimeError(f"load generator hung; see {out}") from None
        text = out.read_text(errors="replace")
        m = re.search(r"^BENCH_JSON (\{.*\})\s*$", text, re.MULTILINE)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"load generator failed (exit {p.returncode}); see {out}:\n{text[-2000:]}")
        doc: dict[str, Any] = json.loads(m.group(1))
        doc["connections"] = c
        doc["threads"] = min(self.threads, c)
        doc["generator"] = self.kind
        return doc


def ok_requests(r: dict[str, Any]) -> int:
    if r.get("statuses"):
        return sum(n for code, n in r["statuses"].items() if 200 <= int(code) < 300)
    return int(r["requests"] - r["errors"]["status"])
