"""The OpenAPI document is served and the running daemon conforms to it (schemathesis)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.every_front


def _schemathesis() -> str:
    exe = Path(sys.executable).with_name("schemathesis")
    return str(exe) if exe.exists() else (shutil.which("schemathesis") or "schemathesis")


def test_openapi_document_matches_config(daemon_factory):
    d = daemon_factory({"http": {"max_payloads": 77}}).start()
    doc = requests.get(d.url + "/openapi.json", timeout=5).json()
    assert doc["openapi"].startswith("3.")
    data = doc["components"]["schemas"]["Collection"]["properties"]["data"]
    assert data["maxItems"] == 77 and data["minItems"] == 1
    assert set(doc["paths"]) >= {"/v1/payloads", "/health", "/health/live", "/health/ready", "/metrics"}


@pytest.mark.parametrize("token", ["s3cr3t", "limited"])
def test_daemon_conforms_to_its_openapi_document(daemon_factory, tmp_path, token):
    # "limited": a tenant whose rate the fuzzing exceeds, so 429 is answered and checked against
    # the document too. Its rate is http.max_payloads: with a lower one, a request valid by the
    # document (up to max_payloads) could never fit and would get 413, which a document per
    # daemon cannot express per tenant (that 413 is tested in tests/unit/test_app.py)
    d = daemon_factory({"auth": {"tokens": ["s3cr3t"], "tenants": [{"name": "lim", "tokens": ["limited"],
                                                                    "max_payloads_per_s": 50}]},
                        "http": {"max_payloads": 50}}).start()
    proc = subprocess.run(
        [_schemathesis(), "run", d.url + "/openapi.json", "--checks", "all", "--max-examples", "40",
         "--seed", "20261128", "--no-color", "--header", f"Authorization: Bearer {token}",
         "--report-dir", str(tmp_path / "schemathesis"), "--generation-database", "none"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
    # the fuzzing did not take the daemon down
    assert d.is_ready()
    if token == "limited":
        assert d.health()["tenants"]["lim"]["rate_limited_requests"] > 0, "the fuzzing never met the rate limit"
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
