"""Coordination protocols as pure state machines: no sockets, clocks or threads inside.

Each protocol is a reducer, `step(state, input, now) -> (state, messages to send)`; the
driver (the node's runtime loop, or `butterfly.testing.sim`) delivers messages and ticks
and sends what comes back. Modules:

    sign              Ed25519 keys; signing and verifying wire messages (types.wire)
    inputs            reducer inputs that never cross the wire (Tick, SuspectPrimary)
    quorum            n >= 3f + 1 and quorum sizes
    pbft              PBFT replica (pbft_state, pbft_order, pbft_viewchange, evidence)
    agreement         the seed's ByzantineAgreement API over one PBFT replica
    failure_detector  phi accrual detector with min std and acceptable pause
    proof             signed stage-step records, activation fingerprints, conflicts
    checkpoint        generation checkpoints (tokens, RNG state, epoch, KV snapshots)
    coordinator       phases and epochs, barrier, routing by message kind
"""

from butterfly.protocol.agreement import AgreementValue, ByzantineAgreement
from butterfly.protocol.checkpoint import Checkpoint, CheckpointManager, CheckpointStats
from butterfly.protocol.failure_detector import Health, PhiAccrualFailureDetector
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState
from butterfly.protocol.quorum import check_fault_tolerance, max_faulty
from butterfly.protocol.sign import SigningKey
from butterfly.types.wire.agreement import Fingerprint, Proof, decode, encode

__all__ = [
    "AgreementValue",
    "ByzantineAgreement",
    "Checkpoint",
    "CheckpointManager",
    "CheckpointStats",
    "Fingerprint",
    "Health",
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
