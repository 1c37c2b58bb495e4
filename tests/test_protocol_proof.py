"""Step proofs: signatures, fingerprints under float noise, conflicts and blame."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from butterfly.dataplane.proving import Prover
from butterfly.protocol.proof import (
    Proof,
    Tolerance,
    blame,
    compare,
    conflicting,
    fingerprint,
    matches_tensor,
)
from butterfly.protocol.sign import verify_message
from butterfly.types.hashing import merkle_path, merkle_root, sha256, verify_merkle_path
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.wire.agreement import decode, encode
from tests.protocol_util import KEYS

KEYMAP = {NodeId(i): k.public for i, k in enumerate(KEYS)}


def activations(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 70, 48, generator=torch.Generator().manual_seed(seed))


def proof_of(node: int, hidden_out: torch.Tensor, hidden_in: torch.Tensor | None = None) -> Proof:
    """A record as a stage signs it (the production Prover, hashing the exact tensors)."""
    x = activations(99) if hidden_in is None else hidden_in
    record = Prover(NodeId(node), KEYS[node], k=8, chunk=32).prove(
        epoch=Epoch(1),
        request_id=RequestId("req-1"),
        step=4,
        stage=StageIndex(1),
        layers=LayerRange(2, 5),
        x_in=x,
        out=hidden_out,
        layer_outputs=[hidden_out * 0.5, hidden_out * 0.7, hidden_out],
    )
    proof = decode(record)
    assert isinstance(proof, Proof)
    return proof


def test_generate_verify_and_round_trip() -> None:
    proof = proof_of(1, activations())
    assert verify_message(proof, KEYS[1].public) and not verify_message(proof, KEYS[2].public)
    assert decode(encode(proof)) == proof
    tampered = dataclasses.replace(proof, output_hash=sha256(b"other"))
    assert not verify_message(tampered, KEYS[1].public)
    assert (proof.layer_start, proof.layer_end) == (2, 5)


def test_fingerprint_shape_follows_chunks() -> None:
    fp = fingerprint(activations(), k=8, chunk=32)
    assert (fp.positions, fp.width) == (70, 48)
    assert len(fp.indices) == 4 * (8 + 8 + 8)  # chunks of 32, 32 and 6 positions
    small = fingerprint(torch.ones(1, 3), k=8, chunk=32)
    assert len(small.values) == 4 * 3  # a chunk smaller than k keeps all it has


def test_float_noise_passes_and_corruption_fails() -> None:
    t = activations()
    fp = fingerprint(t)
    noisy = t + torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * 1e-6
    assert compare(fp, fingerprint(noisy)).ok and matches_tensor(fp, noisy)
    corrupted = t.clone()
    corrupted[0, 40, :] *= 1.5  # one position of the second chunk is off
    result = compare(fp, fingerprint(corrupted))
    assert not result.ok and result.bad_chunks == (1,)
    assert not matches_tensor(fp, corrupted)
    assert not compare(fp, fingerprint(t, k=4)).ok  # different shapes never match


def test_claiming_small_entries_to_hide_a_large_one_is_caught() -> None:
    t = activations()
    honest = fingerprint(t, k=8)
    liar_view = t.clone()
    liar_view[0, 0, 0] = 1000.0  # the liar's real output has a huge value it does not list
    assert not matches_tensor(honest, liar_view)


def test_conflicts_need_the_same_input_valid_signatures_and_real_disagreement() -> None:
    t = activations()
    good, also_good = proof_of(1, t), proof_of(2, t + 1e-7)
    bad = proof_of(3, t * 1.3)
    assert conflicting(good, also_good, KEYMAP) is None
    found = conflicting(good, bad, KEYMAP)
    assert found is not None and "chunks differ" in found.reason
    assert blame(found, t) == (NodeId(3),)
    other_input = proof_of(3, t * 1.3, hidden_in=activations(5))
    assert conflicting(good, other_input, KEYMAP) is None
    unsigned = dataclasses.replace(bad, signature=b"")
    assert conflicting(good, unsigned, KEYMAP) is None


def test_tolerance_is_configurable() -> None:
    t = activations()
    scaled = t * 1.01
    assert not compare(fingerprint(t), fingerprint(scaled)).ok
    assert compare(fingerprint(t), fingerprint(scaled), Tolerance(rtol=0.02)).ok


@pytest.mark.parametrize("count", [1, 2, 3, 7, 8])
def test_merkle_paths_prove_each_layer_against_the_root(count: int) -> None:
    leaves = [sha256(bytes([i])) for i in range(count)]
    root = merkle_root(leaves)
    for i, leaf in enumerate(leaves):
        assert verify_merkle_path(leaf, merkle_path(leaves, i), root)
        assert not verify_merkle_path(sha256(b"x"), merkle_path(leaves, i), root)
