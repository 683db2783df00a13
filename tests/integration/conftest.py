from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.harness import AWS_ENV, Daemon, merge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> str:
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{id(request) % 10000}"
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def memory_path(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs for the logs of memory durability (as in production), removed at teardown."""
    path = Path("/dev/shm") / f"ingestd-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


FRONTS = ("waitress", "uvloop")  # every value of http.server


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked `every_front` runs once per HTTP front: each must meet the same contract.
    Module scope, so that a module's own daemon (a module-scoped fixture) is started once per front."""
    if "front" in metafunc.fixturenames and metafunc.definition.get_closest_marker("every_front"):
        metafunc.parametrize("front", FRONTS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def front(request: pytest.FixtureRequest) -> str:
    """The http.server of the daemons a test starts: each of FRONTS in a module marked
    `every_front`, else the default."""
    return str(getattr(request, "param", "waitress"))


@pytest.fixture
def daemon_factory(tmp_path: Path, memory_path: Path, front: str) -> Iterator[Callable[..., Daemon]]:
    """Build (not start) daemons in tmp_path; every one is killed by process group at teardown."""
    made: list[Daemon] = []

    def make(extra: dict[str, dict[str, Any]] | None = None, env: dict[str, str] | None = None) -> Daemon:
        base = {
            # the key only where it is not the default: a config any build of ingestd reads
            "http": {"listen": "127.0.0.1:0", **({"server": front} if front != "waitress" else {})},
            "sink": {"kind": "directory", "path": str(tmp_path / "objects")},
            "spool": {"path": str(tmp_path / "spool"), "memory_path": str(memory_path)},
            "batch": {"max_age_ms": 200},
            "shutdown": {"drain_timeout_s": 10},
        }
        d = Daemon(tmp_path, merge(base, extra), env)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.kill_group()


@pytest.fixture
def s3_tables(moto_server: str, bucket: str) -> dict[str, dict[str, Any]]:
    return {"sink": {"kind": "s3", "bucket": bucket, "endpoint_url": moto_server, "region": "us-east-1",
                     "prefix": "telemetry"}}


@pytest.fixture
def stalled_sink() -> Iterator[Any]:
    """A TCP endpoint that accepts and never answers; closed at teardown."""
    from tests.harness import StalledServer

    with StalledServer() as server:
        yield server


@pytest.fixture
def stalled_s3_tables(stalled_sink: Any) -> dict[str, dict[str, Any]]:
    """An S3 sink pointed at `stalled_sink`: every upload attempt ends in a quick read timeout."""
    return {"sink": {"kind": "s3", "bucket": "stalled", "endpoint_url": stalled_sink.url, "region": "us-east-1",
                     "prefix": "telemetry", "connect_timeout_s": 0.5, "read_timeout_s": 0.3,
                     "retry_base_ms": 50, "retry_max_ms": 200}}
