"""The logits an engine's model computes for a whole prompt in one prefill step (no sampling)."""

from __future__ import annotations

import torch

from chatscale.engine.llm import LLM
from chatscale.engine.runner import Work
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.sequence import Sequence


def prefill_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] fp32 logits, through the engine's own runner and KV pages (freed after);
    under tensor parallelism, every rank's shard takes part."""
    seq = Sequence("r", prompt, SamplingParams(max_tokens=1))
    assert llm.engine.kv.allocate(seq, len(prompt))
    out = llm.engine.runner.run([Work(seq, 0, prompt, num_logits=len(prompt))])
    llm.engine.kv.free(seq)
    return out
