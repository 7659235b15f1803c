"""Tools and tool-call history rendered into the prompt.

A checkpoint whose chat template mentions `tools` renders them itself (as transformers does: the
OpenAI tool objects as the `tools` variable, assistant `tool_calls` with their arguments as objects).
Many templates never mention tools (SmolLM2-135M-Instruct's is plain ChatML); for those the server
uses this module's default, Hermes-style: the tools in a system prompt, calls written as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results as `tool` messages wrapped in
`<tool_response>`. The demo models are trained on exactly this rendering (tools/demo_models/data.py),
and the `hermes` parser reads it back.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]

DEFAULT_TOOL_PROMPT = """You can call functions to answer the user. The functions, one JSON object per line:
<tools>
{tools}
</tools>
To call a function, reply with a <tool_call></tool_call> block holding a JSON object with the function's \
name and arguments, one block per call:
<tool_call>
{{"name": "function_name", "arguments": {{"argument_name": "value"}}}}
</tool_call>
If no function fits the question, answer in plain text."""


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tool_lines(tools: list[dict[str, Any]]) -> str:
    """One compact JSON line per function: name, description, parameters."""
    return "\n".join(json.dumps({k: v for k, v in t["function"].items() if k in ("name", "description", "parameters")})
                     for t in tools)


def call_text(name: str, arguments: Any) -> str:
    """One call as the default format writes it; `arguments` is an object or its JSON text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # history with broken arguments is rendered as it came
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def with_default_tools(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """`messages` (template-ready dicts) rewritten in the default format: the tools prompt joins
    the system message (or becomes one), assistant calls become text, tool results are wrapped."""
    out: list[Message] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if m["role"] == "assistant" and calls:
            text = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls)
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        elif m["role"] == "tool":
            m.pop("tool_call_id", None)
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
        out.append(m)
    if tools:
        prompt = DEFAULT_TOOL_PROMPT.format(tools=tool_lines(tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def for_tool_template(messages: list[Message]) -> list[Message]:
    """Messages for a template that renders tools itself: call arguments as objects (as HF expects)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_call_with_object_arguments(c) for c in calls]}
        out.append(m)
    return out


def _call_with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call["function"])
    try:
        fn["arguments"] = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
    except json.JSONDecodeError:
        pass
    return {**call, "function": fn}
