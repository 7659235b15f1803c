"""Continuous batching with chunked prefill, recompute preemption and a fair share per request.

Every step hands each sequence a number of tokens to compute: one for a decode, a chunk for a
prefill. Running sequences go first (oldest first) so decodes keep flowing while long prompts are
split across steps; then waiting sequences are admitted FCFS. When pages run out, the newest
running sequence is preempted: it drops its pages and goes back to the front of the queue.

One request (all its prompts and `n` choices: its `group_id`) may fill the whole batch while nobody
else waits, but beyond `fair_share_seqs` running sequences the slots and pages it holds are only
lent: a waiting sequence of a request holding fewer goes first, and takes them back by preempting
the lender's newest sequence (vLLM preempts by priority when pages run out, SGLang also to admit a
higher-priority request; here the priority is how far a request is over its share). So an `n=128`
request cannot make an 8-token one wait for all of its choices, and a lone one still runs at full
batch. Preempted sequences recompute, but their full pages stay in the prefix cache, so that is
mostly cache hits.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from chatscale.engine.kv_cache import KVCacheManager
from chatscale.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What one step computes: `(sequence, number of new tokens)` in batch order."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[str, int, int]] = field(default_factory=list)  # second-tier page moves, in order
    # Speculative decoding: decodes that also verify this many proposed tokens (pages reserved).
    lookahead: dict[Sequence, int] = field(default_factory=dict)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled) + sum(self.lookahead.values())

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def samples(self, seq: Sequence, n: int) -> bool:
        """Whether computing `n` more tokens of `seq` reaches its last known token, so the step
        samples its next one (a prefill chunk short of the prompt's end samples nothing)."""
        return seq.num_computed_tokens + n == seq.num_tokens

    @property
    def sampled(self) -> list[Sequence]:
        """Sequences that get a new token from this step, in batch order (call before the update)."""
        return [seq for seq, n in self.scheduled if self.samples(seq, n)]


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_model_len: int = 1 << 30, eos_token_ids: frozenset[int] = frozenset(),
                 fair_share_seqs: int | None = None) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        # Running sequences a request keeps while others wait (None: no limit, plain FCFS).
        self.fair_share_seqs = fair_share_seqs or max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Speculative tokens a decode may verify this step (0: none); set by the engine per step.
        self.lookahead: Callable[[Sequence], int] = lambda seq: 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        held = Counter(seq.group_id for seq in self.running)  # running sequences per request
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            k = min(self.lookahead(seq), budget - n) if n == seq.num_uncomputed_tokens == 1 else 0
            while not self.kv.allocate(seq, n + k):
                victim = self._over_share(held) or self.running[-1]
                if self.running.index(victim) < i:
                    i -= 1  # it was scheduled already: its place and tokens are given back
                budget += self._preempt(victim, held, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                if k > 0:
                    out.lookahead[seq] = k
                budget -= n + k
                i += 1
        pressed = bool(out.preempted)  # pages ran short for running sequences: admit nobody this step
        while self.waiting and not pressed and budget > 0:
            seq = self._next_waiting(held)
            n = self.kv.allocate_prefix(seq, budget) if len(self.running) < self.max_num_seqs else None
            if n is None:  # no slot or no pages: a request under its share takes back what is lent
                victim = self._over_share(held) if held[seq.group_id] < self.fair_share_seqs else None
                if victim is None:
                    break
                budget += self._preempt(victim, held, out)
                continue
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            held[seq.group_id] += 1
            out.scheduled.append((seq, n))
            budget -= n
        out.copies = self.kv.drain_copies()
        return out

    def _next_waiting(self, held: Counter) -> Sequence:
        """FCFS, except that a request holding its fair share of the batch lets the others go first."""
        for seq in self.waiting:
            if held[seq.group_id] < self.fair_share_seqs:
                return seq
        return self.waiting[0]

    def _over_share(self, held: Counter) -> Sequence | None:
        """The newest running sequence of the request furthest over its fair share (of the newest such
        request, on a tie); None if no request is over its share."""
        most = max(held.values(), default=0)
        if most <= self.fair_share_seqs:
            return None
        return next(seq for seq in reversed(self.running) if held[seq.group_id] == most)

    def update_from_output(self, plan: SchedulerOutput, sampled: Mapping[Sequence, list[int]], started: float,
                           now: float) -> list[tuple[Sequence, list[int]]]:
        """The bookkeeping after every step, for the engine and the simulator alike.

        The step that began at `started` and ended at `now` computed the planned tokens (they now
        have KV; full pages join the prefix cache); each sequence in `sampled` appends its new tokens
        (one, or a speculative decode's accepted proposals plus one) until a token-level stop; a
        decode's verified lookahead keeps the accepted proposals' KV and gives back the rest;
        finished sequences are freed. Returns (sequence, tokens appended) for every sampled one."""
        for seq, n in plan.scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = started
            seq.num_computed_tokens += n
            self.kv.commit(seq)
        appended = []
        for seq, tokens in sampled.items():
            kept = []
            for token in tokens:
                seq.append_token(token)
                kept.append(token)
                if seq.grammar is not None and not seq.grammar.accept([token]):
                    seq.grammar = None  # a ban overrode the mask (e.g. min_tokens): no longer guaranteed
                seq.first_token_time = seq.first_token_time or now
                seq.last_token_time = now
                if seq.check_stop(self.eos_token_ids, self.max_model_len):
                    self.finish(seq)
                    break
            if seq in plan.lookahead and not seq.is_finished:
                self._accept(seq, len(tokens) - 1)
            appended.append((seq, kept))
        return appended

    def _accept(self, seq: Sequence, num_accepted: int) -> None:
        """After verifying a decode's lookahead: the accepted proposals keep their KV (and full
        pages join the prefix cache); the pages reserved for the rejected ones go back."""
        seq.num_computed_tokens += num_accepted
        seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, seq.num_computed_tokens)
        self.kv.commit(seq)
        self.kv.trim(seq)

    def _preempt(self, seq: Sequence, held: Counter, out: SchedulerOutput) -> int:
        """Take a running sequence out of this step and back to the front of the queue, its pages
        dropped (recomputed on its return). Returns the tokens it had been scheduled for this step."""
        self.running.remove(seq)
        held[seq.group_id] -= 1
        refund = 0
        for j, (scheduled, n) in enumerate(out.scheduled):
            if scheduled is seq:
                del out.scheduled[j]
                refund = n + out.lookahead.pop(seq, 0)
                break
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_draft_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)
        return refund

    def finish(self, seq: Sequence, reason: str | None = None, keep_tokens: int | None = None) -> None:
        """Remove `seq` wherever it is and free its pages at once (done, stopped or aborted). With
        `keep_tokens`, tokens past that many were an overshoot: their pages leave the prefix cache."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:  # not yet added: compiling a grammar
            self.waiting.remove(seq)
        if reason is not None:
            seq.finish_reason = reason
        self.kv.free(seq, keep_tokens)
        seq.status = SequenceStatus.FINISHED
