"""What crosses between the API server and the engine core: small, typed, msgpack-encoded messages.

Requests go in as token ids and sampling parameters (the server tokenizes); every step comes out as
the *new* tokens of each sequence it touched, plus a compact stats record and a snapshot of the
engine's load. No Python object is shared, so the engine core can live in its own process (and its
model on other devices) without the server noticing. msgspec encodes these in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from chatscale.engine.sampling_params import SamplingParams
from chatscale.planner.hardware import Hardware


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability and the `k` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepStats:
    """One step's shape, for metrics, benchmarks and the simulator's cost model."""

    num_seqs: int = 0
    num_tokens: int = 0
    num_prefill_tokens: int = 0
    duration_s: float = 0.0
    end_time: float = 0.0  # time.monotonic() when the step ended (one clock for every process)
    # Per scheduled sequence: (tokens already in its KV cache, tokens computed this step). With
    # the model's shapes this gives the step's FLOPs and bytes (attention reads every cached token).
    chunks: list[tuple[int, int]] = field(default_factory=list)
    # MoE models: tokens routed to each expert, one list per MoE layer; None for dense models.
    expert_tokens: list[list[int]] | None = None
    collective_s: float = 0.0  # tensor parallelism: rank 0's seconds in the model's collectives


@dataclass
class EngineSnapshot:
    """The engine's load and running totals after a step: what /metrics and the gateway read."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 1
    num_used_blocks: int = 0
    num_cached_free_blocks: int = 0
    num_requests: int = 0  # requests the core holds (any state)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_recomputed: int = 0
    kv_cache_evictions: int = 0
    kv_tier_stores: int = 0
    kv_tier_restores: int = 0
    num_preemptions: int = 0
    spec_drafts: int | None = None  # None: speculative decoding is off
    spec_draft_tokens: int | None = None
    spec_accepted_tokens: int | None = None

    @property
    def kv_usage(self) -> float:
        """Fraction of pages held by live sequences: the first half of "load" (lesson 3)."""
        return self.num_used_blocks / self.num_blocks


@dataclass
class EngineInfo:
    """Sent once, when the engine core is ready: what the server needs to validate and measure."""

    model: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    dtype: str  # the planner's name of the serving dtype (fp32, bf16, ...)
    device: str
    model_config: dict[str, Any]  # the checkpoint's config.json (the planner's model shape)
    sampling_defaults: dict[str, Any]  # generation_config.json's sampling fields
    peaks: Hardware  # the device's measured (CPU) or datasheet (GPU) peaks
    kv_cache_bytes: int = 0
    weight_bytes: int = 0  # what a forward reads
    resident_weight_bytes: int = 0  # what the weights hold in memory (prepacked copies included)
    # Stored bytes per weight (shared, embedding value, experts or a dense model's MLPs): quantized
    # layers make them differ from the dtype's; the metrics count a step's bytes with them.
    weight_storage: tuple[float, float, float] = (0.0, 0.0, 0.0)
    kv_tier_pages: int = 0  # the second KV tier's pages (0: off, or it did not pay here)
    tensor_parallel_size: int = 1  # ranks; kv_cache_bytes and weight_bytes are rank 0's share


# ---- server -> engine -----------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    arrival_time: float = 0.0
    group_id: str = ""  # the client request it is one prompt of (the scheduler's fair-share unit); "": itself


class Abort(msgspec.Struct, tag=True, array_like=True):
    """Stop a request (`index` None: all its choices, e.g. the client left) or one choice that a
    stop string ended after `keep_tokens` of its tokens: the rest is overshoot, never cached."""

    request_id: str
    index: int | None = None
    keep_tokens: int | None = None


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


# ---- engine -> server -----------------------------------------------------------------------------
class SeqDelta(msgspec.Struct, array_like=True):
    """What one step added to one choice of a request."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None


class Ready(msgspec.Struct, tag=True, array_like=True):
    info: EngineInfo


class StepResult(msgspec.Struct, tag=True, array_like=True):
    deltas: list[SeqDelta]
    snapshot: EngineSnapshot
    stats: StepStats | None = None  # None: no step ran (only commands were applied)
    errors: dict[str, str] = {}  # request id -> why its step failed (its choices end with "error")


class Dead(msgspec.Struct, tag=True, array_like=True):
    """The engine core stopped for good; every open request must fail with this message."""

    message: str


ToEngine = AddRequest | Abort | Shutdown
FromEngine = Ready | StepResult | Dead


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def decoder(kind: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind)
