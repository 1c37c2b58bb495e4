"""Lying agreement drivers: a node composed with one of these votes falsely in PBFT.

Like the faulty stage servers of `butterfly.testing.liars`, they are whole parts swapped
in by composition (`build_node(..., agreement_type=...)`), and they sign their lies with the
node's own key: honest replicas must convict them from what was signed alone.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

from butterfly.agreement.driver import AgreementDriver
from butterfly.protocol.pbft_state import Send
from butterfly.protocol.sign import sign_message
from butterfly.types.wire.agreement import Commit, Prepare, PrePrepare, Request, request_digest


class EquivocatingDriver(AgreementDriver):
    """Votes like an honest replica, and also signs a second, conflicting prepare and
    commit for the same (view, seq) to half of its peers.

    Each peer of that half holds two votes of one signer for one slot: the evidence of
    `butterfly.protocol.evidence`, which it broadcasts. (A liar that tells each honest
    replica only one of the two digests cannot be convicted by anyone; it then merely
    withholds its vote from half of them, which a quorum of 2f+1 already tolerates.)
    """

    def _route(self, sends: list[Send]) -> None:
        super()._route(sends)
        half = self.peers[::2]
        lies: list[Send] = []
        for send in sends:
            vote = send.message
            if send.to is None and isinstance(vote, Prepare | Commit):
                other = hashlib.sha256(b"equivocate" + vote.digest).digest()
                lie = sign_message(replace(vote, digest=other), self._key)
                lies.extend(Send(peer, lie) for peer in half)
        if lies:
            super()._route(lies)


class SilentDriver(AgreementDriver):
    """Receives every agreement frame and sends none: no votes, no status, no requests."""

    def _route(self, sends: list[Send]) -> None:
        return


class UsurpingDriver(AgreementDriver):
    """Votes honestly, and orders commands that are not its to propose (`usurp`): a plan,
    an eviction (of an honest node, or of itself to pre-empt the gateway's), a config
    change. It signs the request itself and, as primary, pre-prepares it, prepares and
    commits it with its own signatures, bypassing its own replica's refusal: the honest
    replicas must refuse to prepare it, so it never executes anywhere."""

    def usurp(self, command: bytes) -> Request:
        state = self._state
        self._last_ts = max(self._last_ts + 1, time.time_ns())
        request = sign_message(
            Request(self.me, state.config.epoch, self._last_ts, command), self._key
        )
        sends = [Send(None, request)]
        if state.is_primary and state.active:
            seq, view, digest = state.next_seq, state.view, request_digest(request)
            state.next_seq += 1
            pp = sign_message(
                PrePrepare(self.me, state.config.epoch, view, seq, digest, request), self._key
            )
            commit = sign_message(Commit(self.me, state.config.epoch, view, seq, digest), self._key)
            sends += [Send(None, pp), Send(None, commit)]
        self._route(sends)
        return request


DRIVERS: dict[str, type[AgreementDriver]] = {
    "equivocate": EquivocatingDriver,
    "silent": SilentDriver,
}
"""Behaviours (`butterfly.testing.liars.BEHAVIOURS`) whose votes lie too."""
