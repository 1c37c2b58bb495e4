"""Coordination protocols as pure state machines: no sockets, clocks or threads inside.

PBFT is a reducer, `step(state, input, now) -> (state, messages to send)`; its driver
(`agreement.driver`, or `butterfly.testing.sim`) delivers messages and ticks and sends
what comes back. The failure detector takes the time as an argument too. Modules:

    sign              Ed25519 keys; signing and verifying wire messages (types.wire)
    entitled          which peer may send each message kind (the router's and handlers' rules)
    inputs            reducer inputs that never cross the wire (Tick, SuspectPrimary)
    quorum            n >= 3f + 1 and quorum sizes
    pbft              PBFT replica (pbft_state, pbft_order, pbft_viewchange, evidence)
    failure_detector  phi accrual detector with min std and acceptable pause
    proof             signed stage-step records, activation fingerprints, conflicts
"""

from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState
from butterfly.protocol.quorum import check_fault_tolerance, max_faulty
from butterfly.protocol.sign import SigningKey
from butterfly.types.wire.agreement import Fingerprint, Proof, decode, encode

__all__ = [
    "Fingerprint",
    "PbftConfig",
    "PhiAccrualFailureDetector",
    "Proof",
    "ReplicaState",
    "SigningKey",
    "check_fault_tolerance",
    "decode",
    "encode",
    "max_faulty",
]
