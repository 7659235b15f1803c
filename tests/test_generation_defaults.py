"""Sampling defaults come from generation_config.json as transformers reads it: greedy unless the
checkpoint sets do_sample (a chat model without sampling defaults must not answer at temperature 1)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from chatscale.engine.llm import LLM
from chatscale.models.loader import GenerationDefaults


@pytest.mark.parametrize("config, sampling", [
    (None, {"temperature": 0.0}),  # no file at all
    ({"eos_token_id": 2}, {"temperature": 0.0}),
    ({"temperature": 0.6, "top_p": 0.9}, {"temperature": 0.0}),  # card values without do_sample: unused
    ({"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.1},
     {"temperature": 0.0, "repetition_penalty": 1.1}),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64},
     {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 64}),
    ({"do_sample": True}, {}),  # sampling at the engine's defaults (temperature 1)
])
def test_generation_config_is_read_as_transformers_reads_it(tmp_path, config, sampling):
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert GenerationDefaults.from_dir(tmp_path).sampling == sampling


def test_a_checkpoint_without_do_sample_answers_as_transformers_generate_does(checkpoint, tmp_path):
    """The same default generation as transformers' `generate` with the checkpoint's own config."""
    path = tmp_path / "model"
    shutil.copytree(checkpoint("llama"), path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "max_new_tokens": 12}))
    prompt = [5, 17, 42, 99, 7]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.generation_config = GenerationConfig.from_pretrained(path)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]))[0, len(prompt):].tolist()
    ours = [LLM(str(path), num_blocks=64, seed=seed).generate(prompt)[0].outputs[0].token_ids for seed in (0, 1)]
    assert ours == [expected, expected]  # greedy: no seed changes it
