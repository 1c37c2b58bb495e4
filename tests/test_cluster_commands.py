"""Node keys: created once, private, and matched against the configured public keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from butterfly.config import load_config
from butterfly.protocol.keys import load_or_create_key, public_keys
from butterfly.types.errors import ConfigError


def test_a_node_key_is_created_once_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "node-0" / "node.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path).public == key.public
    path.write_text("not a key")
    with pytest.raises(ConfigError, match="not a signing key"):
        load_or_create_key(path)


def test_public_keys_come_from_config_and_must_match_the_key_file(tmp_path: Path) -> None:
    mine, other = (load_or_create_key(tmp_path / f"k{i}") for i in range(2))
    alone = load_config()
    assert public_keys(alone, mine) == (mine.public,)  # one node: its own key
    members = ["127.0.0.1:9000", "127.0.0.1:9001"]
    two = load_config(overrides={"cluster.members": members})
    with pytest.raises(ConfigError, match="public_keys is empty"):
        public_keys(two, mine)
    listed = {"cluster.members": members, "cluster.public_keys": [other.public.hex()] * 2}
    with pytest.raises(Exception, match="listed twice"):
        load_config(overrides=listed)
    wrong = load_config(
        overrides={**listed, "cluster.public_keys": [other.public.hex(), mine.public.hex()]}
    )
    with pytest.raises(ConfigError, match=r"public_keys\[0\] does not match"):
        public_keys(wrong, mine)
    assert public_keys(wrong, other) == (other.public, mine.public)
