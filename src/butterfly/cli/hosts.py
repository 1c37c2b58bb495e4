"""`butterfly init`: the files of a cluster on real machines, one directory per host.

`init_cluster` writes, under OUT:

    ca/ca.pem, ca/ca.key          the cluster CA; ca.key signs certificates of hosts added
                                  later and never leaves the machine init ran on
    node-<i>/butterfly.toml       node i's config (the doc `launcher.node_doc` builds)
    node-<i>/node.key             node i's Ed25519 signing key (its data directory is node-<i>)
    node-<i>/public_keys.txt      every member's id, address and public key, to compare
    node-<i>/tls/                 ca.pem and node i's certificate and TLS key

Every path inside a config is relative to the config file, so a host directory works
wherever it is copied. The keys are made here, on one machine, because every config must
list every member's public key (protocol.keys): a host's key arriving later by copy-paste
is how a typo makes every vote of a node look forged.

`add_host` appends one member: it writes the new host's directory and rewrites
`cluster.members`/`cluster.public_keys` in every existing host's config under OUT. Both
options are static-critical (equal on every node, read at start), and the agreement has
no membership command, so a running cluster takes them by a full restart: stop every
node, copy the new configs, start every node. A rolling restart would run nodes with
different member lists side by side, and two such nodes count quorums differently.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from butterfly.cli.launcher import node_doc
from butterfly.config import ConfigInvalid, dump_toml, largest_safe_f, load_config
from butterfly.config.schema import HostPort
from butterfly.net.tls import NAME_PREFIX, TlsFiles, add_node_cert, cert_paths, make_certs
from butterfly.protocol.keys import KEY_FILE, key_path, load_or_create_key
from butterfly.types.errors import ConfigError

CONFIG_FILE = "butterfly.toml"
KEYS_FILE = "public_keys.txt"
CA_DIR = "ca"
TLS_DIR = "tls"
_ADDRESS: TypeAdapter[str] = TypeAdapter(HostPort)


@dataclass(frozen=True)
class InitOptions:
    """What `butterfly init` is asked for. `f` None = the largest f the hosts allow."""

    hosts: tuple[str, ...]
    model: str
    f: int | None = None
    api_port: int = 8080
    cluster_id: str = "butterfly"
    bind: str = "0.0.0.0"  # nodes listen on all interfaces; peers dial `hosts`
    tls: bool = True
    settings: Mapping[str, Any] = field(default_factory=dict)  # dotted key -> value


@dataclass(frozen=True)
class HostAdded:
    config: Path
    members: tuple[str, ...]
    public_keys: tuple[str, ...]
    change: str  # the TOML to apply to every running node


def parse_hosts(text: str) -> tuple[str, ...]:
    """`HOST:PORT,HOST:PORT,...`, each checked as the config will check it."""
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    for h in hosts:
        check_address(h)
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"a host is listed twice in {text!r}: every node needs its own address")
    return hosts


def check_address(address: str) -> str:
    try:
        _ADDRESS.validate_python(address)
    except ValidationError as e:
        raise ConfigError(f"{address!r}: {e.errors()[0]['msg']}") from None
    return address


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]")


def _check_name(node: int, address: str) -> None:
    """A host called node-<k> would be read as node k's certificate name (net.tls)."""
    host = host_of(address)
    if host.startswith(NAME_PREFIX) and host != f"{NAME_PREFIX}{node}":
        raise ConfigError(
            f"host {host!r} of node {node} looks like another node's certificate name; "
            "use an IP address or another host name"
        )


def node_dir(out: Path, node: int) -> Path:
    return out / f"node-{node}"


def _tls_files(out: Path, node: int, made: TlsFiles) -> TlsFiles:
    """Move the node's pair into its directory, beside a copy of the CA certificate, so
    its TLS key exists once and the CA key stays behind in `ca/`."""
    dest = node_dir(out, node) / TLS_DIR
    dest.mkdir(parents=True, exist_ok=True)
    cert, key = cert_paths(dest, node)
    shutil.copyfile(made.ca, dest / "ca.pem")
    shutil.move(made.cert, cert)
    shutil.move(made.key, key)  # a rename: keeps mode 0600
    rel = Path(TLS_DIR)
    return TlsFiles(rel / "ca.pem", rel / cert.name, rel / key.name)


def _write_keys_list(out: Path, members: Sequence[str], keys: Sequence[str]) -> None:
    lines = [f"{i} {m} {k}" for i, (m, k) in enumerate(zip(members, keys, strict=True))]
    text = "# node address public-key (cluster.public_keys, in node id order)\n"
    for i in range(len(members)):
        (node_dir(out, i) / KEYS_FILE).write_text(text + "\n".join(lines) + "\n")


def _write_doc(out: Path, node: int, doc: dict[str, Any]) -> Path:
    path = node_dir(out, node) / CONFIG_FILE
    path.write_text(dump_toml(doc))
    return path


def init_cluster(opts: InitOptions, out: Path) -> list[Path]:
    """Write every host's directory under `out` (which must not hold a cluster yet)."""
    n = len(opts.hosts)
    if n == 0:
        raise ConfigError("--hosts lists no host")
    f = largest_safe_f(n) if opts.f is None else opts.f
    if n < 3 * f + 1:
        raise ConfigError(
            f"{n} hosts tolerate at most f={largest_safe_f(n)} (n >= 3f+1); f={f} needs "
            f"{3 * f + 1} hosts"
        )
    if (out / CA_DIR).exists() or node_dir(out, 0).exists():
        raise ConfigError(f"{out} already holds a cluster; choose an empty directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not an empty directory; choose an empty one")
    for i, address in enumerate(opts.hosts):
        _check_name(i, address)
    keys = [load_or_create_key(node_dir(out, i) / KEY_FILE).public.hex() for i in range(n)]
    certs: dict[int, TlsFiles] = {}
    if opts.tls:
        made = make_certs(
            out / CA_DIR, n, opts.cluster_id, {i: host_of(h) for i, h in enumerate(opts.hosts)}
        )
        certs = {i: _tls_files(out, i, made[i]) for i in range(n)}
    paths = []
    for i, address in enumerate(opts.hosts):
        doc = node_doc(
            cluster_id=opts.cluster_id,
            members=opts.hosts,
            keys=keys,
            node=i,
            listen=f"{opts.bind}:{address.rsplit(':', 1)[1]}",
            data_dir=".",
            f=f,
            model=opts.model,
            api=(opts.bind, opts.api_port),
            tls=certs.get(i),
        )
        for dotted, value in opts.settings.items():
            *parents, leaf = dotted.split(".")
            table = doc
            for p in parents:
                table = table.setdefault(p, {})
            table[leaf] = value
        paths.append(_write_doc(out, i, doc))
    _write_keys_list(out, opts.hosts, keys)
    return paths


def remove_init(out: Path) -> None:
    """Take back what `init_cluster` wrote into `out` (empty or absent before it), so a
    refused init can be run again with the mistake mended."""
    for entry in [out / CA_DIR, *out.glob("node-*")]:
        if entry.is_dir():
            shutil.rmtree(entry)
    with contextlib.suppress(OSError):
        out.rmdir()  # only if nothing else is there


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path} (written by `butterfly init`?): {e}") from e


def membership_change(members: Sequence[str], keys: Sequence[str]) -> str:
    """The `[cluster]` lines every node's config must carry after a host is added."""
    return dump_toml({"cluster": {"members": list(members), "public_keys": list(keys)}})


def add_host(out: Path, address: str) -> HostAdded:
    """Write the directory of a new last member and update every host's config in `out`."""
    check_address(address)
    existing = sorted(
        int(d.name.removeprefix("node-"))
        for d in out.glob("node-*")
        if (d / CONFIG_FILE).is_file() and d.name.removeprefix("node-").isdigit()
    )
    if not existing or existing != list(range(len(existing))):
        raise ConfigError(f"{out} holds no cluster written by `butterfly init --hosts`")
    first = node_dir(out, 0) / CONFIG_FILE
    base = _read_doc(first)
    # the values from the loader (defaults where a hand edit left a key out); the files
    # are rewritten from their own tables, so what a host wrote by hand stays
    cfg = load_config([first], on_this_machine=False)
    if not cfg.cluster.members:
        raise ConfigError(f"{first} lists no cluster.members to add {address} to")
    members = [*cfg.cluster.members, address]
    new = len(members) - 1
    if existing != list(range(new)):
        raise ConfigError(
            f"{out} has the directories of nodes {existing} but the cluster has {new} "
            "members: every host's directory must be there to be updated"
        )
    if address in members[:-1]:
        raise ConfigError(f"{address} is already member {members.index(address)}")
    _check_name(new, address)
    new_key = load_or_create_key(node_dir(out, new) / KEY_FILE).public.hex()
    keys = [*cfg.cluster.public_keys, new_key]
    doc = copy.deepcopy(base)
    bind = cfg.node.listen.rsplit(":", 1)[0]
    port = address.rsplit(":", 1)[1]
    doc["node"] = {**base.get("node", {}), "id": new, "listen": f"{bind}:{port}"}
    if cfg.security.tls.enabled:
        made = add_node_cert(out / CA_DIR, new, cfg.cluster.id, host_of(address))
        tls = _tls_files(out, new, made)
        doc.setdefault("security", {})["tls"] = {
            "enabled": True,
            "ca": str(tls.ca),
            "cert": str(tls.cert),
            "key": str(tls.key),
        }
    docs = [*(_read_doc(node_dir(out, i) / CONFIG_FILE) for i in existing), doc]
    for i, d in enumerate(docs):
        d["cluster"] = {**d.get("cluster", {}), "members": members, "public_keys": keys}
        _write_doc(out, i, d)
    _write_keys_list(out, members, keys)
    path = node_dir(out, new) / CONFIG_FILE
    return HostAdded(path, tuple(members), tuple(keys), membership_change(members, keys))


def check_configs(paths: Sequence[Path]) -> list[str]:
    """Load every written config as its node will; returns notes, raises what would stop a
    node. A model missing on this machine is a note: it has to be on the hosts, not here."""
    notes = []
    for path in paths:
        try:
            load_config([path])
        except ConfigInvalid as e:
            serious = [i for i in e.issues if i.rule != "model-exists"]
            if serious:
                raise ConfigInvalid(serious) from None
            notes.append(f"{path}: {e.issues[0].message}; put the model there on that host")
    return notes


def public_key(config: Path) -> tuple[str, Path]:
    """The node's public key (hex) and its key file, created on first use as a node does."""
    # the key's place does not depend on the model, which need not be on this host yet
    cfg = load_config([config], overrides={"model": {"path": ""}})
    path = key_path(cfg, Path(cfg.node.data_dir))
    return load_or_create_key(path).public.hex(), path
