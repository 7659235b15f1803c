"""Reading a server's metrics the way people look at them: rates, means and percentiles over time.

A `Scrape` is one reading of the Prometheus samples (from /metrics text, or from the server's own
registry); a `LoadWindow` turns successive scrapes into `LoadRow`s: what the last interval did
(tokens/s, batch size, arithmetic intensity) and the recent percentiles (TTFT, ITL), computed from
histogram bucket deltas the way Prometheus' `histogram_quantile` does. The dashboard and
`chatscale top` both draw these rows, so they always agree with each other and with Grafana.

Names are read without their `prefix:`, so a vLLM server's shared metrics read the same.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

QUANTILE_WINDOW_S = 10.0  # TTFT / ITL percentiles and the hit rate cover this much history


@dataclass
class Scrape:
    time: float  # seconds since the epoch
    values: dict[str, float] = field(default_factory=dict)  # sample name -> value (bucket samples aside)
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # histogram -> [(le, count)]

    @classmethod
    def from_families(cls, families: Iterable[Metric], now: float | None = None) -> Scrape:
        scrape = cls(time.time() if now is None else now)
        for family in families:
            for s in family.samples:
                name = s.name.split(":", 1)[-1]
                if name.endswith("_bucket"):
                    scrape.buckets.setdefault(name[:-len("_bucket")], []).append((float(s.labels["le"]), s.value))
                else:
                    scrape.values[name] = s.value
        for edges in scrape.buckets.values():
            edges.sort()
        return scrape

    @classmethod
    def from_text(cls, text: str, now: float | None = None) -> Scrape:
        return cls.from_families(text_string_to_metric_families(text), now)

    @classmethod
    def from_registry(cls, registry: CollectorRegistry, now: float | None = None) -> Scrape:
        return cls.from_families(registry.collect(), now)

    def get(self, name: str) -> float | None:
        return self.values.get(name)


def quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """The q-quantile of the observations a histogram gained between two readings, interpolated
    linearly inside its bucket (in the overflow bucket: the largest finite edge). None if none."""
    earlier = dict(before)
    counts = [(le, c - earlier.get(le, 0.0)) for le, c in after]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    low_edge, low_count = 0.0, 0.0
    for le, count in counts:
        if count >= rank and count > low_count:
            if math.isinf(le):
                return low_edge
            return low_edge + (le - low_edge) * (rank - low_count) / (count - low_count)
        low_edge, low_count = le, count
    return low_edge


@dataclass
class LoadRow:
    """One point of the dashboard: state at `t`, rates over the last interval, percentiles and hit
    rate over the last QUANTILE_WINDOW_S. None: not known (no step, no request, no such metric)."""

    t: float
    load: float | None
    kv_live: float | None
    kv_cached: float | None
    running: float | None
    waiting: float | None
    batch_sequences: float | None  # mean sequences per step
    batch_tokens: float | None  # mean tokens per step
    tokens_per_s: float | None  # generated
    prompt_tokens_per_s: float | None
    intensity: float | None  # FLOPs per byte moved
    ridge: float | None
    mfu: float | None
    mbu: float | None
    busy: float | None  # fraction of the interval spent in steps
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    hit_rate: float | None  # prefix-cache hits / queries, in tokens
    preemptions_per_s: float | None


def _delta(a: Scrape, b: Scrape, name: str) -> float | None:
    if name not in b.values:
        return None
    return b.values[name] - a.values.get(name, 0.0)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


class LoadWindow:
    """Successive scrapes of one server, in time order; `push` returns the row the newest one adds."""

    def __init__(self, quantile_window_s: float = QUANTILE_WINDOW_S) -> None:
        self.span = quantile_window_s
        self.scrapes: deque[Scrape] = deque()

    def push(self, scrape: Scrape) -> LoadRow:
        prev = self.scrapes[-1] if self.scrapes else scrape
        self.scrapes.append(scrape)
        while len(self.scrapes) > 2 and self.scrapes[1].time <= scrape.time - self.span:
            self.scrapes.popleft()
        return row(prev, scrape, self.scrapes[0])


def row(prev: Scrape, now: Scrape, base: Scrape) -> LoadRow:
    """The row for `now`: rates since `prev`, percentiles and hit rate since `base`."""
    dt = now.time - prev.time

    def rate(name: str) -> float | None:
        return _ratio(_delta(prev, now, name), dt)

    def pct(name: str, q: float) -> float | None:
        return quantile(q, base.buckets.get(name, []), now.buckets.get(name, [])) if name in now.buckets else None

    busy = _delta(prev, now, "step_seconds_total")
    return LoadRow(
        t=now.time,
        load=now.get("load"),
        kv_live=now.get("kv_cache_usage_perc"),
        kv_cached=now.get("kv_cache_cached_perc"),
        running=now.get("num_requests_running"),
        waiting=now.get("num_requests_waiting"),
        batch_sequences=_ratio(_delta(prev, now, "step_sequences_sum"), _delta(prev, now, "step_sequences_count")),
        batch_tokens=_ratio(_delta(prev, now, "iteration_tokens_total_sum"),
                            _delta(prev, now, "iteration_tokens_total_count")),
        tokens_per_s=rate("generation_tokens_total"),
        prompt_tokens_per_s=rate("prompt_tokens_total"),
        intensity=_ratio(_delta(prev, now, "step_flops_total"), _delta(prev, now, "step_bytes_total")),
        ridge=now.get("ridge_point"),
        mfu=_ratio(_ratio(_delta(prev, now, "step_flops_total"), busy), now.get("peak_flops")),
        mbu=_ratio(_ratio(_delta(prev, now, "step_bytes_total"), busy), now.get("peak_memory_bandwidth")),
        busy=_ratio(busy, dt),
        ttft_p50=pct("time_to_first_token_seconds", 0.5),
        ttft_p99=pct("time_to_first_token_seconds", 0.99),
        itl_p50=pct("inter_token_latency_seconds", 0.5),
        itl_p99=pct("inter_token_latency_seconds", 0.99),
        hit_rate=_ratio(_delta(base, now, "prefix_cache_hits_total"), _delta(base, now, "prefix_cache_queries_total")),
        preemptions_per_s=rate("num_preemptions_total"),
    )
