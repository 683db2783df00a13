#!/usr/bin/env python3
"""A "null S3" in pure Python (asyncio, standard library only), for `scripts/bench`.

Every request gets `200 OK` with an ETag and an empty body; request bodies are read and
discarded (Content-Length, chunked, and `Expect: 100-continue` are understood). Two uses:

- the fallback sink when nginx cannot be installed (nginx is cheaper: this server takes ~20 µs
  of CPU per request, ~50k req/s on one core with keep-alive, which is enough for every
  scenario but takes more of the two cores that the servers under test share);
- the deliberately slow sink of the overload scenario: `--delay-ms N` answers each request N ms
  late, so that the daemon's uploaders, not its HTTP side, are the bottleneck;
- the fallback of the S3-like sink (../shared/peers/slows3) when nginx's echo module is missing:
  `--delay-ms 30 --rate 3500 --burst 350` answers each PUT 30 ms late and, beyond 3,500 PUT/s
  (a token bucket holding `--burst` PUTs), at once with 503 SlowDown, as S3 throttles.

`GET /__nulls3_status` answers `{"puts": N, "requests": M}` (that request not counted).
Usage: nulls3.py --port PORT [--host 127.0.0.1] [--delay-ms 0] [--rate 0 --burst 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

STATUS_PATH = b"/__nulls3_status"
OK = (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: \"0123456789abcdef0123456789abcdef\"\r\n"
      b"x-amz-request-id: null-s3\r\nServer: nulls3-python\r\n\r\n")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")
SLOWDOWN = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
            b"x-amz-request-id: slow-s3\r\nServer: nulls3-python\r\n\r\n%s" % (len(SLOWDOWN_BODY), SLOWDOWN_BODY))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_HEAD = 64 * 1024


class Stats:
    puts = 0
    requests = 0
    throttled = 0


class Bucket:
    """PUTs allowed per second (`rate`, 0: unlimited), `burst` of them at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = max(1.0, float(burst))
        self.tokens = self.capacity
        self.at = time.monotonic()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


BUCKET = Bucket(0, 0)


class NullS3(asyncio.Protocol):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        # parser state: "head" | "body" (fixed length) | "chunk-size" | "chunk-data" | "chunk-trailer"
        self.state = "head"
        self.left = 0
        self.method = b""
        self.target = b""
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except ValueError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def _parse(self) -> None:
        buf = self.buf
        while True:
            if self.state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ValueError("head too long")
                    return
                head = bytes(buf[:end])
                del buf[:end + 4]
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                if len(parts) < 3:
                    raise ValueError("bad request line")
                self.method, self.target = parts[0], parts[1]
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    headers[k.strip().lower()] = v.strip()
                self.close_after = headers.get(b"connection", b"").lower() == b"close"
                if headers.get(b"expect", b"").lower() == b"100-continue":
                    assert self.transport is not None
                    self.transport.write(CONTINUE)
                if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    self.state = "chunk-size"
                else:
                    self.left = int(headers.get(b"content-length", b"0") or 0)
                    self.state = "body"
            elif self.state == "body":
                n = min(self.left, len(buf))
                del buf[:n]
                self.left -= n
                if self.left:
                    return
                self._respond()
                self.state = "head"
            elif self.state == "chunk-size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0].strip() or b"0", 16)
                del buf[:end + 2]
                if size == 0:
                    self.state = "chunk-trailer"
                else:
                    self.left = size + 2  # data and its CRLF
                    self.state = "chunk-data"
            elif self.state == "chunk-data":
                n = min(self.left, len(buf))
                del buf[:n]
                self.left -= n
                if self.left:
                    return
                self.state = "chunk-size"
            elif self.state == "chunk-trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[:end + 2]
                if not line:  # the empty line that ends the trailer
                    self._respond()
                    self.state = "head"

    def _respond(self) -> None:
        assert self.transport is not None
        if self.method == b"GET" and self.target == STATUS_PATH:
            body = json.dumps({"puts": Stats.puts, "requests": Stats.requests, "throttled": Stats.throttled}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
            return
        Stats.requests += 1
        if self.method == b"PUT":
            Stats.puts += 1
            if not BUCKET.take():
                Stats.throttled += 1
                self.transport.write(SLOWDOWN)
                if self.close_after:
                    self.transport.close()
                return
        close = self.close_after
        if self.delay_s > 0:
            asyncio.get_running_loop().call_later(self.delay_s, self._send_ok, close)
        else:
            self._send_ok(close)

    def _send_ok(self, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(OK)
        if close:
            self.transport.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="answer every request this late")
    p.add_argument("--rate", type=float, default=0.0, help="PUTs per second beyond which 503 SlowDown (0: none)")
    p.add_argument("--burst", type=int, default=0, help="PUTs allowed at once above the rate")
    args = p.parse_args()
    global BUCKET
    BUCKET = Bucket(args.rate, args.burst)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: NullS3(args.delay_ms / 1000.0), args.host, args.port,
                                      reuse_address=True, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"nulls3-python listening on http://{args.host}:{args.port} delay={args.delay_ms}ms rate={args.rate}/s",
          flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
