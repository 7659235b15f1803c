"""The fields of an OpenAI generation request that the gateway reads itself, checked.

The gateway hashes the prompt for routing, counts tokens for TPM and may rewrite the messages, so
it must be able to read `messages`, `prompt`, `n`, `max_tokens` / `max_completion_tokens` and
`stream_options`: a body where one of them has a shape no OpenAI server accepts is a 400 here, named
as the server names it, never a 500. Everything else is forwarded untouched for the replica to judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


MAX_N = 128  # OpenAI's
# No model's context is longer; and the TPM reservation (prompt + max_tokens x n per prompt) stays
# an integer Redis can count (a 1e300 had been a 500 from its INCRBY).
MAX_TOKENS = 2**31 - 1


class Malformed(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Generation:
    body: dict
    prompt: str | list[int]  # what routing hashes: the rendered text, or the first prompt's token ids
    prompt_tokens: int | None  # exact for token ids; None: to be counted or estimated from `prompt`
    num_prompts: int
    n: int
    max_tokens: int | None  # None: the replica's default


def parse(data: bytes) -> Generation:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep to parse
        raise Malformed("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise Malformed("The body must be a JSON object.")
    return read(body)


def read(body: dict) -> Generation:
    """The fields the gateway uses, from a body parsed (or rewritten by a key policy) already."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise Malformed("Invalid value for 'stream_options': an object is required.", "stream_options")
    n = _integer(body, "n", MAX_N) or 1
    max_tokens = _integer(body, "max_completion_tokens", MAX_TOKENS) or _integer(body, "max_tokens", MAX_TOKENS)
    if "messages" in body:
        return Generation(body, _conversation(body["messages"]), None, 1, n, max_tokens)
    prompts = _prompts(body.get("prompt", ""))
    if isinstance(prompts[0], str):
        return Generation(body, "\n".join(prompts), None, len(prompts), n, max_tokens)
    return Generation(body, prompts[0], sum(len(p) for p in prompts), len(prompts), n, max_tokens)


def _integer(body: dict, name: str, most: int) -> int | None:
    value = body.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema's integers include 4.0
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most):
        raise Malformed(f"Invalid value for '{name}': an integer from 1 to {most} is required.", name)
    return value


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"Invalid value for '{param}': a string is required.", param)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise Malformed(f"Invalid value for '{param}': a lone UTF-16 surrogate is not valid Unicode text.",
                        param) from None
    return value


def _conversation(messages: Any) -> str:
    """The messages as one text (role, then content, per message) for prefix hashing."""
    if not isinstance(messages, list):
        raise Malformed("Invalid value for 'messages': an array is required.", "messages")
    parts = []
    for i, m in enumerate(messages):
        where = f"messages.[{i}]"
        if not isinstance(m, dict):
            raise Malformed(f"Invalid value for '{where}': an object is required.", where)
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(_text(p.get("text", "") if isinstance(p, dict) else p, f"{where}.content.[{j}].text")
                              for j, p in enumerate(content))
        elif content is not None:
            content = _text(content, f"{where}.content")
        parts.append(f"{_text(m.get('role', ''), f'{where}.role')}\n{content or ''}\n")
    return "".join(parts)


def _prompts(prompt: Any) -> list[str] | list[list[int]]:
    """A completion's prompt as OpenAI takes it: a text, texts, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [_text(prompt, "prompt")]
    if not isinstance(prompt, list):
        raise Malformed("Invalid value for 'prompt': a string, an array of strings or of token ids is required.",
                        "prompt")
    if all(_is_token(t) for t in prompt):  # [] too: the replica says it is empty
        return [prompt]
    if isinstance(prompt[0], list):
        for i, ids in enumerate(prompt):
            if not isinstance(ids, list) or not all(_is_token(t) for t in ids):
                raise Malformed(f"Invalid value for 'prompt.[{i}]': an array of token ids is required.",
                                f"prompt.[{i}]")
        return prompt
    return [_text(p, f"prompt.[{i}]") for i, p in enumerate(prompt)]


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) or isinstance(t, float) and t.is_integer()
