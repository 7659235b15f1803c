"""Engine steps -> request outputs, where the text is: detokenization and stop strings.

The engine core reports token ids only, and only the new ones of each step. This side keeps each
choice's tokens and text, detokenizes every token once (tokenizers.DecodeStream), and ends a choice
whose text reaches a stop string: its output stops there, and the returned `Abort` (with the tokens
to keep) tells the core to stop the sequence and keep its overshoot out of the prefix cache. Until
that abort lands the core may run a step or more past the stop; those tokens are dropped here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from chatscale.engine.detokenizer import IncrementalDetokenizer
from chatscale.engine.messages import Abort, SeqDelta, StepResult, TokenLogprobs
from chatscale.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from chatscale.engine.sampling_params import SamplingParams
from chatscale.models.tokenizer import Tokenizer


@dataclass(eq=False)
class _Choice:
    index: int
    detok: IncrementalDetokenizer
    want_logprobs: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0  # tokens already reported
    num_cached_tokens: int = 0


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    choices: list[_Choice]
    metrics: RequestMetrics
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            arrival_time: float | None = None) -> None:
        choices = [_Choice(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                                     params.include_stop_str_in_output, params.skip_special_tokens),
                           params.logprobs is not None)
                   for i in range(params.n)]
        self.requests[request_id] = _Request(request_id, prompt_token_ids, choices,
                                             RequestMetrics(arrival_time or time.monotonic()))

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, result: StepResult) -> tuple[list[RequestOutput], list[Abort]]:
        """This step's outputs (one per request it touched) and the choices stop strings ended."""
        now = result.stats.end_time if result.stats is not None else time.monotonic()
        touched: dict[str, _Request] = {}
        aborts: list[Abort] = []
        for request_id, message in result.errors.items():
            req = self.requests.get(request_id)
            if req is not None:
                req.error = message
                for choice in req.choices:
                    choice.finish_reason = choice.finish_reason or "error"
                touched[request_id] = req
        for delta in result.deltas:
            req = self.requests.get(delta.request_id)
            if req is None or req.error is not None:
                continue  # aborted here while the step ran, or failed
            abort = self._apply(req, req.choices[delta.index], delta, now)
            if abort is not None:
                aborts.append(abort)
            touched[req.request_id] = req
        return [self._output(req, now) for req in touched.values()], aborts

    def _apply(self, req: _Request, choice: _Choice, delta: SeqDelta, now: float) -> Abort | None:
        if choice.finish_reason is not None:
            return None  # a stop string ended it: this is overshoot
        m = req.metrics
        m.first_scheduled_time = m.first_scheduled_time or delta.first_scheduled_time
        choice.num_cached_tokens = delta.num_cached_tokens
        for i, token in enumerate(delta.token_ids):
            m.first_token_time = m.first_token_time or now
            choice.token_ids.append(token)
            if choice.want_logprobs and delta.logprobs is not None:
                choice.logprobs.append(delta.logprobs[i])
            choice.detok.add(token)
            if choice.detok.stopped_by is not None:
                choice.finish_reason, choice.stop_reason = "stop", choice.detok.stopped_by
                if delta.finish_reason is None:  # still running in the core
                    return Abort(req.request_id, choice.index, len(req.prompt_token_ids) + len(choice.token_ids))
                return None
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
        return None

    def _output(self, req: _Request, now: float) -> RequestOutput:
        outs = []
        for c in req.choices:
            new = c.token_ids[c.sent_tokens:]
            sent_before, c.sent_tokens = c.sent_tokens, len(c.token_ids)
            outs.append(CompletionOutput(
                index=c.index, text=c.detok.text, token_ids=c.token_ids,
                delta_text=c.detok.flush(c.finish_reason is not None), delta_token_ids=new,
                logprobs=c.logprobs if c.want_logprobs else None,
                delta_logprobs=c.logprobs[sent_before:] if c.want_logprobs else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        finished = req.finished
        if finished:
            req.metrics.finished_time = now
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, finished,
                             min(c.num_cached_tokens for c in req.choices), req.metrics, step_time=now,
                             error=req.error)
