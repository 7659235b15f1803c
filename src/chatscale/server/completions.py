"""Engine outputs in OpenAI's shapes: chat completions and text completions, whole or streamed.

Streams follow OpenAI's order: a role chunk per choice, content (and tool call) deltas, a chunk with
each choice's finish_reason, then (with `stream_options.include_usage`) a usage chunk with `choices: []`.
When tools were offered, calls are parsed out of the text (tools/parsers.py) into `tool_calls`, with
`finish_reason: "tool_calls"`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from chatscale.engine.outputs import CompletionOutput, RequestOutput
from chatscale.models.tokenizer import Tokenizer
from chatscale.server.generation import Generation
from chatscale.server.logprobs import chat_logprobs, completion_logprobs
from chatscale.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, Completion, CompletionChoice,
    Delta, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta, Usage,
)
from chatscale.server.sse import event
from chatscale.server.tools.parsers import ToolStream, parse

Outputs = AsyncIterator[tuple[int, RequestOutput]]


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


def _message(gen: Generation, text: str) -> tuple[AssistantMessage, bool]:
    if gen.tool_parser is None:
        return AssistantMessage(content=text), False
    content, calls = parse(text, gen.tool_parser)
    tool_calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return AssistantMessage(content=content, tool_calls=tool_calls or None), bool(calls)


async def collect(outputs: Outputs) -> dict[int, RequestOutput]:
    """The last (finished) output of each prompt, for a non-streamed answer."""
    finals: dict[int, RequestOutput] = {}
    async with aclosing(outputs):
        async for i, out in outputs:
            finals[i] = out
    return finals


def chat_completion(gen: Generation, finals: dict[int, RequestOutput], tokenizer: Tokenizer) -> ChatCompletion:
    choices = []
    for o in finals[0].outputs:
        message, called = _message(gen, o.text)
        choices.append(ChatChoice(index=o.index, message=message, logprobs=chat_logprobs(tokenizer, o.logprobs),
                                  finish_reason=_finish_reason(o.finish_reason, called)))
    return ChatCompletion(id=gen.id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage(finals))


async def _deltas(outputs: Outputs, finals: dict[int, RequestOutput]
                  ) -> AsyncIterator[tuple[int, list[CompletionOutput]]]:
    """(prompt index, its choices with something to send) per engine output; a finished choice is
    never sent again. Keeps each prompt's latest output in `finals`, for the usage chunk. One step's
    choices travel together so that their events leave in one write: at n=128 a write per choice
    made the event loop, not the engine, set the pace of every stream on the server."""
    done: set[tuple[int, int]] = set()
    async with aclosing(outputs):  # closing the stream early aborts the engine requests
        async for i, out in outputs:
            finals[i] = out
            ready = [o for o in out.outputs
                     if (i, o.index) not in done and (o.delta_text or o.delta_logprobs or o.finish_reason)]
            done.update((i, o.index) for o in ready if o.finish_reason)
            if ready:
                yield i, ready


async def chat_stream(gen: Generation, outputs: Outputs, tokenizer: Tokenizer,
                      include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return event(ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.model, choices=choices,
                                         usage=usage), include_usage)

    for index in range(gen.n):
        yield chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
    finals: dict[int, RequestOutput] = {}
    parsers = [ToolStream(gen.tool_parser) for _ in range(gen.n)] if gen.tool_parser else None
    async with aclosing(_deltas(outputs, finals)) as deltas:
        async for _, ready in deltas:
            events = []
            for o in ready:
                content, calls, called = o.delta_text, None, False
                if parsers is not None:
                    content, call_deltas = parsers[o.index].feed(o.delta_text, final=o.finish_reason is not None)
                    calls = [ToolCallDelta(index=d.index, id=d.id, type="function" if d.id else None,
                                           function=FunctionCallDelta(name=d.name, arguments=d.arguments
                                                                      if d.id is None else d.arguments or ""))
                             for d in call_deltas] or None
                    called = bool(parsers[o.index].calls)
                logprobs = chat_logprobs(tokenizer, o.delta_logprobs)
                if content or calls or logprobs or o.finish_reason:
                    events.append(chunk([ChatChunkChoice(
                        index=o.index, delta=Delta(content=content or None, tool_calls=calls), logprobs=logprobs,
                        finish_reason=_finish_reason(o.finish_reason, called))]))
            if events:
                yield "".join(events)
    if include_usage:
        yield chunk([], gen.usage(finals))


def text_completion(gen: Generation, finals: dict[int, RequestOutput], tokenizer: Tokenizer) -> Completion:
    choices = [CompletionChoice(index=i * gen.n + o.index, text=gen.echoed(i) + o.text,
                                logprobs=completion_logprobs(tokenizer, o.logprobs, 0)[0],
                                finish_reason=o.finish_reason)
               for i, out in sorted(finals.items()) for o in out.outputs]
    return Completion(id=gen.id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage(finals))


async def text_stream(gen: Generation, outputs: Outputs, tokenizer: Tokenizer,
                      include_usage: bool) -> AsyncIterator[str]:
    finals: dict[int, RequestOutput] = {}
    offsets: dict[int, int] = {}
    async with aclosing(_deltas(outputs, finals)) as deltas:
        async for i, ready in deltas:
            events = []
            for o in ready:
                index = i * gen.n + o.index
                echo = gen.echoed(i) if index not in offsets else ""  # the prompt leads a choice's first chunk
                logprobs, offsets[index] = completion_logprobs(tokenizer, o.delta_logprobs, offsets.get(index, 0))
                choice = CompletionChoice(index=index, text=echo + o.delta_text, logprobs=logprobs,
                                          finish_reason=o.finish_reason)
                events.append(event(Completion(id=gen.id, created=gen.created, model=gen.model, choices=[choice]),
                                    include_usage))
            yield "".join(events)
    if include_usage:
        yield event(Completion(id=gen.id, created=gen.created, model=gen.model, choices=[], usage=gen.usage(finals)),
                    include_usage)
