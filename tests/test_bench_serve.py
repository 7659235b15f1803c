"""`chatscale bench serve`: arrivals, datasets, trace scaling, statistics, and a real HTTP run.

The end-to-end tests drive a small OpenAI-shaped server over real HTTP on 127.0.0.1 whose timing
is known (first token after TTFT_S, then one chunk every ITL_S; every third request refused with
429), so the measured TTFT, TPOT, token counts and error counts can be checked against the truth.
"""

from __future__ import annotations

import asyncio
import json
import statistics

import pytest
from server_utils import running

from chatscale.bench import workloads as w
from chatscale.bench.stats import RequestRecord, summarize
from chatscale.traces import TRACE_FILES
from chatscale.cli import main

TTFT_S, ITL_S, TOKENS_PER_WORD = 0.08, 0.01, 2


# ---- arrivals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [1.0, 0.25, 4.0])
def test_gamma_arrivals_keep_the_rate_and_set_the_burstiness(shape):
    times = w.gamma_arrivals(20000, rate=5.0, burstiness=shape, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.05)
    cv = statistics.stdev(gaps) / statistics.mean(gaps)
    assert cv == pytest.approx(shape ** -0.5, rel=0.08)  # gamma: CV = 1/sqrt(shape); Poisson CV = 1


def test_gamma_arrivals_are_seeded_and_infinite_rate_sends_all_at_once():
    assert w.gamma_arrivals(50, 2.0, seed=3) == w.gamma_arrivals(50, 2.0, seed=3)
    assert w.gamma_arrivals(50, 2.0, seed=3) != w.gamma_arrivals(50, 2.0, seed=4)
    assert w.gamma_arrivals(4, float("inf")) == [0.0] * 4
    with pytest.raises(ValueError):
        w.gamma_arrivals(4, 1.0, burstiness=0)


# ---- traces ------------------------------------------------------------------------------------

@pytest.fixture
def azure_csv(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:50.9951690,396,109\n"  # out of order: loading sorts
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:16:46.6805900,1000,10\n")
    return path


def test_azure_trace_loads_sorted_from_zero_with_seven_digit_fractions(azure_csv):
    rows = w.load_trace(azure_csv)
    assert [r.timestamp for r in rows] == pytest.approx([0.0, 4.314579, 60.0])
    assert [(r.input_tokens, r.output_tokens) for r in rows] == [(374, 44), (396, 109), (1000, 10)]
    assert len(w.load_trace(azure_csv, limit=2)) == 2
    assert w.trace_rate(rows) == pytest.approx(2 / 60.0)


def test_mooncake_trace_keeps_prefix_blocks(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"timestamp": 1000, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]}\n'
                    '{"timestamp": 3500, "input_length": 700, "output_length": 7, "hash_ids": [0, 2]}\n')
    rows = w.load_trace(path)
    assert [r.timestamp for r in rows] == [0.0, 2.5]
    assert rows[0].hash_ids == (0, 1)
    bad = tmp_path / "trace.txt"
    bad.write_text("1\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        w.load_trace(bad)


def test_shipped_traces_load_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no trace here: the name is the package's file
    assert [len(w.load_trace(name)) for name in TRACE_FILES] == [8819, 19366, 12031]
    assert w.load_trace("mooncake_conversation.jsonl", limit=1)[0].hash_ids[:3] == (0, 1, 2)


def test_trace_scaling_keeps_ratios_clips_lengths_and_compresses_time(azure_csv):
    rows = w.load_trace(azure_csv)
    scaled = w.scale_lengths(rows, 0.1, max_input=64, max_output=8)
    assert [(r.input_tokens, r.output_tokens) for r in scaled] == [(37, 4), (40, 8), (64, 1)]
    assert [r.timestamp for r in scaled] == [r.timestamp for r in rows]
    assert w.trace_arrivals(rows, speedup=2.0) == pytest.approx([0.0, 2.1572895, 30.0])
    with pytest.raises(ValueError):
        w.scale_lengths(rows, 0)


# ---- datasets and prompt text ------------------------------------------------------------------

def test_random_sessions_lengths_stay_in_range():
    sessions = w.random_sessions(200, 100, 20, range_ratio=0.5, seed=0)
    ins = [s.turns[0].input_tokens for s in sessions]
    assert len(sessions) == 200 and all(s.num_requests == 1 for s in sessions)
    assert 50 <= min(ins) < 60 and 140 < max(ins) <= 150
    assert {s.turns[0].output_tokens for s in w.random_sessions(5, 100, 20)} == {20}


def test_conversations_total_the_requested_requests_with_think_time_between_turns():
    sessions = w.conversation_sessions(10, turns=4, input_len=16, output_len=8, think_time=2.0, seed=0)
    assert [s.num_requests for s in sessions] == [4, 4, 2]
    assert all(s.turns[0].think_time == 0.0 for s in sessions)
    later = [t.think_time for s in sessions for t in s.turns[1:]]
    assert all(t > 0 for t in later) and len(set(later)) == len(later)


def test_prompt_text_has_the_sized_word_count_and_shared_prefix_blocks():
    sessions = [w.Session((w.Turn(40, 4),), (7, 8)), w.Session((w.Turn(30, 4),), (7, 9)),
                w.Session((w.Turn(10, 4),))]
    a, b, c = w.with_text(sessions, tokens_per_word=2.0, seed=1, block_tokens=10)
    wa, wb = a.turns[0].text.split(), b.turns[0].text.split()
    assert (len(wa), len(wb), len(c.turns[0].text.split())) == (20, 15, 5)
    assert wa[:5] == wb[:5] and wa[5:10] != wb[5:10]  # block 7 shared, blocks 8 and 9 differ
    assert w.with_text(sessions, 2.0, seed=1, block_tokens=10)[2] == c


# ---- statistics --------------------------------------------------------------------------------

def test_summary_percentiles_goodput_and_errors():
    recs = [RequestRecord(i, 0, 0.0, 10, ttft=0.1 * (i + 1), latency=0.1 * (i + 1) + 0.9,
                          output_tokens=10, chunk_gaps=[0.1] * 9) for i in range(4)]
    recs += [RequestRecord(9, 0, 0.0, 10, status=429, error="HTTP 429"),
             RequestRecord(9, 1, 0.0, 10, error="ReadTimeout")]
    r = summarize(recs, duration=2.0, slo_ttft_ms=250, slo_tpot_ms=101)
    assert (r["completed"], r["failed"]) == (4, 2)
    assert r["errors"] == {"HTTP 429": 1, "ReadTimeout": 1}
    assert r["output_throughput"] == 20.0 and r["total_token_throughput"] == 40.0
    assert r["request_throughput"] == 2.0
    assert r["ttft_ms"]["mean"] == pytest.approx(250) and r["ttft_ms"]["p50"] == pytest.approx(250)
    assert r["ttft_ms"]["p99"] == pytest.approx(397)
    assert r["tpot_ms"]["p90"] == pytest.approx(100) and r["itl_ms"]["mean"] == pytest.approx(100)
    assert r["goodput"]["requests_per_s"] == 1.0  # TTFT 100 and 200 ms meet 250 ms
    assert r["goodput"]["fraction"] == pytest.approx(2 / 6)
    assert summarize(recs, 2.0, 250, 99)["goodput"]["requests_per_s"] == 0.0
    assert summarize([], 0.0, 1, 1)["ttft_ms"]["p99"] is None


# ---- real HTTP against an OpenAI-shaped server with known timing -------------------------------

def _fake_openai_app(seen: list[dict]):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    count = {"n": 0}

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def tokenize(request):  # llama.cpp's shape: the client's first (vLLM-shaped) try is refused
        body = await request.json()
        if set(body) != {"content"}:
            return JSONResponse({"detail": "unknown field"}, status_code=422)
        return JSONResponse({"tokens": [1] * (TOKENS_PER_WORD * len(body["content"].split()))})

    async def chat(request):
        body = await request.json()
        seen.append(body)
        count["n"] += 1
        if count["n"] % 3 == 0:
            return JSONResponse({"error": {"message": "at capacity"}}, status_code=429)
        n = body["max_tokens"]
        prompt = sum(TOKENS_PER_WORD * len(m["content"].split()) for m in body["messages"])

        async def events():
            yield 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}\n\n'
            await asyncio.sleep(TTFT_S)
            for i in range(n):
                if i:
                    await asyncio.sleep(ITL_S)
                text = f" t{i}" if n > 1 else ""  # one token alone: half a character, no text yet
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + "\n\n"
            usage = {"prompt_tokens": prompt, "completion_tokens": n}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/tokenize", tokenize, methods=["POST"]),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def fake_server():
    seen: list[dict] = []
    with running(_fake_openai_app(seen)) as url:
        yield url, seen


def test_bench_serve_measures_a_real_server(fake_server, tmp_path, capsys):
    url, seen = fake_server
    out = tmp_path / "report.json"
    assert main(["bench", "serve", "--base-url", url, "--concurrency", "1", "--num-requests", "8",
                 "--dataset", "conversation", "--turns", "2", "--input-len", "12", "--output-len", "6",
                 "--warmup", "0", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "5000",
                 "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    r = result["report"]
    assert result["model"] == "fake-model" and result["tokens_per_word_source"] == "server"
    assert result["tokens_per_word"] == TOKENS_PER_WORD
    # Requests 3 and 6 (first turns) are refused: each ends its conversation, so 6 are sent, not 8.
    assert len(seen) == 6 and r["errors"] == {"HTTP 429": 2} and r["completed"] == 4
    assert r["output_tokens"] == 4 * 6
    assert all(b["stream"] and b["ignore_eos"] and b["model"] == "fake-model" for b in seen)
    # Turn 2 of a conversation carries turn 1 and the answer the server streamed.
    assert [m["role"] for m in seen[1]["messages"]] == ["user", "assistant", "user"]
    assert seen[1]["messages"][1]["content"] == " t0 t1 t2 t3 t4 t5"
    assert seen[1]["messages"][0] == seen[0]["messages"][0]
    assert r["input_tokens"] == sum(TOKENS_PER_WORD * len(m["content"].split())
                                    for b, q in zip(seen, result["requests"]) if q["error"] is None
                                    for m in b["messages"])
    assert TTFT_S * 1000 <= r["ttft_ms"]["p50"] < TTFT_S * 1000 + 400
    assert ITL_S * 1000 <= r["tpot_ms"]["mean"] < ITL_S * 1000 + 100
    assert r["goodput"]["fraction"] == pytest.approx(4 / 6)
    assert "TTFT" in capsys.readouterr().out


def test_open_loop_starts_sessions_at_their_arrival_times(fake_server):
    from chatscale.bench.serve import OpenAIClient, run_sessions

    url, seen = fake_server
    starts = [0.0, 0.3, 0.6]
    sessions = w.with_text(w.random_sessions(3, 4, 2), TOKENS_PER_WORD)

    async def go():
        client = OpenAIClient(url, "fake-model")
        try:
            return await run_sessions(client, sessions, TOKENS_PER_WORD, starts=starts, progress=False)
        finally:
            await client.aclose()

    records, duration = asyncio.run(go())
    assert [r.start for r in records] == pytest.approx(starts, abs=0.15)
    assert [r.error for r in records] == [None, None, "HTTP 429"]  # the fake refuses every third
    assert duration >= 0.6 and records[0].latency >= TTFT_S


def test_an_answer_without_visible_text_succeeds_with_ttft_at_its_end(fake_server):
    from chatscale.bench.serve import OpenAIClient

    url, _ = fake_server

    async def go():
        client = OpenAIClient(url, "fake-model")
        try:
            record = RequestRecord(0, 0, 0.0, 0)
            await client.send([{"role": "user", "content": "hi"}], 1, record, 0.0)
            return record
        finally:
            await client.aclose()

    record = asyncio.run(go())
    assert record.ok and record.output_tokens == 1 and record.prompt_tokens == TOKENS_PER_WORD
    assert record.ttft == record.latency >= TTFT_S
