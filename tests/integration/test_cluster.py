"""Scale beyond one host: a rolling restart of real ingestd hosts behind real HAProxy loses
nothing, duplicates nothing and lets no 5xx (nor a cut connection) reach a client.

Runs `scripts/cluster rolling-restart` as an operator would: 2 hosts, each in its own network
namespace, one shared directory sink, HAProxy from Debian on 127.0.0.1 in front, 4 keep-alive
client threads posting payloads with unique ids while each host in turn is taken out of HAProxy,
SIGTERMed (drain, exit 0), started again and put back once ready. The script counts by payload
id and writes its report as JSON; the figures are printed (`-s` shows them).

Needs root (network namespaces) and HAProxy, which the script installs with apt when missing;
skipped with the reason otherwise. CI installs haproxy in .ci/run, so there it must run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXIT_UNAVAILABLE = 77  # scripts/cluster: not root, no network namespaces, no HAProxy


def cannot_run_here() -> str | None:
    """Why this machine cannot run a cluster, or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces, veth pairs and a bridge"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"ingestd-probe-{secrets.token_hex(3)}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30, check=False)
    if added.returncode != 0:
        return f"`ip netns add` is refused here: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30, check=False)
    return None


def run_cluster(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run scripts/cluster to completion; on timeout SIGTERM it (it then removes what it made)."""
    proc = subprocess.Popen([str(ROOT / "scripts" / "cluster"), *args], env={**os.environ, "PYTHON": sys.executable},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
        pytest.fail(f"scripts/cluster did not finish within {timeout}s:\n{out}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.parametrize("how", [
    [],  # each host taken out of HAProxy (runtime API), then SIGTERM
    ["--sigterm-only", "--lame-duck", "2"],  # SIGTERM alone: readiness says 503 for 2 s while still accepting
], ids=["out-of-haproxy", "sigterm-lame-duck"])
def test_rolling_restart_behind_haproxy_loses_nothing_and_answers_no_5xx(tmp_path: Path, how: list[str]) -> None:
    reason = cannot_run_here()
    if reason:
        pytest.skip(reason)
    report_path = tmp_path / "report.json"
    done = run_cluster(["rolling-restart", "--hosts", "2", "--threads", "4", "--settle-requests", "100",
                        "--workdir", str(tmp_path), "--json", str(report_path), *how], timeout=120)
    print(done.stdout)
    if done.returncode == EXIT_UNAVAILABLE:
        if os.environ.get("CI"):
            pytest.fail(f"scripts/cluster cannot run in CI (.ci/run installs haproxy):\n{done.stdout}")
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert report_path.exists(), f"scripts/cluster exited {done.returncode} without a report"
    report = json.loads(report_path.read_text())
    f = report["figures"]
    print(f"cluster rolling restart: acknowledged={f['acknowledged']} landed={f['landed']} lost={f['lost']} "
          f"duplicates={f['duplicates']} (answers {report['client_statuses']}, haproxy {report['haproxy']})")
    assert f["acknowledged"] > 0
    assert f["lost"] == 0 and f["landed"] == f["acknowledged"], report
    assert f["duplicates"] == 0, report
    assert f["refused_landed"] == 0 and f["strangers"] == 0, report
    assert report["client_5xx"] == 0, report["client_statuses"]
    assert set(report["client_statuses"]) == {"202"}, report["client_statuses"]  # no 503, no cut connection
    assert [r["host"] for r in report["restarts"]] == ["h1", "h2"]
    assert all(r["exit_code"] == 0 for r in report["restarts"]), report["restarts"]
    assert all(s["exit_code"] == 0 for s in report["final_stops"]), report["final_stops"]
    assert done.returncode == 0, done.stdout
    run_id = report["run_id"]  # the script removed its namespaces and links
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert f"ingestd-{run_id}-" not in namespaces, namespaces
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
    assert f"ig{run_id}" not in links and f"igb{run_id}" not in links, links
