"""Tensor parallelism on CPU (gloo, two ranks, tiny checkpoints): the sharded model computes what the
whole one does (fp32 logits to summation order, greedy tokens exactly) for GQA, one replicated KV
head and experts; quantized weights are split in integer form on group boundaries; prefix caching,
preemption, abort and speculative decoding keep working; a rank that dies turns the server
unhealthy with an error naming it; shapes that do not split are refused naming their sizes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_files import write_gguf
from logits import prefill_logits
from server_utils import MODEL, api, make_engine, running, wait_until

from chatscale.distributed.sharding import Shard, ShardingError
from chatscale.engine.config import EngineConfig
from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.structured.spec import GrammarSpec
from chatscale.models.config import ModelConfig
from chatscale.models.gguf.checkpoint import open_gguf
from chatscale.models.loader import gguf_weights, model_config
from chatscale.models.quant.weight import QuantizedWeight

PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 3, [20, 21, 22], list(range(30, 90))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def run(path: Path, tp: int, prompts=PROMPTS, params=GREEDY, **config) -> tuple[torch.Tensor, list[list[int]]]:
    """Prompt logits of the first prompt and every prompt's greedy tokens, on `tp` ranks."""
    with LLM(str(path), num_blocks=config.pop("num_blocks", 64), dtype="float32", threads=1,
             tensor_parallel_size=tp, **config) as llm:
        logits = prefill_logits(llm, prompts[0])
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.kv.num_used_blocks == 0
    return logits, tokens


@pytest.mark.parametrize("arch", ["llama", "qwen3_mqa", "mixtral"])
def test_two_ranks_compute_what_one_device_does(checkpoint, arch):
    """Llama with GQA (2 KV heads: one a rank), Qwen3 with one KV head (each rank keeps a copy),
    Mixtral (every expert split within): the same logits up to fp32 summation order, the same tokens."""
    path = checkpoint(arch)
    one_logits, one_tokens = run(path, 1)
    two_logits, two_tokens = run(path, 2)
    torch.testing.assert_close(two_logits, one_logits, rtol=1e-4, atol=1e-4)
    assert two_tokens == one_tokens


def test_quantized_weights_are_split_in_integer_form_on_group_boundaries(checkpoint, tmp_path):
    """Each rank's Q4_0 tensors are exactly its slices of the whole file's (integers, scales), read
    before anything is packed; a split that would cut a group of 32 is refused naming the tensor."""
    path = write_gguf(checkpoint("llama"), tmp_path / "q4.gguf", T.Q4_0)
    ckpt = open_gguf(path)
    cfg = model_config(path)
    whole = dict(gguf_weights(ckpt))
    for rank in (0, 1):
        shard = Shard(rank, 2, cfg)
        for name, part in gguf_weights(ckpt, shard):
            cut = shard.slice_for(name, tuple(whole[name].shape))
            expected = whole[name] if cut is None else cut.of(whole[name])
            if isinstance(part, QuantizedWeight):
                assert part.group == 32 and torch.equal(part.q, expected.q) and torch.equal(part.scale, expected.scale)
            else:
                assert torch.equal(part, expected), name
    # o_proj has 64 inputs: four ranks would hold 16 each, half a Q4_0 group.
    with pytest.raises(ShardingError, match=r"self_attn\.o_proj.*group of 32"):
        list(gguf_weights(ckpt, Shard(1, 4, cfg)))


def test_a_quantized_model_on_two_ranks(checkpoint, tmp_path):
    """Q8_0 and Q4_0 files in the weight-only kernels' formats on every rank: two ranks' logits are as
    close to the exact (dequantized) model's as one device's. Q4_0 keeps its groups of 32 on each
    rank; Q8_0 is requantized per output channel of each rank's shard (finer than the whole's)."""
    for qtype in (T.Q8_0, T.Q4_0):
        path = write_gguf(checkpoint("llama"), tmp_path / f"{qtype.name}.gguf", qtype)
        exact, _ = run(path, 1, prompts=PROMPTS[:1], quantization="dense")
        one, _ = run(path, 1, prompts=PROMPTS[:1])
        two, _ = run(path, 2, prompts=PROMPTS[:1])
        one_error, two_error = (one - exact).abs().max(), (two - exact).abs().max()
        assert two_error < 1.5 * one_error, qtype.name


def test_preemption_abort_prefix_cache_and_speculation_on_two_ranks(checkpoint):
    path = checkpoint("llama")
    prompts = [[i, i + 1, i + 2] * 6 for i in range(5, 45, 8)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    _, expected = run(path, 1, prompts, params, num_blocks=128)
    with LLM(str(path), num_blocks=12, dtype="float32", threads=1, tensor_parallel_size=2) as llm:
        # 5 sequences of 58 tokens in 12 pages of 16: some are preempted and recomputed.
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
        assert llm.engine.snapshot().num_preemptions > 0
        stream = llm.stream(prompts[0], params)
        for _ in range(3):
            next(stream)
        stream.close()  # abandoned: aborted, its pages freed
        assert llm.engine.kv.num_used_blocks == 0 and not llm.engine.has_unfinished_requests()
        hits = llm.engine.snapshot().prefix_cache_hits
        assert [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params)] == expected[:1]
        assert llm.engine.snapshot().prefix_cache_hits > hits
    for proposer in ("ngram", str(path)):  # n-gram lookup; a draft model (here the target itself) on rank 0
        _, speculated = run(path, 2, prompts, params, num_blocks=128, speculative_model=proposer)
        assert speculated == expected, proposer


@pytest.mark.slow
def test_a_compiled_decode_step_traces_the_collectives(checkpoint):
    """torch.compile over a rank's decode step (the CUDA default, where it is captured in graphs): the
    functional collectives trace, and the tokens are one device's. On a CPU here, for lack of GPUs."""
    path = checkpoint("llama")
    _, eager = run(path, 1)
    _, compiled = run(path, 2, compile=True)
    assert compiled == eager


def test_grammars_and_seeded_sampling_stay_with_rank_0(checkpoint):
    """Grammar masks and seeded generators live where the sampler does (rank 0): a constrained answer
    and a seeded sampled one come out as on one device."""
    choices = ["continuous batching", "paged attention"]
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured=GrammarSpec.choice(choices)),
              SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)]
    path = checkpoint("llama")
    _, one = run(path, 1, PROMPTS[:2], params)
    _, two = run(path, 2, PROMPTS[:2], params)
    assert two == one
    with LLM(str(path), num_blocks=64, dtype="float32", threads=1) as llm:
        assert llm.tokenizer.decode(two[0]) in choices


def _rank_pids(engine_pid: int) -> list[int]:
    """Processes whose parent is the engine process and that run a tensor-parallel rank."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == engine_pid and b"chatscale.distributed.worker" in cmdline:
            pids.append(int(entry))
    return pids


def test_a_rank_that_dies_makes_the_server_unhealthy_with_a_clear_error(checkpoint):
    engine = make_engine(checkpoint("llama"), num_blocks=64, tensor_parallel_size=2)
    body = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 8, "ignore_eos": True, "temperature": 0}
    try:
        with running(api(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/completions", json=body).status_code == 200
            metrics = client.get("/metrics").text
            assert 'chatscale:kv_cache_rank_used_bytes{model_name="tiny",rank="1"}' in metrics
            count = next(line for line in metrics.splitlines()
                         if line.startswith("chatscale:step_collective_seconds_count"))
            assert float(count.split()[-1]) > 0
            (rank1,) = _rank_pids(engine.process.pid)
            os.kill(rank1, signal.SIGKILL)
            r = client.post("/v1/completions", json=body)
            assert r.status_code in (500, 503)
            assert wait_until(lambda: client.get("/health").status_code == 503, 10)
            health = client.get("/health").json()
            assert health["status"] == "failed" and f"rank 1 (pid {rank1}) exited" in health["error"], health
            assert client.post("/v1/completions", json=body).status_code == 503
        assert wait_until(lambda: engine.process.poll() is not None, 10)  # the engine process ended too
    finally:
        engine.shutdown()


def test_shapes_that_do_not_split_are_refused_naming_the_sizes(checkpoint):
    smollm2 = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3})
    with pytest.raises(ShardingError, match="9 query heads; 3 KV heads .* do not divide by 2"):
        Shard(0, 2, smollm2)
    Shard(0, 3, smollm2)  # three ranks split it: three query heads and one KV head each
    with pytest.raises(ValueError, match="second KV tier"):
        EngineConfig(tensor_parallel_size=2, kv_host_bytes=1 << 20)
    with pytest.raises(ValueError, match="cannot be combined with --executor"):
        EngineConfig(tensor_parallel_size=2, executor="fault_executors:SlowExecutor")
    with pytest.raises(ShardingError, match="4 query heads"):  # refused before any rank starts
        LLM(str(checkpoint("llama")), num_blocks=16, tensor_parallel_size=3)


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie
    except OSError:
        return True


def test_ranks_exit_when_the_engine_process_is_killed(checkpoint):
    """Nothing is left behind: the other ranks' next broadcast fails when rank 0 is gone, and they exit."""
    engine = make_engine(checkpoint("llama"), num_blocks=32, tensor_parallel_size=2)
    try:
        (rank1,) = _rank_pids(engine.process.pid)
        os.kill(engine.process.pid, signal.SIGKILL)
        assert wait_until(lambda: _exited(rank1), 10)
    finally:
        engine.shutdown()
