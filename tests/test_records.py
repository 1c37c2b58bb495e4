"""The check every receiver runs on a step's signed records (dataplane.proving)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from butterfly.dataplane.proving import (
    RECORD_MISMATCH,
    Prover,
    RecordMismatch,
    check_records,
    culprit,
    decode_proofs,
    digest,
    framed,
)
from butterfly.protocol.sign import SigningKey
from butterfly.types.hashing import sha256
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.wire.agreement import Proof

KEYS = {NodeId(n): SigningKey.generate() for n in range(4)}
PUBLIC = {n: k.public for n, k in KEYS.items()}
HOLDERS = {0: (NodeId(0), NodeId(2)), 1: (NodeId(1), NodeId(3))}


def _record(node: int, stage: int, x: torch.Tensor, out: torch.Tensor, epoch: int = 1) -> Proof:
    raw = Prover(NodeId(node), KEYS[NodeId(node)]).prove(
        epoch=Epoch(epoch),
        request_id=RequestId("r"),
        step=3,
        stage=StageIndex(stage),
        layers=LayerRange(2 * stage, 2 * stage + 2),
        x_in=x,
        out=out,
        layer_outputs=[out, out],
    )
    return next(decode_proofs([raw]))


def _check(proofs: list[Proof], received: torch.Tensor, upto: int = 2) -> list[Proof]:
    return check_records(
        proofs,
        keys=PUBLIC,
        request_id=RequestId("r"),
        step=3,
        upto=upto,
        received=received,
        signers=lambda j: HOLDERS[j],
        epoch=1,
    )


TOKENS = torch.tensor([[5, 6, 7]])
HIDDEN = torch.randn(1, 3, 16)
LOGITS = torch.randn(1, 1, 32)


def test_an_honest_chain_vouches_for_what_arrived() -> None:
    chain = [_record(0, 0, TOKENS, HIDDEN), _record(1, 1, HIDDEN, LOGITS)]
    assert _check(chain, LOGITS) == chain
    assert _check(chain[:1], HIDDEN, upto=1) == chain[:1]


def test_bytes_other_than_the_signed_ones_are_refused_and_name_the_signer() -> None:
    chain = [_record(0, 0, TOKENS, HIDDEN), _record(1, 1, HIDDEN, LOGITS)]
    other = LOGITS.clone()
    other[0, 0, 0] += 1e-6  # one value, one ulp-scale change: a fingerprint would pass
    with pytest.raises(RecordMismatch) as e:
        _check(chain, other)
    assert e.value.blame == NodeId(1)
    assert e.value.kind == RECORD_MISMATCH


def test_digest_is_the_hash_a_record_carries() -> None:
    record = _record(1, 1, HIDDEN, LOGITS)
    assert record.input_hash == digest(HIDDEN) == sha256(framed(HIDDEN))
    assert record.output_hash == digest(LOGITS)
    assert digest(HIDDEN[:, 1:2]) == sha256(framed(HIDDEN[:, 1:2].contiguous()))


def test_the_same_bytes_under_another_dtype_or_shape_do_not_match() -> None:
    assert digest(HIDDEN) != digest(HIDDEN.reshape(1, 16, 3))
    assert digest(HIDDEN) != digest(HIDDEN.view(torch.int32))


@pytest.mark.parametrize(
    "case", ["missing", "unsigned", "not-a-holder", "other-epoch", "chain-broken"]
)
def test_records_that_do_not_chain_are_refused(case: str) -> None:
    first = _record(0, 0, TOKENS, HIDDEN)
    last = _record(1, 1, HIDDEN, LOGITS)
    if case == "missing":
        chain = [last]
    elif case == "unsigned":
        chain = [first, replace(last, signature=b"")]
    elif case == "not-a-holder":
        chain = [first, _record(2, 1, HIDDEN, LOGITS)]  # node 2 holds stage 0, not 1
    elif case == "other-epoch":
        chain = [first, _record(1, 1, HIDDEN, LOGITS, epoch=2)]
    else:
        chain = [first, _record(1, 1, HIDDEN + 1, LOGITS)]  # computed on other input
    with pytest.raises(RecordMismatch):
        _check(chain, LOGITS)


def _culprit(chain: list[Proof], received: torch.Tensor, peer: int, sent: torch.Tensor) -> object:
    return culprit(
        chain,
        keys=PUBLIC,
        request_id=RequestId("r"),
        step=3,
        upto=2,
        received=received,
        signers=lambda j: HOLDERS[j],
        epoch=1,
        peer=NodeId(peer),
        sent=digest(sent),
    )


def test_the_gateway_blames_the_peer_that_delivered_or_the_signer_of_a_false_input() -> None:
    chain = [_record(0, 0, TOKENS, HIDDEN), _record(1, 1, HIDDEN, LOGITS)]
    assert _culprit(chain, LOGITS, 1, TOKENS) is None
    # bytes the records do not vouch for: the peer that delivered them
    assert _culprit(chain, LOGITS + 1, 1, TOKENS)[0] == NodeId(1)  # type: ignore[index]
    # node 3 delivers node 1's result as its own: node 3
    assert _culprit(chain, LOGITS, 3, TOKENS)[0] == NodeId(3)  # type: ignore[index]
    # the first stage signed another input than the gateway sent: that signer
    other = torch.tensor([[5, 6, 8]])
    assert _culprit(chain, LOGITS, 1, other)[0] == NodeId(0)  # type: ignore[index]


@pytest.mark.parametrize(
    ("shape", "dtype", "k", "chunk"),
    [
        ((1, 5, 16), torch.float32, 8, 1),
        ((7, 16), torch.bfloat16, 3, 3),
        ((2, 4), torch.float32, 9, 2),
    ],
)
def test_a_fingerprint_describes_exactly_the_bytes_it_was_made_of(
    shape: tuple[int, ...], dtype: torch.dtype, k: int, chunk: int
) -> None:
    from butterfly.protocol.proof import describes, fingerprint

    t = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    fp = fingerprint(t, k, chunk)
    assert describes(fp, t)
    rows = t.reshape(-1, t.shape[-1])
    top = int(rows[0].abs().argmax())
    claimed = rows.clone()
    claimed[0, top] += 1.0  # a value the fingerprint names, changed
    assert not describes(fp, claimed.reshape(shape))
    hidden = rows.clone()
    hidden[-1, int(rows[-1].abs().argmin())] = 1e3  # an unnamed one, now the largest
    assert not describes(fp, hidden.reshape(shape))
    assert not describes(fp, rows[:-1])  # another shape


def test_a_fingerprint_naming_either_of_two_equal_values_describes_them() -> None:
    from butterfly.protocol.proof import describes, fingerprint

    t = torch.tensor([[3.0, -3.0, 1.0, 0.5]])
    fp = fingerprint(t, 1, 1)
    swapped = torch.tensor([[-3.0, 3.0, 1.0, 0.5]])  # the other of the tie is named now
    assert describes(fp, t) and not describes(fp, swapped)
    assert describes(fingerprint(swapped, 1, 1), swapped)


def test_the_audit_takes_the_weaker_of_the_last_two_agreed_fingerprint_shapes() -> None:
    from butterfly.dataplane.proving import Shape
    from butterfly.protocol.proof import fingerprint

    t = torch.randn(4, 8)
    both = Shape(4, 1).after(Shape(8, 2))
    assert both == Shape(4, 2)
    assert both.admits(fingerprint(t, 4, 1)) and both.admits(fingerprint(t, 8, 2))
    assert not both.admits(fingerprint(t, 3, 1)) and not both.admits(fingerprint(t, 4, 4))
    # 8 -> 1 -> 8: once 8 is agreed again, 1 is no longer taken (a review: it was, for
    # ever, and a liar signing one value per position passed)
    assert Shape(1, 1).after(Shape(8, 1)) == Shape(1, 1)
    assert Shape(8, 1).after(Shape(8, 1)) == Shape(8, 1)


def test_a_fingerprint_naming_one_value_k_times_describes_nothing() -> None:
    """A review's liar named each position's largest value eight times: of the cluster's
    shape on its face, of one value in effect, and it passed."""
    import struct

    from butterfly.protocol.proof import describes, fingerprint

    t = torch.randn(3, 16)
    fp = fingerprint(t, 4, 1)
    top = [int(i) for i in t.abs().argmax(dim=1)]
    indices = struct.pack("<12I", *[i for i in top for _ in range(4)])
    values = struct.pack("<12f", *[float(t[r, i]) for r, i in enumerate(top) for _ in range(4)])
    assert not describes(replace(fp, indices=indices, values=values), t)


def test_an_honest_output_holding_nan_or_inf_is_described_by_its_fingerprint() -> None:
    """NaN ranks above everything in torch's top-k; it failed the check, and a review had
    honest nodes evicted for a NaN their model computed."""
    from butterfly.protocol.proof import describes, fingerprint

    t = torch.randn(5, 16)
    t[1, 3], t[2, 0], t[2, 1], t[4, 7] = float("nan"), float("inf"), float("nan"), float("-inf")
    for k, chunk in ((1, 1), (4, 1), (4, 2), (3, 4)):
        assert describes(fingerprint(t, k, chunk), t)


def test_an_honest_nan_matches_its_re_execution() -> None:
    """A model that computes NaN computes it on every honest machine: the audit found
    the chain node "contradicting" the re-execution (NaN is not close to NaN) and
    evicted it, and allclose raised on a NaN tolerance (a review)."""
    from butterfly.protocol.proof import Tolerance, fingerprint, matches_tensor, tensors_close

    t = torch.randn(3, 16)
    t[1, 2] = float("nan")
    tol = Tolerance(rtol=1e-3, atol=1e-4, scaled=1e-2)
    assert matches_tensor(fingerprint(t, 4, 1), t, tol)
    assert tensors_close(t, t.clone(), tol)
    other = t.clone()
    other[1, 2] = 0.0
    assert not tensors_close(other, t, tol)


def test_a_nan_in_the_re_execution_does_not_switch_off_the_largest_value_check() -> None:
    """The check's bound was NaN when the chunk held one, so a fingerprint naming a
    chunk's smallest values passed (a review)."""
    import struct

    from butterfly.protocol.proof import Fingerprint, Tolerance, matches_tensor

    t = torch.arange(1.0, 17.0).reshape(1, 16)
    t[0, 15] = float("nan")
    smallest = list(range(4))
    fp = Fingerprint(
        4,
        1,
        1,
        16,
        struct.pack("<4I", *smallest),
        struct.pack("<4f", *[float(t[0, i]) for i in smallest]),
    )
    assert not matches_tensor(fp, t, Tolerance(rtol=1e-3, atol=1e-4, scaled=1e-2))
