"""Metric values against ground truth the test computes itself: FLOPs and bytes of each step from
the model's own tensors, KV usage from the pages a known workload must hold, the load gauge from a
known queue, one TTFT observation per request through a real server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from server_utils import MODEL, api, make_engine, running, wait_until

from chatscale.device_peaks import catalog_entry
from chatscale.engine.config import EngineConfig
from chatscale.engine.engine import LLMEngine
from chatscale.engine.sampling_params import SamplingParams
from chatscale.metrics import Metrics
from chatscale.models.moe import SparseMoE
from chatscale.planner.hardware import CATALOG
from chatscale.scrape import Scrape, quantile

PAGE = 16
GRAFANA = Path(__file__).parents[1] / "deploy" / "grafana"


def engine(checkpoint, arch: str = "llama", **config) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(checkpoint(arch)), threads=1, **config), num_blocks=64)


def values(metrics: Metrics) -> dict[str, float]:
    return Scrape.from_registry(metrics.registry).values


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def run(core: LLMEngine) -> None:
    while core.has_unfinished_requests():
        core.step()


def observed(core: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[Metrics, list]:
    """Metrics attached to `core` and the steps it ran to answer `prompt` greedily."""
    metrics = Metrics(MODEL)
    metrics.attach(core.info, core.step_listeners)
    steps = []
    core.step_listeners.append(steps.append)
    core.add_request(prompt, greedy(max_tokens))
    run(core)
    return metrics, steps


def unique_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each parameter tensor once (a tied embedding is also the output projection)."""
    seen: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_step_bytes_count_quantized_weights_at_their_stored_size(checkpoint, quantization):
    """With quantized weights a step reads what is stored: every packed weight, scale and zero once
    (the tied table is the LM head), the looked-up rows of the table, and the KV. /metrics says the
    resident bytes."""
    core = engine(checkpoint, "llama", quantization=quantization)
    metrics, steps = observed(core, list(range(10, 30)), 3)
    model, cfg = core.model, core.model.cfg
    assert cfg.tie_word_embeddings and model.embed is model.lm_head
    resident = sum(p.numel() * p.element_size() for p in unique_params(model))
    row = sum(p.numel() * p.element_size() for p in model.embed.parameters()) / cfg.vocab_size
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize
    expected = sum(resident + n * row + (cached + 2 * n) * kv_per_token for step in steps for cached, n in step.chunks)
    m = values(metrics)
    assert m["step_bytes_total"] == pytest.approx(expected, rel=1e-9)
    assert m["model_weight_bytes"] == resident < sum(p.numel() for p in unique_params(model)) * 4 / 3


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_step_flops_and_bytes_are_the_analytic_count_of_the_model(checkpoint, arch):
    """One 40-token prompt, 5 tokens: a prefill step (0 cached, 40 new), then 4 decodes at 40..43.
    FLOPs: 2 per active weight per token, 4 per attended key per query-head dimension per layer.
    Bytes: every weight read once (untouched experts not at all), KV read for all, written for new."""
    core = engine(checkpoint, arch)
    metrics, steps = observed(core, list(range(10, 50)), 5)
    assert [s.chunks for s in steps] == [[(0, 40)], [(40, 1)], [(41, 1)], [(42, 1)], [(43, 1)]]

    model, cfg = core.model, core.model.cfg
    item = model.dtype.itemsize
    total = sum(p.numel() for p in unique_params(model))
    lookup = 0 if cfg.tie_word_embeddings else model.embed.weight.numel()  # a table lookup, not a matmul
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    expert = layers[0].gate_up[0].numel() + layers[0].down[0].numel() if layers else 0
    idle_experts = sum(len(m.gate_up) - m.top_k for m in layers)
    active = total - lookup - idle_experts * expert
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item
    flops = bytes_ = 0.0
    for step in steps:
        (cached, n), = step.chunks
        pairs = n * cached + n * (n + 1) / 2  # causal: new token i sees the cached ones and i of its own
        flops += 2 * active * n + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs
        untouched = 0
        if layers:
            assert [sum(t) for t in step.expert_tokens] == [n * layers[0].top_k] * len(layers)
            untouched = sum(1 for t in step.expert_tokens for x in t if x == 0)
        weights = total - lookup + n * cfg.hidden_size - untouched * expert
        bytes_ += weights * item + (cached + 2 * n) * kv_per_token
    m = values(metrics)
    assert m["step_flops_total"] == pytest.approx(flops, rel=1e-12)
    assert m["step_bytes_total"] == pytest.approx(bytes_, rel=1e-12)
    assert m["iteration_tokens_total_sum"] == 44 and m["iteration_tokens_total_count"] == 5
    assert m["step_sequences_sum"] == 5
    assert m["step_seconds_total"] == pytest.approx(sum(s.duration_s for s in steps))
    if layers:  # every expert of every MoE layer once per step; tokens x top_k routed per layer
        assert m["moe_tokens_per_expert_count"] == 5 * len(layers) * len(layers[0].gate_up)
        assert m["moe_tokens_per_expert_sum"] == 44 * layers[0].top_k * len(layers)
        assert m["moe_experts_touched_count"] == 5 * len(layers)
    else:
        assert m["moe_tokens_per_expert_count"] == 0


def test_intensity_mfu_and_mbu_divide_by_the_measured_peaks(checkpoint):
    core = engine(checkpoint)
    metrics = Metrics(MODEL)
    metrics.attach(core.info, core.step_listeners)
    core.add_request(list(range(10, 50)), greedy(8))
    run(core)
    metrics.observe_engine(core.snapshot(), core.info.max_num_seqs)
    m = values(metrics)
    assert m["peak_flops"] > 0 and m["peak_memory_bandwidth"] > 0
    assert m["ridge_point"] == pytest.approx(m["peak_flops"] / m["peak_memory_bandwidth"])
    assert m["arithmetic_intensity"] == pytest.approx(m["step_flops_total"] / m["step_bytes_total"])
    assert m["mfu"] == pytest.approx(m["step_flops_total"] / m["step_seconds_total"] / m["peak_flops"])
    assert m["mbu"] == pytest.approx(m["step_bytes_total"] / m["step_seconds_total"] / m["peak_memory_bandwidth"])


def test_kv_usage_is_live_pages_over_all_and_cached_pages_are_split_out(checkpoint):
    """With max_num_seqs=2 and three requests, one waits: load = 1 (sequence slots full) + 1/2."""
    core = engine(checkpoint, max_num_seqs=2)
    metrics = Metrics(MODEL)
    metrics.attach(core.info, core.step_listeners)
    core.add_request(list(range(10, 50)), greedy(3))  # 40 tokens: 3 pages
    core.add_request(list(range(100, 120)), greedy(3))  # 20 tokens: 2 pages
    core.add_request(list(range(200, 210)), greedy(3))  # waits for a sequence slot
    core.step()
    metrics.observe_engine(core.snapshot(), core.info.max_num_seqs)
    m = values(metrics)
    assert m["kv_cache_usage_perc"] == 5 / 64 and m["kv_cache_cached_perc"] == 0
    assert m["num_requests_running"] == 2 and m["num_requests_waiting"] == 1
    assert m["load"] == 1 + 1 / 2
    run(core)
    metrics.observe_engine(core.snapshot(), core.info.max_num_seqs)
    m = values(metrics)
    # Finished: 40 + 2 computed tokens fill 2 pages, 20 + 2 fill 1, 10 + 2 none; those stay cached.
    assert m["kv_cache_usage_perc"] == 0 and m["kv_cache_cached_perc"] == 3 / 64
    assert m["load"] == 0
    assert m["prefix_cache_queries_total"] == 70 and m["prefix_cache_hits_total"] == 0
    # The first prompt again: its two cached pages are reused (now live), its last 8 tokens computed.
    core.add_request(list(range(10, 50)), greedy(1))
    core.step()
    metrics.observe_engine(core.snapshot(), core.info.max_num_seqs)
    m = values(metrics)
    assert m["prefix_cache_queries_total"] == 110 and m["prefix_cache_hits_total"] == 2 * PAGE
    assert m["kv_cache_usage_perc"] == 0 and m["kv_cache_cached_perc"] == 3 / 64  # finished in one step
    assert m["iteration_tokens_total_sum"] == 40 + 20 + 10 + 3 * 2 + 8


def test_preemptions_and_speculative_decoding_totals_are_the_engines(checkpoint):
    """A repetitive prompt with n-gram speculation on: the counters are the engine's own totals."""
    core = engine(checkpoint, speculative_model="ngram", speculative_max_batch=8)
    metrics = Metrics(MODEL)
    metrics.attach(core.info, core.step_listeners)
    core.add_request([5, 6, 7, 8] * 10, greedy(16))
    run(core)
    core.scheduler.num_preemptions = 3
    metrics.observe_engine(core.snapshot(), core.info.max_num_seqs)
    m = values(metrics)
    spec = core.spec_stats
    assert spec.drafts > 0
    assert m["num_preemptions_total"] == 3
    assert (m["spec_decode_num_drafts_total"], m["spec_decode_num_draft_tokens_total"],
            m["spec_decode_num_accepted_tokens_total"]) == (spec.drafts, spec.draft_tokens, spec.accepted_tokens)
    assert m["spec_decode_mean_acceptance_length"] == 1 + spec.accepted_tokens / spec.drafts


def test_request_histograms_count_one_observation_per_request(checkpoint):
    """Three streamed and two plain chats plus one completion of two prompts: seven engine requests,
    each 6 tokens, so seven TTFTs, queue times and end-to-end latencies, and 5 inter-token gaps each."""
    server_engine = make_engine(checkpoint("llama"))
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    chat = {**body, "messages": [{"role": "user", "content": "How large is a KV page?"}]}
    try:
        with running(api(server_engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(3):
                with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
                    assert r.status_code == 200 and len(list(r.iter_lines())) > 6
            for _ in range(2):
                assert client.post("/v1/chat/completions", json=chat).status_code == 200
            r = client.post("/v1/completions", json={**body, "prompt": [[5, 6, 7], [8, 9, 10, 11]]})
            assert r.json()["usage"]["completion_tokens"] == 12
            m = Scrape.from_text(client.get("/metrics").text).values
    finally:
        server_engine.shutdown()
    for name in ("time_to_first_token_seconds", "request_queue_time_seconds", "e2e_request_latency_seconds"):
        assert m[f"{name}_count"] == 7, name
    assert m["inter_token_latency_seconds_count"] == 7 * 5
    # One token per output: a request's gaps add up to its first token -> last token time.
    assert m["inter_token_latency_seconds_sum"] == pytest.approx(
        m["e2e_request_latency_seconds_sum"] - m["time_to_first_token_seconds_sum"])
    assert 0 <= m["request_queue_time_seconds_sum"] <= m["time_to_first_token_seconds_sum"]
    assert m["time_to_first_token_seconds_sum"] < m["e2e_request_latency_seconds_sum"]
    assert m["generation_tokens_total"] == 7 * 6


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    before = [(0.1, 2.0), (0.2, 2.0), (0.4, 2.0), (math.inf, 2.0)]
    after = [(0.1, 2.0), (0.2, 12.0), (0.4, 22.0), (math.inf, 24.0)]  # 10 in (0.1, 0.2], 10 in (0.2, 0.4], 2 above
    assert quantile(0.5, before, after) == pytest.approx(0.2 + 0.2 * 1 / 10)  # rank 11 of 22
    assert quantile(0.25, before, after) == pytest.approx(0.1 + 0.1 * 5.5 / 10)  # rank 5.5
    assert quantile(0.99, before, after) == 0.4  # in the overflow bucket: its lower edge
    assert quantile(0.5, after, after) is None


@pytest.mark.parametrize("name, key", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100 80GB PCIe", "a100-80gb"),
                                       ("NVIDIA B200", "b200")])
def test_gpu_peaks_come_from_the_planner_catalog(name, key):
    assert catalog_entry(name) is CATALOG[key]
    assert catalog_entry("NVIDIA GeForce RTX 4090") is None


def test_grafana_dashboard_uses_only_metrics_the_server_defines():
    defined = Scrape.from_registry(Metrics(MODEL).registry)
    names = set(defined.values) | {n + "_bucket" for n in defined.buckets}
    exprs = [t["expr"] for f in GRAFANA.glob("*.json")
             for p in json.loads(f.read_text())["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {w.split(":", 1)[1] for e in exprs for w in e.replace("(", " ").replace("[", " ").replace("{", " ").split()
            if w.startswith("chatscale:")}
    assert used and used <= names, used - names


def test_dashboard_rows_add_up_to_the_tokens_served(checkpoint):
    """Each row's tokens/s times its interval, summed over the history, is every token generated."""
    server_engine = make_engine(checkpoint("llama"))
    app = api(server_engine)
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "prompt": [5, 6, 7, 8]}
    try:
        with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert wait_until(lambda: len(client.get("/dashboard/data").json()["rows"]) >= 1)
            generated = sum(client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
                            for _ in range(3))
            seen = len(client.get("/dashboard/data").json()["rows"])
            assert wait_until(lambda: len(client.get("/dashboard/data").json()["rows"]) > seen + 1)
            data = client.get("/dashboard/data").json()
            later = client.get("/dashboard/data", params={"since": data["rows"][-2]["t"]}).json()["rows"]
    finally:
        server_engine.shutdown()
    rows = data["rows"]
    assert later == rows[-1:] or later[0] == rows[-1]
    served = sum(r["tokens_per_s"] * (r["t"] - p["t"]) for p, r in zip(rows, rows[1:]))
    assert served == pytest.approx(generated)
    busy = [r for r in rows if r["batch_sequences"]]
    assert busy and all(r["intensity"] > 0 and r["ridge"] > 0 and r["batch_tokens"] >= 1 for r in busy)
    assert rows[-1]["kv_live"] == 0 and rows[-1]["running"] == 0


def test_dashboard_page_is_open_and_its_data_needs_the_api_key(checkpoint):
    server_engine = make_engine(checkpoint("llama"))
    try:
        client = TestClient(api(server_engine, api_key="sk-test"))
        assert client.get("/dashboard").status_code == 200
        assert client.get("/static/dashboard.js").status_code == 200
        assert client.get("/dashboard/data").status_code == 401
        data = client.get("/dashboard/data", headers={"Authorization": "Bearer sk-test"}).json()
        assert data["rows"] == [] and data["interval_s"] == 1 and data["history_s"] == 600
    finally:
        server_engine.shutdown()
