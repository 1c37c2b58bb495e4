"""Loopback clusters get distinct ports: no node may be handed the API's port, and none
is one the kernel may give an outgoing connection meanwhile.

CI once failed because the API port, chosen and released first, came back from the
kernel as a node's listen port, and that node refused to start ("distinct ports").
"""

from __future__ import annotations

import random
from pathlib import Path

from butterfly.cli import launcher


def test_free_ports_skips_an_avoided_port() -> None:
    first = launcher.free_ports(1, rng=random.Random(7))[0]
    got = launcher.free_ports(3, avoid=frozenset({first}), rng=random.Random(7))
    assert first not in got and len(set(got)) == 3


def test_free_ports_skips_a_port_another_process_holds() -> None:
    first = launcher.free_ports(1, rng=random.Random(8))[0]
    with launcher.socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        assert first not in launcher.free_ports(2, rng=random.Random(8))


def test_free_ports_are_distinct_really_free_and_below_the_ephemeral_range() -> None:
    """A port the kernel hands out for port 0 may go to any outgoing connection before
    the node binds it: CI saw a node fail to start so."""
    ports = launcher.free_ports(8, avoid=frozenset({1}))
    assert len(set(ports)) == 8 and 1 not in ports
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low = int(ephemeral[0])
    assert all(launcher.PORTS_LOW <= p < min(launcher.PORTS_HIGH, low) for p in ports)


def test_a_port_block_is_free_as_a_whole_and_below_the_ephemeral_range() -> None:
    base = launcher.free_port_block(4)
    assert base >= 20000 and base + 4 <= 32000
    for port in range(base, base + 4):  # each of them can be bound
        with launcher.socket.socket() as s:
            s.bind(("127.0.0.1", port))
