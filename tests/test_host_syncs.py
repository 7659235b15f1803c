"""One host synchronisation per engine step: reading the sampled tokens back. Everything else a step
needs is built on the host (numpy) and sent to the device without waiting for it, so on a GPU the
step's kernels queue back to back. Counted with a TorchFunctionMode over a real step: every call that
makes the host wait for a device value (.tolist, .item, int/float/bool of a tensor, .cpu, .numpy,
and torch.tensor from a Python list, which blocks on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams

SYNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}


class CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS or (func is torch.tensor and isinstance(args[0], (list, tuple))):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch, backend", [("llama", "torch"), ("mixtral", "torch"), ("llama", "flex")])
def test_a_decode_step_syncs_once(checkpoint, arch, backend):
    llm = LLM(str(checkpoint(arch)), num_blocks=64, attention_backend=backend)
    engine = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)]
    for i, p in enumerate(params):
        engine.add_request([5 + i, 6, 7, 8, 9], p)
    engine.step()  # the prefill
    engine.step()  # the first decode (compiles the flex kernel)
    counter = CountSyncs()
    with counter:
        engine.step()
    assert engine.last_step.num_seqs == 3 and engine.last_step.num_prefill_tokens == 0
    assert counter.calls == ["tolist"], counter.calls
