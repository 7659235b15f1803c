"""One sequence's place in its grammar: which tokens may come next, and how to step back.

Wraps an llguidance matcher. The engine accepts every token it appends, so the state always
matches the sequence's output; a preempted sequence keeps its tokens and so its state (recompute
rebuilds KV, not tokens). Speculative decoding advances through proposals and rolls back the
rejected ones exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import llguidance


class GrammarState:
    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids
        self.num_tokens = 0  # tokens accepted so far (the sequence's output tokens)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (an int32 CPU tensor, 32 tokens a word)."""
        target = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def accept(self, tokens: list[int]) -> bool:
        """Advance over `tokens`, or return False and change nothing if the grammar refuses one
        (checked first: a matcher that consumed a refused token stays broken for good). A grammar
        that reached its end takes EOS and stays where it is: the sequence ends there anyway."""
        if self.matcher.is_stopped() and all(t in self.eos_token_ids for t in tokens):
            return True
        if self.matcher.validate_tokens(tokens) < len(tokens) or not self.matcher.consume_tokens(tokens):
            return False
        self.num_tokens += len(tokens)
        return True

    def rollback(self, n: int) -> None:
        if n:
            if not self.matcher.rollback(n):
                raise RuntimeError(f"grammar rollback of {n} tokens failed: {self.matcher.get_error()}")
            self.num_tokens -= n

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the grammar allows from here (nothing is consumed)."""
        return self.matcher.validate_tokens(tokens)

    @property
    def is_finished(self) -> bool:
        """Nothing but EOS may follow (the grammar is complete and allows no more)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()
