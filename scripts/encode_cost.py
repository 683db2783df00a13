#!/usr/bin/env python3
"""Encode cost of one object per format, on varied ~800 B telemetry events (not one repeated
body, which compresses far better than real traffic and hides the compressor's cost).

    .venv/bin/python scripts/encode_cost.py [--payloads 1000] [--seed 7]

Prints µs of CPU per payload (best of 5 x 5 encodes, one core) and stored bytes per payload
for each format and level ingestd offers. Deterministic input (seeded), so runs compare.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ingestd import formats  # noqa: E402
from ingestd.records import encode_lines  # noqa: E402

ENCODINGS = [("gzip", 6), ("gzip", 1), ("zstd", 3), ("zstd", 9), (None, 0), ("parquet-zstd", 3), ("parquet-gzip", 6)]


def event(rng: random.Random, i: int) -> dict[str, Any]:
    words = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randrange(3, 10))) for _ in range(40))
    return {"event_id": f"{rng.getrandbits(64):016x}", "ts": 1764460000 + i * 0.01,
            "device_id": f"dev-{rng.randrange(5000):05d}", "app": rng.choice(["ios", "android", "web"]),
            "version": f"{rng.randrange(1, 9)}.{rng.randrange(20)}.{rng.randrange(50)}",
            "user_agent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                          "Chrome/131.0 Mobile Safari/537.36",
            "url": "https://example.com/" + "/".join(rng.choice(["shop", "cart", "item", "search", "account"])
                                                     for _ in range(3)) + f"?q={rng.getrandbits(32):x}",
            "attrs": {k: rng.random() for k in ("cpu", "mem", "battery", "latency_ms", "fps")},
            "message": words}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--payloads", type=int, default=1000)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    rng = random.Random(a.seed)
    body = b"".join(encode_lines(time.time(), "1.0", [event(rng, i)]) for i in range(a.payloads))
    print(f"one object of {a.payloads} payloads, {len(body) / a.payloads:.0f} B per NDJSON line")
    print(f"{'encoding':>14} {'level':>5} {'µs/payload':>11} {'stored B/payload':>17} {'of NDJSON':>10}")
    for enc, level in ENCODINGS:
        out = formats.encode(body, enc, level)
        t = min(timeit.repeat(lambda: formats.encode(body, enc, level), number=5, repeat=5)) / 5
        print(f"{enc or 'none':>14} {level:>5} {t / a.payloads * 1e6:>11.1f} {len(out) / a.payloads:>17.1f} "
              f"{len(out) / len(body):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
