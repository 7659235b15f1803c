"""Every chatscale metric name, defined once, in Prometheus form (docs/metrics.md says what each means).

Names follow vLLM's with a `chatscale:` prefix (`vllm:num_requests_running` ->
`chatscale:num_requests_running`), so dashboards and the gateway's scrapers port unchanged.
Load is KV-cache usage plus batch size, efficiency is arithmetic intensity against the ridge point
(docs/architecture.md, lesson 3), so those come first.

Three feeds, all messages from the engine process (nothing is read off a shared object): the
engine's load and running totals as of its last step (`observe_engine`, an EngineSnapshot, read at
scrape time); every engine step's stats (`observe_step`, a step listener); every request output,
observed by the server as it arrives (`observe_output`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chatscale.planner.catalog import Model, from_hf_config
from chatscale.planner.hardware import Hardware
from chatscale.step_work import WeightBytes, step_work

if TYPE_CHECKING:
    from chatscale.engine.messages import EngineInfo, EngineSnapshot, StepStats
    from chatscale.engine.outputs import RequestOutput

PREFIX = "chatscale:"
CONTENT_TYPE = CONTENT_TYPE_LATEST
WINDOW_S = 10.0  # the window of steps behind the intensity, MFU and MBU gauges

# Bucket edges: 1-2.5-5 steps wide enough for a CPU and fine enough for an H100.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
           7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
POWERS_OF_TWO = tuple(float(2**i) for i in range(15))  # 1 .. 16384 (tokens, sequences)
INTENSITY = tuple(float(2**i) for i in range(-2, 13))  # 0.25 .. 4096 FLOPs/byte


class Metrics:
    """One registry per server (not the process-wide default), so several servers can share a
    process, as tests do."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        # ---- load: read from the engine at scrape time
        self.num_requests_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache pages held by running sequences (0 to 1).")
        self.kv_cache_cached_perc = gauge(
            "kv_cache_cached_perc", "Fraction of KV-cache pages held by nobody but still caching a prefix "
                                    "(reclaimable on demand).")
        self.load = gauge("load", "max(kv_cache_usage_perc, running / max_num_seqs) + waiting / max_num_seqs: "
                                  "1 means the next request waits.")
        # ---- running totals the engine keeps; each scrape adds what they grew by (counters only grow)
        self._mirrors: list[tuple[Counter, Callable[[EngineSnapshot], int | None]]] = []

        def mirror(name: str, doc: str, read: Callable[[EngineSnapshot], int | None]) -> None:
            self._mirrors.append((counter(name, doc), read))

        mirror("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
               lambda e: e.prefix_cache_queries)
        mirror("prefix_cache_hits", "Prompt tokens served from the prefix cache (either tier).",
               lambda e: e.prefix_cache_hits)
        mirror("prefix_cache_recomputed_tokens", "Prompt tokens computed before, evicted, and computed again.",
               lambda e: e.prefix_cache_recomputed)
        mirror("kv_cache_evictions", "Cached KV pages evicted to make room.", lambda e: e.kv_cache_evictions)
        mirror("kv_tier_stores", "Evicted KV pages copied to the second tier.", lambda e: e.kv_tier_stores)
        mirror("kv_tier_restores", "KV pages restored from the second tier, not recomputed.",
               lambda e: e.kv_tier_restores)
        mirror("num_preemptions", "Sequences preempted (pages dropped, recomputed later).",
               lambda e: e.num_preemptions)
        for field, doc in (("drafts", "Speculative-decoding draft runs."),
                           ("draft_tokens", "Tokens proposed by the draft model."),
                           ("accepted_tokens", "Draft tokens the target model accepted.")):
            mirror(f"spec_decode_num_{field}", doc, lambda e, f=field: getattr(e, f"spec_{f}"))
        self.spec_decode_mean_acceptance_length = gauge(
            "spec_decode_mean_acceptance_length", "Tokens per target pass while speculating: 1 + accepted / drafts.")
        self._seen = [0] * len(self._mirrors)
        # ---- requests: fed by the server as outputs arrive
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival at the server to first token, one per request.", SECONDS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Gap between a request's outputs per token they carry.", SECONDS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival at the server to last token, finished requests.", SECONDS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival at the server to first scheduled, one per request.", SECONDS)
        # ---- steps: observed on the engine thread after every step
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per step.", POWERS_OF_TWO)
        self.step_sequences = histogram("step_sequences", "Sequences per step (the batch size).", POWERS_OF_TWO)
        self.step_intensity = histogram(
            "step_arithmetic_intensity", "FLOPs per byte moved, per step.", INTENSITY)
        self.step_flops = counter("step_flops", "Model FLOPs of all steps.")
        self.step_bytes = counter("step_bytes", "Bytes all steps moved (weights read, KV read and written).")
        self.step_seconds = counter("step_seconds", "Seconds spent in steps (busy time).")
        self.moe_tokens_per_expert = histogram(
            "moe_tokens_per_expert", "Tokens routed to an expert: one per expert, MoE layer and step.",
            (0.0, *POWERS_OF_TWO))
        self.moe_experts_touched = histogram(
            "moe_experts_touched", "Experts reached by at least one token: one per MoE layer and step.",
            POWERS_OF_TWO)
        # ---- efficiency against the device's peaks (WINDOW_S of steps)
        self.arithmetic_intensity = gauge("arithmetic_intensity",
                                          "FLOPs per byte moved over the last 10 s of steps (NaN: no step).")
        self.mfu = gauge("mfu", "Model FLOPs utilisation while stepping: FLOP/s over the last 10 s / peak.")
        self.mbu = gauge("mbu", "Memory bandwidth utilisation while stepping: bytes/s over the last 10 s / peak.")
        self.peak_flops = gauge("peak_flops", "The device's peak FLOP/s at the serving dtype.")
        self.peak_memory_bandwidth = gauge("peak_memory_bandwidth", "The device's peak memory bandwidth, bytes/s.")
        self.ridge_point = gauge("ridge_point", "peak_flops / peak_memory_bandwidth: FLOPs per byte where "
                                                "compute, not memory, becomes the bound.")
        self.model_weight_bytes = gauge("model_weight_bytes", "Bytes of model weights resident on the device "
                                                              "(quantized layers at their packed size, prepacked "
                                                              "copies of dense CPU layers included).")
        # ---- tensor parallelism
        self.step_collective_seconds = histogram(
            "step_collective_seconds", "Seconds rank 0 spent in tensor-parallel collectives (all-reduces, "
                                       "the logits' all-gather), one per step (none on one device).", SECONDS)
        self.kv_cache_rank_used_bytes = Gauge(
            PREFIX + "kv_cache_rank_used_bytes", "Bytes of KV pages in use on each tensor-parallel rank (each "
                                                  "holds its heads' share of every page).",
            ["model_name", "rank"], registry=self.registry)
        self._rank_kv: list[Gauge] = []  # one child per rank, once attached
        self._recent: deque[tuple[float, float, float, float]] = deque()  # (time, flops, bytes, seconds)
        self._lock = threading.Lock()
        self._shape: Model | None = None
        self._dtype = "fp32"
        self._stored: WeightBytes | None = None
        self.peaks: Hardware | None = None

    # ---- wiring ---------------------------------------------------------------------------------
    def attach(self, info: EngineInfo, step_listeners: list[Callable[[StepStats], None]]) -> None:
        """Start observing an engine's steps, with its model's shape and its device's peaks (which
        the engine measured once on a CPU, or took from a GPU's datasheet)."""
        self._shape = from_hf_config(info.model_config)
        self._dtype = info.dtype
        self.peaks = hw = info.peaks
        self._stored = WeightBytes(*info.weight_storage)
        self.model_weight_bytes.set(info.resident_weight_bytes)
        self.peak_flops.set(hw.flops(self._dtype))
        self.peak_memory_bandwidth.set(hw.memory_bandwidth)
        self.ridge_point.set(hw.ridge_point(self._dtype))
        self._page_bytes = info.kv_cache_bytes / info.num_blocks  # one rank's share of a page
        self._rank_kv = [self.kv_cache_rank_used_bytes.labels(self.model_name, str(r))
                         for r in range(info.tensor_parallel_size)]
        step_listeners.append(self.observe_step)

    # ---- feeds ----------------------------------------------------------------------------------
    def observe_step(self, step: StepStats) -> None:
        work = step_work(self._shape, self._dtype, step.chunks, step.expert_tokens, self._stored)
        self.iteration_tokens.observe(step.num_tokens)
        self.step_sequences.observe(step.num_seqs)
        self.step_intensity.observe(work.intensity)
        self.step_flops.inc(work.flops)
        self.step_bytes.inc(work.bytes)
        self.step_seconds.inc(step.duration_s)
        if len(self._rank_kv) > 1:
            self.step_collective_seconds.observe(step.collective_s)
        for layer in step.expert_tokens or ():
            for n in layer:
                self.moe_tokens_per_expert.observe(n)
            self.moe_experts_touched.observe(sum(1 for n in layer if n))
        with self._lock:
            self._recent.append((time.monotonic(), work.flops, work.bytes, step.duration_s))
            self._forget_old_steps()

    def observe_engine(self, snap: EngineSnapshot, max_num_seqs: int) -> None:
        running, waiting = snap.num_running, snap.num_waiting
        self.num_requests_running.set(running)
        self.num_requests_waiting.set(waiting)
        self.kv_cache_usage_perc.set(snap.kv_usage)
        self.kv_cache_cached_perc.set(snap.num_cached_free_blocks / snap.num_blocks)
        self.load.set(max(snap.kv_usage, running / max_num_seqs) + waiting / max_num_seqs)
        for rank_kv in self._rank_kv:
            rank_kv.set(snap.num_used_blocks * self._page_bytes)
        for i, (metric, read) in enumerate(self._mirrors):
            total = read(snap)
            if total is not None:
                metric.inc(total - self._seen[i])
                self._seen[i] = total
        if snap.spec_drafts:
            self.spec_decode_mean_acceptance_length.set(1 + snap.spec_accepted_tokens / snap.spec_drafts)
        self._observe_window()

    def _forget_old_steps(self) -> None:
        horizon = time.monotonic() - WINDOW_S
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()

    def _observe_window(self) -> None:
        with self._lock:
            self._forget_old_steps()
            flops = sum(r[1] for r in self._recent)
            moved = sum(r[2] for r in self._recent)
            busy = sum(r[3] for r in self._recent)
        self.arithmetic_intensity.set(flops / moved if moved else math.nan)
        self.mfu.set(flops / busy / self.peaks.flops(self._dtype) if busy else 0.0)
        self.mbu.set(moved / busy / self.peaks.memory_bandwidth if busy else 0.0)

    def observe_output(self, out: RequestOutput, previous: float | None, arrival: float) -> float:
        """Count one engine output of a request the server took at `arrival` (time.monotonic());
        `previous` is the step time of its last output (None for its first). Returns this output's
        step time, to pass as `previous` next time."""
        now = out.step_time
        per_choice = max((len(o.delta_token_ids) for o in out.outputs), default=0)
        self.generation_tokens.inc(sum(len(o.delta_token_ids) for o in out.outputs))
        if previous is None:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.time_to_first_token.observe(now - arrival)  # a first output carries the first token
            self.request_queue_time.observe(out.metrics.first_scheduled_time - arrival)
        elif per_choice:
            self.inter_token_latency.observe((now - previous) / per_choice)
        if out.finished:
            self.e2e_request_latency.observe(now - arrival)
        return now

    def render(self) -> bytes:
        return generate_latest(self.registry)
