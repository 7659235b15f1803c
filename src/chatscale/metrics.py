"""Every chatscale metric name, defined once, in Prometheus form.

Names follow vLLM's with a `chatscale:` prefix (`vllm:num_requests_running` ->
`chatscale:num_requests_running`), so dashboards and the gateway's scrapers port unchanged.
Load is KV-cache usage plus batch size (ARCHITECTURE lesson 3), so those come first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

if TYPE_CHECKING:
    from chatscale.engine.engine import LLMEngine
    from chatscale.engine.outputs import RequestOutput

PREFIX = "chatscale:"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """One registry per server (not the process-wide default), so several servers can share a
    process, as tests do. Gauges and the KV-cache counters are read from the engine at scrape
    time; token counters are fed by the server as outputs arrive."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        # Prefix caching (ARCHITECTURE lesson 1): the engine keeps running totals in `kv.stats`;
        # each scrape adds what they grew by since the last one, as Prometheus counters only grow.
        self._kv_counters = {
            "queries": counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            "hits": counter("prefix_cache_hits", "Prompt tokens served from the prefix cache (either tier)."),
            "recomputed": counter("prefix_cache_recomputed_tokens",
                                  "Prompt tokens computed before, evicted, and computed again."),
            "evictions": counter("kv_cache_evictions", "Cached KV pages evicted to make room."),
            "tier_stores": counter("kv_tier_stores", "Evicted KV pages copied to the second tier."),
            "tier_restores": counter("kv_tier_restores", "KV pages restored from the second tier, not recomputed."),
        }
        self._kv_seen = dict.fromkeys(self._kv_counters, 0)

    def observe_engine(self, engine: LLMEngine) -> None:
        self.num_requests_running.set(engine.num_running)
        self.num_requests_waiting.set(engine.num_waiting)
        self.kv_cache_usage_perc.set(engine.kv.usage)
        stats = engine.kv.stats
        for name, metric in self._kv_counters.items():
            total = getattr(stats, name)
            metric.inc(total - self._kv_seen[name])
            self._kv_seen[name] = total

    def observe_output(self, out: RequestOutput, first: bool) -> None:
        if first:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(sum(len(o.delta_token_ids) for o in out.outputs))

    def render(self) -> bytes:
        return generate_latest(self.registry)
