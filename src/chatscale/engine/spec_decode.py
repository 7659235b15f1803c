"""Exact speculative decoding: cheap guesses, one target pass to check them, rejection sampling.

A proposer guesses each decode's next k tokens: a small draft model with the target's tokenizer,
or n-gram lookup in the sequence's own tokens (no model at all). The target then computes the
last known token and the k guesses in one forward pass, which costs about one decode step while
decoding is memory-bound (every weight is read once either way), and keeps the longest prefix it
agrees with plus one token of its own. Acceptance with min(1, p/q) and resampling from
norm(max(0, p - q)) on rejection (Leviathan et al. 2023) keep the output distributed exactly as
the target's; greedy output is the target's greedy output.

Speculation only pays while that pass stays memory-bound, i.e. at small batch: `SpecPolicy`
decides from the roofline of the chip, per step, how large a batch still gains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chatscale.engine.runner import ModelRunner, Work
from chatscale.engine.sampler import Sampler, exponential_race, seq_generator
from chatscale.engine.sequence import Sequence
from chatscale.engine.structured.hook import StructuredOutputs
from chatscale.planner.roofline import speculative_tokens_per_pass


@dataclass
class SpecDecodeStats:
    """Running totals, named as vLLM's spec_decode_* metrics."""

    drafts: int = 0  # verify passes (one per sequence and step that speculated)
    draft_tokens: int = 0  # tokens proposed
    accepted_tokens: int = 0  # proposals the target kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify pass: the accepted proposals plus the target's own token."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else 0.0


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None  # [len(tokens), vocab]: the draft's distributions; None: deterministic guesses


class NgramProposer:
    """Prompt lookup: find the latest earlier place where the sequence's last n tokens occurred
    (longest n first) and propose what followed there. Pays when outputs copy their input
    (summaries, code edits, quoting), costs nothing when they do not."""

    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("n-gram lookup needs 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, batch: dict[Sequence, int]) -> dict[Sequence, Proposal]:
        return {seq: Proposal(self.lookup(seq.token_ids, k), None) for seq, k in batch.items()}

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        # Tokens as 4-byte words, so bytes.rfind (C speed) searches for the pattern.
        data = np.asarray(tokens, dtype=np.int32).tobytes()
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            pattern = data[-4 * n:]
            end = len(data) - 4  # an occurrence must end before the last token
            while (at := data.rfind(pattern, 0, end)) >= 0:
                if at % 4 == 0:
                    first = at // 4 + n
                    return tokens[first:first + k]
                end = at + 4 * n - 1  # misaligned match: look further left
        return []


class DraftModelProposer:
    """A small model proposes by k cheap decode steps of its own.

    Its KV lives in its own pages indexed by the target's block tables: the pages a sequence owns
    hold both models' KV, so allocation, prefix sharing, eviction and preemption need no second
    bookkeeping. A sequence's draft KV starts empty; the first proposal catches up on the whole
    prompt in one chunk (the draft is several times cheaper than the target)."""

    def __init__(self, runner: ModelRunner, sampler: Sampler, structured: StructuredOutputs | None = None) -> None:
        self.runner = runner
        self.sampler = sampler
        self.structured = structured  # masks a constrained sequence's draft logits by its grammar

    def propose(self, batch: dict[Sequence, int]) -> dict[Sequence, Proposal]:
        tokens: dict[Sequence, list[int]] = {seq: [] for seq in batch}
        probs: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq in batch}
        works = [Work(seq, seq.num_draft_computed_tokens, seq.token_ids[seq.num_draft_computed_tokens:])
                 for seq in batch]
        advanced: dict[Sequence, int] = {}  # constrained sequences: their grammar's position before
        while works:
            seqs = [w.seq for w in works]
            logits = self.runner.run(works)
            if self.structured is not None:
                self.structured.mask_draft(logits, seqs)
            dist = self.sampler.distribution(logits, seqs)
            picked = dist.argmax(dim=-1)
            sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
            if sampled:
                rows = torch.tensor(sampled, device=dist.device)
                picked[rows] = exponential_race(dist[rows], [seqs[i] for i in sampled])
            nxt = []
            for w, token, row in zip(works, picked.tolist(), dist):
                seq = w.seq
                seq.num_draft_computed_tokens = w.start + len(w.ids)
                tokens[seq].append(token)
                probs[seq].append(row)
                if len(tokens[seq]) < batch[seq] and self._advance_grammar(seq, token, advanced):
                    nxt.append(Work(seq, seq.num_draft_computed_tokens, [token]))
            works = nxt
        for seq, start in advanced.items():  # the grammars stepped through the proposals: step back
            seq.grammar.rollback(seq.grammar.num_tokens - start)
        return {seq: Proposal(tokens[seq], None if seq.params.greedy else torch.stack(probs[seq]))
                for seq in batch}

    def _advance_grammar(self, seq: Sequence, token: int, advanced: dict[Sequence, int]) -> bool:
        """Move a constrained sequence's grammar over its proposal, so the next draft step is masked
        from there; False (propose no further) past the grammar's end."""
        if self.structured is None or seq.grammar is None:
            return True
        advanced.setdefault(seq, seq.grammar.num_tokens)
        return seq.grammar.accept([token])


def verify(target: torch.Tensor, proposal: Proposal, seq: Sequence) -> list[int]:
    """The tokens to append: the accepted prefix of `proposal`, then one token from the target
    (its correction at the first rejection, or a bonus token when all were accepted).

    `target`: [len(proposal.tokens) + 1, vocab] sampling distributions of the target (one-hot
    for greedy requests, so acceptance is "equals the target's argmax")."""
    if seq.params.greedy:
        best = target.argmax(dim=-1).tolist()
        out = []
        for guess, choice in zip(proposal.tokens, best):
            if guess != choice:
                break
            out.append(guess)
        return out + [best[len(out)]]
    gen = seq_generator(seq, target.device)
    for i, guess in enumerate(proposal.tokens):
        p = target[i]
        q = proposal.probs[i] if proposal.probs is not None else torch.nn.functional.one_hot(
            torch.tensor(guess, device=p.device), p.shape[-1]).to(p.dtype)
        u = float(torch.rand((), generator=gen, device=p.device))
        if u * float(q[guess]) < float(p[guess]):
            continue  # accepted with probability min(1, p/q)
        residual = (p - q).clamp_min_(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            residual = p
        token = int(torch.multinomial(residual, 1, generator=gen))
        return proposal.tokens[:i] + [token]
    bonus = exponential_race(target[len(proposal.tokens):], [seq])
    return proposal.tokens + [int(bonus)]


class SpecPolicy:
    """When speculation pays, by the roofline.

    A plain step of B decodes costs max(B / T, 1) weight reads, where T = the chip's ridge point
    in tokens (peak FLOP/s x bytes per weight / (2 x memory bandwidth)): below T tokens a step is
    memory-bound. A speculative step verifies B(k+1) tokens and runs k draft steps (r = draft
    bytes / target bytes each), and yields B x E tokens, E = (1 - a^(k+1)) / (1 - a) at acceptance
    rate a. Speculate while its cost per token is lower by a margin (the roofline ignores the
    per-token work around the matmuls: sampling, verification, k+1 queries of attention); a large
    batch makes the verify pass compute-bound and speculation off.
    """

    PRIOR_ACCEPTANCE = 0.7  # a new sequence's expected acceptance, worth PRIOR_WEIGHT proposals
    PRIOR_WEIGHT = 8
    MARGIN = 1.1  # speculate only for an expected gain of 10% or more

    def __init__(self, num_tokens: int, ridge_tokens: float, draft_ratio: float,
                 max_batch: int | None = None) -> None:
        self.k = num_tokens
        self.ridge_tokens = ridge_tokens
        self.draft_ratio = draft_ratio
        self.max_batch = max_batch  # an operator's override of the roofline's answer

    def acceptance(self, seq: Sequence) -> float:
        """This sequence's acceptance so far, pulled towards the prior while it has few proposals:
        each sequence finds out for itself (a summary copies its input, a chat answer does not), and
        every new one starts hopeful, so a workload change is noticed."""
        prior = self.PRIOR_ACCEPTANCE * self.PRIOR_WEIGHT
        return (seq.num_spec_accepted_tokens + prior) / (seq.num_spec_draft_tokens + self.PRIOR_WEIGHT)

    def pays(self, batch: int, acceptance: float) -> bool:
        if self.max_batch is not None:
            return batch <= self.max_batch
        plain = max(batch / self.ridge_tokens, 1.0) / batch
        cost = max(batch * (self.k + 1) / self.ridge_tokens, 1.0)
        cost += self.k * self.draft_ratio * max(batch / self.ridge_tokens, 1.0)
        return self.MARGIN * cost / (batch * speculative_tokens_per_pass(acceptance, self.k)) < plain

    def largest_batch(self, acceptance: float, limit: int = 4096) -> int:
        """The largest batch that still speculates (0: none), for logs and docs."""
        return max((b for b in range(1, limit + 1) if self.pays(b, acceptance)), default=0)
