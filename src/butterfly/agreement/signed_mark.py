"""How far this node's replica has signed votes for slots, kept in its data directory.

A primary that crashes and restarts with an empty replica must not sign a second
pre-prepare for a (view, seq) it signed before, nor a backup a second prepare or commit:
its peers hold the first one, and the pair is evidence of equivocation that gets an
honest node evicted for restarting (`protocol.evidence`). Only the node itself can
remember what it signed, so the driver writes the replica's `pbft_state.Signed` here
before any vote leaves, and a restarted replica votes only past it
(`pbft_state.may_sign`). Agreement commands are rare (plans, evictions, takeovers,
config), so a small synced write per vote (two or three per command) costs nothing that
matters.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from butterfly.protocol.pbft_state import UNKNOWN, Signed

log = logging.getLogger(__name__)

MARK_FILE = "pbft_signed.json"


def load(path: Path, epoch: int) -> Signed | None:
    """The mark a previous life of this node wrote; None when it never signed one.

    An unreadable one stands for every slot of `epoch` (`pbft_state.UNKNOWN`): the
    replica then votes in no slot before the next epoch (it still executes what the
    others decide and follows their views, and each view it would lead times out to the
    next primary) rather than risk a conviction."""
    try:
        raw = json.loads(path.read_text())
        return Signed(epoch=int(raw["epoch"]), view=int(raw["view"]), seq=int(raw["seq"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.error(
            "%s is unreadable (%s): this node will not vote in the agreement before the "
            "replica set next changes, as it cannot tell which votes it signed before "
            "(it still executes what the others agree); until then the cluster tolerates "
            "one failure less: change the member set (add or remove a member) to start "
            "a new agreement epoch, in which it votes again",
            path,
            e,
        )
        return Signed(epoch=epoch, view=UNKNOWN, seq=UNKNOWN)


def store(path: Path, mark: Signed) -> None:
    """Replace the mark atomically and durably: a crash leaves the old one or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"epoch": mark.epoch, "view": mark.view, "seq": mark.seq}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)  # the rename itself survives a power cut
    finally:
        os.close(dirfd)


__all__ = ["MARK_FILE", "load", "store"]
