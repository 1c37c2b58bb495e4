"""Signed records of stage steps, activation fingerprints, and when two records conflict.

Every stage step a node computes is answered with a `Proof` (defined with the other wire
messages in `butterfly.types.wire.agreement`): hashes of input and output, a Merkle root
over the per-layer output hashes, and a TOPLOC-style fingerprint (Ong et al., 2025): for
each chunk of `chunk` positions, the `k` largest-magnitude activations and where they are.

Exact hashes only match on identical hardware and thread counts; the fingerprint is what
survives float noise across machines, compared with tolerances. Two proofs for the same
input whose fingerprints disagree beyond tolerance are a conflict; a re-execution by a
third party (`blame`) decides which signer lied, and that pair of signed records plus
the re-execution is the evidence that goes through PBFT (DESIGN.md section 3).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from butterfly.protocol.sign import SigningKey, sign_message, verify_message
from butterfly.types.hashing import merkle_root, sha256
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.wire.agreement import Fingerprint, Proof, fingerprint_entries

if TYPE_CHECKING:
    import torch

__all__ = [
    "Fingerprint",
    "FingerprintMatch",
    "Proof",
    "ProofConflict",
    "Tolerance",
    "blame",
    "compare",
    "conflicting",
    "describes",
    "fingerprint",
    "generate_proof",
    "head",
    "matches_tensor",
    "rows_close",
    "tensor_bytes",
    "tensors_close",
    "tolerance_for",
]


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far honest fingerprints of one step may drift between machines."""

    rtol: float = 1e-3  # relative error allowed per value (float32 across thread counts)
    atol: float = 1e-4  # absolute error allowed per value
    min_overlap: float = 0.75  # share of top-k positions both sides must name (near-ties)
    # error allowed per value as a share of the largest magnitude compared beside it (a
    # fingerprint chunk's, a tensor's): reduced-precision sums drift with the scale of
    # what they add up, not with each value (`tolerance_for`)
    scaled: float = 0.0


def tolerance_for(rtol: float, atol: float, floor: float) -> Tolerance:
    """The tolerance honest nodes computing in a precision whose `floor` is given
    (`runtime.precision.Precision.verification_floor`) meet: the configured one, widened
    to the floor. In bfloat16 an auditor's one-pass prefill and the chain's token-by-token
    decode differ by up to ~1% of the activations' scale (0.094 at a scale of 10 on the
    small demo model's first half), so the default rtol 1e-3 had honest chain nodes
    evicted; float32's floor (about 3x its drift) keeps a tolerance of 0, which the schema
    allows, from convicting honest nodes."""
    return Tolerance(rtol=max(rtol, floor), atol=atol, scaled=floor)


def tensors_close(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> bool:
    """`torch.allclose` with the tolerance's scaled share of `b`'s largest magnitude; NaN
    where both hold it is equal (an honest model can compute one: its largest magnitude
    was NaN, and allclose raised on the NaN tolerance, failing the request)."""
    import torch

    if a.shape != b.shape:
        return False
    largest = float(b.abs().nan_to_num(nan=0.0).max()) if b.numel() else 0.0
    slack = tol.scaled * largest if tol.scaled else 0.0
    return bool(torch.allclose(a, b, rtol=tol.rtol, atol=tol.atol + slack, equal_nan=True))


def rows_close(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> bool:
    """`tensors_close` position by position: each row's scaled slack is its own largest
    magnitude's share, as a fingerprint of one position is judged. Over a whole prompt,
    one position's outliers (the first's run to hundreds in many models) widened every
    row's slack past what a liar changed elsewhere."""
    import torch

    if a.shape != b.shape:
        return False
    x, y = _rows(a), _rows(b)
    largest = y.abs().nan_to_num(nan=0.0).amax(dim=-1, keepdim=True) if y.numel() else y
    bound = tol.atol + tol.rtol * y.abs() + tol.scaled * largest
    same = ((x - y).abs() <= bound) | (x == y) | (x.isnan() & y.isnan())
    return bool(torch.all(same))


@dataclass(frozen=True, slots=True)
class FingerprintMatch:
    ok: bool
    bad_chunks: tuple[int, ...] = ()
    reason: str = ""


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(positions, width) float32 view: leading dims are positions, the last is width."""
    import torch

    x = t.detach().to("cpu", dtype=torch.float32)
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(-1, x.shape[-1])


def fingerprint(t: torch.Tensor, k: int = 8, chunk: int = 32) -> Fingerprint:
    """Top-`k` activations by magnitude per chunk of `chunk` positions, in index order."""
    import torch

    if k < 1 or chunk < 1:
        raise ValueError(f"fingerprint k={k} and chunk={chunk} must be >= 1")
    rows = _rows(t)
    positions, width = rows.shape
    indices: list[int] = []
    values: list[float] = []
    for start in range(0, positions, chunk):
        flat = rows[start : start + chunk].reshape(-1)
        top = torch.topk(flat.abs(), min(k, flat.numel())).indices.sort().values
        indices.extend(top.tolist())
        values.extend(flat[top].tolist())
    return Fingerprint(
        k=k,
        chunk=chunk,
        positions=positions,
        width=width,
        indices=struct.pack(f"<{len(indices)}I", *indices),
        values=struct.pack(f"<{len(values)}f", *values),
    )


def head(fp: Fingerprint, positions: int) -> Fingerprint | None:
    """The fingerprint of `fp`'s first `positions` rows, or None where a chunk would be
    cut: a speculative step's record covers every drafted position, and only those before
    the first rejected draft token are what the request went on from."""
    if positions == fp.positions:
        return fp
    if not 0 < positions < fp.positions or positions % fp.chunk:
        return None
    n = fingerprint_entries(fp.k, fp.chunk, positions, fp.width)
    return Fingerprint(fp.k, fp.chunk, positions, fp.width, fp.indices[: 4 * n], fp.values[: 4 * n])


def _chunks(fp: Fingerprint) -> list[dict[int, float]]:
    """Per chunk, index -> value; the shape fixes how many entries each chunk holds."""
    n = len(fp.indices) // 4
    idx = struct.unpack(f"<{n}I", fp.indices)
    val = struct.unpack(f"<{n}f", fp.values)
    out, at = [], 0
    for start in range(0, fp.positions, fp.chunk):
        size = min(fp.k, min(fp.chunk, fp.positions - start) * fp.width)
        out.append(dict(zip(idx[at : at + size], val[at : at + size], strict=True)))
        at += size
    return out


def _close(a: float, b: float, tol: Tolerance, scale: float = 0.0) -> bool:
    if math.isnan(a) or math.isnan(b):  # an honest model may compute NaN; both must
        return math.isnan(a) and math.isnan(b)
    if math.isnan(scale):
        scale = 0.0
    return abs(a - b) <= tol.atol + tol.rtol * max(abs(a), abs(b)) + tol.scaled * scale


def compare(a: Fingerprint, b: Fingerprint, tol: Tolerance = Tolerance()) -> FingerprintMatch:
    """Do two fingerprints describe the same activations, up to float noise?"""
    shape_a, shape_b = (a.k, a.chunk, a.positions, a.width), (b.k, b.chunk, b.positions, b.width)
    if shape_a != shape_b:
        return FingerprintMatch(False, reason=f"shapes differ: {shape_a} vs {shape_b}")
    bad = []
    for i, (ca, cb) in enumerate(zip(_chunks(a), _chunks(b), strict=True)):
        shared = ca.keys() & cb.keys()
        overlap = len(shared) / max(1, len(ca))
        scale = max((abs(v) for v in (*ca.values(), *cb.values())), default=0.0)
        if overlap < tol.min_overlap or not all(_close(ca[j], cb[j], tol, scale) for j in shared):
            bad.append(i)
    if bad:
        return FingerprintMatch(False, tuple(bad), f"{len(bad)} of {len(_chunks(a))} chunks differ")
    return FingerprintMatch(True)


def matches_tensor(fp: Fingerprint, t: torch.Tensor, tol: Tolerance = Tolerance()) -> bool:
    """Check a claimed fingerprint against activations we computed ourselves.

    Robust to near-ties in ranking: the claimed values must be what the tensor holds at the
    claimed positions, and no unclaimed activation may be clearly larger than the smallest
    claimed one (a liar cannot name small entries to hide a corrupted large one).
    """
    import torch

    rows = _rows(t)
    if (fp.positions, fp.width) != tuple(rows.shape):
        return False
    starts = range(0, fp.positions, fp.chunk)
    for start, claimed in zip(starts, _chunks(fp), strict=True):
        flat = rows[start : start + fp.chunk].reshape(-1)
        scale = float(flat.abs().nan_to_num(nan=0.0).max()) if flat.numel() else 0.0
        for j, v in claimed.items():
            if j >= flat.numel() or not _close(flat[j].item(), v, tol, scale):
                return False
        inf = float("inf")  # NaN ranks first, as in torch's top-k; a NaN bound passed all
        kth = torch.topk(flat.abs().nan_to_num(nan=inf), len(claimed)).values[-1].item()
        smallest = min(inf if math.isnan(v) else abs(v) for v in claimed.values())
        if kth > smallest * (1 + tol.rtol) + tol.atol + tol.scaled * scale:
            return False
    return True


def describes(fp: Fingerprint, t: torch.Tensor) -> bool:
    """Is `fp` a fingerprint of exactly `t`, the bytes its signer sent? Per chunk, its k
    indices are distinct (in increasing order, as `fingerprint` writes them), every
    claimed value equals the tensor's exactly (as floats: 0.0 and -0.0 alike; NaN is
    NaN), and no unclaimed one is larger in
    magnitude than the smallest claimed (ties either way: which of equal values a top-k
    names is the implementation's; a NaN ranks above everything, as in torch's top-k). A
    receiver checks this, having the bytes: an audit compares only the fingerprint, so one
    that describes other bytes than were sent (an honest computation's, beside a lying
    tensor bound by its hash) hid the lie from it, and one naming a position's largest
    value k times was, in effect, of one value."""
    rows = _rows(t)
    if (fp.positions, fp.width) != tuple(rows.shape):
        return False
    k = min(fp.k, fp.chunk * fp.width)
    whole = fp.positions // fp.chunk * fp.chunk  # positions in full chunks
    n = whole // fp.chunk * k
    if whole and not _exactly(
        rows[:whole].reshape(whole // fp.chunk, fp.chunk * fp.width),
        fp.indices[: 4 * n],
        fp.values[: 4 * n],
        k,
    ):
        return False
    rest = rows[whole:].reshape(1, -1)
    if whole == fp.positions:
        return True
    return _exactly(rest, fp.indices[4 * n :], fp.values[4 * n :], min(fp.k, rest.shape[1]))


def _exactly(flat: torch.Tensor, indices: bytes, values: bytes, k: int) -> bool:
    """`describes` for chunks of equal size: `flat` [chunks, size], k entries each."""
    import torch

    if len(indices) != 4 * k * flat.shape[0] or len(values) != len(indices):
        return False
    idx = torch.frombuffer(bytearray(indices), dtype=torch.int32).view(-1, k).to(torch.int64)
    val = torch.frombuffer(bytearray(values), dtype=torch.float32).view(-1, k)
    inside = (idx >= 0) & (idx < flat.shape[1])  # one check at the end: each is a sync
    distinct = (idx[:, 1:] > idx[:, :-1]).all()
    got = flat.gather(1, idx.clamp(0, flat.shape[1] - 1))
    same = inside & ((got == val) | (got.isnan() & val.isnan()))
    inf = float("inf")
    kth = torch.topk(flat.abs().nan_to_num(nan=inf), k, dim=1).values[:, -1]
    smallest = val.abs().nan_to_num(nan=inf).amin(dim=1)
    return bool(same.all() & distinct & (kth <= smallest).all())


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Exact bytes of a tensor for hashing (same machine replays compare these)."""
    import torch

    flat = t.detach().contiguous().cpu().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def generate_proof(
    *,
    key: SigningKey,
    signer: NodeId,
    epoch: Epoch,
    request_id: RequestId,
    step: int,
    stage: StageIndex,
    layers: tuple[int, int],
    input_data: bytes,
    output_data: bytes,
    layer_outputs: tuple[bytes, ...],
    fingerprint: Fingerprint,
) -> Proof:
    """Hash the step's bytes, build the Merkle root of per-layer outputs, and sign."""
    start, end = layers
    if not 0 <= start < end:
        raise ValueError(f"layer range [{start}, {end}) is empty or negative")
    if len(layer_outputs) != end - start:
        raise ValueError(f"{len(layer_outputs)} layer outputs for {end - start} layers")
    proof = Proof(
        sender=signer,
        epoch=epoch,
        request_id=request_id,
        step=step,
        stage=stage,
        layer_start=start,
        layer_end=end,
        input_hash=sha256(input_data),
        output_hash=sha256(output_data),
        fingerprint=fingerprint,
        merkle_root=merkle_root([sha256(b) for b in layer_outputs]),
    )
    return sign_message(proof, key)


@dataclass(frozen=True, slots=True)
class ProofConflict:
    """Two signed records of the same step whose outputs disagree beyond tolerance."""

    first: Proof
    second: Proof
    reason: str


def same_step(a: Proof, b: Proof) -> bool:
    """Same request, step, stage, layers and input: their outputs must agree."""
    fields = ("epoch", "request_id", "step", "stage", "layer_start", "layer_end", "input_hash")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def conflicting(
    a: Proof, b: Proof, keys: Mapping[NodeId, bytes], tol: Tolerance = Tolerance()
) -> ProofConflict | None:
    """A conflict worth re-executing for, or None.

    Unsigned or wrongly signed records prove nothing and are never a conflict; nor are
    records of different inputs. Identical output hashes agree without looking further.
    """
    if not same_step(a, b):
        return None
    key_a, key_b = keys.get(a.sender), keys.get(b.sender)
    if (
        key_a is None
        or key_b is None
        or not (verify_message(a, key_a) and verify_message(b, key_b))
    ):
        return None
    if a.output_hash == b.output_hash:
        return None
    match = compare(a.fingerprint, b.fingerprint, tol)
    return None if match.ok else ProofConflict(a, b, match.reason)


def blame(
    conflict: ProofConflict, reference: torch.Tensor, tol: Tolerance = Tolerance()
) -> tuple[NodeId, ...]:
    """Signers whose claimed output the re-executed `reference` output contradicts."""
    return tuple(
        p.sender
        for p in (conflict.first, conflict.second)
        if not matches_tensor(p.fingerprint, reference, tol)
    )
