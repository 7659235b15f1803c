"""The shipped demo models run on chatscale's engine exactly as on transformers, the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatscale.engine.config import EngineConfig
from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams
from chatscale.models.demo import DEMO_MODELS, demo_model_path

QUESTIONS = ["What is a KV cache?", "Why does batching matter?", "What is 12 + 30?"]


def test_the_demo_target_is_the_default_model():
    assert EngineConfig().model == str(demo_model_path("target"))


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_engine_greedy_equals_transformers_on_demo_model(name):
    path = demo_model_path(name)
    llm = LLM(str(path), dtype="float32", num_blocks=256)
    prompts = [llm.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eos = sorted(llm.engine.eos_token_ids)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos[0])[0, len(prompt):].tolist()
        assert tokens == ref
