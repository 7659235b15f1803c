"""Engine outputs in OpenAI's shapes: chat completions and text completions, whole or streamed.

Streams follow OpenAI's order: a role chunk per choice, content deltas, a chunk with each choice's
finish_reason, then (with `stream_options.include_usage`) a usage chunk with `choices: []`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import jinja2

from chatscale.engine.outputs import CompletionOutput, RequestOutput
from chatscale.models.tokenizer import Tokenizer
from chatscale.server.errors import APIError
from chatscale.server.generation import Generation
from chatscale.server.logprobs import chat_logprobs, completion_logprobs
from chatscale.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatMessage, Completion,
    CompletionChoice, Delta, Usage,
)
from chatscale.server.sse import event

Outputs = AsyncIterator[tuple[int, RequestOutput]]


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """The conversation rendered with the checkpoint's own chat template."""
    try:
        return tokenizer.encode_chat([m.for_template() for m in messages], add_generation_prompt)
    except (jinja2.TemplateError, ValueError) as exc:  # the template's raise_exception, or no template
        raise APIError(400, f"The chat template rejected these messages: {exc}", param="messages") from exc


async def collect(outputs: Outputs) -> dict[int, RequestOutput]:
    """The last (finished) output of each prompt, for a non-streamed answer."""
    finals: dict[int, RequestOutput] = {}
    async with aclosing(outputs):
        async for i, out in outputs:
            finals[i] = out
    return finals


def chat_completion(gen: Generation, finals: dict[int, RequestOutput], tokenizer: Tokenizer) -> ChatCompletion:
    choices = [ChatChoice(index=o.index, message=AssistantMessage(content=o.text),
                          logprobs=chat_logprobs(tokenizer, o.logprobs), finish_reason=o.finish_reason)
               for o in finals[0].outputs]
    return ChatCompletion(id=gen.id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage(finals))


async def _deltas(outputs: Outputs, finals: dict[int, RequestOutput]) -> AsyncIterator[tuple[int, CompletionOutput]]:
    """(prompt index, choice) whenever a choice has something to send; a finished choice is never
    sent again. Keeps each prompt's latest output in `finals`, for the usage chunk."""
    done: set[tuple[int, int]] = set()
    async with aclosing(outputs):  # closing the stream early aborts the engine requests
        async for i, out in outputs:
            finals[i] = out
            for o in out.outputs:
                if (i, o.index) not in done and (o.delta_text or o.delta_logprobs or o.finish_reason):
                    if o.finish_reason:
                        done.add((i, o.index))
                    yield i, o


async def chat_stream(gen: Generation, outputs: Outputs, tokenizer: Tokenizer, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return event(ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.model, choices=choices,
                                         usage=usage), include_usage)

    for index in range(gen.n):
        yield chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
    finals: dict[int, RequestOutput] = {}
    async with aclosing(_deltas(outputs, finals)) as deltas:
        async for _, o in deltas:
            yield chunk([ChatChunkChoice(index=o.index, delta=Delta(content=o.delta_text or None),
                                         logprobs=chat_logprobs(tokenizer, o.delta_logprobs),
                                         finish_reason=o.finish_reason)])
    if include_usage:
        yield chunk([], gen.usage(finals))


def text_completion(gen: Generation, finals: dict[int, RequestOutput], tokenizer: Tokenizer) -> Completion:
    choices = [CompletionChoice(index=i * gen.n + o.index, text=o.text,
                                logprobs=completion_logprobs(tokenizer, o.logprobs, 0)[0], finish_reason=o.finish_reason)
               for i, out in sorted(finals.items()) for o in out.outputs]
    return Completion(id=gen.id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage(finals))


async def text_stream(gen: Generation, outputs: Outputs, tokenizer: Tokenizer, include_usage: bool) -> AsyncIterator[str]:
    finals: dict[int, RequestOutput] = {}
    offsets: dict[int, int] = {}
    async with aclosing(_deltas(outputs, finals)) as deltas:
        async for i, o in deltas:
            index = i * gen.n + o.index
            logprobs, offsets[index] = completion_logprobs(tokenizer, o.delta_logprobs, offsets.get(index, 0))
            choice = CompletionChoice(index=index, text=o.delta_text, logprobs=logprobs, finish_reason=o.finish_reason)
            yield event(Completion(id=gen.id, created=gen.created, model=gen.model, choices=[choice]), include_usage)
    if include_usage:
        yield event(Completion(id=gen.id, created=gen.created, model=gen.model, choices=[], usage=gen.usage(finals)),
                    include_usage)
