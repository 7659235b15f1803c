"""Executors for fault and timing tests, plugged into the engine process with `--executor
fault_executors:Name` (the engine process imports them from the tests folder, as the server would
import any executor class by its path)."""

from __future__ import annotations

import time

from chatscale.engine.executor import InProcessExecutor, ModelOutput
from chatscale.engine.scheduler import SchedulerOutput

POISON = 13  # a prompt holding this token id makes every step that schedules it raise


class SlowExecutor(InProcessExecutor):
    """20 ms a step: requests queue, and a stream lasts seconds, not milliseconds."""

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        time.sleep(0.02)
        return super().execute(plan)


class PoisonedExecutor(InProcessExecutor):
    """A step raises, as a device error would, whenever it schedules a poisoned prompt."""

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        if any(POISON in seq.prompt_token_ids for seq, _ in plan.scheduled):
            raise RuntimeError("injected device error")
        time.sleep(0.01)
        return super().execute(plan)
