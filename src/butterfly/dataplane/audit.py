"""Audit: replicas re-run a finished generation as one prefill and check every claim.

The chain's nodes signed a record (fingerprint of the output) for every step they ran.
After generation the gateway sends the whole sequence, stage by stage, to every other holder
of each stage's layers (f of them: with the chain's node that makes f+1, so one is honest
even when f liars collude), each of which runs it as ONE prefill pass (a fraction of the cost of
generating) and returns its output for every position. Each signed claim is checked
against the replica's output at the claim's positions, with float tolerances, by
replicas that did not sign it; the replicas' outputs must agree with each other too,
since a record pins a stage's largest outputs only and one replica's output is the next
stage's input. On a mismatch the gateway itself re-executes that stage (it is trusted,
DESIGN.md section 3) and blames whichever contradicts the re-execution; before it
convicts the chain, it re-executes the stage's input too, from the last input it knows
is right, so a replica's output that fed it wrongly is blamed instead. The signed record
of a liar is the evidence that goes through agreement to evict it. `request_audit`
audits a whole request, under each plan it ran under.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from butterfly.dataplane.chosen import Chosen
from butterfly.dataplane.crossing import Hop, Inputs, contradicted_senders, fetch, rebuilt
from butterfly.dataplane.proving import Shape
from butterfly.dataplane.referee import Referee
from butterfly.protocol.proof import Tolerance, head, matches_tensor, tensors_close
from butterfly.protocol.sign import verify_message
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.types.errors import ButterflyError, InvalidMessage
from butterfly.types.ids import NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof
from butterfly.types.wire.data import AuditReply, AuditRequest

log = logging.getLogger(__name__)
Ask = Callable[[NodeId, AuditRequest, bytes], Awaitable[tuple[AuditReply, bytes]]]
# the gateway's own outputs of a stage for a request's positions [0, length), if it has them
OwnOutputs = Callable[[RequestId, LayerRange, int], torch.Tensor | None]


@dataclass(frozen=True)
class Claim:
    """A chain node's signed record of one step: rows [start, start + width) of the
    output, computed on input rows `rows` (start, length)."""

    proof: Proof
    start: int
    width: int
    rows: tuple[int, int]


@dataclass(frozen=True)
class Verdict:
    verified: bool  # every claim checked against an independent replica (or the referee)
    liars: tuple[NodeId, ...] = ()
    reason: str = ""
    checked: int = 0  # claims checked
    evidence: tuple[bytes, ...] = field(default=(), repr=False)
    # no holder left that may re-run a stage: nothing was found wrong, nothing checked
    unauditable: bool = False
    # the answer contradicts the re-execution and nobody is to blame for it: the chain
    # computed on caches built before its plan (a standby's KV copy, or rows a stage
    # sent from one), or tokens were chosen where no record of the plan covers them (a
    # dead gateway's checkpoint, a plan passed over). It is not given: a run from
    # position 0 on fresh caches is not exposed to what made it wrong
    recompute: bool = False


class Auditor:
    def __init__(
        self,
        *,
        ask: Ask,
        inputs: Inputs,
        keys: Mapping[NodeId, bytes],
        referee: Referee,
        tolerance: Tolerance,
        max_tensor_bytes: int,
        gateway: NodeId | None = None,
        own_outputs: OwnOutputs = lambda request_id, layers, length: None,
        lone_ranges: bool = True,
    ) -> None:
        """A stage the `gateway` itself ran is not re-run: the client trusts the gateway
        (DESIGN.md section 3), so re-executing its work proves nothing; its kept outputs
        (`own_outputs`) are the next stage's input instead. `lone_ranges`: a range no
        other holder may re-run (failures left it one) is re-executed by the gateway,
        where it has room to load it (`Referee.fits`); n = 4 with f = 1 answered
        unverified from a node's death until it came back."""
        self._ask, self._keys, self._referee = ask, keys, referee
        self._inputs = inputs
        self._tol, self._max = tolerance, max_tensor_bytes
        self._gateway, self._own = gateway, own_outputs
        self._audit_lone = lone_ranges

    def retune(self, tolerance: Tolerance, lone_ranges: bool = True) -> None:
        """Compare with changed byzantine.rtol/atol from the next comparison on; audit
        ranges left with one holder by re-executing them (byzantine.audit_lone_ranges)
        from the next audit on."""
        self._tol, self._audit_lone = tolerance, lone_ranges

    def _lone_ranges(self, layers: LayerRange) -> str:
        """Why the gateway does not re-execute `layers`, which no other holder may
        re-run, to audit them ("": it does)."""
        if not self._audit_lone:
            return "byzantine.audit_lone_ranges is off"
        return self._referee.fits(layers)

    def claims_of(
        self,
        records: Sequence[Proof],
        *,
        request_id: RequestId,
        plan: StagePlan,
        positions: Mapping[int, tuple[int, int]],
        every_row: Collection[int] = (),
    ) -> dict[int, list[Claim]]:
        """This request's signed records of the plan's epoch, by stage index. Unsigned or
        forged ones are dropped: they prove nothing, and the stage then fails its audit.

        `positions[step]` is (start, length) of the step's input; the last stage answered
        only the step's last position (generation needs no more), but for the steps in
        `every_row`, which asked it for every position (a prompt's logprobs): its record
        of those covers them all, and is checked on them all.
        """
        last = len(plan.stages) - 1
        by_stage: dict[int, list[Claim]] = {}
        seen: set[tuple[int, int]] = set()
        for proof in records:
            if (
                proof.request_id != request_id
                or proof.epoch != plan.epoch
                or proof.step not in positions
                or (proof.step, int(proof.stage)) in seen
            ):
                continue
            if not 0 <= proof.stage <= last or proof.sender not in plan.holders(
                plan.stages[proof.stage][1]
            ):
                continue  # only a holder of the stage's range may have computed it
            key = self._keys.get(proof.sender)
            if key is None or not verify_message(proof, key):
                continue
            seen.add((proof.step, int(proof.stage)))
            start, length = positions[proof.step]
            claim = (
                Claim(proof, start + length - 1, 1, (start, length))
                if proof.stage == last and proof.step not in every_row
                else Claim(proof, start, length, (start, length))
            )
            by_stage.setdefault(int(proof.stage), []).append(claim)
        return by_stage

    @staticmethod
    def gaps(
        claims: Mapping[int, list[Claim]], positions: Mapping[int, tuple[int, int]], stages: int
    ) -> str:
        """Why the claims do not cover the request, or "": a record of every stage for
        every step, each stage's signed input the previous stage's signed output.

        The gateway checked each result against these records as it arrived
        (`intake.Intake._vouched`), so a gap here names no liar: the request is simply
        not verified."""
        by_step: dict[int, dict[int, Proof]] = {}
        for index, mine in claims.items():
            for c in mine:
                by_step.setdefault(c.proof.step, {})[index] = c.proof
        for step in positions:
            records = by_step.get(step, {})
            for index in range(stages):
                if index not in records:
                    return f"stage {index} sent no signed record of step {step}"
                if index and records[index].input_hash != records[index - 1].output_hash:
                    return (
                        f"stage {index} signed another input of step {step} "
                        f"than stage {index - 1} signed as its output"
                    )
        return ""

    async def audit(
        self,
        plan: StagePlan,
        request_id: RequestId,
        sequence: Sequence[int],
        claims: Mapping[int, list[Claim]],
        chosen: Chosen | None = None,
        weakest: Shape | None = None,
        members: Collection[NodeId] | None = None,
        own_history: Mapping[int, NodeId] | None = None,
    ) -> Verdict:
        """Check every stage's claims; the sequence is every token whose output was used.
        `chosen`: the tokens picked from the last stage's output, held to its
        re-execution too. `members`: the nodes that may be asked to re-run a stage (None:
        any holder); a plan before the current one may name a node that has since
        failed, whose silence would cost the audit a timeout. `own_history`: for a plan
        that went on from caches built before it, the node that built each stage's
        (by index) itself, under plans whose audits found everything right: only
        there is a contradiction its own doing."""
        x = torch.tensor([list(sequence)], dtype=torch.int64)
        checked, liars, reasons = 0, list[NodeId](), list[str]()
        # the last input known right (the tokens, the gateway's own outputs, the
        # referee's), and the re-runs that fed the stages since: a re-run is judged only
        # where the records pin it, so it is retraced before a dispute blames anyone
        trusted, fed = x, list[tuple[LayerRange, NodeId | None, torch.Tensor]]()
        before_own = False  # the stage before was the gateway's own: x is what it sent
        for index, (node, layers) in enumerate(plan.stages):
            mine = claims.get(index, [])
            if not mine:
                return Verdict(False, reason=f"stage {index} sent no signed records")
            own = self._own(request_id, layers, x.shape[1]) if node == self._gateway else None
            ran_before_own, before_own = before_own, own is not None
            if own is not None:
                checked += len(mine)
                x = trusted = own
                fed.clear()
                continue
            # the last stage's outputs matter only where tokens were chosen: from the
            # first of its records, and from the prompt's last position, so that every
            # chosen token is held to honest logits even where no record of this plan
            # covers it (a replay's step signs its last row only; a review)
            offset = 0
            if index == len(plan.stages) - 1:
                offset = min(c.start for c in mine)
                if chosen is not None:
                    offset = min(offset, chosen.first_row)
            # no node audits its own work: each claim is judged by the re-runs of the
            # holders that did not sign it. A step routed around the chain's node
            # (`claims.Claims`) was signed by a standby, and the chain's node signed the
            # steps before: each audits the other's (the first asked nobody, a review)
            signed = {c.proof.sender for c in mine}
            askable = [n for n in plan.holders(layers) if members is None or n in members]
            others = [n for n in askable if signed - {n}]
            # a signer no other holder may audit (failures left its range one holder)
            # is audited by the gateway's own re-execution, where it can load the range
            # (`lone_ranges`); else the request is not verified
            unjudged = sorted(s for s in signed if not [n for n in others if n != s])
            cannot = self._lone_ranges(layers) if unjudged else ""
            if cannot:
                stop = f"no replica of {layers} to audit node {unjudged[0]}: {cannot}"
                return Verdict(False, tuple(liars), stop, checked, unauditable=not liars)
            replies = await asyncio.gather(
                *(self._replay(request_id, index, layers, x, offset, a) for a in others)
            )
            outs = [out for _, out, _ in replies if out is not None]
            last = index == len(plan.stages) - 1
            picks = chosen if last else None
            # a record fingerprinted more weakly than the cluster's shape may match and
            # still hide a lie: the audit stops there (unverified, nobody blamed), or it
            # blamed the honest next stage that computed on it (a review); one of the last
            # stage leaves the request unverified unless a liar was found
            weak = sorted({c.proof.sender for c in mine if not self._strong(c, weakest)})
            agreed = len(outs) == len(replies) and self._judged(mine, replies, offset, picks)
            if agreed and not unjudged:
                checked += len(mine)
                runner, x = next((a, out) for a, out, _ in replies if out is not None)
                fed.append((layers, runner, x))  # the chain agrees with it where it signed
                if weak and not (last and liars):
                    past = None if last else (trusted, fed)
                    sent = await self._past_weak(
                        request_id, plan, index, claims, past, liars, reasons
                    )
                    return self._weak(weak, index, layers, liars, reasons, checked, sent)
                continue
            # a dispute (or an auditor that could not run): the gateway re-executes and
            # blames whoever signed or answered something that contradicts it. An
            # auditor re-ran what it was given, so it is judged on that; the chain is
            # judged only on an input known right: a re-run that fed this stage may have
            # matched the records and still been wrong elsewhere (an honest chain node
            # was convicted on such an input: a review), so it is retraced first
            reference = await self._referee.run(layers, x, outputs_from=offset)
            bad, chain_lied = self._contradicted(mine, reference, offset, picks)
            if (chain_lied or bad) and fed:
                good, feeder = await self._retrace(trusted, fed)
                if feeder:
                    liars.append(feeder[0])
                    reasons.append(feeder[1])
                    log.warning("audit of %s: %s", request_id, feeder[1])
                    return Verdict(False, tuple(liars), "; ".join(reasons), checked)
                x = trusted = good
                reference = await self._referee.run(layers, x, outputs_from=offset)
                bad, chain_lied = self._contradicted(mine, reference, offset, picks)
            said = []
            for auditor, out, answered in replies:
                lied = answered and (out is None or not tensors_close(out, reference, self._tol))
                if lied:
                    liars.append(auditor)
                verb = "contradicts" if lied else "matches" if answered else "could not answer"
                said.append(f"auditor {auditor} {verb} it")
            # a plan that went on from caches built before it (a recovery resumed on them,
            # or a standby on a KV copy) computed positions its audit takes as honest: a
            # contradiction convicts nobody (an honest receiver of a liar's earlier rows,
            # and a standby resuming on a liar's copy, were evicted: a review)
            builder = (own_history or {}).get(index)
            early = [c for c in self._on_earlier_caches(mine) if c in chain_lied]
            if any(c.proof.sender != builder for c in early):
                first = min(c.rows[0] for c in early)
                why = f"is not all known: its caches held positions before {first} from "
                stop = self._unjudged(index, chain_lied, said, why + "before this plan")
                reason = "; ".join([*reasons, stop])
                return Verdict(False, tuple(liars), reason, checked, recompute=True)
            # before the chain is convicted, what it computed on: the stage before may
            # have sent something else than the honest computation, which its records
            # do not show below their largest values (an honest next stage was evicted
            # for it: a review). x is the input known right here
            if chain_lied and index and not ran_before_own:
                hops = self._hops(claims, index)
                crossed = await fetch(self._inputs, self._max, request_id, plan.epoch, hops)
                wrong = contradicted_senders(hops, crossed, x, self._tol)
                # the stage before may have computed on caches from before the plan (a
                # standby on a poisoned copy, its own records matching where they pin
                # it): what it sent convicts nobody (such a standby was evicted: a
                # review), and nor does what it did to this stage
                stale = self._stale_senders(claims, index, own_history)
                if stale & {h.step for h in wrong}:
                    why = "came from a stage that computed on caches from before this plan"
                    stop = self._unjudged(index, chain_lied, said, why)
                    reason = "; ".join([*reasons, stop])
                    return Verdict(False, tuple(liars), reason, checked, recompute=True)
                if wrong:
                    reasons.append(self._fed(index, wrong, chain_lied, said))
                    log.warning("audit of %s: %s", request_id, reasons[-1])
                    senders = tuple(dict.fromkeys(h.sender.sender for h in wrong))
                    evidence = tuple(h.sender.signature for h in wrong)
                    return Verdict(False, (*liars, *senders), "; ".join(reasons), checked, evidence)
                # the chain judged on what it received: within tolerance of the honest
                # input, a liar's adversarial rows still moved it past (a review)
                received = rebuilt(x, hops, crossed)
                if received is None:
                    stop = self._unjudged(index, chain_lied, said, "cannot be shown")
                    reason = "; ".join([*reasons, stop])
                    return Verdict(False, tuple(liars), reason, checked, recompute=bool(stale))
                on_it = await self._referee.run(layers, received, outputs_from=offset)
                _, chain_lied = self._contradicted(mine, on_it, offset, picks)
                if not chain_lied:
                    stop = self._unjudged(
                        index, mine, said, "are within tolerance of the honest input and moved it"
                    )
                    reason = "; ".join([*reasons, stop])
                    return Verdict(False, tuple(liars), reason, checked, recompute=bool(stale))
            # the nodes whose records are judged (a standby's, after a reroute), not the
            # plan's chain node alone
            judged = sorted({c.proof.sender for c in chain_lied or mine})
            reason = (
                f"stage {index} {layers}: chain node(s) {', '.join(map(str, judged))} "
                f"{'contradict' if chain_lied else 'match'} the re-execution"
                + "".join(f", {s}" for s in said)
            )
            if chain_lied or bad or not agreed:  # not a lone range's audit that found it right
                log.warning("audit of %s: %s", request_id, reason)
                reasons.append(reason)
            if chain_lied:
                # the signers of the contradicted records, whoever the plan names: only
                # what a node signed is evidence against it
                signers = tuple(dict.fromkeys(c.proof.sender for c in chain_lied))
                evidence = tuple(c.proof.signature for c in chain_lied)
                return Verdict(False, (*liars, *signers), "; ".join(reasons), checked, evidence)
            if bad:  # tokens no honest logits allow, of steps no record here covers
                stop = f"the tokens chosen at positions {sorted(bad)} are not what the "
                stop += "re-executed logits allow, and no record of this plan covers them"
                reason = "; ".join([*reasons, stop])
                return Verdict(False, tuple(liars), reason, checked, recompute=True)
            checked += len(mine)
            if fed:  # the referee's output, on an input not retraced: right if it was
                fed.append((layers, None, reference))
            else:
                trusted = reference
            if weak and not (last and liars):
                past = None if last else (trusted, fed)
                sent = await self._past_weak(request_id, plan, index, claims, past, liars, reasons)
                return self._weak(weak, index, layers, liars, reasons, checked, sent)
            x = reference  # the chain was right; go on from the re-execution
        return Verdict(True, tuple(liars), "; ".join(reasons), checked)

    def _contradicted(
        self, claims: Sequence[Claim], reference: torch.Tensor, offset: int, picks: Chosen | None
    ) -> tuple[set[int], list[Claim]]:
        """The positions whose chosen token `reference` does not allow, and the claims
        that contradict it (or vouch for such a position)."""
        bad = set(picks.wrong(reference, offset, self._tol)) if picks else set()
        vouched = (
            set(picks.wrong(reference, offset, self._tol, answered=True))
            if picks and bad
            else set()
        )
        lied = [
            c
            for c in claims
            if not self._matches(c, reference, offset)
            or any(c.start <= p < c.start + c.width for p in vouched)
        ]
        return bad, lied

    async def _retrace(
        self, trusted: torch.Tensor, fed: list[tuple[LayerRange, NodeId | None, torch.Tensor]]
    ) -> tuple[torch.Tensor, tuple[NodeId, str] | None]:
        """The input of a disputed stage, re-executed from `trusted` through the stages
        whose re-runs fed it, and the first re-runner whose output contradicts that
        re-execution (with why), if one did (None: the referee's own output)."""
        x = trusted
        for layers, runner, used in fed:
            x = await self._referee.run(layers, x)
            if runner is not None and not tensors_close(used, x, self._tol):
                why = f"auditor {runner}'s re-run of {layers} matched the records but "
                why += "contradicts the re-execution where they do not pin it"
                return x, (runner, why)
        fed.clear()
        return x, None

    def _judged(
        self,
        claims: Sequence[Claim],
        replies: Sequence[tuple[NodeId, torch.Tensor | None, bool]],
        offset: int,
        picks: Chosen | None,
    ) -> bool:
        """Whether every re-run matches the claims its runner did not sign, allows the
        chosen tokens, and agrees with the other re-runs: the records pin a stage's
        largest outputs only, and one re-run becomes the next stage's input (two
        colluders, a re-runner wrong below the pinned values and a next stage that
        computed on such an input, had a wrong answer verified: a review)."""
        outs = [out for _, out, _ in replies if out is not None]
        for runner, out, _ in replies:
            if out is None:
                continue
            if not self._all_match([c for c in claims if c.proof.sender != runner], out, offset):
                return False
            if picks and picks.wrong(out, offset, self._tol):
                return False
        return all(tensors_close(out, outs[0], self._tol) for out in outs[1:])

    @staticmethod
    def _strong(claim: Claim, weakest: Shape | None) -> bool:
        """Of the cluster's shape, and whole on the rows the request kept: a record of
        chunks of several positions cannot leave out a rejected draft's rows (`head`),
        and is judged as a weak one (stopping there convicted nobody, and a liar signing
        so was never evicted: a review)."""
        fp = claim.proof.fingerprint
        return (weakest is None or weakest.admits(fp)) and head(fp, claim.width) is not None

    @staticmethod
    def _weak(
        signers: list[NodeId],
        index: int,
        layers: LayerRange,
        liars: list[NodeId],
        reasons: list[str],
        checked: int,
        sent: Sequence[Hop] = (),
    ) -> Verdict:
        """Unverified: stage `index`'s records are fingerprinted more weakly than the
        cluster's shape; the liars found so far stand, and the signers of `sent`, the
        records of what the next stage received and the re-execution contradicts."""
        stop = f"stage {index} {layers}: node(s) {signers} signed fingerprints weaker than "
        stop += "the cluster's (or of chunks a verify step's kept rows cut); not checked past it"
        if not sent:
            return Verdict(False, tuple(liars), "; ".join([*reasons, stop]), checked)
        senders = tuple(dict.fromkeys(h.sender.sender for h in sent))
        steps = sorted({h.step for h in sent})
        stop += f"; node(s) {', '.join(map(str, senders))} sent stage {index + 1} inputs "
        stop += f"at step(s) {steps} that contradict the re-execution, and signed them"
        evidence = tuple(h.sender.signature for h in sent)
        return Verdict(False, (*liars, *senders), "; ".join([*reasons, stop]), checked, evidence)

    @staticmethod
    def _fed(index: int, sent: Sequence[Hop], accused: Sequence[Claim], said: list[str]) -> str:
        senders = ", ".join(map(str, dict.fromkeys(h.sender.sender for h in sent)))
        receivers = ", ".join(map(str, sorted({c.proof.sender for c in accused})))
        steps = sorted({h.step for h in sent})
        return (
            f"stage {index - 1}: node(s) {senders} sent stage {index} inputs at step(s) "
            f"{steps} that contradict the re-execution, and signed them; node(s) "
            f"{receivers} computed on them, " + ", ".join(said)
        )

    async def _past_weak(
        self,
        request_id: RequestId,
        plan: StagePlan,
        index: int,
        claims: Mapping[int, list[Claim]],
        past: tuple[torch.Tensor, list[tuple[LayerRange, NodeId | None, torch.Tensor]]] | None,
        liars: list[NodeId],
        reasons: list[str],
    ) -> list[Hop]:
        """The records of weakly fingerprinted stage `index` whose bytes, as the next
        stage received them, contradict the re-execution from the last trusted input
        through the re-runs fed since (`past`, ending with this stage; None: the last
        stage, which sent nothing on): a weak record matches much, but it binds its
        signer to the bytes it sent. A re-runner the retrace finds wrong joins `liars`."""
        if past is None or self._on_earlier_caches(claims.get(index, [])):
            return []  # the last stage; or caches from before this plan: not all known
        honest, feeder = await self._retrace(past[0], list(past[1]))
        if feeder:
            liars.append(feeder[0])
            reasons.append(feeder[1])
            return []
        hops = self._hops(claims, index + 1)
        crossed = await fetch(self._inputs, self._max, request_id, plan.epoch, hops)
        return contradicted_senders(hops, crossed, honest, self._tol)

    def _stale_senders(
        self,
        claims: Mapping[int, list[Claim]],
        index: int,
        own_history: Mapping[int, NodeId] | None,
    ) -> set[int]:
        """The steps whose rows into stage `index` the stage before computed on caches
        built before the plan, by another node than itself (`own_history`)."""
        builder = (own_history or {}).get(index - 1)
        early = self._on_earlier_caches(claims.get(index - 1, []))
        return {c.proof.step for c in early if c.proof.sender != builder}

    @staticmethod
    def _on_earlier_caches(claims: Sequence[Claim]) -> list[Claim]:
        """The claims computed on caches built before their plan: those of steps that
        began after position 0 before the plan's first step from 0 (a replay from 0
        within the plan rebuilds them; deciding by the plan's earliest row convicted a
        standby on a poisoned copy again once its plan replayed: a review)."""
        rebuilt = min((c.proof.step for c in claims if c.rows[0] == 0), default=None)
        return [c for c in claims if c.rows[0] > 0 and (rebuilt is None or c.proof.step < rebuilt)]

    @staticmethod
    def _hops(claims: Mapping[int, list[Claim]], index: int) -> list[Hop]:
        """Each step's rows crossing into stage `index` (`gaps` made sure each has its
        sender's record, whose output is the receiver's input)."""
        sent = {c.proof.step: c.proof for c in claims.get(index - 1, [])}
        return [
            Hop(c.proof.step, sent[c.proof.step], c.proof, *c.rows)
            for c in claims.get(index, [])
            if c.proof.step in sent
        ]

    @staticmethod
    def _unjudged(index: int, claims: Sequence[Claim], said: list[str], why: str) -> str:
        """Unverified, nobody blamed: what stage `index`'s signers computed on `why`."""
        signers = ", ".join(map(str, sorted({c.proof.sender for c in claims})))
        return (
            f"stage {index}: node(s) {signers} contradict the re-execution, but what they "
            f"received {why}: unverified, nobody blamed; " + ", ".join(said)
        )

    async def _replay(
        self,
        request_id: RequestId,
        index: int,
        layers: LayerRange,
        x: torch.Tensor,
        offset: int,
        auditor: NodeId,
    ) -> tuple[NodeId, torch.Tensor | None, bool]:
        """(the auditor, its outputs or None, whether it answered at all).

        An auditor that says it could not run (`AuditReply.error`: out of memory, another
        range) or does not answer is no liar: it did not answer, and the gateway's
        re-execution checks the claims instead. Only an answer that is not an error is
        judged (and convicts when it contradicts the re-execution)."""
        try:
            reply, payload = await self._ask(
                auditor,
                AuditRequest(request_id, StageIndex(index), layers.start, layers.end, offset),
                encode_tensor(x),
            )
        except InvalidMessage as e:  # an answer, of the wrong kind: judged as a wrong one
            log.warning("audit of %s: auditor %s: %s", request_id, auditor, e)
            return auditor, None, True
        except ButterflyError as e:
            # no answer is not a lie: the silence is counted by whoever asked
            # (`dataplane.unresponsive`)
            log.warning("audit of %s: auditor %s did not answer: %s", request_id, auditor, e)
            return auditor, None, False
        if reply.error:
            log.warning(
                "audit of %s: auditor %s could not run: %s", request_id, auditor, reply.error
            )
            return auditor, None, False
        try:
            return auditor, decode_tensor(payload, self._max), True
        except ButterflyError:
            return auditor, None, True

    def _all_match(self, claims: Sequence[Claim], out: torch.Tensor, offset: int) -> bool:
        return all(self._matches(c, out, offset) for c in claims)

    def _matches(self, claim: Claim, out: torch.Tensor, offset: int = 0) -> bool:
        """Does `out`, the outputs of positions from `offset` on, hold what `claim` says
        (of the rows the request kept: a speculative step's record covers rejected
        draft positions too, which its head leaves out)? A record that cannot be cut
        there gives nothing to compare, and is judged as a weak one (`_strong`)."""
        rows = out[:, claim.start - offset : claim.start - offset + claim.width]
        kept = head(claim.proof.fingerprint, claim.width)
        if kept is None:
            return True
        return rows.shape[1] == claim.width and matches_tensor(kept, rows, self._tol)
