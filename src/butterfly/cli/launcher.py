"""`butterfly cluster up`: N node processes on 127.0.0.1, in the foreground.

Each node gets its own TOML file (the frozen config is handed over as a file, never
through environment variables) and its own data directory. Each is forked from a server
that imported a node's code once (`cli.prefork`), unless it runs under a prefix (a
network namespace's `ip netns exec`). The launcher owns every node by PID: on Ctrl-C,
SIGTERM, or a node dying early, it terminates all of them, waits, and kills what is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from butterfly.cli.prefork import CannotFork, NodeProcess, fork_node, forkable
from butterfly.config import dump_toml
from butterfly.net.tls import TlsFiles, cert_paths, make_certs
from butterfly.protocol.keys import KEY_FILE, load_or_create_key

log = logging.getLogger(__name__)

# Idle OpenMP threads of waiting stages spin and steal the active stage's cores; a short
# spin before sleeping made a 4-stage pipeline 1.59x -> 1.17x the single process
# (MEASUREMENTS.md). This is a runtime-library setting, not Butterfly configuration.
CHILD_ENV = {"GOMP_SPINCOUNT": "20000"}


PORTS_LOW, PORTS_HIGH = 20000, 32000  # below Linux's default ephemeral range, 32768-60999


def free_ports(
    n: int,
    host: str = "127.0.0.1",
    avoid: frozenset[int] = frozenset(),
    rng: random.Random | None = None,
) -> list[int]:
    """`n` distinct free ports, none in `avoid`, below the kernel's ephemeral range (as
    `free_port_block`'s): a port the kernel hands out for port 0 is one any outgoing
    connection may take next, before the node binds it. CI saw a node refuse to start
    for that reason (a test's client had the node's listen port); before that, the API's
    port, chosen and released first, came back as a node's (hence `avoid`)."""
    rng = rng or random.Random()
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        for _ in range(200 + n):
            port = rng.randrange(PORTS_LOW, PORTS_HIGH)
            if port in avoid or port in ports:
                continue
            s = socket.socket()
            socks.append(s)  # held until the end: each one really free at once
            try:
                s.bind((host, port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == n:
                return ports
        raise RuntimeError(f"could not find {n} free ports on {host} outside {sorted(avoid)}")
    finally:
        for s in socks:
            s.close()


def node_doc(
    *,
    cluster_id: str,
    members: Sequence[str],
    keys: Sequence[str],
    node: int,
    listen: str,
    data_dir: str,
    f: int,
    model: str,
    api: tuple[str, int],
    tls: TlsFiles | None,
) -> dict[str, Any]:
    """One node's TOML document: who the cluster is, who this node is, and its files.

    Shared by the loopback launcher and `butterfly init` (cli.hosts), so a local cluster
    and a deployed one differ only in addresses and paths, never in what they set.
    """
    doc: dict[str, Any] = {
        "cluster": {"id": cluster_id, "members": list(members), "public_keys": list(keys)},
        "node": {"id": node, "listen": listen, "data_dir": data_dir},
        "byzantine": {"f": f},
        "model": {"path": model},
        "api": {"host": api[0], "port": api[1]},
    }
    if tls is not None:
        doc["security"] = {
            "tls": {"enabled": True, "ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)}
        }
    return doc


def free_port_block(
    count: int, host: str = "127.0.0.1", low: int = PORTS_LOW, high: int = PORTS_HIGH
) -> int:
    """The first of `count` consecutive free ports, below the kernel's ephemeral range.

    Gateway k serves its API on the first gateway's port + k, so a loopback cluster needs
    a run of free ports, not one. Ports the kernel hands out (binding port 0) lie in its
    ephemeral range, where any outgoing connection may take the next port at any moment:
    CI once saw a standby gateway unable to bind its API at takeover for that reason.
    """
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host} in [{low}, {high})")


def node_configs(
    *,
    nodes: int,
    f: int,
    model: Path,
    api_port: int,
    data_dir: Path,
    settings: dict[str, Any] | None = None,
    tls: bool = False,
) -> list[Path]:
    """Write node-<i>.toml for a loopback cluster; returns their paths.

    Each node's signing key is created in its data directory (kept if it exists, so a
    restarted cluster keeps its identities) and every TOML lists all public keys. With
    `tls`, a cluster CA and node certificates are made under `<data_dir>/tls` (kept if
    there) and every node is set to mutual TLS. In replicate mode each node gets its
    share of this machine's cores unless `settings` say otherwise.
    """
    certs: dict[int, TlsFiles] = {}
    if tls:
        tls_dir = data_dir / "tls"
        certs = (
            {i: TlsFiles(tls_dir / "ca.pem", *cert_paths(tls_dir, i)) for i in range(nodes)}
            if all(p.is_file() for i in range(nodes) for p in cert_paths(tls_dir, i))
            else make_certs(tls_dir, nodes, "local")
        )
    # every gateway-capable node serves its API on a port after api.port (config.gateways);
    # a `settings` api.port is the one the files say, so its ports are the ones kept free
    gateways = len((settings or {}).get("cluster.gateways", ())) or min(nodes, max(2, f + 1))
    first = (settings or {}).get("api.port", api_port)
    first = first if isinstance(first, int) else api_port  # a bad value: the files refuse it
    api_ports = frozenset(range(first, first + gateways)) if first else frozenset()
    ports = free_ports(nodes, avoid=api_ports)
    members = [f"127.0.0.1:{p}" for p in ports]
    dirs = [data_dir / f"node-{i}" for i in range(nodes)]
    keys = [load_or_create_key(d / KEY_FILE).public.hex() for d in dirs]
    paths = []
    for i, node_dir in enumerate(dirs):
        node_dir.mkdir(parents=True, exist_ok=True)
        doc = node_doc(
            cluster_id="local",
            members=members,
            keys=keys,
            node=i,
            listen=members[i],
            data_dir=str(node_dir),
            f=f,
            model=str(model),
            api=("127.0.0.1", api_port),
            tls=certs.get(i),
        )
        if (settings or {}).get("byzantine.verification") == "replicate":
            # f + 1 lanes compute at once on this one machine, so each node gets its share
            # of the cores (2 cores, f = 1: 60 ms/token with both each, 39 ms with one)
            doc["resources"] = {"threads": max(1, len(os.sched_getaffinity(0)) // (f + 1))}
        for dotted, value in (settings or {}).items():
            section, key = dotted.split(".", 1)
            doc.setdefault(section, {})[key] = value
        path = data_dir / f"node-{i}.toml"
        path.write_text(dump_toml(doc))
        paths.append(path)
    return paths


@dataclass
class LocalCluster:
    """Child node processes started from config files; stop() reaps every one by PID."""

    configs: list[Path]
    api_url: str
    log_dir: Path
    command: Sequence[str] = (sys.executable, "-m", "butterfly", "start", "--config")
    procs: list[NodeProcess] = field(default_factory=list)
    # per node: extra arguments after the config path (the testing launcher's liars)
    extra_args: dict[int, Sequence[str]] = field(default_factory=dict)
    # per node: a command that runs the node's command (`ip netns exec NS`, testing.netns)
    prefix: dict[int, Sequence[str]] = field(default_factory=dict)

    def _spawn(self, index: int) -> NodeProcess:
        """Forked from a fork server that imported a node's code once (`cli.prefork`); a
        node run under a `prefix`, or by a command other than `python -m`, starts anew."""
        command = [*self.command, str(self.configs[index]), *self.extra_args.get(index, ())]
        log_path = self.log_dir / f"node-{index}.log"
        env = {**os.environ, **CHILD_ENV}
        if index not in self.prefix and forkable(command):
            try:
                return fork_node(command, log_path, env)
            except CannotFork as e:  # a node it cannot fork starts as a fresh process
                log.warning("node %d started anew: %s", index, e)
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                [*self.prefix.get(index, ()), *command], stdout=out, stderr=out, env=env
            )

    def start(self) -> None:
        """One node after another, each kept as it starts: one that fails to start (an
        interrupt) leaves those before it in `procs`, for `stop` (a review)."""
        self.procs = []
        for i in range(len(self.configs)):
            self.procs.append(self._spawn(i))

    def restart(self, index: int) -> None:
        """Start node `index` again from its config (after a kill or a stop)."""
        if self.procs[index].poll() is None:
            raise RuntimeError(f"node {index} (pid {self.procs[index].pid}) is still running")
        self.procs[index] = self._spawn(index)

    def gateway_url(self, k: int) -> str:
        """Gateway k's API URL: the first gateway's port + k (`free_port_block`)."""
        host, port = self.api_url.rsplit(":", 1)
        return f"{host}:{int(port) + k}"

    def acting_url(self, client: httpx.Client | None = None) -> str:
        """The acting gateway's API URL: `api_url` (the first gateway's), or the one its
        `/health` names when another gateway-capable node took over."""
        with contextlib.ExitStack() as stack:
            if client is None:
                client = stack.enter_context(httpx.Client(timeout=2.0))
            with contextlib.suppress(httpx.HTTPError, ValueError):
                gateways = client.get(f"{self.api_url}/health").json().get("gateways", [])
                for g in gateways:
                    if g.get("acting") and g.get("url"):
                        return str(g["url"])
        return self.api_url

    def wait_ready(
        self,
        timeout_s: float = 120.0,
        on_dead: Callable[[], None] | None = None,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        """Until the acting gateway reports a healthy cluster; raises if a node dies
        first, unless `on_dead` is given: then it is called on every look while a node
        is down (`cluster up` restarts it), and the cluster may still come up without
        it (any n - f members start it). Before, `cluster up` stopped every node when
        one died during start-up, or in the moment between the gateway's first healthy
        /health and this loop's next look. Returns early once `stopped()` (a SIGTERM
        during start-up: before, it was acted on only once the cluster was healthy)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if stopped():
                    return
                dead = [(i, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]
                if dead and on_dead is not None:
                    on_dead()
                elif dead:
                    raise RuntimeError(
                        f"node(s) exited during start-up: {dead}; see logs in {self.log_dir}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    r = client.get(f"{self.acting_url(client)}/health")
                    if r.status_code == 200 and r.json().get("healthy"):
                        return
                time.sleep(0.2)
        raise TimeoutError(f"cluster not healthy after {timeout_s:.0f} s; logs in {self.log_dir}")

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.procs]

    def dead(self) -> dict[int, int]:
        """Nodes whose process has exited, with their exit codes."""
        return {i: code for i, p in enumerate(self.procs) if (code := p.poll()) is not None}

    def stop(self, grace_s: float = 10.0) -> list[int | None]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
        return [p.returncode for p in self.procs]

    def kill(self, index: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.procs[index].kill()
        self.procs[index].wait(timeout=5)
