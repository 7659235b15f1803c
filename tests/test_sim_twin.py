"""The replica twin against the real engine, its workloads, tokens and cost models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatscale.sim import workloads as W
from chatscale.sim.cost import LinearStepCost, RooflineStepCost, step_features
from chatscale.sim.replay import simulate_replica
from chatscale.sim.tokens import answer_key, prompt_token_ids
from chatscale.sim.twin import ReplicaTwin, TwinConfig

FLAT = LinearStepCost([0.01, 0, 0, 0, 0, 0])  # every step 10 ms


def small_chat(n_conv: int = 6, seed: int = 0) -> W.Workload:
    users = W.Users(mean_turns=3, think_s=8.0, system_tokens=40, message_tokens=(3.0, 0.5),
                    answer_tokens=(2.5, 0.5), max_context=600)
    return W.conversations(n_conv / 3 * 5, 60, regions={"local": (0, 1.0)}, start_hour_utc=12, users=users,
                           seed=seed)


def test_twin_schedules_exactly_as_the_engine_does():
    """Same requests, same pages (few enough to preempt): the real LLMEngine and the twin must take
    the same steps, in order, and serve the same prefix-cache hits. Mooncake requests share prompt
    pages only (the engine's sampled answers are not the twin's, so no answer is reused here)."""
    from chatscale.engine.config import EngineConfig
    from chatscale.engine.engine import LLMEngine
    from chatscale.engine.sampling_params import SamplingParams

    w = W.mooncake().first(16).scaled(length=1 / 32, max_prompt=400, max_output=24)
    engine = LLMEngine(EngineConfig(threads=1, max_num_seqs=8, max_num_batched_tokens=256), num_blocks=48)
    twin = ReplicaTwin(FLAT, TwinConfig(num_blocks=48, max_num_seqs=8, max_num_batched_tokens=256,
                                        max_model_len=engine.max_model_len, vocab=engine.vocab_size),
                       record_steps=True)
    engine_steps, cached = [], {}
    for i in range(len(w)):
        ids = prompt_token_ids(w, i, engine.vocab_size)
        engine.add_request(ids, SamplingParams(max_tokens=int(w.output[i]), ignore_eos=True), request_id=str(i))
        twin.add(i, ids, int(w.output[i]), 0.0, answer_key(w, i))
    while engine.has_unfinished_requests():
        for out in engine.step():
            cached[out.request_id] = out.num_cached_tokens
        engine_steps.append((engine.last_step.num_seqs, engine.last_step.num_tokens))
    twin.run_until_idle(0.0)
    assert [(s.seqs, s.tokens) for s in twin.steps] == engine_steps
    assert engine.scheduler.num_preemptions > 0 and twin.scheduler.num_preemptions == engine.scheduler.num_preemptions
    assert twin.kv.stats.hits == engine.kv.stats.hits > 0


def test_conversation_turns_repeat_the_previous_turn_token_for_token():
    w = small_chat(12)
    vocab = 2000
    by_conv: dict[int, list[int]] = {}
    for i in range(len(w)):
        by_conv.setdefault(int(w.conv[i]), []).append(i)
    pairs = [(a, b) for rows in by_conv.values() for a, b in zip(rows, rows[1:])]
    assert pairs, "the workload should hold multi-turn conversations"
    for a, b in pairs:
        assert w.prefix[b] == w.prompt[a] + w.output[a]
        first, second = prompt_token_ids(w, a, vocab), prompt_token_ids(w, b, vocab)
        assert second[:len(first)] == first
    # one replica with room for everything hits every repeated prefix (whole pages of it) once the
    # previous turn has finished (open-loop think times can bring a turn before its predecessor ends)
    log, _ = simulate_replica(w, FLAT, TwinConfig(num_blocks=4096, vocab=vocab))
    later = [b for a, b in pairs if log.finish[a] < w.arrival[b]]
    assert len(later) > len(pairs) / 2
    assert np.all(log.cached[later] >= (w.prefix[later] // 16 - 1) * 16)
    assert log.cached[[rows[0] for rows in by_conv.values()]].sum() == 0


def test_mooncake_pages_are_shared_by_hash_id():
    w = W.mooncake().first(40).scaled(length=1 / 16)
    assert w.hash_block == 32
    a, b = prompt_token_ids(w, 0, 5000), prompt_token_ids(w, 1, 5000)
    assert w.hash_ids[0][0] == w.hash_ids[1][0] and w.hash_ids[0][1] != w.hash_ids[1][1]
    assert len(a) == w.prompt[0] and a[:32] == b[:32] and a[32:64] != b[32:64]


def test_traces_and_gateway_log_load(tmp_path):
    for kind in ("conv", "code"):
        a = W.azure(kind)
        assert len(a) > 8000 and 3000 < a.duration < 3700 and np.all(np.diff(a.arrival) >= 0)
    log = tmp_path / "gw.jsonl"
    rows = [{"timestamp": 100.0 + k, "prompt_tokens": 50 + 60 * k, "output_tokens": 10, "key": "k1",
             "region": "eu-west", "conversation": "c"} for k in range(3)]
    rows.append({"timestamp": 101.5, "prompt_tokens": 30, "output_tokens": 5, "key": "k2", "region": "us-east"})
    rows.append({"timestamp": 103.0, "prompt_tokens": 30, "output_tokens": 5, "key": "k2", "region": "us-east",
                 "conversation": None})
    log.write_text("\n".join(json.dumps(r) for r in rows))
    w = W.gateway_log(log)
    assert w.regions == ["eu-west", "us-east"] and list(w.arrival) == [0, 1, 1.5, 2, 3]
    assert list(w.prefix) == [0, 60, 0, 120, 0] and len(set(w.conv.tolist())) == 3


def test_japan_morning_spike_shows_in_its_region():
    w = W.conversations(200, 4 * 3600, start_hour_utc=21, spike={"ap-japan": 2.0})
    japan = w.arrival[w.region == w.regions.index("ap-japan")]
    per_hour = np.histogram(japan, bins=4, range=(0, 4 * 3600))[0]
    # 21-22h UTC is 6-7h in Japan, 23-24h UTC is 8-9h: the spike
    assert per_hour[2] > 2 * per_hour[0]


def test_linear_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    truth = np.array([0.004, 0.0001, 0.00015, 0.0003, 5e-7, 0.0002])
    steps = []
    for _ in range(300):
        b = int(rng.integers(1, 64))
        chunks = [(int(rng.integers(10, 2000)), 1) for _ in range(b)]
        if rng.random() < 0.4:
            chunks.append((int(rng.integers(0, 500)), int(rng.integers(2, 900))))
        steps.append(chunks)
    seconds = [float(np.dot(truth, step_features(c))) * rng.uniform(0.97, 1.03) for c in steps]
    fit = LinearStepCost.fit(steps, seconds)
    assert min(fit.coefficients) >= 0
    assert fit.source["mean_abs_error"] < 0.03
    for c in steps[:20]:
        assert fit.step_seconds(c) == pytest.approx(float(np.dot(truth, step_features(c))), rel=0.05)


def test_roofline_cost_is_the_planners():
    from chatscale.planner.roofline import Efficiency, step_time

    cost = RooflineStepCost.named("llama-3-8b", "h100", efficiency=Efficiency(0.5, 0.001))
    chunks = [(1000, 1)] * 32 + [(0, 512)]
    want = step_time(cost.model, cost.hw, cost.layout, decode_contexts=[1001] * 32, prefills=[(512, 0)])
    assert cost.step_seconds(chunks) == pytest.approx(0.001 + want / 0.5)
    assert 20_000 < cost.kv_blocks(16) < 40_000  # ~57 GB of KV at 128 KiB per token, 16 per page


def test_engine_replay_serves_every_request_at_its_arrival():
    from chatscale.engine.config import EngineConfig
    from chatscale.engine.engine import LLMEngine
    from chatscale.sim.engine_replay import replay_on_engine

    w = W.poisson(10, 1.5, (16, 64), (2, 8), seed=1)
    log = replay_on_engine(LLMEngine(EngineConfig(threads=1), num_blocks=256), w)
    assert np.array_equal(log.output, w.output)
    assert np.all(log.ttft > 0) and np.all(log.finish >= log.first_token)
    assert log.finish.max() > w.arrival.max()  # open loop: the last request was not sent early
