"""One post-step bookkeeping for the engine and its simulator twin: both call
Scheduler.update_from_output, so the twin cannot drift from the engine."""

from __future__ import annotations

from chatscale.engine.config import EngineConfig
from chatscale.engine.engine import LLMEngine
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.scheduler import Scheduler
from chatscale.sim.cost import LinearStepCost
from chatscale.sim.twin import ReplicaTwin, TwinConfig


def test_engine_and_twin_share_the_post_step_update(checkpoint, monkeypatch):
    calls: list[Scheduler] = []
    real = Scheduler.update_from_output

    def counted(self, plan, sampled, started, now):
        calls.append(self)
        return real(self, plan, sampled, started, now)

    monkeypatch.setattr(Scheduler, "update_from_output", counted)
    engine = LLMEngine(EngineConfig(model=str(checkpoint("llama")), threads=1), num_blocks=32)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine_calls = len(calls)
    twin = ReplicaTwin(LinearStepCost([0.01, 0, 0, 0, 0, 0]), TwinConfig(num_blocks=32))
    twin.add(0, [5, 6, 7], 3, 0.0, answer_key=1)
    twin.run_until_idle(0.0)
    assert engine_calls == 3 and len(calls) - engine_calls == 3  # one prefill + two decodes, each
