"""The seed's ByzantineAgreement calls, over real PBFT messages."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from butterfly.protocol.agreement import AgreementValue, ByzantineAgreement
from butterfly.protocol.proof import Proof, prove_step
from butterfly.types.errors import ByzantineViolation, InsufficientNodes, PhaseTransitionFailed
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from tests.protocol_util import KEYS

VALUE = AgreementValue(Epoch(0), (1, 2, 3, 4, 5))


def proof(node: int = 0) -> Proof:
    t = torch.arange(12.0).reshape(1, 3, 4)
    return prove_step(
        key=KEYS[node],
        signer=NodeId(node),
        epoch=Epoch(0),
        request_id=RequestId("r"),
        step=0,
        stage=StageIndex(0),
        layers=LayerRange(0, 1),
        hidden_in=t,
        hidden_out=t + 1,
        layer_outputs=[t + 1],
    )


def test_seed_flow_with_five_nodes_and_f_1() -> None:
    agreement = ByzantineAgreement(5, 1, keys=KEYS[:5])
    agreement.handle_pre_prepare(VALUE, proof())
    prepared = [agreement.record_prepare_vote(NodeId(i), VALUE.hash) for i in range(5)]
    assert prepared == [False, False, True, True, True]  # primary + 2f backups
    committed = [agreement.record_commit_vote(NodeId(i), VALUE.hash) for i in range(5)]
    assert committed == [False, False, True, True, True]  # 2f + 1 commits incl. our own
    assert agreement.committed_result() == VALUE
    assert agreement.evidence == []


def test_five_nodes_with_f_2_are_refused() -> None:
    with pytest.raises(InsufficientNodes, match="f=2 needs 7"):
        ByzantineAgreement(5, 2)


def test_votes_for_another_value_do_not_count() -> None:
    agreement = ByzantineAgreement(4, 1, keys=KEYS[:4])
    agreement.handle_pre_prepare(VALUE, proof())
    other = AgreementValue(Epoch(0), (9,)).hash
    assert not agreement.record_prepare_vote(NodeId(1), other)
    assert not agreement.record_prepare_vote(NodeId(2), other)
    assert not agreement.record_prepare_vote(NodeId(3), VALUE.hash)
    assert agreement.committed_result() is None


def test_a_badly_signed_proof_is_a_byzantine_violation_naming_the_signer() -> None:
    agreement = ByzantineAgreement(4, 1, keys=KEYS[:4])
    forged = dataclasses.replace(proof(node=2), sender=NodeId(1))  # 2's signature, 1's name
    with pytest.raises(ByzantineViolation) as info:
        agreement.handle_pre_prepare(VALUE, forged)
    assert info.value.blame == 1


def test_votes_before_a_proposal_are_a_phase_error() -> None:
    with pytest.raises(PhaseTransitionFailed):
        ByzantineAgreement(4, 1, keys=KEYS[:4]).record_prepare_vote(NodeId(1), VALUE.hash)
