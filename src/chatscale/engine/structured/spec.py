"""What a request wants its output to match, as plain data that crosses processes.

A `GrammarSpec` is a kind and a source text (a JSON Schema, a regex, choices, a Lark or GBNF
grammar), never a compiled object: the API server checks it (`check`), the engine compiles it in its
own process. Compiling to llguidance's grammar format happens here, in one place for both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal


Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")

# JSON as Python's json.dumps writes it (", " and ": ", no other whitespace): small models learned
# that style, and a fixed layout leaves no room for runaway whitespace.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The spec cannot be compiled; the message says why (an unsupported JSON Schema keyword is named)."""


@dataclass(frozen=True)
class GrammarSpec:
    """`source`: JSON Schema text (json_schema), ignored (json_object: any JSON object), a regex,
    a JSON list of strings (choice), or a Lark grammar; GBNF (`root ::= ...`) is converted."""

    kind: Kind
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict | bool) -> "GrammarSpec":
        return cls("json_schema", json.dumps(schema))  # key order kept: properties are written in it

    @classmethod
    def choice(cls, choices: list[str]) -> "GrammarSpec":
        return cls("choice", json.dumps(list(choices)))

    def to_llguidance(self) -> str:
        """llguidance's grammar text for this spec."""
        import llguidance  # imported where used: an engine serving no grammar never needs it

        if self.kind in ("json_schema", "json_object"):
            try:
                schema = json.loads(self.source) if self.kind == "json_schema" else {"type": "object"}
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("a JSON schema must be an object or a boolean")
            return llguidance.LLMatcher.grammar_from_json_schema(close_objects(schema), defaults=JSON_LAYOUT)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            choices = json.loads(self.source)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise GrammarError("choice must be a non-empty list of non-empty strings")
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        text = self.source
        if "::=" in text:  # GBNF, as llama.cpp and vLLM's EBNF examples write it
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                text = gbnf_to_lark(text)
            except Exception as exc:  # the converter raises plain exceptions on syntax errors
                raise GrammarError(f"the GBNF grammar does not parse: {exc}") from exc
        return llguidance.LLMatcher.grammar_from_lark(text)


OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def close_objects(schema):
    """The schema with every object that lists `properties` (and says nothing of other keys) taking
    only those, as OpenAI's strict mode requires. Outputs still validate against the original; the
    model cannot wander into keys nobody asked for (small models do, and never close them)."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: close_objects(v) for k, v in schema["properties"].items()}
        if not any(k in schema for k in OPEN_KEYS):
            out["additionalProperties"] = False
    return out


def check(spec: GrammarSpec) -> str:
    """The compiled grammar text, or GrammarError with llguidance's reason (no tokenizer needed:
    the API server calls this before a request reaches the engine)."""
    import llguidance

    grammar = spec.to_llguidance()
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(_explain(messages[0]))
    return grammar


def _explain(message: str) -> str:
    if message.startswith("Unimplemented keys"):
        keys = message.split(":", 1)[1].strip()
        return f"JSON Schema keyword(s) {keys} are not supported by the grammar engine (llguidance)"
    return message.strip()
