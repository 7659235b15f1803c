"""Tool calling and structured outputs through the HTTP API, with the official openai client, on a
tiny random model (the protocol, not the model's knowledge: forced calls and grammars make its
output well-formed whatever its weights)."""

from __future__ import annotations

import json
import shutil
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_utils import MODEL, api, make_engine, running, sse_events

from chatscale.models.tokenizer import Tokenizer
from chatscale.server.tools.prompt import DEFAULT_TOOL_PROMPT

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIMER = {"type": "function", "function": {
    "name": "set_timer", "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1,
                                                                                      "maximum": 90}},
                                        "required": ["minutes"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server_engine(checkpoint):
    engine = make_engine(checkpoint("llama_long"), num_blocks=512)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(server_engine):
    with running(api(server_engine)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)


def _prompt_text(url: str, **body) -> str:
    ids = httpx.post(url + "/tokenize", json={"model": MODEL, **body}).json()["tokens"]
    return httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]


# ---- the prompt ---------------------------------------------------------------------------------
def test_tools_are_rendered_by_the_default_prompt_when_the_template_has_none(url):
    plain = _prompt_text(url, messages=ASK)
    with_tools = _prompt_text(url, messages=ASK, tools=[WEATHER, TIMER])
    assert "<tools>" not in plain
    assert DEFAULT_TOOL_PROMPT.split("\n")[0] in with_tools
    assert json.dumps({k: WEATHER["function"][k] for k in ("name", "description", "parameters")}) in with_tools


def test_history_with_tool_calls_and_results_is_rendered(url):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'}]
    text = _prompt_text(url, messages=history, tools=[WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temperature": 18}\n</tool_response>' in text


def test_a_template_that_renders_tools_gets_them_and_template_kwargs(checkpoint, tmp_path):
    path = tmp_path / "tool-template"
    shutil.copytree(checkpoint("llama_long"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if tools %}TOOLS={{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
        "{% if mood %}MOOD={{ mood }}\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>"
        "{% endfor %}{% endif %}\n{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    engine = make_engine(path)
    try:
        with running(api(engine)) as base:
            history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
            text = _prompt_text(base, messages=history, tools=[WEATHER, TIMER], chat_template_kwargs={"mood": "calm"})
            assert text.startswith("TOOLS=get_weather,set_timer\nMOOD=calm\n") and "<tools>" not in text
            # arguments reach the template as an object, as transformers passes them
            assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
    finally:
        engine.shutdown()


def test_continue_final_message_leaves_the_turn_open(client, server_engine):
    messages = ASK + [{"role": "assistant", "content": "The weather"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    tok: Tokenizer = server_engine.tokenizer
    want = tok.encode_text("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
                           "<|im_start|>assistant\nThe weather")
    assert r.usage.prompt_tokens == len(want)


# ---- forced calls -------------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", [False, True])
def test_required_always_yields_valid_calls(client, parallel):
    """A random model given the choice would add calls until max_tokens: with parallel calls every
    complete one is valid; without, each choice is exactly one call."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIMER], tool_choice="required",
                                       n=6, temperature=1.0, seed=3, max_tokens=200, parallel_tool_calls=parallel)
    for choice in r.choices:
        assert choice.message.tool_calls, choice
        assert choice.finish_reason == "tool_calls" or parallel and choice.finish_reason == "length", choice
        assert parallel or len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            tool = {"get_weather": WEATHER, "set_timer": TIMER}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
            assert call.id.startswith("call_") and call.type == "function"


def test_auto_calls_follow_their_schemas(client):
    """With "auto" the model may write text or calls; a call it writes is always valid (a random
    model, sampled: some choices call, some write text)."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIMER], n=12, temperature=1.0,
                                       seed=11, max_tokens=150, parallel_tool_calls=False)
    for choice in r.choices:
        for call in choice.message.tool_calls or []:
            tool = {"get_weather": WEATHER, "set_timer": TIMER}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        if not choice.message.tool_calls:
            assert not (choice.message.content or "").startswith("<")


def test_named_tool_and_no_parallel_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIMER], n=4, temperature=1.0,
                                       seed=5, max_tokens=200, parallel_tool_calls=False,
                                       tool_choice={"type": "function", "function": {"name": "set_timer"}})
    for choice in r.choices:
        assert [c.function.name for c in choice.message.tool_calls] == ["set_timer"]
        assert 1 <= json.loads(choice.message.tool_calls[0].function.arguments)["minutes"] <= 90


def test_streamed_tool_call_reassembles(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=200,
                  parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    first_deltas, finish = [], None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.index not in calls:
                first_deltas.append(d)
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
    assert all(d.id and d.function.name for d in first_deltas)  # the name comes first, with the id
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] == whole.function.name and calls[0]["arguments"] == whole.function.arguments
    json.loads(calls[0]["arguments"])


def test_tool_choice_none_renders_and_parses_nothing(client, url):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None
    assert r.usage.prompt_tokens == len(httpx.post(url + "/tokenize", json={"messages": ASK}).json()["tokens"])


# ---- structured outputs -------------------------------------------------------------------------
class Forecast(BaseModel):
    city: Literal["Paris", "Rome"]
    degrees: int = Field(ge=-20, le=45)
    rain: bool


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast, temperature=0,
                                      max_tokens=100)
    assert isinstance(r.choices[0].message.parsed, Forecast)


@pytest.mark.parametrize("extra, check", [
    ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": "(ab|cd){2}"}}, lambda t: t in {"abab", "abcd", "cdab", "cdcd"}),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ({"guided_grammar": 'root ::= "x" [0-9] "y"'}, lambda t: len(t) == 3 and t[0] == "x" and t[2] == "y"),
    ({"guided_json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                      "additionalProperties": False}}, lambda t: isinstance(json.loads(t)["ok"], bool)),
])
def test_vllm_constraints_on_both_endpoints(client, extra, check):
    chat = client.chat.completions.create(model=MODEL, messages=ASK, n=3, temperature=1.0, seed=1, max_tokens=60,
                                          extra_body=extra)
    text = client.completions.create(model=MODEL, prompt="Answer:", n=3, temperature=1.0, seed=2, max_tokens=60,
                                     extra_body=extra)
    for t in [c.message.content for c in chat.choices] + [c.text for c in text.choices]:
        assert check(t), (extra, t)


def test_structured_output_streams_and_mixes_with_free_requests(url):
    schema = {**Forecast.model_json_schema(), "additionalProperties": False}
    body = {"model": MODEL, "messages": ASK, "temperature": 1.0, "seed": 4, "max_tokens": 100, "n": 2, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": schema, "strict": True}}}
    with httpx.Client(timeout=60) as http:
        free = http.post(url + "/v1/chat/completions", json={**body, "response_format": None, "max_tokens": 20})
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            events = sse_events(r.iter_lines())
    texts = ["", ""]
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    for t in texts:
        Forecast.model_validate_json(t)
    assert free.status_code == 200


# ---- clear answers ------------------------------------------------------------------------------
@pytest.mark.parametrize("change, param, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "http://127.0.0.1/x.png"}}]}]},
     "messages.[0].content", ["image_url", "text only"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                {"type": "input_audio",
                                                 "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages.[0].content", ["input_audio", "text only"]),
    ({"response_format": {"type": "xml"}}, "response_format.type", ["json_schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema", ["uniqueItems"]),
    ({"guided_regex": "a(b"}, "guided_regex", ["regex"]),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", ["one"]),
    ({"tool_choice": "required"}, "tool_choice", ["tools"]),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", ["nope"]),
    ({"messages": ASK + [{"role": "assistant", "content": "x"}], "continue_final_message": True},
     "continue_final_message", ["add_generation_prompt"]),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", ["messages"]),
    ({"functions": [{"name": "f"}]}, "functions", ["tools"]),
    ({"modalities": ["text", "audio"]}, "modalities", ["text"]),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", ["not supported"]),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages.[1].tool_call_id", ["tool_call_id"]),
])
def test_unsupported_input_is_a_400_that_says_why(url, change, param, words):
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 3, **change})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert all(w in err["message"] for w in words), err["message"]


def test_completions_echo(client, url):
    r = client.completions.create(model=MODEL, prompt="The KV cache", echo=True, max_tokens=4, temperature=0)
    plain = client.completions.create(model=MODEL, prompt="The KV cache", max_tokens=4, temperature=0)
    assert r.choices[0].text == "The KV cache" + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The KV cache", echo=True, max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "echo"


def test_always_include_usage(server_engine):
    with running(api(server_engine, always_include_usage=True)) as base:
        with httpx.stream("POST", base + "/v1/chat/completions",
                          json={"model": MODEL, "messages": ASK, "max_tokens": 3, "stream": True}) as r:
            events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3
