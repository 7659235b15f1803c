"""Our model code against transformers, the reference: logits and greedy generations."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoints import ARCHS
from transformers import AutoModelForCausalLM

from chatscale.engine.llm import LLM
from chatscale.engine.runner import works_for
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.sequence import Sequence
from chatscale.models.config import UnsupportedModelError
from chatscale.models.dtype_policy import compute_dtype
from chatscale.models.loader import load_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def prompts(lengths):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(path, prompt, n=32):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS is a token like any other
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(checkpoint, arch):
    path = checkpoint(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(str(path), num_blocks=64, block_size=4)
    runner = llm.engine.runner
    for prompt in prompts([1, 5, 17, 60]):
        seq = Sequence("r", prompt, GREEDY)
        assert llm.engine.kv.allocate(seq, len(prompt))
        step = runner.prepare(works_for([(seq, len(prompt))]))
        ours = llm.engine.model.logits(runner.forward(step))
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        assert (ours - ref).abs().max().item() <= 1e-4
        llm.engine.kv.free(seq)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_single_and_batched_match_transformers(checkpoint, arch):
    path = checkpoint(arch)
    batch = prompts([3, 11, 29, 50])
    refs = [hf_greedy(path, p) for p in batch]
    llm = LLM(str(path), num_blocks=128, block_size=4)
    assert llm.generate(batch[2], GREEDY)[0].outputs[0].token_ids == refs[2]
    assert [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)] == refs


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "mixtral"])
def test_greedy_with_forced_chunked_prefill(checkpoint, arch):
    path = checkpoint(arch)
    batch = prompts([40, 7, 33])
    refs = [hf_greedy(path, p) for p in batch]
    llm = LLM(str(path), num_blocks=128, block_size=4, max_num_batched_tokens=8)
    assert [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)] == refs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2_moe"])
def test_greedy_with_forced_preemption(checkpoint, arch):
    path = checkpoint(arch)
    batch = prompts([20, 25, 30, 18])
    refs = [hf_greedy(path, p) for p in batch]
    # 16 blocks of 4 tokens: each request needs 13-16 blocks, so they cannot all run at once.
    llm = LLM(str(path), num_blocks=16, block_size=4)
    outs = llm.generate(batch, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert llm.engine.kv.num_free_blocks == 16


def test_bfloat16_checkpoint_runs_close_to_transformers(checkpoint):
    path = checkpoint("llama", torch.bfloat16)
    model = load_model(path)
    # --dtype auto measures bf16 against fp32 on this CPU (once per process): whichever it chose,
    # the weights are stored in it.
    assert model.dtype == model.embed.weight.dtype == compute_dtype("auto", "bfloat16", torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    llm = LLM(str(path), num_blocks=32, block_size=4)
    prompt = prompts([24])[0]
    seq = Sequence("r", prompt, GREEDY)
    llm.engine.kv.allocate(seq, len(prompt))
    step = llm.engine.runner.prepare(works_for([(seq, len(prompt))]))
    ours = llm.engine.model.logits(llm.engine.runner.forward(step))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 0.05 * scale


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    src = checkpoint("qwen2")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    prompt = prompts([9])[0]
    a = LLM(str(src), num_blocks=32, block_size=4).generate(prompt, GREEDY)[0].outputs[0].token_ids
    b = LLM(str(tmp_path), num_blocks=32, block_size=4).generate(prompt, GREEDY)[0].outputs[0].token_ids
    assert a == b


def test_clear_errors(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    bad = tmp_path / "gpt2"
    shutil.copytree(checkpoint("llama"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(bad)
    wide = tmp_path / "wide"
    shutil.copytree(checkpoint("llama"), wide)
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight: checkpoint"):
        load_model(wide)
    noweights = tmp_path / "noweights"
    shutil.copytree(checkpoint("llama"), noweights)
    (noweights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(noweights)


def test_moe_groups_tokens_by_expert(checkpoint):
    """Every routed assignment lands in exactly one expert's batch: k per token per MoE layer."""
    llm = LLM(str(checkpoint("mixtral")), num_blocks=64, block_size=4)
    prompt = prompts([13])[0]
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
    for layer in llm.engine.model.layers:
        counts = layer.mlp.last_tokens_per_expert
        assert sum(counts) == 2 * len(prompt) and len(counts) == 4


@pytest.mark.parametrize("arch", ["llama", "mixtral"])  # one shape: one compile of the flex kernel
def test_flex_backend_greedy_batched_chunked_and_preempted_match_transformers(checkpoint, arch):
    """The FlexAttention backend (decodes read pages in place) against transformers: a batch with
    chunked prefill, then the same under page pressure (preemption and recompute), in fp32."""
    path = checkpoint(arch)
    batch = prompts([40, 7, 33, 21])
    refs = [hf_greedy(path, p) for p in batch]
    llm = LLM(str(path), num_blocks=64, block_size=16, attention_backend="flex", compile=False,
              max_num_batched_tokens=24)
    assert llm.engine.runner.backend.name == "flex"
    assert [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)] == refs
    tight = LLM(str(path), num_blocks=8, block_size=16, attention_backend="flex", compile=False)
    assert [o.outputs[0].token_ids for o in tight.generate(batch, GREEDY)] == refs
    assert tight.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("backend", ["flex", "torch"])
def test_compiled_decode_matches_transformers(checkpoint, backend):
    """Decode steps as one compiled graph (dynamic batch: one compile serves every batch size as
    sequences finish), prefill steps eager: greedy output equals transformers in fp32."""
    path = checkpoint("llama")
    batch = prompts([40, 7, 33, 21])
    refs = [hf_greedy(path, p) for p in batch]
    llm = LLM(str(path), num_blocks=64, block_size=16, attention_backend=backend, compile=True)
    lengths = [32, 20, 11, 5]  # the decode batch shrinks from 4 to 1 as they finish
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(batch, params)
    assert [o.outputs[0].token_ids for o in outs] == [ref[:n] for ref, n in zip(refs, lengths)]
    assert llm.engine.runner._compile_s > 0  # the compiled graph ran
