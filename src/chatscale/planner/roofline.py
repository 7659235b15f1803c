"""Roofline arithmetic for serving (and training) a transformer on a given layout of accelerators.

Everything here is a closed-form count: parameters and KV-cache bytes, FLOPs, bytes moved, and the
time a step takes when it is bound by whichever of compute and memory is slower, plus the time
spent talking between GPUs. It is a lower bound on real step times (kernels reach 50-90% of peak);
its value is in *which* bound applies and how the answer moves with batch, context and layout.
`Efficiency` turns the bound into an expected step time; the planner and the simulator's roofline
cost share it, so `chatscale plan` and `chatscale simulate` agree on the same setup.

Units: FLOPs count a multiply-add as two; bytes are bytes; times are seconds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from chatscale.planner.catalog import Model
from chatscale.planner.hardware import DTYPE_BYTES, Hardware

# Activations cross GPU links in BF16.
ACTIVATION_BYTES = 2
SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class Layout:
    """How one model replica is split and stored.

    `tp` GPUs split every layer (tensor parallelism, two all-reduces per layer); `pp` groups of
    them each hold a slice of the layers (pipeline parallelism). Weights and the KV cache each have
    a storage format; matmuls run in the weights' format where the chip has a unit for it.
    """

    tp: int = 1
    pp: int = 1
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")
        for dtype in (self.weight_dtype, self.kv_dtype):
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class Efficiency:
    """How far served steps fall short of the roofline: kernels reach `fraction` of the chip's peak
    FLOP/s and bandwidth, and every step pays `step_overhead_s` besides (scheduling, sampling,
    kernel launches, the host sync). The defaults are an assumption, not a measurement: vLLM-class
    engines reach 50-80% of peak on large steps, and a step's fixed cost is a few milliseconds."""

    fraction: float = 0.6
    step_overhead_s: float = 0.002

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1 or self.step_overhead_s < 0:
            raise ValueError(f"efficiency must be in (0, 1] and the step overhead >= 0, got {self.fraction} "
                             f"and {self.step_overhead_s}")

    def seconds(self, roofline_s: float) -> float:
        """The expected time of a step whose roofline bound is `roofline_s`."""
        return self.step_overhead_s + roofline_s / self.fraction

    def __str__(self) -> str:
        return f"{self.fraction:.0%} of peak + {self.step_overhead_s * 1e3:g} ms/step"

    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser) -> None:
        """The same two flags on `chatscale plan` and `chatscale simulate`."""
        d = Efficiency()
        p.add_argument("--efficiency", type=float, default=d.fraction,
                       help="share of the chip's peak FLOP/s and bandwidth a served step reaches (1: the roofline)")
        p.add_argument("--step-overhead", type=float, default=d.step_overhead_s,
                       help="seconds every step costs besides (scheduling, sampling, launches)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Efficiency:
        return cls(args.efficiency, args.step_overhead)


ROOFLINE = Efficiency(1.0, 0.0)  # the bound itself


# --- memory -------------------------------------------------------------------------------------

def weight_bytes(model: Model, layout: Layout) -> float:
    """Bytes of all weights of one replica (every expert is resident, routed to or not)."""
    return model.total_params * DTYPE_BYTES[layout.weight_dtype]


def kv_bytes_per_token(model: Model, layout: Layout = Layout()) -> float:
    """KV-cache bytes one token occupies across the replica: K and V, every layer, every KV head.

    Tensor parallelism splits KV heads across GPUs; when it exceeds the number of KV heads (a
    multi-query model on 8 GPUs) each GPU still needs a whole head, so heads are replicated.
    """
    stored_heads = layout.tp * math.ceil(model.kv_heads / layout.tp)
    return 2 * model.layers * stored_heads * model.head_dim * DTYPE_BYTES[layout.kv_dtype]


def max_batch(model: Model, hw: Hardware, layout: Layout, context: int,
              memory_utilization: float = 0.9) -> int | None:
    """Most sequences of `context` tokens whose KV cache fits beside the weights.

    `memory_utilization` keeps the rest of each GPU for activations and workspace (vLLM's default
    gpu_memory_utilization is 0.9). Zero when the weights alone do not fit; None (no limit) at
    context 0, where sequences hold no KV cache.
    """
    free = hw.memory_bytes * memory_utilization * layout.gpus - weight_bytes(model, layout)
    if free < 0:
        return 0
    return None if context == 0 else int(free // (kv_bytes_per_token(model, layout) * context))


# --- FLOPs --------------------------------------------------------------------------------------

def _attention_flops(model: Model, query_key_pairs: float) -> float:
    """Q.K scores and the weighted sum of V: 2 FLOPs each per pair, query head and head dimension."""
    return 4 * model.layers * model.attention_width * query_key_pairs


def decode_flops(model: Model, context: int) -> float:
    """FLOPs to generate one token that attends to `context` tokens: 2 x active matmul parameters
    (the seeds' "2 x active parameters") plus attention over the context."""
    return 2 * model.matmul_params + _attention_flops(model, context)


def _prefill_pairs(tokens: int, cached: int) -> float:
    """Causal attention pairs of `tokens` new tokens after `cached` ones: token i sees cached + i."""
    return tokens * cached + tokens * (tokens + 1) / 2


def prefill_flops(model: Model, tokens: int, cached: int = 0) -> float:
    """FLOPs to process `tokens` prompt tokens after `cached` tokens already in the KV cache."""
    return 2 * model.matmul_params * tokens + _attention_flops(model, _prefill_pairs(tokens, cached))


# --- mixture of experts -------------------------------------------------------------------------

def expected_distinct_experts(model: Model, tokens: float) -> float:
    """Experts (per MoE layer) that at least one of `tokens` tokens is routed to, on average.

    With uniform routing a token skips a given expert with probability 1 - k/E, so an expert stays
    idle with probability (1 - k/E)^tokens. Only the experts in use are read from memory: at small
    batches an MoE reads far fewer bytes than its total parameters.
    """
    if not model.is_moe:
        return 1.0
    return model.experts * (1 - (1 - model.top_k / model.experts) ** tokens)


def tokens_per_expert(model: Model, tokens: float) -> float:
    """Mean tokens each expert receives: tokens x k / E. The expert's matmul has this batch size."""
    return tokens * model.top_k / model.experts


def expert_load_pmf(model: Model, tokens: int, n: int) -> float:
    """Probability that a given expert receives exactly `n` of `tokens` tokens (uniform routing)."""
    p = model.top_k / model.experts
    return math.comb(tokens, n) * p**n * (1 - p) ** (tokens - n)


# --- one scheduler step -------------------------------------------------------------------------

@dataclass(frozen=True)
class StepCost:
    """Work and time of one step of one replica; `seconds` = max(compute, memory) + communication."""

    flops: float
    bytes: float  # moved from device memory, all GPUs together
    compute_s: float
    memory_s: float
    comm_s: float
    micro_batches: int

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s) + self.comm_s

    @property
    def intensity(self) -> float:
        """Arithmetic intensity: FLOPs per byte moved, to compare with the chip's ridge point."""
        return self.flops / self.bytes

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def _link_bandwidth(hw: Hardware, gpus: int) -> float:
    """Bandwidth between GPUs of a group: NVLink inside a node, the network beyond it."""
    link = hw.nvlink_bandwidth if gpus <= hw.gpus_per_node else hw.network_bandwidth
    if link is None:
        raise ValueError(f"{hw.name} has no link to spread a replica over {gpus} devices")
    return link


def step_cost(model: Model, hw: Hardware, layout: Layout, *,
              decode_contexts: Sequence[int] = (),
              prefills: Sequence[tuple[int, int]] = ()) -> StepCost:
    """Cost of one scheduler step: every decoding sequence gains a token, prefill chunks are read.

    `decode_contexts` holds, per decoding sequence, the tokens its new token attends to (its length
    including the new token); `prefills` holds (new tokens, tokens already cached) per prefill
    chunk. This is the step-cost model the simulator drives the real scheduler with.

    The step's sequences are split into up to `pp` micro-batches that flow through the pipeline;
    each stage reads its weights once per micro-batch (for an MoE: the shared weights and the
    experts that micro-batch's tokens are routed to) and the KV cache of its sequences. So pipeline
    stages add memory capacity, not bandwidth per token. Each stage of `tp` GPUs does its share of
    the FLOPs and bytes, then all-reduces activations twice per layer and sends them to the next
    stage; communication is counted by bandwidth plus the link's latency per collective where the
    hardware knows it (`Hardware.link_latency`), and not overlapped with compute.
    """
    sequences = len(decode_contexts) + len(prefills)
    tokens = len(decode_contexts) + sum(n for n, _ in prefills)
    if tokens == 0:
        raise ValueError("a step needs at least one decoding sequence or prefill token")
    flops = (2 * model.matmul_params * tokens
             + _attention_flops(model, sum(decode_contexts)
                                + sum(_prefill_pairs(n, cached) for n, cached in prefills)))
    kv_tokens = sum(decode_contexts) + sum(n + cached for n, cached in prefills)
    kv_bytes = kv_tokens * kv_bytes_per_token(model, layout)

    micro = min(layout.pp, sequences)
    micro_tokens = tokens / micro
    params_read = (model.shared_params
                   + expected_distinct_experts(model, micro_tokens) * model.expert_params)
    moved = micro * params_read * DTYPE_BYTES[layout.weight_dtype] + kv_bytes

    # Per GPU: a micro-batch visits pp stages in turn, so the step lasts pp stage-times; within a
    # stage tp GPUs share the work. Totals divided by (tp x micro) give exactly that.
    share = layout.tp * micro
    compute_s = flops / share / hw.flops(layout.weight_dtype)
    memory_s = moved / share / hw.memory_bandwidth

    activations = micro_tokens * model.d_model * ACTIVATION_BYTES
    latency = hw.link_latency or 0.0
    comm_s = 0.0
    if layout.tp > 1:
        ring = 2 * (layout.tp - 1) / layout.tp  # a ring all-reduce moves this many buffers per GPU
        per_layer = 2 * (ring * activations / _link_bandwidth(hw, layout.tp) + latency)
        comm_s += model.layers * per_layer  # every micro-batch's path crosses all layers
    if layout.pp > 1:
        comm_s += (layout.pp - 1) * (activations / _link_bandwidth(hw, layout.gpus) + latency)
    return StepCost(flops=flops, bytes=moved, compute_s=compute_s, memory_s=memory_s,
                    comm_s=comm_s, micro_batches=micro)


def step_time(model: Model, hw: Hardware, layout: Layout, *,
              decode_contexts: Sequence[int] = (),
              prefills: Sequence[tuple[int, int]] = ()) -> float:
    """Seconds of one scheduler step; see `step_cost` for what a step holds and how it is costed."""
    return step_cost(model, hw, layout, decode_contexts=decode_contexts, prefills=prefills).seconds


# --- a serving plan -----------------------------------------------------------------------------

def cost_per_1k_tokens(price_per_gpu_hour: float, gpus: int, tokens_per_s: float,
                       utilisation: float = 1.0) -> float:
    """Dollars per 1,000 generated tokens when `gpus` GPUs produce `tokens_per_s` while busy and are
    busy a fraction `utilisation` of the hours paid for."""
    return price_per_gpu_hour * gpus / 3600 / (tokens_per_s * utilisation) * 1000


@dataclass(frozen=True)
class Throughput:
    """Decode speed and cost of one replica at one step time: the roofline bound, or the time
    `Efficiency` expects. MFU and MBU are the step's FLOPs and bytes over what the replica's GPUs
    could do and move at peak in that time (what `chatscale:mfu` / `chatscale:mbu` measure)."""

    step_s: float
    tokens_per_s_per_user: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    cost_per_1k_tokens: float | None
    mfu: float
    mbu: float


def throughput(step: StepCost, seconds: float, batch: int, hw: Hardware, layout: Layout,
               utilisation: float = 1.0) -> Throughput:
    """`batch` sequences each gaining a token per `seconds`-long step of work `step`."""
    tokens_per_s = batch / seconds
    return Throughput(
        step_s=seconds, tokens_per_s_per_user=1 / seconds, tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=tokens_per_s / layout.gpus,
        cost_per_1k_tokens=(None if hw.price_per_hour is None else
                            cost_per_1k_tokens(hw.price_per_hour, layout.gpus, tokens_per_s, utilisation)),
        mfu=step.flops / (seconds * hw.flops(layout.weight_dtype) * layout.gpus),
        mbu=step.bytes / (seconds * hw.memory_bandwidth * layout.gpus))


@dataclass(frozen=True)
class Plan:
    """Steady decoding at a fixed batch, every sequence at `context` tokens (the worst case; 0:
    weights only, no KV cache)."""

    model: str
    hardware: str
    layout: Layout
    batch: int
    context: int
    weight_bytes_per_gpu: float
    kv_bytes_per_token: float  # across the replica
    kv_bytes_per_gpu: float  # for the whole batch at full context
    memory_per_gpu: float
    fits: bool
    max_batch: int | None  # None: no limit (context 0)
    decode_flops_per_token: float
    intensity: float
    ridge_point: float
    bound: str
    compute_s: float  # the roofline's terms of one step
    memory_s: float
    comm_s: float
    efficiency: Efficiency
    roofline: Throughput  # at the roofline's step time: a bound no engine beats
    expected: Throughput  # at the step time `efficiency` expects (what the simulator's roofline cost uses)
    experts_read_per_micro_batch: float | None  # MoE only
    tokens_per_expert: float | None  # MoE only, per micro-batch


def plan(model: Model, hw: Hardware, layout: Layout, batch: int, context: int,
         utilisation: float = 1.0, memory_utilization: float = 0.9,
         efficiency: Efficiency = Efficiency()) -> Plan:
    """Memory, speed and cost of decoding `batch` sequences of `context` tokens on one replica."""
    if batch < 1 or context < 0:
        raise ValueError(f"batch must be >= 1 and context >= 0, got batch={batch} context={context}")
    step = step_cost(model, hw, layout, decode_contexts=[context] * batch)
    kv_per_gpu = kv_bytes_per_token(model, layout) * batch * context / layout.gpus
    weights_per_gpu = weight_bytes(model, layout) / layout.gpus
    micro_tokens = batch / step.micro_batches
    return Plan(
        model=model.name,
        hardware=hw.name,
        layout=layout,
        batch=batch,
        context=context,
        weight_bytes_per_gpu=weights_per_gpu,
        kv_bytes_per_token=kv_bytes_per_token(model, layout),
        kv_bytes_per_gpu=kv_per_gpu,
        memory_per_gpu=hw.memory_bytes,
        fits=weights_per_gpu + kv_per_gpu <= hw.memory_bytes * memory_utilization,
        max_batch=max_batch(model, hw, layout, context, memory_utilization),
        decode_flops_per_token=decode_flops(model, context),
        intensity=step.intensity,
        ridge_point=hw.ridge_point(layout.weight_dtype),
        bound=step.bound,
        compute_s=step.compute_s,
        memory_s=step.memory_s,
        comm_s=step.comm_s,
        efficiency=efficiency,
        roofline=throughput(step, step.seconds, batch, hw, layout, utilisation),
        expected=throughput(step, efficiency.seconds(step.seconds), batch, hw, layout, utilisation),
        experts_read_per_micro_batch=(expected_distinct_experts(model, micro_tokens)
                                      if model.is_moe else None),
        tokens_per_expert=tokens_per_expert(model, micro_tokens) if model.is_moe else None,
    )


def reading_speed_tokens_per_s(words_per_minute: float, tokens_per_word: float = 2.0) -> float:
    """Tokens/s a user reads at. The seeds count two tokens per word (English BPE is nearer 1.3,
    so this errs towards a faster target)."""
    return words_per_minute * tokens_per_word / 60


def speculative_tokens_per_pass(acceptance: float, draft_tokens: int) -> float:
    """Expected tokens per target-model pass with `draft_tokens` drafted, each accepted with
    probability `acceptance`: (1 - a^(g+1)) / (1 - a) (Leviathan et al. 2023, eq. 1)."""
    if not 0 <= acceptance <= 1 or draft_tokens < 0:
        raise ValueError("acceptance must be in [0, 1] and draft_tokens >= 0")
    if acceptance == 1:
        return draft_tokens + 1.0
    return (1 - acceptance ** (draft_tokens + 1)) / (1 - acceptance)


def training_flops(model: Model, tokens: float) -> float:
    """6 x active (matmul) parameters x tokens: forward 2, backward 4 FLOPs per parameter and token."""
    return 6 * model.matmul_params * tokens


def training_days(flops: float, hw: Hardware, gpus: int, mfu: float, dtype: str = "bf16") -> float:
    """Days `gpus` chips need for `flops` at model-FLOPs utilisation `mfu` of their `dtype` peak."""
    return flops / (gpus * hw.flops(dtype) * mfu) / SECONDS_PER_DAY


def implied_mfu(flops: float, hw: Hardware, gpus: int, days: float, dtype: str = "bf16") -> float:
    """The utilisation a claimed run length implies: the inverse of `training_days`."""
    return flops / (gpus * hw.flops(dtype) * days * SECONDS_PER_DAY)


def rental_cost(hw: Hardware, gpus: int, days: float) -> float:
    """Dollars to rent `gpus` chips for `days` at the chip's hourly price."""
    if hw.price_per_hour is None:
        raise ValueError(f"{hw.name} has no price; pass one with Hardware.with_price")
    return gpus * days * 24 * hw.price_per_hour
