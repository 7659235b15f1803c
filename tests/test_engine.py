"""Engine behaviour: aborts in every state, streaming, logprobs, limits, the async front."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server_utils import engine_idle, wait_until

from chatscale.engine.async_engine import AsyncEngine
from chatscale.engine.config import EngineConfig
from chatscale.engine.errors import ContextLengthError, InvalidRequestError
from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture()
def llm(checkpoint):
    return LLM(str(checkpoint("llama")), num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=2)


def all_free(llm: LLM) -> bool:
    kv = llm.engine.kv
    return kv.num_free_blocks == kv.num_blocks and not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_abort_frees_blocks_in_every_state(llm):
    e = llm.engine
    decoding = e.add_request([5] * 10, LONG)
    prefilling = e.add_request([6] * 40, LONG)  # 40 tokens at 16 per step: several chunks
    queued = e.add_request([7] * 10, LONG)  # max_num_seqs=2 keeps it waiting
    e.step()
    e.step()
    seqs = {r: e.core.requests[r][0] for r in (decoding, prefilling, queued)}
    assert seqs[decoding].num_output_tokens >= 1
    assert 0 < seqs[prefilling].num_computed_tokens < 40
    assert seqs[queued].status.value == "waiting"
    for r in (prefilling, queued, decoding):
        assert e.abort_request(r)
        assert seqs[r].finish_reason == "abort" and not seqs[r].block_table
    assert all_free(llm) and not e.has_unfinished_requests()
    assert not e.abort_request(decoding)  # twice is harmless


def test_stream_yields_deltas_that_add_up(llm):
    pieces, tokens, last = [], [], None
    for out in llm.stream("Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)):
        pieces.append(out.outputs[0].delta_text)
        tokens += out.outputs[0].delta_token_ids
        last = out
    assert last.finished and last.outputs[0].finish_reason == "length"
    assert "".join(pieces) == last.outputs[0].text and tokens == last.outputs[0].token_ids
    assert len(tokens) == 12 and all_free(llm)


def test_abandoned_stream_aborts(llm):
    it = llm.stream("Hello", LONG)
    next(it)
    it.close()
    assert all_free(llm) and not llm.engine.has_unfinished_requests()


def test_logprobs(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.logprob == pytest.approx(lp.top[0][1])  # greedy: the top token
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert sum(torch.tensor([v for _, v in lp.top]).exp()) <= 1.0 + 1e-5


def test_request_limits(llm):
    e = llm.engine
    with pytest.raises(ContextLengthError, match="maximum context length is 512 tokens.*500 in the messages, 40"):
        e.add_request([5] * 500, LONG)
    with pytest.raises(ContextLengthError, match="KV cache"):
        e.add_request([5] * 250, LONG)  # fits the context, not the 64 x 4-token pool
    with pytest.raises(InvalidRequestError, match="empty"):
        e.add_request([], LONG)
    with pytest.raises(InvalidRequestError) as exc:
        e.add_request([1], SamplingParams(logit_bias={10**6: 1.0}))
    assert exc.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as exc:
        e.add_request([1], SamplingParams(stop_token_ids=[-1], min_tokens=2))
    assert exc.value.param == "stop_token_ids"
    assert all_free(llm)


def test_extreme_but_valid_sampling_values_do_not_break_the_step(llm):
    params = SamplingParams(temperature=1.0, seed=-(2**63), top_k=2**62, max_tokens=3, ignore_eos=True)
    out = llm.generate("Hello", params)[0].outputs[0]
    assert len(out.token_ids) == 3
    assert llm.generate("Hello", params)[0].outputs[0].token_ids == out.token_ids


def test_async_engine_serves_many_callers_and_cancellation_frees_blocks(checkpoint):
    engine = AsyncEngine(EngineConfig(str(checkpoint("llama")), block_size=4, threads=1), num_blocks=128)
    ref = LLM(str(checkpoint("llama")), num_blocks=128, block_size=4)

    async def collect(prompt):
        text = ""
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)):
            text += out.outputs[0].delta_text
        return text

    async def cancelled():
        async def consume():
            async for _ in engine.generate("never ends", SamplingParams(max_tokens=400, ignore_eos=True)):
                pass
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main():
        prompts = [f"prompt {i}" for i in range(6)]
        texts, _ = await asyncio.gather(asyncio.gather(*(collect(p) for p in prompts)), cancelled())
        return prompts, texts

    try:
        prompts, texts = asyncio.run(main())
        expected = [o.outputs[0].text for o in ref.generate(prompts, SamplingParams(temperature=0, max_tokens=10,
                                                                                    ignore_eos=True))]
        assert texts == expected
        assert wait_until(lambda: engine_idle(engine)), engine.snapshot  # the abort reaches the engine process
    finally:
        engine.shutdown()


def test_async_engine_rejects_bad_requests_in_the_caller(checkpoint):
    engine = AsyncEngine(EngineConfig(str(checkpoint("llama")), block_size=4, threads=1), num_blocks=16)

    async def main():
        async for _ in engine.generate([1] * 600, SamplingParams(max_tokens=1)):
            pass

    try:
        with pytest.raises(ContextLengthError):
            asyncio.run(main())
    finally:
        engine.shutdown()


def test_many_decodes_attend_in_groups_exactly_as_alone(checkpoint):
    """More decodes than one group holds, of mixed context lengths: each matches its solo run."""
    llm = LLM(str(checkpoint("llama")), num_blocks=512, block_size=4)
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + 3 * i)] for i in range(21)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert batched == [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
