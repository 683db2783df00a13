"""Sink faults with the real daemon: 5xx and throttling, a sink that never answers, S3 going away,
permanent refusals and the dead-letter spool, and a drain with a failing sink.

The sink is moto's S3 server, reached through `tests.faults.FaultProxy` (which fails on
purpose), or a moto that is stopped and restarted, or a TCP server that never answers. Each
test ends by comparing every acknowledged payload id with what landed in the bucket and prints
`scenario: acknowledged=N landed=N duplicates=N` (see it with `pytest -s`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from tests.faults import (  # noqa: F401 - fixtures are used by name
    BATCH,
    check_delivery,
    counters,
    fault_proxy,
    FaultProxy,
    health_status,
    Ledger,
    Load,
    peak_rss_bytes,
    restartable_moto,
    RestartableMoto,
    run_ingestd,
    s3_tables,
    sigterm,
    unique_prefix,
)
from tests.harness import dead_lines, payload_ids, read_bucket, spool_lines, wait_for

pytestmark = pytest.mark.slow



def dead_files(spool: Path) -> list[Path]:
    return sorted((spool / "dead").glob("*.dead"))


def dead_reasons(spool: Path) -> list[str]:
    from ingestd.config import SpoolConfig
    from ingestd.spool import Spool

    reader = Spool(SpoolConfig(path=str(spool)))
    return [str(reader.read_dead_letter(p)[0]["reason"]) for p in dead_files(spool)]  # type: ignore[index]


# -- 1. 500 for a while, then healthy ----------------------------------------------------------------

def test_internal_errors_for_a_while_then_healthy(daemon_factory, fault_proxy: FaultProxy, s3, bucket):
    fault_proxy.set_mode("500")
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url), "batch": BATCH}).start()
    ledger = Ledger()
    prefix = unique_prefix("e500")
    ledger.send_many(d.url, prefix + "-a", 20, 5)
    assert ledger.statuses == {202: 20}, ledger.statuses

    wait_for(lambda: counters(d)["failed_uploads"] >= 6, 15, "several failed upload attempts")
    code, health = health_status(d.url)
    assert code == 200 and health["ready"], (code, health)  # buffering through an outage is the point
    assert health["status"] == "degraded", health
    assert health["counters"]["uploaded_payloads"] == 0, health
    metrics = requests.get(d.url + "/metrics", timeout=5).text
    assert "ingestd_sink_failing 1.0" in metrics, metrics
    # still failing: requests are still acknowledged while the queue has room
    ledger.send_many(d.url, prefix + "-b", 20, 5)
    assert ledger.statuses == {202: 40}, ledger.statuses
    assert read_bucket(s3, bucket) == {}

    fault_proxy.set_mode(None)
    wait_for(lambda: counters(d)["uploaded_payloads"] >= ledger.acked_payloads, 20, "every payload to be uploaded")
    wait_for(lambda: d.health()["status"] == "ok", 10, "status ok once the sink works again")
    code, health = health_status(d.url)
    assert code == 200 and health["counters"]["failed_uploads"] > 0, health
    sigterm(d)
    check_delivery("500-then-healthy", ledger, payload_ids(read_bucket(s3, bucket)), allow_duplicates=False)
    assert fault_proxy.count("500") >= 6 and fault_proxy.count("forwarded") > 0, fault_proxy.counts


# -- 2. 503 SlowDown for the first N requests ----------------------------------------------------------

def test_slowdown_for_the_first_requests(daemon_factory, fault_proxy: FaultProxy, s3, bucket):
    n = 8
    fault_proxy.fail_first(n, "503")
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url), "batch": BATCH}).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix("slowdown"), 30, 4)
    assert ledger.statuses == {202: 30}, ledger.statuses
    wait_for(lambda: counters(d)["uploaded_payloads"] >= ledger.acked_payloads, 20, "every payload to be uploaded")
    failed = counters(d)["failed_uploads"]
    sigterm(d)
    check_delivery("503-slowdown-first-8", ledger, payload_ids(read_bucket(s3, bucket)), allow_duplicates=False)
    assert fault_proxy.count("503") == n, fault_proxy.counts
    assert failed > 0
    # Retries are ingestd's own (backoff bounded by the drain deadline, s3sink.py): each failed
    # attempt it counts must be one request to the sink, not several made by botocore behind its back.
    assert failed == n, (f"{n} SlowDown answers but failed_uploads={failed}: botocore retried on its own "
                         f"(s3sink.py: retries max_attempts=1 means one *retry* in botocore)")


# -- 3. a sink that never answers ------------------------------------------------------------------------

def test_never_answering_tcp_sink_buffers_then_refuses_then_delivers_after_restart(
        daemon_factory, stalled_sink, moto_server, s3, bucket):
    """Accept-and-never-answer TCP server: 202 while the queue has room, then only 503 with
    Retry-After; SIGTERM spills to the spool; the next start with a working sink delivers."""
    # one uploader: while its upload is stuck it goes on taking until it holds one more object
    # waiting (max_payloads 20 = at most 7 requests of 3) and at most one more object's worth
    # gathering in its batcher, then takes nothing: queue + two objects is the bound (seen: 15, 16)
    tables = {**s3_tables(bucket, stalled_sink.url), "batch": BATCH, "queue": {"max_items": 8},
              "workers": {"count": 1}, "shutdown": {"drain_timeout_s": 1}}
    d = daemon_factory(tables).start()
    ledger = Ledger()
    prefix = unique_prefix("tcp-hang")
    assert ledger.send(d.url, [f"{prefix}-first"]) == 202
    wait_for(lambda: stalled_sink.accepted > 0, 10, "an upload to reach the never-answering server")
    statuses = ledger.send_many(d.url, prefix, 200, 3, until=lambda s: s == 503)
    assert 8 <= statuses.count(202) <= 8 + 7 + 7 and statuses[-1] == 503, statuses  # 202 while there is room
    more = ledger.send_many(d.url, unique_prefix("tcp-hang-full"), 20, 3)
    assert set(more) == {503}, more  # the uploaders are stuck: the queue stays full
    assert set(ledger.statuses) == {202, 503}, ledger.statuses
    code, health = health_status(d.url)
    assert code == 503 and health["status"] == "degraded" and health["queue"]["depth"] == 8, (code, health)

    drained = sigterm(d, 20)
    print(f"\ntcp-never-answers: drain took {drained:.1f}s (drain_timeout_s=1)")
    assert drained < 1 + 2, f"drain took {drained:.1f}s with drain_timeout_s=1 (the SPEC: at most + 2 s)"
    held = [line["payload"]["id"] for line in spool_lines(d.workdir)]
    assert sorted(held) == sorted(ledger.acked), "what the drain spilled is not what was acknowledged"

    d2 = daemon_factory({**tables, **s3_tables(bucket, moto_server)}).start()
    wait_for(lambda: counters(d2)["uploaded_payloads"] >= ledger.acked_payloads, 20, "redelivery after restart")
    sigterm(d2)
    check_delivery("tcp-never-answers-then-restart", ledger, payload_ids(read_bucket(s3, bucket)),
                   allow_duplicates=False)
    assert spool_lines(d.workdir) == []


def test_hanging_sink_memory_stays_flat_then_everything_lands(daemon_factory, fault_proxy: FaultProxy, s3, bucket):
    """Proxy in "hang" mode (reads the request, never answers), then forwarding again."""
    fault_proxy.set_mode("hang")
    d = daemon_factory({**s3_tables(bucket, fault_proxy.url), "batch": BATCH, "queue": {"max_items": 10},
                        "workers": {"count": 1}}).start()
    ledger = Ledger()
    prefix = unique_prefix("hang")
    assert ledger.send(d.url, [f"{prefix}-first"]) == 202
    wait_for(lambda: fault_proxy.count("hang") > 0, 10, "an upload to hang")
    statuses = ledger.send_many(d.url, prefix, 200, 5, until=lambda s: s == 503)
    # the queue's 10 items, plus what the uploader holds behind its hung PUT: one object waiting
    # (20 payloads = 4 requests of 5) and at most one more object's worth gathering in its batcher
    # (how much of it fills before the 503 depends on timing: seen 14 and 15)
    assert 10 <= statuses.count(202) <= 10 + 4 + 4 and statuses[-1] == 503, statuses

    assert d.proc is not None
    rss_before, peak_before = d.health()["rss_bytes"], peak_rss_bytes(d.proc.pid)
    pad = 128 * 1024  # 400 requests of ~128 KiB: 50 MiB offered to a full queue
    burst = Load(d.url, ledger, unique_prefix("hang-burst"), threads=4, requests_per_thread=100, payloads=1,
                 pad=pad).start()
    burst.join(60)
    rss_after, peak_after = d.health()["rss_bytes"], peak_rss_bytes(d.proc.pid)
    assert set(ledger.statuses) <= {202, 503}, f"under overload the only answers are 202 and 503: {ledger.statuses}"
    assert ledger.statuses[503] == 1 + 400, ledger.statuses  # the uploader is stuck: no room appears
    grew = (rss_after - rss_before) / 2**20
    print(f"\nhang burst: supervisor RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB "
          f"(peak {peak_before / 2**20:.1f} -> {peak_after / 2**20:.1f}) after {400 * pad / 2**20:.0f} MiB offered")
    assert grew < 25, f"supervisor RSS grew {grew:.1f} MiB under overload"
    peak_grew = (peak_after - peak_before) / 2**20
    assert peak_grew < 40, f"supervisor peak RSS grew {peak_grew:.1f} MiB during the burst"

    fault_proxy.set_mode(None)
    wait_for(lambda: counters(d)["uploaded_payloads"] >= ledger.acked_payloads, 30, "every payload to be uploaded")
    wait_for(lambda: d.health()["status"] == "ok", 10, "status ok")
    sigterm(d)
    check_delivery("hang-then-forward", ledger, payload_ids(read_bucket(s3, bucket)), allow_duplicates=False)


# -- 4. moto stopped mid-run and restarted on the same port ----------------------------------------------

def test_s3_stopped_mid_run_and_restarted(daemon_factory, restartable_moto: RestartableMoto, s3, bucket):
    d = daemon_factory({**s3_tables(bucket, restartable_moto.url), "batch": BATCH}).start()
    ledger = Ledger()
    load = Load(d.url, ledger, unique_prefix("restart"), threads=3, requests_per_thread=120, payloads=3,
                pace_s=0.01).start()
    try:
        wait_for(lambda: load.done >= 60 and counters(d)["uploaded_payloads"] > 0, 20, "uploads before the outage")
        restartable_moto.stop()  # connection refused from now on; open connections are cut
        failed = counters(d)["failed_uploads"]
        # acknowledged during the outage, whatever the pace of the load threads
        assert set(ledger.send_many(d.url, unique_prefix("during-outage"), 10, 3)) == {202}
        wait_for(lambda: counters(d)["failed_uploads"] >= failed + 3, 15, "uploads to fail while S3 is away")
        code, health = health_status(d.url)
        assert code == 200 and health["status"] == "degraded", (code, health)
        assert "Could not connect to the endpoint URL" in d.log()
        restartable_moto.start()
    finally:
        load.join(60)
    assert set(ledger.statuses) == {202}, ledger.statuses
    wait_for(lambda: counters(d)["uploaded_payloads"] >= ledger.acked_payloads, 30, "every payload to be uploaded")
    sigterm(d)
    assert restartable_moto.starts == 2
    check_delivery("s3-stopped-and-restarted", ledger, payload_ids(read_bucket(s3, bucket)))


# -- 5. permanent errors: dead letters, then replay ---------------------------------------------------------

@pytest.mark.parametrize("fault", ["403", "404", "missing-bucket"])
def test_permanent_errors_dead_letter_then_replay(daemon_factory, fault_proxy: FaultProxy, s3, bucket, fault):
    target = f"never-made-{unique_prefix('b')}" if fault == "missing-bucket" else bucket
    code_name = {"403": "AccessDenied", "404": "NoSuchBucket", "missing-bucket": "NoSuchBucket"}[fault]
    if fault != "missing-bucket":
        fault_proxy.set_mode(fault)
    d = daemon_factory({**s3_tables(target, fault_proxy.url), "batch": BATCH}).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix(f"dead-{fault}"), 25, 4)
    assert ledger.statuses == {202: 25}, ledger.statuses
    sent_at = time.monotonic()
    wait_for(lambda: counters(d)["dead_lettered_payloads"] >= ledger.acked_payloads, 15, "dead letters")
    took = time.monotonic() - sent_at
    assert took < 5, f"dead-lettering took {took:.1f}s"
    health = d.health()
    assert health["counters"]["dead_lettered_payloads"] == ledger.acked_payloads, health
    assert health["counters"]["uploaded_payloads"] == 0, health
    metrics = requests.get(d.url + "/metrics", timeout=5).text
    assert f"ingestd_dead_lettered_payloads_total {float(ledger.acked_payloads)}" in metrics

    spool = d.workdir / "spool"
    recs = dead_files(spool)
    assert recs, "no dead letter written"
    assert all(code_name in why for why in dead_reasons(spool)), dead_reasons(spool)
    dead_ids = [line["payload"]["id"] for line in dead_lines(spool)]
    assert sorted(dead_ids) == sorted(ledger.acked)
    # each batch was tried once, not retried: one request to the sink per dead-letter file
    tried = fault_proxy.count("forwarded" if fault == "missing-bucket" else fault)
    assert tried == len(recs) == health["counters"]["failed_uploads"], (tried, len(recs), health["counters"])

    drained = sigterm(d, 15)
    assert drained < 3, f"drain took {drained:.1f}s: something was still being retried"
    assert fault_proxy.count("forwarded" if fault == "missing-bucket" else fault) == tried

    if fault == "403":  # replay while the sink still refuses: exit non-zero, nothing removed
        r = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
        assert r.returncode != 0, r
        assert dead_files(spool) == recs

    # make the sink work, then replay with the daemon stopped
    if fault == "missing-bucket":
        s3.create_bucket(Bucket=target)
    fault_proxy.set_mode(None)
    r = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert f"replayed {ledger.acked_payloads} payloads" in r.stdout, r.stdout
    assert dead_files(spool) == [], "replay left dead letters behind"
    forwarded = fault_proxy.count("forwarded")
    first = payload_ids(read_bucket(s3, target))

    r2 = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
    assert r2.returncode == 0, f"{r2.stdout}\n{r2.stderr}"
    assert "replayed 0 payloads" in r2.stdout, r2.stdout
    assert fault_proxy.count("forwarded") == forwarded, "the second replay sent something"
    second = payload_ids(read_bucket(s3, target))
    assert sorted(second) == sorted(first)
    check_delivery(f"permanent-{fault}-then-replay", ledger, second, allow_duplicates=False)


# -- 6. drain with a failing sink ------------------------------------------------------------------------------

@pytest.mark.parametrize("deliver_by", ["restart", "replay"])
def test_drain_with_failing_sink_spills_then_delivers(daemon_factory, fault_proxy: FaultProxy, s3, bucket, deliver_by):
    drain_timeout = 2
    fault_proxy.set_mode("500")
    tables = {**s3_tables(bucket, fault_proxy.url), "batch": BATCH, "shutdown": {"drain_timeout_s": drain_timeout}}
    d = daemon_factory(tables).start()
    ledger = Ledger()
    ledger.send_many(d.url, unique_prefix(f"drain-{deliver_by}"), 40, 5)
    assert ledger.statuses == {202: 40}, ledger.statuses
    wait_for(lambda: counters(d)["failed_uploads"] > 2, 10, "uploads to fail")

    drained = sigterm(d, drain_timeout + 20)
    print(f"\ndrain with a failing sink took {drained:.1f}s (drain_timeout_s={drain_timeout})")
    assert drained < drain_timeout + 2, f"drain took {drained:.1f}s with drain_timeout_s={drain_timeout}"
    spool = d.workdir / "spool"
    held = [line["payload"]["id"] for line in spool_lines(d.workdir)]
    assert sorted(held) == sorted(ledger.acked), "the spool does not hold exactly what was acknowledged"
    assert "stays in" in d.log()
    assert read_bucket(s3, bucket) == {}

    fault_proxy.set_mode(None)
    if deliver_by == "restart":
        d2 = daemon_factory(tables).start()
        wait_for(lambda: counters(d2)["uploaded_payloads"] >= ledger.acked_payloads, 20, "delivery after restart")
        sigterm(d2)
    else:
        r = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        forwarded = fault_proxy.count("forwarded")
        r2 = run_ingestd(["replay", "--config", str(d.config_path)], d.workdir)
        assert r2.returncode == 0 and fault_proxy.count("forwarded") == forwarded, (r2, fault_proxy.counts)
    assert spool_lines(d.workdir) == [], "payloads left in the spool after delivery"
    check_delivery(f"drain-failing-sink-then-{deliver_by}", ledger, payload_ids(read_bucket(s3, bucket)),
                   allow_duplicates=False)
