"""A request's structured-output fields as one GrammarSpec for the engine, checked here (400s).

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` and its older
`guided_*` fields, and `tool_choice` "required" or a named function (tools/grammar.py) all become a
GrammarSpec; at most one may be given. `check` compiles it without a tokenizer, so an invalid regex
or an unsupported JSON Schema keyword is refused with a 400 naming it before the engine sees it.
"""

from __future__ import annotations

import json
from typing import Any

from chatscale.engine.structured.spec import GrammarError, GrammarSpec, check
from chatscale.server.errors import APIError
from chatscale.server.protocol import ChatCompletionRequest, CompletionRequest, StructuredOutputs


def grammar_for(body: ChatCompletionRequest | CompletionRequest) -> GrammarSpec | None:
    """The one constraint the request asks for, checked; None for free text."""
    found: list[tuple[str, GrammarSpec]] = []
    if isinstance(body, ChatCompletionRequest) and body.response_format is not None:
        spec = _response_format(body)
        if spec is not None:
            found.append(("response_format" if spec.kind == "json_object" else "response_format.json_schema.schema",
                          spec))
    if body.structured_outputs is not None:
        found.append(_structured_outputs(body.structured_outputs))
    guided = {"guided_json": body.guided_json, "guided_regex": body.guided_regex,
              "guided_choice": body.guided_choice, "guided_grammar": body.guided_grammar}
    for name, value in guided.items():
        if value is not None:
            found.append((name, _guided(name, value)))
    if len(found) > 1:
        raise APIError(400, f"Send one structured-output constraint, not {len(found)} "
                            f"({', '.join(n for n, _ in found)}).", param=found[1][0])
    if not found:
        return None
    param, spec = found[0]
    try:
        check(spec)
    except GrammarError as exc:
        raise APIError(400, f"Invalid {param}: {exc}.", param=param) from exc
    return spec


def _schema_spec(schema: Any, param: str) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"Invalid {param}: the schema is not valid JSON ({exc}).", param=param) from exc
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"Invalid {param}: a JSON schema must be an object.", param=param)
    return GrammarSpec.json_schema(schema)


def _response_format(body: ChatCompletionRequest) -> GrammarSpec | None:
    fmt = body.response_format
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format of type json_schema needs json_schema.schema.",
                       param="response_format.json_schema")
    return _schema_spec(fmt.json_schema.schema_, "response_format.json_schema.schema")


def _structured_outputs(so: StructuredOutputs) -> tuple[str, GrammarSpec]:
    given = {k: v for k, v in so.model_dump(by_alias=True).items() if v not in (None, False)}
    if len(given) != 1:
        raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object.",
                       param="structured_outputs")
    (key, value), = given.items()
    param = f"structured_outputs.{key}"
    return param, GrammarSpec("json_object") if key == "json_object" else _guided(f"guided_{key}", value, param)


def _guided(name: str, value: Any, param: str | None = None) -> GrammarSpec:
    param = param or name
    if name == "guided_json":
        return _schema_spec(value, param)
    if name == "guided_choice":
        if not value or not all(value):
            raise APIError(400, f"Invalid {param}: give at least one non-empty choice.", param=param)
        return GrammarSpec.choice(value)
    return GrammarSpec("regex" if name == "guided_regex" else "grammar", value)


def unsupported_fields(body: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for OpenAI fields this server cannot honour, rather than silently ignoring them."""
    refused: dict[str, str] = {"guided_whitespace_pattern": "JSON is always written as json.dumps does"}
    if isinstance(body, ChatCompletionRequest):
        refused |= {"functions": "use `tools`", "function_call": "use `tool_choice`",
                    "audio": "this model reads and writes text only",
                    "prediction": "predicted outputs are not supported",
                    "web_search_options": "this server has no web search"}
        if body.modalities not in (None, ["text"]):
            raise APIError(400, "modalities: this model writes text only.", param="modalities")
    else:
        refused |= {"suffix": "this server does no fill-in-the-middle"}
    for name, why in refused.items():
        if getattr(body, name, None) is not None:
            raise APIError(400, f"{name} is not supported: {why}.", param=name)
