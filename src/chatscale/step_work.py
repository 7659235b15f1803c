"""FLOPs and bytes one engine step did, counted from the model's shape and the step's batch.

The planner's roofline formulas (planner/roofline.py) priced on the step the scheduler really ran
rather than on an assumed batch: per scheduled sequence, the tokens already in its KV cache and the
tokens computed now. Dividing one by the other gives the step's arithmetic intensity, which is the
number to hold against the chip's ridge point (docs/architecture.md, lesson 3).

FLOPs are *model* FLOPs, as MFU counts them: every computed token passes every active matmul (the
output projection included) and attends to its whole context. Bytes are what one step must move at
the least: each weight read once (of an MoE, only the experts some token was routed to), the KV of
every cached and new token read, the new tokens' KV written. Activations are left out. Weights
stored quantized are counted at their stored size (packed values, scales and zeros), given as
`WeightBytes` by the serving model; the planner's dtype sizes otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatscale.planner.catalog import Model
from chatscale.planner.hardware import DTYPE_BYTES
from chatscale.planner.roofline import Layout, kv_bytes_per_token, prefill_flops


@dataclass(frozen=True)
class WeightBytes:
    """Stored bytes per weight: of the shared (non-expert) weights, of an embedding value a lookup
    reads, and of a routed expert's weights. Quantized layers make these differ from the dtype's."""

    shared: float
    lookup: float
    expert: float

    @classmethod
    def of_dtype(cls, dtype: str) -> "WeightBytes":
        size = DTYPE_BYTES[dtype]
        return cls(size, size, size)


@dataclass(frozen=True)
class StepWork:
    flops: float
    weight_bytes: float
    kv_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes


def step_work(model: Model, dtype: str, chunks: Sequence[tuple[int, int]],
              expert_tokens: Sequence[Sequence[int]] | None = None, stored: WeightBytes | None = None) -> StepWork:
    """Work of a step that computed `n` new tokens after `cached` ones for each `(cached, n)` in
    `chunks`, with weights and KV stored as `dtype` (a planner dtype: "fp32", "bf16", ...).

    `expert_tokens` (MoE) holds the tokens routed to each expert, one list per MoE layer: an expert
    no token reached is not read. `stored` overrides the weights' bytes per value (quantized weights).
    """
    stored = stored or WeightBytes.of_dtype(dtype)
    tokens = sum(n for _, n in chunks)
    flops = sum(prefill_flops(model, n, cached) for cached, n in chunks)
    # The input embedding is a lookup: only the rows of this step's tokens are read (a tied one is
    # read whole anyway, as the output projection).
    lookup_table = 0 if model.tied_embeddings else model.vocab * model.d_model
    weight_bytes = (model.shared_params - lookup_table) * stored.shared + tokens * model.d_model * stored.lookup
    if model.is_moe and expert_tokens:
        per_layer_expert = model.expert_params / model.layers  # the planner's view: every layer sparse
        weight_bytes += per_layer_expert * sum(1 for layer in expert_tokens for n in layer if n) * stored.expert
    else:
        weight_bytes += model.experts * model.expert_params * stored.expert
    kv_tokens = sum(cached + 2 * n for cached, n in chunks)  # read cached and new, write new
    kv = kv_tokens * kv_bytes_per_token(model, Layout(kv_dtype=dtype))
    return StepWork(flops=flops, weight_bytes=weight_bytes, kv_bytes=kv)
