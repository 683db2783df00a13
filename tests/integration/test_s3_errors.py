"""S3 error classes with the real daemon: errors that heal (expired credentials, conflicts) are
retried without bound; an error code nobody knows is retried UNCERTAIN_ATTEMPTS times, then the
object is dead-lettered with the code as its reason and `ingestd replay` delivers it; and every
PUT carries a Content-MD5 of its body.

S3 is moto's server over real HTTP, behind `tests.faults.FaultProxy`, which answers S3-style
XML errors on purpose and records every request it receives.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from ingestd.delivery import UNCERTAIN_ATTEMPTS
from tests.faults import (  # noqa: F401 - fixtures are used by name
    BATCH,
    check_delivery,
    counters,
    fault_proxy,
    FaultProxy,
    FAULTS,
    Ledger,
    run_ingestd,
    s3_tables,
    sigterm,
    unique_prefix,
)
from tests.harness import dead_lines, payload_ids, read_bucket, wait_for

pytestmark = pytest.mark.slow



def dead_letters(spool: Path) -> list[dict[str, Any]]:
    """The metadata of every dead letter in the spool."""
    from ingestd.config import SpoolConfig
    from ingestd.spool import Spool

    reader = Spool(SpoolConfig(path=str(spool)))
    out = []
    for path in reader.dead_letters():
        found = reader.read_dead_letter(path)
        assert found is not None, f"{path} is damaged"
        out.append(found[0])
    return out


# -- errors that heal: retried past the uncertain bound, nothing dead-lettered ----------------------

@pytest.mark.parametrize("mode", ["400-expired", "400-request-expired", "409"])
def test_healing_errors_are_retried_until_s3_accepts(daemon_factory, fault_proxy: FaultProxy, s3, bucket, mode):
    fault_proxy.set_mode(mode)
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url), "batch": BATCH}).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix(f"heal-{mode}"), 12, 5)
    assert ledger.statuses == {202: 12}, ledger.statuses

    # more failures than an uncertain error would get: had they counted toward the bound, some
    # object would be dead-lettered by now (the dead letter is written before the next attempt)
    past_bound = 2 * UNCERTAIN_ATTEMPTS + 2

    def failed_past_bound() -> bool:
        dead = counters(d)["dead_lettered_payloads"]
        assert dead == 0, f"{dead} payloads dead-lettered on {FAULTS[mode][1]}, an error that heals"
        return fault_proxy.count(mode) >= past_bound

    wait_for(failed_past_bound, 15, f"{past_bound} {mode} answers")
    health = d.health()
    assert health["counters"]["dead_lettered_payloads"] == 0, health
    assert health["counters"]["uploaded_payloads"] == 0, health
    assert health["status"] == "degraded", health

    fault_proxy.set_mode(None)
    wait_for(lambda: counters(d)["uploaded_payloads"] >= ledger.acked_payloads, 20, "every payload to be uploaded")
    sigterm(d)
    check_delivery(f"{mode}-then-forward", ledger, payload_ids(read_bucket(s3, bucket)), allow_duplicates=False)
    assert dead_letters(d.workdir / "spool") == []
    code = FAULTS[mode][1]
    assert code in d.log(), f"the {code} answers were not logged"


# -- an unknown 4xx code: bounded attempts, a dead letter that keeps the reason, replay -----------

def test_unknown_code_is_dead_lettered_after_the_bound_then_replayed(daemon_factory, fault_proxy: FaultProxy, s3,
                                                                     bucket):
    mode = "400-unknown"
    status, code, message = FAULTS[mode]
    fault_proxy.set_mode(mode)
    # one uploader and one request: one object, so every attempt the proxy sees is that object's
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url), "batch": BATCH, "workers": {"count": 1}}).start()
    ledger = Ledger()
    prefix = unique_prefix("unknown")
    assert ledger.send(d.url, [f"{prefix}-{i}" for i in range(7)]) == 202

    wait_for(lambda: counters(d)["dead_lettered_payloads"] >= ledger.acked_payloads, 15, "the dead letter")
    sigterm(d, 15)  # the drain ends at once: nothing is left to retry
    puts = fault_proxy.seen("PUT")
    assert fault_proxy.count(mode) == len(puts) == UNCERTAIN_ATTEMPTS, (fault_proxy.counts, len(puts))
    assert len({p.path for p in puts}) == 1, "the attempts were not all for the same object"
    assert fault_proxy.count("forwarded") == 0 and read_bucket(s3, bucket) == {}

    spool = d.workdir / "spool"
    [meta] = dead_letters(spool)
    assert meta["count"] == 7 and unquote(puts[0].path) == f"/{bucket}/{meta['key']}", (meta, puts[0].path)
    reason = meta["reason"]
    assert f"{code} (HTTP {status}) {message}" in reason, reason
    assert f"refused {UNCERTAIN_ATTEMPTS} times" in reason, reason
    assert sorted(line["payload"]["id"] for line in dead_lines(spool)) == sorted(ledger.acked)

    # replay while S3 still answers the unknown code: the same bound, exit 1, the dead letter stays
    r = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert fault_proxy.count(mode) == 2 * UNCERTAIN_ATTEMPTS, fault_proxy.counts
    assert [m["key"] for m in dead_letters(spool)] == [meta["key"]]

    fault_proxy.set_mode(None)
    r = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert f"replayed {ledger.acked_payloads} payloads" in r.stdout, r.stdout
    assert dead_letters(spool) == []
    objects = read_bucket(s3, bucket)
    assert list(objects) == [meta["key"]], list(objects)  # at the key it was refused at
    check_delivery("unknown-code-dead-letter-then-replay", ledger, payload_ids(objects), allow_duplicates=False)


# -- Content-MD5 on every PUT ------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_every_put_carries_the_content_md5_of_what_s3_stored(daemon_factory, fault_proxy: FaultProxy, s3, bucket,
                                                             compression):
    fault_proxy.fail_first(3, "503")  # re-sent PUTs must carry it too
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url),
                        "batch": {**BATCH, "compression": compression}}).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix(f"md5-{compression}"), 10, 4)
    assert ledger.statuses == {202: 10}, ledger.statuses
    wait_for(lambda: counters(d)["uploaded_payloads"] >= ledger.acked_payloads, 20, "every payload to be uploaded")
    sigterm(d)

    def b64md5(data: bytes) -> str:
        return base64.b64encode(hashlib.md5(data).digest()).decode()

    puts = fault_proxy.seen("PUT")
    assert len(puts) >= 4 and fault_proxy.count("503") == 3, fault_proxy.counts
    for p in puts:
        assert "content-md5" in p.headers, f"PUT {p.path} ({p.outcome}) without Content-MD5: {sorted(p.headers)}"
        assert p.headers["content-md5"] == b64md5(p.body), f"PUT {p.path}: Content-MD5 does not match its body"
    # path-style requests: /<bucket>/<key>
    sent = {unquote(p.path.split("?")[0]).split("/", 2)[2]: p.headers["content-md5"]
            for p in puts if p.outcome == "forwarded"}
    stored = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            stored[obj["Key"]] = b64md5(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    assert stored and stored == sent, (stored, sent)
    check_delivery(f"content-md5-{compression}", ledger, payload_ids(read_bucket(s3, bucket)), allow_duplicates=False)
