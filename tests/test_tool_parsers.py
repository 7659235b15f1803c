"""Tool-call parsers: whole answers, and streams cut at every possible place add up to the same."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatscale.server.tools.parsers import ToolStream, parse, parser_for_template

CALL_A = '{"name": "get_weather", "arguments": {"city": "Paris", "nested": {"a": [1, 2]}}}'
CALL_B = '{"name": "get_time", "arguments": {"city": "Rome"}}'
HERMES = [
    f"<tool_call>\n{CALL_A}\n</tool_call>",
    f"Let me check. <tool_call>\n{CALL_A}\n</tool_call>\n<tool_call>\n{CALL_B}\n</tool_call>",
    "No call here, just < and <tool and a brace }.",
    "<tool_call>\nnot json\n</tool_call> then text",
    f"<tool_call>{CALL_B}</tool_call> and more text",
]
LLAMA = ['{"name": "get_time", "parameters": {"city": "Rome"}}',
         '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": "a;b"}}',
         "Plain answer {with braces}", '{"not": "a call"}']


def test_hermes_whole():
    content, calls = parse(HERMES[1], "hermes")
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "nested": {"a": [1, 2]}}), ("get_time", {"city": "Rome"})]
    assert calls[0].arguments == '{"city": "Paris", "nested": {"a": [1, 2]}}'  # the model's own text
    assert parse(HERMES[0], "hermes")[0] is None
    assert parse(HERMES[3], "hermes") == (HERMES[3], [])


def test_llama3_json_whole():
    assert [(c.name, c.arguments) for c in parse(LLAMA[0], "llama3_json")[1]] == [("get_time", '{"city": "Rome"}')]
    assert parse(LLAMA[2], "llama3_json") == (LLAMA[2], [])
    assert parse(LLAMA[3], "llama3_json") == (LLAMA[3], [])


def test_parser_from_template():
    assert parser_for_template(None) == "hermes"
    assert parser_for_template("{{ '<tool_call>' }}{{ tools }}") == "hermes"
    assert parser_for_template('{{ tools }} {"name": function name, "parameters": dictionary}') == "llama3_json"


def _stream(parser: str, text: str, cuts: list[int]) -> tuple[str, dict[int, list]]:
    s, content, calls = ToolStream(parser), "", {}
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for i, piece in enumerate(pieces):
        c, deltas = s.feed(piece, final=i == len(pieces) - 1)
        content += c
        for d in deltas:
            if d.index not in calls:
                assert d.id and d.name, "a call's first delta has its id and name"
                calls[d.index] = [d.name, ""]
            calls[d.index][1] += d.arguments
    return content, calls


@pytest.mark.parametrize("parser, text", [("hermes", t) for t in HERMES] + [("llama3_json", t) for t in LLAMA])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_streams_add_up_to_the_whole_answer(parser, text, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=12))))
    content, calls = _stream(parser, text, cuts)
    want_content, want_calls = parse(text, parser)
    assert [tuple(v) for v in calls.values()] == [(c.name, c.arguments) for c in want_calls]
    assert content.strip() == (want_content or "").strip()
