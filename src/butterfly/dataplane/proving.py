"""The signed record a stage node returns for every step it computes.

A record binds the signer to what it claims it computed: hashes of its input and output,
the Merkle root of its per-layer outputs and a fingerprint of the output that survives
float noise (protocol/proof.py). An auditor's contradicting record, plus the gateway's
re-execution, turns a lie into evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from butterfly.protocol.proof import fingerprint, generate_proof, tensor_bytes
from butterfly.protocol.sign import SigningKey
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.wire.agreement import encode


@dataclass(frozen=True)
class Prover:
    node: NodeId
    key: SigningKey
    k: int = 8  # fingerprint: largest activations kept per chunk
    chunk: int = 1  # positions per chunk; 1 lets an audit compare any single position

    def prove(
        self,
        *,
        epoch: Epoch,
        request_id: RequestId,
        step: int,
        stage: StageIndex,
        layers: LayerRange,
        x_in: torch.Tensor,
        out: torch.Tensor,
        layer_outputs: Sequence[torch.Tensor],
    ) -> bytes:
        proof = generate_proof(
            key=self.key,
            signer=self.node,
            epoch=epoch,
            request_id=request_id,
            step=step,
            stage=stage,
            layers=(layers.start, layers.end),
            input_data=tensor_bytes(x_in),
            output_data=tensor_bytes(out),
            layer_outputs=tuple(tensor_bytes(t) for t in layer_outputs),
            fingerprint=fingerprint(out, self.k, self.chunk),
        )
        return encode(proof)
