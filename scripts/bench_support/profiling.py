"""Where ingestd's CPU goes per payload: py-spy stacks grouped by role, weighted by measured CPU.

Pure functions, no I/O (scenarios.py runs py-spy and reads the CPU counters).

Method. `py-spy record --subprocesses --threads --format raw --nonblocking` (Python frames
only, no --native) samples every thread of the daemon's tree that the OS shows as running or
runnable. Samples alone overstate threads that wake often and wait for a core (a 2 ms sleep
loop, a condition variable), so they are not used as CPU directly: each thread's *measured*
CPU time over the same window (user + system, from /proc via psutil) is split between groups in
proportion to that thread's samples. Samples whose innermost frame is a wait (a condition, an
event, a selector) are left out of that split when the thread has other samples (a woken thread
waiting for a core is not spending CPU there). Each thread's share is then divided by the
payloads its role handled in the window: accepted payloads for listeners and the supervisor,
delivered payloads for uploaders. Kernel time not charged to any process (loopback TCP's
softirq) is not in these figures.

Groups (GROUP_HELP says what each holds) are tested on each frame from the innermost outwards;
the first frame that belongs to a group decides (generic frames, `threading`, `socket`,
`json`..., belong to none, so their time goes to the caller's group).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

GROUPS = ("HTTP server (waitress/front)", "parse", "validate", "encode", "log write", "queue", "batch", "compress",
          "PUT", "other")
HTTP, PARSE, VALIDATE, ENCODE, LOG, QUEUE, BATCH, COMPRESS, PUT, OTHER = GROUPS

GROUP_HELP = {
    HTTP: "waitress (or the configured front), front.py, the WSGI entry point and handler glue in app.py, falcon",
    PARSE: "JSON parsing of the body (orjson.loads under validation._loads; gzip request decoding)",
    VALIDATE: "shape and limit checks before and after parsing (content type, value counts, sizes, depth), rate limits",
    ENCODE: "building the stored NDJSON lines (envelope, received_at, orjson.dumps of each payload)",
    LOG: "framing + CRC of the request record, the append to the listener's log under its lock, the keeper",
    QUEUE: "the reference queue: ref-writer thread, pipe writes and reads, queue-full checks",
    BATCH: "uploader: reading records back, batching, intent journal, .landed records",
    COMPRESS: "gzip (or zstd, Parquet) of each object",
    PUT: "the S3 PUT: boto3/botocore (signing, Content-MD5), urllib3, http.client, sockets",
    OTHER: "supervisor, scoreboard counters, logging, health, threads without samples, anything else",
}

# ingestd's own modules: (module, function or "*") -> group; the first match of a module wins
_INGESTD: dict[str, list[tuple[str, str]]] = {
    "validation": [("_loads", PARSE), ("_exact_loads", PARSE), ("parse_ndjson", PARSE), ("decode_body", PARSE),
                   ("encode_collection", ENCODE), ("*", VALIDATE)],
    "records": [("rfc3339_ms", ENCODE), ("exact_dumps", ENCODE), ("encode_lines", ENCODE),
                ("frame", LOG), ("request_record", LOG), ("*", BATCH)],
    "intake": [("RefWriter.", QUEUE), ("Intake.queue_full", QUEUE), ("*", LOG)],
    "requestlog": [("read_record", BATCH), ("read_parts", BATCH), ("append_landed", BATCH), ("landed_entries", BATCH),
                   ("*", LOG)],
    "listener": [("Keeper.", LOG), ("run_keeper", LOG), ("*", OTHER)],
    "refqueue": [("*", QUEUE)],
    "batching": [("*", BATCH)],
    "journal": [("*", BATCH)],
    "uploader": [("*", BATCH)],
    "delivery": [("Delivery.encode", COMPRESS), ("Delivery.put_object", PUT), ("*", BATCH)],
    "s3sink": [("*", PUT)],
    "sinks": [("*", PUT)],
    "formats": [("*", COMPRESS)],  # an object's stored bytes: gzip / zstd / Parquet
    "partitions": [("*", BATCH)],  # routing payloads to their object's key
    "app": [("*", HTTP)],
    "front": [("*", HTTP)],
    "fastfront": [("*", HTTP)],  # the uvloop + httptools front (http.server = "uvloop")
    "ratelimit": [("*", VALIDATE)],
}
_LIBRARIES = (  # top-level module of a frame's file -> group
    ({"waitress", "falcon", "uvloop", "httptools", "asyncio"}, HTTP),
    ({"gzip", "_compression", "zlib", "zstandard", "pyarrow"}, COMPRESS),
    ({"botocore", "boto3", "urllib3", "s3transfer", "http", "ssl", "email", "hashlib", "base64", "hmac"}, PUT),
    ({"logging"}, OTHER),
)
# a sample whose innermost frame is one of these waits is not CPU spent there
_WAITS = re.compile(r"^(Condition\.wait|Condition\.wait_for|Event\.wait|Thread\.join|Thread\._wait_for_tstate_lock|"
                    r"Semaphore\.acquire|Queue\.get|\w*Selector\.select|wait) \((threading|queue|selectors|"
                    r"multiprocessing/connection)\.py:\d+\)$")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_HEAD = re.compile(r'^((?:process \d+:"(?:[^"\\]|\\.)*?"(?:;|$))*)(?:thread \((0x[0-9a-fA-F]+|\d+)\)(?:: ([^;]*))?(?:;|$))?')
_PROC = re.compile(r'process (\d+):"')


class Sample(NamedTuple):
    pid: int | None  # the innermost process of the stack (with --subprocesses)
    tid: int | None  # the OS thread id (with --threads)
    thread: str
    frames: tuple[str, ...]  # outermost first, as py-spy writes them
    n: int


def module_of(path: str) -> str:
    """A frame's file as a module path: `ingestd/app.py`, `waitress/task.py`, `threading.py`, with
    site-packages and interpreter prefixes taken off (py-spy shortens most paths itself)."""
    if path.startswith("<"):
        return path
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    m = re.search(r"(?:^|/)(ingestd/[^/]+\.py)$", path)
    if m:
        return m.group(1)
    m = re.search(r"/lib/python\d+\.\d+/(.+)$", path)
    if m:
        return m.group(1)
    return path.lstrip("/")


def classify_frame(frame: str) -> str | None:
    """The group a single frame belongs to, or None for a generic frame."""
    m = _FRAME.match(frame)
    if not m:
        return None
    func, path = m.group("func"), module_of(m.group("file"))
    if path.startswith("ingestd/"):
        mod = path[len("ingestd/"):].removesuffix(".py")
        for prefix, group in _INGESTD.get(mod, [("*", OTHER)]):
            if prefix == "*" or func == prefix or (prefix.endswith(".") and func.startswith(prefix)):
                return group
        return OTHER
    top = re.split(r"[/.]", path, maxsplit=1)[0]
    for names, group in _LIBRARIES:
        if top in names:
            return group
    return None


def classify(frames: Iterable[str]) -> str:
    """The group of a stack (outermost frame first): the innermost frame that has a group."""
    for f in reversed(list(frames)):
        g = classify_frame(f)
        if g is not None:
            return g
    return OTHER


def is_wait(frames: tuple[str, ...]) -> bool:
    return bool(frames) and bool(_WAITS.match(frames[-1]))


def parse_raw(raw: str) -> list[Sample]:
    """py-spy's `--format raw` output: one `frame;frame;... count` line per distinct stack, with
    `process PID:"cmdline";` heads (--subprocesses; the cmdline may hold `;`) and a
    `thread (TID): name;` head (--threads)."""
    out: list[Sample] = []
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        m = _HEAD.match(stack)
        assert m is not None  # every group of the pattern is optional
        procs = _PROC.findall(m.group(1) or "")
        tid_text = m.group(2)
        tid = (int(tid_text, 16) if tid_text.startswith("0x") else int(tid_text)) if tid_text else None
        rest = stack[m.end():]
        frames = tuple(f for f in rest.split(";") if f) if rest else ()
        out.append(Sample(int(procs[-1]) if procs else None, tid, (m.group(3) or "").strip(), frames, int(n)))
    return out


def group_samples(samples: Iterable[Sample]) -> dict[tuple[int | None, int | None], dict[str, Any]]:
    """Per (pid, tid): thread name, samples per group (waits apart) and the total."""
    threads: dict[tuple[int | None, int | None], dict[str, Any]] = {}
    for s in samples:
        t = threads.setdefault((s.pid, s.tid), {"thread": s.thread, "groups": {}, "wait": 0, "samples": 0})
        t["samples"] += s.n
        if is_wait(s.frames):
            t["wait"] += s.n
            t.setdefault("wait_groups", {})
            g = classify(s.frames)
            t["wait_groups"][g] = t["wait_groups"].get(g, 0) + s.n
            continue
        g = classify(s.frames)
        t["groups"][g] = t["groups"].get(g, 0) + s.n
    return threads


def attribute(samples: Iterable[Sample], thread_cpu_s: Mapping[tuple[int, int], float], roles: Mapping[int, str],
              payloads: Mapping[str, float]) -> dict[str, Any]:
    """µs of CPU per payload by group.

    `thread_cpu_s`: CPU seconds each (pid, tid) used in the window (every thread of the tree,
    sampled or not); `roles`: pid -> "listener" | "uploader" | "supervisor" | other;
    `payloads`: role -> payloads that role handled in the window ("listener" and "supervisor":
    accepted; "uploader": delivered; anything else falls back to "listener")."""
    per_thread = group_samples(samples)
    groups = {g: 0.0 for g in GROUPS}
    by_role: dict[str, float] = {}
    unsampled_us = 0.0
    waits = total = 0
    for (pid, tid), cpu_s in thread_cpu_s.items():
        role = roles.get(pid, "other")
        n = payloads.get(role) or payloads.get("listener") or 0.0
        if n <= 0 or cpu_s <= 0:
            continue
        us = cpu_s * 1e6 / n
        by_role[role] = by_role.get(role, 0.0) + us
        t = per_thread.get((pid, tid))
        if t is None:
            unsampled_us += us
            groups[OTHER] += us
            continue
        waits += t["wait"]
        total += t["samples"]
        shares = t["groups"] or t.get("wait_groups") or {OTHER: 1}
        denom = sum(shares.values())
        for g, c in shares.items():
            groups[g] += us * c / denom
    return {"us_per_payload": groups, "total_us_per_payload": sum(groups.values()), "by_role_us_per_payload": by_role,
            "unsampled_us_per_payload": unsampled_us, "wait_sample_share": waits / total if total else None,
            "samples": total}


def top_frames(samples: Iterable[Sample], group: str, n: int = 5) -> list[tuple[str, int]]:
    """The innermost frames with the most samples in one group (what "other" holds, say)."""
    counts: dict[str, int] = {}
    for s in samples:
        if s.frames and not is_wait(s.frames) and classify(s.frames) == group:
            f = re.sub(r":\d+\)$", ")", s.frames[-1])
            counts[f] = counts.get(f, 0) + s.n
    return sorted(counts.items(), key=lambda kv: -kv[1])[:n]
