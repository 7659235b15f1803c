"""Offline API: `LLM(path).generate(prompts, params)`, `LLM.chat(messages)` and `LLM.stream(...)`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from chatscale.engine.config import EngineConfig
from chatscale.engine.engine import LLMEngine
from chatscale.engine.outputs import RequestOutput
from chatscale.engine.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """Batch generation over the continuous-batching engine: all prompts are queued at once.

    Without SamplingParams a request takes the checkpoint's generation_config.json defaults
    (GenerationDefaults: greedy unless it sets do_sample; its max_new_tokens, else 16 tokens)."""

    def __init__(self, model: str = "", num_blocks: int | None = None, **config: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **config), num_blocks=num_blocks)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params or self.engine.default_sampling_params()] * len(prompts)
        ids = [self.engine.add_request(p, replace(sp)) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        """Stop the engine's other processes (tensor-parallel ranks); the object is unusable after."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def chat_prompt(self, messages: Messages) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None) -> list[RequestOutput]:
        """One answer per conversation, with the checkpoint's chat template applied."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.chat_prompt(m) for m in conversations], params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changed it; the last one is finished.

        Abandoning the iterator aborts the request and frees its pages."""
        request_id = self.engine.add_request(prompt, replace(params or self.engine.default_sampling_params()))
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(request_id)
