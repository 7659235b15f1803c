"""Grammars that force tool calls: `tool_choice` "required" (one of the tools) or a named function.

The call's JSON follows the function's own parameters schema; the call's framing is the parser's
format (Hermes tags around each call, or a bare Llama-3.1 JSON object). With `parallel_tool_calls`
the Hermes grammar allows several calls in a row.
"""

from __future__ import annotations

import json
from typing import Any

from chatscale.engine.structured.spec import JSON_LAYOUT, GrammarSpec


def _call_schema(function: dict[str, Any], arguments_key: str) -> dict[str, Any]:
    params = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: params},
            "required": ["name", arguments_key], "additionalProperties": False}


def _calls_schema(functions: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    options = [_call_schema(f, arguments_key) for f in functions]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_LAYOUT}


def forced_calls(functions: list[dict[str, Any]], parser: str, parallel: bool) -> GrammarSpec:
    """A grammar whose every output is one call (or several, `parallel`, Hermes only) of `functions`."""
    if parser == "llama3_json":
        schema = _calls_schema(functions, "parameters")
        schema.pop("x-guidance")
        return GrammarSpec.json_schema(schema)
    call = json.dumps(_calls_schema(functions, "arguments"))
    repeat = ' ("\\n" call)*' if parallel else ""
    return GrammarSpec("grammar", f'start: call{repeat}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\n'
                                  f"body: %json {call}\n")
