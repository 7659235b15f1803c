"""One generated sequence: its tokens, how many of them have KV in the cache, and its pages.

Pure Python on purpose: the simulator drives the same objects with a step-cost model.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from chatscale.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Tokens `[0, num_computed_tokens)` have KV in `block_table`; the rest are still to compute.

    A decode step computes one token (the last sampled one); a prefill chunk computes many. A
    preempted sequence drops its pages and recomputes prompt *and* output, so nothing is lost.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n choices
    # The client request it belongs to (every prompt and choice of one API call; default: its own
    # request): what the scheduler shares the batch between.
    group_id: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    token_ids: list[int] = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cache_salt: str | None = None  # isolates one tenant's prefix cache from another's
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_hashes: list = field(default_factory=list)  # chained hashes of full pages (KV manager's)
    num_registered_blocks: int = 0  # leading pages already named in the prefix cache
    num_preemptions: int = 0
    num_draft_computed_tokens: int = 0  # speculative decoding: tokens with KV in the draft model's pages
    num_spec_draft_tokens: int = 0  # tokens proposed for this sequence, and how many the target kept
    num_spec_accepted_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    output_logprobs: list[Any] = field(default_factory=list)
    rng: Any = None  # the sampler's per-sequence generator, for seeded requests
    grammar: Any = None  # structured output: a GrammarState over the output tokens, or None

    def __post_init__(self) -> None:
        self.group_id = self.group_id or self.request_id
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self, eos_token_ids: frozenset[int], max_model_len: int) -> bool:
        """Token-level stop conditions; stop strings are the detokenizer's job."""
        last = self.token_ids[-1]
        p = self.params
        if self.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and last in eos_token_ids:
                self.finish_reason, self.stop_reason = "stop", None
                return True
            if last in p.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", last
                return True
        if (p.max_tokens is not None and self.num_output_tokens >= p.max_tokens) or (
            self.num_tokens >= max_model_len
        ):
            self.finish_reason = "length"
            return True
        return False
