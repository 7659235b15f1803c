"""Continuous batching with chunked prefill and recompute preemption.

Every step hands each sequence a number of tokens to compute: one for a decode, a chunk for a
prefill. Running sequences go first (oldest first) so decodes keep flowing while long prompts are
split across steps; then waiting sequences are admitted FCFS. When pages run out, the newest
running sequence is preempted: it drops its pages and goes back to the front of the queue.
"""

from __future__ import annotations

from collections import deque
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
                 max_model_len: int = 1 << 30, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
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
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            k = min(self.lookahead(seq), budget - n) if n == seq.num_uncomputed_tokens == 1 else 0
            while not self.kv.allocate(seq, n + k):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                if k > 0:
                    out.lookahead[seq] = k
                budget -= n + k
                i += 1
                continue
            break
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self.kv.allocate_prefix(seq, budget)  # cached prefix pages are reused, not recomputed
            if n is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        out.copies = self.kv.drain_copies()
        return out

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

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_draft_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

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
