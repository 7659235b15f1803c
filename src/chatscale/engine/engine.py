"""LLMEngine: the engine core and the output processor in one process, for offline use and tests.

`add_request` tokenizes and validates, `step` runs one core step and turns its token deltas into
request outputs (text, stop strings); a choice a stop string ends is stopped in the core before the
next step, so nothing runs past it here. The server runs the same two halves in two processes
(engine/async_engine.py + engine/core_process.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from chatscale.engine.config import EngineConfig
from chatscale.engine.core import EngineCore
from chatscale.engine.messages import AddRequest, EngineSnapshot, StepStats
from chatscale.engine.output_processor import OutputProcessor
from chatscale.engine.outputs import RequestOutput
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.errors import InvalidRequestError
from chatscale.engine.validation import EngineFront
from chatscale.models.tokenizer import Tokenizer


class LLMEngine(EngineFront):
    def __init__(self, config: EngineConfig, num_blocks: int | None = None) -> None:
        self.config = config
        self.core = EngineCore(config, num_blocks)
        self.info = self.core.info()
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.outputs = OutputProcessor(self.tokenizer)
        # Called with every step's StepStats (metrics histograms, benchmarks).
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.total_scheduled_tokens = 0  # every token any step computed, prefill and decode
        self._ids = itertools.count()

    # The core's parts, for tests, benchmarks and the tier/metrics code that inspects them.
    @property
    def kv(self):
        return self.core.kv

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def model(self):
        return self.core.model

    @property
    def runner(self):
        return self.core.executor.runner

    def snapshot(self) -> EngineSnapshot:
        return self.core.snapshot()

    @property
    def last_step(self) -> StepStats:
        return self.core.last_step

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.core.eos_token_ids

    @property
    def spec_stats(self):
        return self.core.spec_stats

    @property
    def tier_report(self):
        return self.core.tier_report

    @property
    def model_path(self) -> Path:
        return Path(self.config.model)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.outputs.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(ids, params)
        now = time.monotonic()
        self.outputs.add(request_id, ids, params, now)
        self.core.add_request(AddRequest(request_id, ids, params, cache_salt, now))
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is (queued, prefilling, decoding) and free all its pages."""
        known = request_id in self.outputs.requests
        self.outputs.abort(request_id)
        self.core.abort(request_id)
        return known

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.requests)

    @property
    def num_running(self) -> int:
        return len(self.core.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.core.scheduler.waiting)

    # ---- the step loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        result = self.core.step()
        if result is None:
            return []
        if result.stats is not None:
            self.total_scheduled_tokens += result.stats.num_tokens
            for listener in self.step_listeners:
                listener(result.stats)
        outputs, aborts = self.outputs.process(result)
        for abort in aborts:
            self.core.abort(abort.request_id, abort.index, abort.keep_tokens)
        return outputs

    def shutdown(self) -> None:
        """Release what the executor holds beyond this process (tensor-parallel ranks)."""
        self.core.shutdown()
