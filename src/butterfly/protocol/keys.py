"""Node signing keys: one Ed25519 key per node in its data directory, public keys in config.

Every node must know every member's public key before it trusts a vote, so the keys are
configuration (`cluster.public_keys`, one hex string per member), never learned from the
peers themselves: a liar could otherwise introduce itself under any key. `node_configs`
(the local launcher) creates the key files and writes the public keys into every node's
TOML; a one-node cluster may leave the list empty and uses its own key.

The private key file holds the 32-byte Ed25519 seed as hex, readable by its owner only.
"""

from __future__ import annotations

import os
from pathlib import Path

from butterfly.config import ButterflyConfig
from butterfly.config.validate import cluster_size
from butterfly.protocol.failure_detector import steady_detection_s
from butterfly.protocol.pbft_members import epoch_of
from butterfly.protocol.pbft_state import PbftConfig
from butterfly.protocol.sign import SigningKey
from butterfly.types.errors import ConfigError
from butterfly.types.ids import NodeId

KEY_FILE = "node.key"


def key_path(cfg: ButterflyConfig, data_dir: Path) -> Path:
    """`security.signing_key`, or `<data_dir>/node.key` when unset."""
    return Path(cfg.security.signing_key) if cfg.security.signing_key else data_dir / KEY_FILE


def load_or_create_key(path: Path) -> SigningKey:
    """The key at `path`, created (mode 0600) on first use."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        key_seed = os.urandom(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key_seed.hex() + "\n")
        os.replace(tmp, path)  # atomic: a crash never leaves half a key
        return SigningKey.from_seed(key_seed)
    except OSError as e:
        raise ConfigError(f"cannot read the signing key {path}: {e}") from None
    try:
        seed = bytes.fromhex(text)
        return SigningKey.from_seed(seed)
    except ValueError:
        raise ConfigError(
            f"{path} is not a signing key (expected 64 hex characters); "
            "move it away to have a new key created, then update cluster.public_keys"
        ) from None


def missing_keys(cfg: ButterflyConfig) -> str | None:
    """Why a node of this config cannot start for want of its members' keys (None: it
    has them, or runs alone): keys are never learned from peers. `config validate` asks
    it too, so a file it passes is not refused by `start` for this."""
    n = cluster_size(cfg)
    if not cfg.cluster.public_keys and n > 1:
        return (
            f"cluster.public_keys is empty but the cluster has {n} members: list one key "
            "per member (`butterfly cluster up` and `butterfly init` write them)"
        )
    return None


def public_keys(cfg: ButterflyConfig, key: SigningKey) -> tuple[bytes, ...]:
    """Every member's public key, index = node id; checks that ours matches our key file."""
    if (missing := missing_keys(cfg)) is not None:
        raise ConfigError(missing)
    if not cfg.cluster.public_keys:
        return (key.public,)
    keys = tuple(bytes.fromhex(k) for k in cfg.cluster.public_keys)  # b"": removed
    me = cfg.node.id
    if not keys[me]:
        raise ConfigError(
            f"node {me} was removed from the cluster (cluster.members[{me}] and "
            f"cluster.public_keys[{me}] are empty); its id is never reused: add this machine "
            "again as a new member (`butterfly cluster add-member`)"
        )
    if keys[me] != key.public:
        raise ConfigError(
            f"cluster.public_keys[{me}] does not match this node's key file; the cluster "
            "would reject every vote it signs"
        )
    return keys


def pbft_config(cfg: ButterflyConfig, keys: tuple[bytes, ...]) -> PbftConfig:
    """This node's replica configuration; nodes are also the only clients (the gateway and
    any node proposing a command sign requests with their node key).

    Replicas start in view 1, so the primary is node 1, not the gateway (node 0): the
    gateway already serves the API and drives generation, and a primary that dies then
    costs a view change while the gateway keeps serving.
    """
    c = cfg.coordination
    return PbftConfig(
        replica=NodeId(cfg.node.id),
        keys=keys,
        f=cfg.byzantine.f,
        clients={NodeId(i): k for i, k in enumerate(keys) if k},
        checkpoint_interval=c.pbft_checkpoint_interval,
        window=c.pbft_window,
        history=c.pbft_history,
        request_timeout=c.view_change_timeout_ms / 1000,
        view_change_timeout=c.phase_timeout_ms / 1000,
        initial_view=1 if len(keys) > 1 else 0,
        epoch=epoch_of(keys),  # a function of the roster (protocol.pbft_members)
        veto_grace=veto_grace(cfg),
    )


def veto_grace(cfg: ButterflyConfig) -> float:
    """How long a replica declines a takeover before it vetoes it (`pbft_veto`): twice
    the failure detector's shortest time to declare a silent node failed, at least 1 s,
    at most half the request timer.

    The proposer's detector and each voter's fire apart by about the difference of their
    detection delays, which jitter in a detector's history stretches from that shortest
    time to about twice it (100 ms heartbeats: 0.53 s to 1.1 s; 1 s heartbeats: 1.4 s
    to 3.2 s). A fixed 1 s covered the first; with slower heartbeats a voter a beat
    behind vetoed a takeover it was about to support and cost it a view change. Half the
    request timer keeps the veto well ahead of the timeout it exists to cut short.
    """
    c = cfg.coordination
    detect = steady_detection_s(
        c.heartbeat_interval_ms,
        c.phi_failed,
        min_std_ms=c.min_std_ms,
        acceptable_pause_ms=c.acceptable_pause_ms,
    )
    return min(max(1.0, 2 * detect), c.view_change_timeout_ms / 2000)


__all__ = [
    "KEY_FILE",
    "key_path",
    "load_or_create_key",
    "missing_keys",
    "pbft_config",
    "public_keys",
]
