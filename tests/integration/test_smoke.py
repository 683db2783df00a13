from __future__ import annotations

import signal
from collections import Counter

from tests.harness import payload_ids, post, read_bucket


def test_s3_roundtrip_and_sigterm_drain(daemon_factory, s3_tables, s3, bucket):
    d = daemon_factory(s3_tables).start()
    sent = []
    for r in range(50):
        ids = [f"r{r}-p{i}" for i in range(7)]
        resp = post(d.url, {"version": "2.1", "data": [{"id": x, "n": i} for i, x in enumerate(ids)]})
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"accepted": 7}
        sent += ids
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    objects = read_bucket(s3, bucket)
    stored = payload_ids(objects)
    assert Counter(stored) == Counter(sent)
    assert all(k.startswith("telemetry/dt=") and k.endswith(".ndjson.gz") for k in objects)
