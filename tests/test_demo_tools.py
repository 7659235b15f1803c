"""The fine-tuned demo target as an agent would use it: it picks the tool that fits with the right
arguments (tool_choice "auto"), answers in text when none fits, uses a tool's result, and writes
JSON in JSON mode. The full 100-question held-out evaluation is slow (tools/demo_models/eval_tools.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest
from server_utils import api, make_engine, running

from chatscale.models.demo import demo_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "demo_models"))
import tool_data  # noqa: E402

T = tool_data.TOOLS


@pytest.fixture(scope="module")
def client():
    engine = make_engine(demo_model_path("target"), num_blocks=512)
    with running(api(engine)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    engine.shutdown()


def _ask(client, question: str, tools: list[dict], **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          tools=tools, temperature=0, max_tokens=120, **kwargs).choices[0]


@pytest.mark.parametrize("question, tools, call", [
    ("What's the weather in Lisbon?", ["get_time", "get_weather", "set_timer"], ("get_weather", {"city": "Lisbon"})),
    ("Convert 7 hours to minutes.", ["convert_units", "calculator"],
     ("convert_units", {"value": 7, "from_unit": "hours", "to_unit": "minutes"})),
    ("Set a timer for 25 minutes.", ["search_docs", "set_timer"], ("set_timer", {"minutes": 25})),
    ("What is the batch size on eu-2?", ["get_server_metric", "get_weather"],
     ("get_server_metric", {"server": "eu-2", "metric": "batch_size"})),
])
def test_auto_picks_the_right_tool_and_arguments(client, question, tools, call):
    choice = _ask(client, question, [T[n] for n in tools])
    assert choice.finish_reason == "tool_calls", choice.message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [call]


def test_no_fitting_tool_means_a_text_answer(client):
    choice = _ask(client, "What is a KV cache?", [T["get_weather"], T["set_timer"]])
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "KV cache" in choice.message.content


def test_a_tool_result_becomes_the_answer(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}
    messages = [{"role": "user", "content": "What's the weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1",
                 "content": json.dumps({"city": "Oslo", "temperature": 4, "unit": "celsius", "sky": "snowy"})}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[T["get_weather"]], temperature=0,
                                       max_tokens=60)
    assert r.choices[0].message.content == "It is 4 degrees Celsius and snowy in Oslo."


def test_json_mode_writes_an_object(client):
    r = client.chat.completions.create(model="tiny", temperature=0, max_tokens=80,
                                       messages=[{"role": "user", "content": "What is the capital of Peru?"}],
                                       response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content) == {"country": "Peru", "capital": "Lima"}


@pytest.mark.slow
def test_heldout_tool_questions():
    """The figure in docs/demo_models.md: >= 80% of 100 held-out questions right."""
    import eval_tools

    result = eval_tools.evaluate(str(demo_model_path("target")), 100)
    assert result["accuracy"] >= 0.8, result["accuracy"]
