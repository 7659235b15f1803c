"""Prefix-cache metrics through a real server: /metrics counts exactly the cached tokens the
responses report, and evictions, recomputes and second-tier moves as the KV manager made them."""

from __future__ import annotations

import httpx
import pytest
from server_utils import MODEL, api, make_engine, running, sse_events

from chatscale.engine.tier_costs import TierCosts

PAGE = 16  # the engine's default block size: hits come in whole pages
A = list(range(5, 53))  # 48 tokens: three full pages
B = list(range(60, 160))  # 100 tokens sharing nothing with A
NEW = list(range(200, 220))
# Costs given, not measured: whether the tier pays on a busy machine is not what these tests check.
TIER_PAYS = TierCosts(restore_s_per_page=1e-6, recompute_s_per_page=1e-3)


def complete(client: httpx.Client, prompt: list[int], stream: bool = False) -> dict:
    """Usage of one greedy 4-token completion, streamed (with include_usage) or not."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    if not stream:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    with client.stream("POST", "/v1/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    return events[-2]["usage"]


def chat(client: httpx.Client, stream: bool) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "The KV cache holds keys and values. " * 4}],
            "max_tokens": 4, "ignore_eos": True}
    if not stream:
        return client.post("/v1/chat/completions", json=body).json()["usage"]
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        return sse_events(r.iter_lines())[-2]["usage"]


def cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def scrape(client: httpx.Client) -> dict[str, float]:
    """This model's `chatscale:*` samples, by name without the prefix."""
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("chatscale:") and f'{{model_name="{MODEL}"}}' in line:
            name, value = line.split()
            values[name[len("chatscale:"):].split("{")[0]] = float(value)
    return values


def test_metrics_count_the_cached_tokens_every_response_reports(checkpoint):
    engine = make_engine(checkpoint("llama"), num_blocks=256)
    try:
        with running(api(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert scrape(client)["prefix_cache_queries_total"] == 0
            usages = [complete(client, A), complete(client, A, stream=True), complete(client, A + NEW)]
            # A again: its first two pages (its third holds the token that must be computed);
            # A + NEW: all three of A's pages, which the first two requests filled.
            assert [cached(u) for u in usages] == [0, 2 * PAGE, 3 * PAGE]
            chats = [chat(client, stream=False), chat(client, stream=True)]
            length = chats[0]["prompt_tokens"]
            assert [cached(u) for u in chats] == [0, (length - 1) // PAGE * PAGE]
            usages += chats
            m = scrape(client)
        assert m["prefix_cache_queries_total"] == sum(u["prompt_tokens"] for u in usages)
        assert m["prefix_cache_hits_total"] == sum(cached(u) for u in usages) == 5 * PAGE + (length - 1) // PAGE * PAGE
        assert m["kv_cache_evictions_total"] == m["prefix_cache_recomputed_tokens_total"] == 0
        assert m["kv_tier_stores_total"] == m["kv_tier_restores_total"] == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("second_tier", [False, True])
def test_evictions_recomputes_and_tier_moves_are_counted(checkpoint, second_tier):
    """Eight pages: B pushes A's tail pages out; when A comes back, its second page is recomputed
    (counted as recomputed) or restored from the second tier (counted as a restore)."""
    engine = make_engine(checkpoint("llama"), num_blocks=8, kv_host_bytes=(1 << 20) if second_tier else 0,
                         kv_tier_costs=TIER_PAYS)
    assert (engine.info.kv_tier_pages > 0) == second_tier
    try:
        with running(api(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
            first, other, again = complete(client, A), complete(client, B), complete(client, A, stream=True)
            m = scrape(client)
            second = scrape(client)  # nothing happened in between: counters stay where they were
    finally:
        engine.shutdown()
    assert [cached(first), cached(other)] == [0, 0]
    assert cached(again) == (2 if second_tier else 1) * PAGE
    assert m["prefix_cache_hits_total"] == cached(again)
    assert m["prefix_cache_recomputed_tokens_total"] == (0 if second_tier else PAGE)
    assert m["kv_tier_restores_total"] == (1 if second_tier else 0)
    evictions = m["kv_cache_evictions_total"]
    assert evictions >= 2  # at least A's two tail pages
    assert m["kv_tier_stores_total"] == (evictions if second_tier else 0)
    assert second == m
