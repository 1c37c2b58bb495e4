"""Several "hosts" on one machine: network namespaces joined by veth pairs and a bridge.

Loopback hides what breaks between real machines: a node binding 127.0.0.1, a peer
dialed by the wrong address, a certificate without the host's address. Here each node
runs in a network namespace of its own with its own address on an interface this module
creates (`10.213.<k>.<i+1>/24`, `k` from the process id so two runs do not collide), and
the root namespace reaches the nodes through the bridge's address (`.254`), as a client
on another machine would. Everything made is listed as it is made and removed by
`close()`, in reverse, whatever failed half-way; names carry a random tag so nothing
here can touch another run's namespaces.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2's `ip`; `unavailable()` says
why a machine cannot run it, for a test to skip with that reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from butterfly.cli.hosts import InitOptions, init_cluster
from butterfly.cli.launcher import LocalCluster

SUBNET_PREFIX = "10.213"
IP_TIMEOUT_S = 10.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=IP_TIMEOUT_S)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"bfprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = e.stderr.decode(errors="replace").strip() if e.stderr else str(e)
        return f"`ip netns add` failed: {detail}"
    try:
        _ip("netns", "del", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"`ip netns del` failed: {e}"
    return None


@dataclass
class Hosts:
    """`count` namespaces on one bridge. Use as a context manager, or call close()."""

    count: int
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: str = field(default_factory=lambda: f"{SUBNET_PREFIX}.{os.getpid() % 250}")
    _undo: list[Sequence[str]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"bfbr{self.tag}"

    def namespace(self, i: int) -> str:
        return f"bf{self.tag}-{i}"

    def address(self, i: int) -> str:
        """Host i's address (i from 0)."""
        return f"{self.subnet}.{i + 1}"

    @property
    def root_address(self) -> str:
        """The root namespace's address on the bridge: where a test's client stands."""
        return f"{self.subnet}.254"

    def exec_prefix(self, i: int) -> tuple[str, ...]:
        """Prefix a command with this to run it in host i (`ip netns exec` execs it, so
        the child's PID is the command's own)."""
        return ("ip", "netns", "exec", self.namespace(i))

    def _made(self, *undo: str) -> None:
        self._undo.append(undo)

    def open(self) -> Hosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made("link", "del", self.bridge)
            _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.count):
                ns, outside, inside = self.namespace(i), f"bfh{self.tag}{i}", f"bfn{self.tag}{i}"
                _ip("netns", "add", ns)
                self._made("netns", "del", ns)
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                self._made("link", "del", outside)  # also removes its peer, wherever it is
                _ip("link", "set", inside, "netns", ns)
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> list[str]:
        """Remove everything made, newest first; returns what could not be removed."""
        left = []
        while self._undo:
            undo = self._undo.pop()
            try:
                _ip(*undo)
            except subprocess.CalledProcessError as e:
                if b"Cannot find device" not in (e.stderr or b""):  # gone with its namespace
                    left.append(" ".join(undo))
            except subprocess.TimeoutExpired:
                left.append(" ".join(undo))
        return left

    def __enter__(self) -> Hosts:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def leftovers(hosts: Hosts) -> list[str]:
    """Namespaces and links of `hosts` still present (a test checks there are none)."""
    found = []
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=IP_TIMEOUT_S
    ).stdout
    found += [line.split()[0] for line in names.splitlines() if line.startswith(f"bf{hosts.tag}-")]
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=IP_TIMEOUT_S
    ).stdout
    ours = {hosts.bridge, *(f"bfh{hosts.tag}{i}" for i in range(hosts.count))}
    found += [
        name
        for line in links.splitlines()
        if (name := line.split(":")[1].split("@")[0].strip()) in ours
    ]
    return found


NODE_PORT = 9000
API_PORT = 8080


@contextmanager
def cluster_on_hosts(
    model: Path,
    out: Path,
    count: int,
    *,
    f: int | None = None,
    settings: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> Iterator[tuple[Hosts, LocalCluster]]:
    """`count` hosts, their files written by `butterfly init` (TLS on), one node each,
    every node listening on the same port in its own namespace, node 0 serving the API
    at `http://<host 0>:8080`. On exit every node is stopped and reaped by PID (killed
    after a bounded grace), then every namespace and link removed."""
    with Hosts(count) as hosts:
        opts = InitOptions(
            hosts=tuple(f"{hosts.address(i)}:{NODE_PORT}" for i in range(count)),
            model=str(model.absolute()),
            f=f,
            api_port=API_PORT,
            settings=dict(settings or {}),
        )
        configs = init_cluster(opts, out)
        url = f"http://{hosts.address(0)}:{API_PORT}"
        cluster = LocalCluster(
            configs, url, out, prefix={i: hosts.exec_prefix(i) for i in range(count)}
        )
        try:
            cluster.start()
            cluster.wait_ready(timeout_s)
            yield hosts, cluster
        finally:
            cluster.stop(grace_s=10.0)
