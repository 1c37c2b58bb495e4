"""Seed 000's "Byzantine Agreement" example: PRE-PREPARE, PREPARE and COMMIT by 5 nodes.

The seed runs 5 nodes with f = 2. Under PBFT that is unsafe: n >= 3f + 1 is needed so
that any two quorums of 2f + 1 share an honest node, and 5 nodes only tolerate f = 1.
Butterfly refuses f = 2 with the rule and the largest safe f, and runs the example with
f = 1 (quorum 3). Every vote below is a real signed PBFT message fed to the replica.

    .venv/bin/python examples/byzantine_agreement.py
"""

from __future__ import annotations

import torch

from butterfly.protocol.agreement import AgreementValue, ByzantineAgreement
from butterfly.protocol.proof import prove_step
from butterfly.protocol.sign import SigningKey
from butterfly.types.errors import InsufficientNodes
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange


def main() -> None:
    try:
        ByzantineAgreement(5, 2)
    except InsufficientNodes as refused:
        print(f"f=2 refused: {refused}")
    agreement = ByzantineAgreement(5, 1)
    print("Running with f=1 instead: quorum 2f+1 = 3 of 5\n")

    result = AgreementValue(Epoch(0), (1, 2, 3, 4, 5))
    step_input = torch.tensor([[0.5, -1.0, 2.0]])
    step_output = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    key: SigningKey = agreement.keys[0]
    proof = prove_step(
        key=key,
        signer=NodeId(0),
        epoch=Epoch(0),
        request_id=RequestId("example"),
        step=0,
        stage=StageIndex(0),
        layers=LayerRange(0, 2),
        hidden_in=step_input,
        hidden_out=step_output,
        layer_outputs=[step_output * 0.5, step_output],  # "step1", "step2"
    )

    head = ", ".join(str(b) for b in result.hash[:3])
    print(f"PRE-PREPARE: Proposing result with hash [{head}, ...]")
    agreement.handle_pre_prepare(result, proof)

    print("\nPREPARE phase:")
    for i in range(5):
        quorum = agreement.record_prepare_vote(NodeId(i), result.hash)
        print(f"  Node {i} voted, quorum reached: {str(quorum).lower()}")

    print("\nCOMMIT phase:")
    for i in range(5):
        committed = agreement.record_commit_vote(NodeId(i), result.hash)
        print(f"  Node {i} committed, finalized: {str(committed).lower()}")

    print(f"\nResult committed: {agreement.committed_result()}")


if __name__ == "__main__":
    main()
