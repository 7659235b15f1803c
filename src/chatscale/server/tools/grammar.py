"""Grammars for tool calls: `tool_choice` "required" or a named function forces calls; "auto" lets
the model write text or calls, and any call it writes follows its function's schema.

A call's JSON follows the function's own parameters schema (objects closed to their listed
properties, as OpenAI's strict mode); its framing is the parser's format (Hermes tags around each
call, or a bare Llama-3.1 JSON object). With `parallel_tool_calls` the Hermes grammar allows several
calls in a row.
"""

from __future__ import annotations

import json
from typing import Any

from chatscale.engine.structured.spec import JSON_LAYOUT, GrammarSpec, close_objects


def _call_schema(function: dict[str, Any], arguments_key: str) -> dict[str, Any]:
    params = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: params},
            "required": ["name", arguments_key], "additionalProperties": False}


def _calls_schema(functions: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    options = [_call_schema(f, arguments_key) for f in functions]
    schema = close_objects(options[0] if len(options) == 1 else {"anyOf": options})
    return {**schema, "x-guidance": JSON_LAYOUT}


def tool_grammar(functions: list[dict[str, Any]], parser: str, parallel: bool, forced: bool) -> GrammarSpec:
    """Calls of `functions` (several in a row with `parallel`, Hermes only); unless `forced`, text
    that does not begin like a call is allowed instead."""
    if parser == "llama3_json":
        call, text = "call", r"/(?s:[^{<].*)/"
        rules = f"call: %json {json.dumps(_calls_schema(functions, 'parameters'))}\n"
    else:
        call, text = 'call ("\\n" call)*' if parallel else "call", r"/(?s:[^<].*)/"
        rules = (f'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
                 f"body: %json {json.dumps(_calls_schema(functions, 'arguments'))}\n")
    start = f"start: {call}\n" if forced else f"start: {call} | TEXT |\nTEXT: {text}\n"
    return GrammarSpec("grammar", start + rules)
