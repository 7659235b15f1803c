"""The official `openai` client against a real uvicorn server: what users and tools will run."""

from __future__ import annotations

import re

import openai
import pytest
from server_utils import MODEL, api, running

USER = [{"role": "user", "content": "Why does batching matter?"}]
KEY = "sk-test"


@pytest.fixture(scope="module")
def url(server_engine):
    with running(api(server_engine, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=8,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_with_usage_and_n(client):
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, n=3, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_differ_and_seed_reproduces(client):
    def ask(seed: int, n: int = 2) -> list[str]:
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, n=n, seed=seed,
                                           temperature=1.0, extra_body={"ignore_eos": True})
        return [c.message.content for c in r.choices]

    first = ask(1234)
    assert len(first) == 2 and first[0] != first[1]
    assert ask(1234) == first
    assert ask(4321) != first
    assert ask(2**62, n=1) == ask(2**62, n=1)  # any int64 seed works


def test_stop_ends_the_answer_before_the_stop_string(client):
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = re.search(r"[A-Za-z]{2}", full[4:]).group()  # the random model's text is fixed: it has one
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=40, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[:full.index(stop)]


def test_completions_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="The KV cache", max_tokens=6, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 6 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    stream = client.completions.create(model=MODEL, prompt="The KV cache", max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"999999": 10}}, "logit_bias"),
    ({"max_tokens": 100_000}, "messages"),
    ({"messages": []}, "messages"),
])
def test_bad_requests_raise_bad_request_error(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**{"model": MODEL, "messages": USER, **kwargs})
    assert exc.value.status_code == 400 and exc.value.param == param


def test_context_length_error_code(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="hello " * 100, max_tokens=500)
    assert exc.value.code == "context_length_exceeded" and "maximum context length is 512" in exc.value.message


def test_unknown_model_and_wrong_key(client, url):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert exc.value.code == "model_not_found"
    assert [m.id for m in client.models.list()] == [MODEL]
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        stranger.models.list()
    assert exc.value.code == "invalid_api_key"


def test_over_capacity_raises_rate_limit_error(server_engine):
    with running(api(server_engine, max_concurrent_sequences=1)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=400, stream=True,
                                                extra_body={"ignore_eos": True})
        next(iter(stream))  # the first request holds the only slot while it streams
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        assert exc.value.code == "rate_limit_exceeded" and exc.value.response.headers["retry-after"] == "1"
        assert exc.value.body["type"] == "requests"
        stream.close()
