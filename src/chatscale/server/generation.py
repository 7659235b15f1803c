"""One OpenAI generation request as engine requests: checked and tokenized before anything is
queued (so every bad input is a 400, never a broken stream), then one engine request per prompt,
each with `n` choices, their outputs merged as they arrive."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from chatscale.engine.async_engine import AsyncEngine
from chatscale.engine.errors import ContextLengthError
from chatscale.engine.outputs import CompletionOutput, RequestOutput
from chatscale.engine.sampling_params import SamplingParams
from chatscale.metrics import Metrics
from chatscale.server.errors import APIError
from chatscale.server.protocol import PromptTokensDetails, Usage

T = TypeVar("T")


@dataclass
class Generation:
    id: str
    created: int
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]  # one copy per prompt: the engine fills max_tokens in place
    cache_salt: str | None = None
    tool_parser: str | None = None  # chat with tools: the format calls are parsed from
    echo: list[str] | None = None  # completions with echo: each prompt's text, to lead its choices
    # time.monotonic() when the server took the request: TTFT and latency count from here, so the
    # time before the engine thread picks a request up is not hidden from them.
    arrival: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return self.params[0].n

    def echoed(self, prompt: int) -> str:
        return self.echo[prompt] if self.echo else ""

    def usage(self, finals: dict[int, RequestOutput]) -> Usage:
        """Usage of the outputs so far; the prompt counts once however many choices it has."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(out.num_generated_tokens for out in finals.values())
        cached = sum(out.num_cached_tokens for out in finals.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def prepare(engine: AsyncEngine, kind: str, model: str, prompts: list[str | list[int]],
            overrides: dict[str, Any], prompt_param: str, cache_salt: str | None = None) -> Generation:
    """Raise an OpenAI 400 for anything the engine would refuse; `kind` prefixes the id."""
    arrival = time.monotonic()
    core = engine
    params = core.default_sampling_params(**overrides)
    vocab = core.vocab_size
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
    if bad:  # the engine indexes logits with these while min_tokens holds them back
        raise APIError(400, f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})",
                       param="stop_token_ids")
    ids = [core.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    per_prompt = [replace(params) for _ in ids]
    for prompt_ids, p in zip(ids, per_prompt):
        try:
            core.check_request(prompt_ids, p, prompt_param)
        except ContextLengthError as exc:
            raise APIError(400, str(exc), param=prompt_param, code=exc.code) from exc
    return Generation(f"{kind}-{uuid.uuid4().hex}", int(time.time()), model, ids, per_prompt, cache_salt,
                      arrival=arrival)


async def outputs(engine: AsyncEngine, gen: Generation, metrics: Metrics,
                  cut: asyncio.Event | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every engine output of `gen`, tagged with its prompt's index. Closing this iterator (a
    disconnect, a cancelled task) aborts every engine request behind it. When `cut` is set (the
    drain timeout ran out) they are aborted too, and every unfinished choice ends with
    finish_reason "abort" (as vLLM's do), so the client gets a complete answer rather than a reset."""
    streams = [engine.generate(ids, p, f"{gen.id}-{i}", gen.cache_salt, gen.arrival, gen.id)
               for i, (ids, p) in enumerate(zip(gen.prompts, gen.params))]
    step_times: dict[int, float] = {}  # per prompt: its previous output's step time (inter-token latency)
    latest: dict[int, RequestOutput] = {}
    async with aclosing(merge(streams, until=cut)) as merged:
        async for i, out in merged:
            step_times[i] = metrics.observe_output(out, step_times.get(i), gen.arrival)
            latest[i] = out
            yield i, out
    for i in range(len(streams)):
        if i not in latest or not latest[i].finished:
            yield i, _aborted(gen, i, latest.get(i))


def _aborted(gen: Generation, i: int, last: RequestOutput | None) -> RequestOutput:
    """Prompt i's output as it stands, with each unfinished choice ended as "abort"."""
    before = {o.index: o for o in last.outputs} if last is not None else {}
    choices = []
    for index in range(gen.n):
        o = before.get(index) or CompletionOutput(index, "", [])
        choices.append(o if o.finished else CompletionOutput(index, o.text, o.token_ids, logprobs=o.logprobs,
                                                             finish_reason="abort"))
    return RequestOutput(f"{gen.id}-{i}", gen.prompts[i], choices, True,
                         last.num_cached_tokens if last is not None else 0)


async def merge(streams: list[AsyncIterator[T]], until: asyncio.Event | None = None) -> AsyncIterator[tuple[int, T]]:
    """Interleave async iterators as their items arrive, until they all end or `until` is set;
    closing the merge closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        async with aclosing(stream):
            async for item in stream:
                await queue.put((i, item))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    watchers = [asyncio.create_task(until.wait())] if until is not None else []
    for task in tasks + watchers:
        task.add_done_callback(queue.put_nowait)  # a pump's after its last item: pump puts in order
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item in watchers:
                return
            if isinstance(item, asyncio.Task):
                running -= 1
                if not item.cancelled() and item.exception() is not None:
                    raise item.exception()
                continue
            yield item
    finally:
        for task in tasks + watchers:
            task.cancel()
        await asyncio.gather(*tasks, *watchers, return_exceptions=True)
