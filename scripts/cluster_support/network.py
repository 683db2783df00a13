"""The network of one run: a Linux bridge in the root namespace and, per host, a network
namespace joined to it by a veth pair.

Addresses are private to this machine: 10.211.K.0/24, the bridge at .1 (HAProxy and the client
reach the hosts through it) and host i at .(10 + i). K is the first /24 of 10.211.0.0/16 that no
address or route of the root namespace uses yet, chosen under a lock file so that parallel runs
never share a subnet. Every name carries the run's id (bridge `igb<id>`, veth `ig<id>h<i>` /
`ig<id>n<i>`, namespace `ingestd-<id>-h<i>`; link names stay within the kernel's 15 bytes).

What a run creates is listed in a state file under /run/ingestd-cluster/ with the pid of its
owner, so that `scripts/cluster cleanup` can remove what a run killed with SIGKILL left behind.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import TimedOut, Unavailable, run, wait_for

SUPERNET = ipaddress.IPv4Network("10.211.0.0/16")
STATE_DIR = Path("/run/ingestd-cluster")
LOCK_PATH = Path("/run/lock/ingestd-cluster.lock")


@dataclass(frozen=True)
class Endpoint:
    """One host's place on the network."""

    index: int  # 1-based
    netns: str
    address: str  # its address inside its namespace
    veth_root: str  # the end on the bridge
    veth_host: str  # the end inside the namespace


@dataclass
class State:
    """What a run created, written to STATE_DIR/<run id>.json for `cleanup`."""

    run_id: str
    owner_pid: int
    bridge: str = ""
    subnet: str = ""
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # to remove: the hosts' tmpfs logs, HAProxy's socket
    pids: list[int] = field(default_factory=list)  # processes in the root namespace (HAProxy)
    marker: str = ""  # a string every one of those processes has on its command line
    run_dir: str = ""  # configs, logs and the sink: kept by `cleanup` for a look

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = STATE_DIR / f".{self.run_id}.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(STATE_DIR / f"{self.run_id}.json")

    def forget(self) -> None:
        (STATE_DIR / f"{self.run_id}.json").unlink(missing_ok=True)


def require_root() -> None:
    if os.geteuid() != 0:
        raise Unavailable("scripts/cluster needs root (network namespaces, veth pairs, a bridge)")


def free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of SUPERNET that no address or route of the root namespace touches."""
    used = run(["ip", "-4", "-o", "addr", "show"]).stdout + run(["ip", "-4", "route", "show", "table", "all"]).stdout
    taken = []
    for text in re.findall(r"\b10\.211\.\d+\.\d+(?:/\d+)?", used):
        taken.append(ipaddress.ip_network(text, strict=False))
    for subnet in SUPERNET.subnets(new_prefix=24):
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise Unavailable(f"every /24 of {SUPERNET} is in use on this machine")


class Network:
    """Creates and destroys the bridge, namespaces and veth pairs of one run."""

    def __init__(self, run_id: str, hosts: int) -> None:
        self.run_id = run_id
        self.hosts = hosts
        self.bridge = f"igb{run_id}"
        self.state = State(run_id, os.getpid())
        self.subnet: ipaddress.IPv4Network | None = None
        self.endpoints: list[Endpoint] = []

    @property
    def gateway(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def create(self) -> list[Endpoint]:
        require_root()
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK_PATH, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until the bridge owns its subnet
            self.subnet = free_subnet()
            self.state.subnet = str(self.subnet)
            self._created("bridge", self.bridge)
            run(["ip", "link", "add", self.bridge, "type", "bridge"])
            run(["ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge])
            run(["ip", "link", "set", self.bridge, "up"])
        for i in range(1, self.hosts + 1):
            self.endpoints.append(self._add_host(i))
        return self.endpoints

    def _created(self, kind: str, name: str) -> None:
        """Record before creating, so that a failure half-way still gets cleaned up."""
        if kind == "bridge":
            self.state.bridge = name
        elif kind == "netns":
            self.state.netns.append(name)
        else:
            self.state.links.append(name)
        self.state.save()

    def _add_host(self, i: int) -> Endpoint:
        assert self.subnet is not None
        ns = f"ingestd-{self.run_id}-h{i}"
        ep = Endpoint(i, ns, str(self.subnet.network_address + 10 + i), f"ig{self.run_id}h{i}", f"ig{self.run_id}n{i}")
        self._created("netns", ns)
        proc = run(["ip", "netns", "add", ns], check=False)
        if proc.returncode != 0:
            raise Unavailable(f"`ip netns add` was refused: {proc.stderr.strip()}")
        self._created("link", ep.veth_root)
        run(["ip", "link", "add", ep.veth_root, "type", "veth", "peer", "name", ep.veth_host, "netns", ns])
        run(["ip", "link", "set", ep.veth_root, "master", self.bridge, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{ep.address}/{self.subnet.prefixlen}", "dev", ep.veth_host])
        run(["ip", "-n", ns, "link", "set", ep.veth_host, "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ep

    def destroy(self) -> list[str]:
        """Remove everything this run created; returns what could not be removed."""
        return teardown(self.state)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_netns_processes(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL whatever still runs in namespace `ns` (only this run's processes can be there)."""
    def pids() -> list[int]:
        return [int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()]

    for _ in range(3):  # a process forked while we were killing shows up in the next round
        found = pids()
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            wait_for(lambda: not pids(), timeout, f"the processes of {ns} to die", interval=0.1)
        except TimedOut:
            pass


def teardown(state: State) -> list[str]:
    """Undo what `state` lists, in reverse order of creation; returns what failed."""
    problems: list[str] = []
    for pid in state.pids:
        if state.marker and state.marker in _cmdline(pid):
            try:
                os.killpg(pid, signal.SIGKILL)  # started with its own session: its group is its own
            except ProcessLookupError:
                pass
    existing_ns = set(run(["ip", "netns", "list"], check=False).stdout.split())
    for ns in reversed(state.netns):
        if ns in existing_ns:
            kill_netns_processes(ns)
    for link in reversed(state.links):
        if run(["ip", "link", "show", link], check=False).returncode == 0:
            proc = run(["ip", "link", "del", link], check=False)
            if proc.returncode != 0:
                problems.append(f"ip link del {link}: {proc.stderr.strip()}")
    for ns in reversed(state.netns):
        if ns in existing_ns:
            proc = run(["ip", "netns", "del", ns], check=False)
            if proc.returncode != 0:
                problems.append(f"ip netns del {ns}: {proc.stderr.strip()}")
    if state.bridge and run(["ip", "link", "show", state.bridge], check=False).returncode == 0:
        proc = run(["ip", "link", "del", state.bridge], check=False)
        if proc.returncode != 0:
            problems.append(f"ip link del {state.bridge}: {proc.stderr.strip()}")
    for path in map(Path, state.paths):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if not problems:
        state.forget()
    return problems


def leftovers() -> list[State]:
    """States of runs whose owner is gone (killed before its `finally` ran)."""
    out = []
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []:
        try:
            state = State(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if not _alive(state.owner_pid) or "cluster_support" not in _cmdline(state.owner_pid):
            out.append(state)  # its owner died (or its pid now belongs to something else)
    return out
