"""Loopback clusters get distinct ports: no node may be handed the API's port.

CI once failed because the API port, chosen and released first, came back from the
kernel as a node's listen port, and that node refused to start ("distinct ports").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from butterfly.cli import launcher


class _Socket:
    """Binds to the next port of a scripted sequence, as a kernel reusing ports might."""

    def __init__(self, ports: Iterator[int]) -> None:
        self._ports = ports
        self.port = 0

    def bind(self, address: tuple[str, int]) -> None:
        self.port = next(self._ports)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        pass


def test_free_ports_skips_an_avoided_port_the_kernel_hands_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ports = iter([5000, 6000, 6001, 6002])
    monkeypatch.setattr(launcher.socket, "socket", lambda: _Socket(ports))
    assert launcher.free_ports(3, avoid=frozenset({5000})) == [6000, 6001, 6002]


def test_free_ports_are_distinct_and_really_free() -> None:
    ports = launcher.free_ports(8, avoid=frozenset({1}))
    assert len(set(ports)) == 8 and 1 not in ports


def test_a_port_block_is_free_as_a_whole_and_below_the_ephemeral_range() -> None:
    base = launcher.free_port_block(4)
    assert base >= 20000 and base + 4 <= 32000
    for port in range(base, base + 4):  # each of them can be bound
        with launcher.socket.socket() as s:
            s.bind(("127.0.0.1", port))
