"""The HTTP API in-process (Starlette's TestClient): response shapes, streams, every error's
OpenAI shape and status, limits, the API key, loading/health, metrics and tokenize."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from fastapi.testclient import TestClient
from server_utils import MODEL, api, make_engine, running, sse_events, wait_until

USER = [{"role": "user", "content": "What is a KV cache?"}]
LONG = {"max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(server_engine):
    return TestClient(api(server_engine))


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})


def test_chat_completion_with_n_and_logprobs(client):
    r = chat(client, n=2, logprobs=True, top_logprobs=3, seed=7, **LONG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] == "length"
        content = choice["logprobs"]["content"]
        assert len(content) == 6
        for tok in content:
            assert tok["logprob"] <= 0 and len(tok["top_logprobs"]) == 3 and tok["bytes"]
            assert tok["top_logprobs"][0]["logprob"] >= tok["top_logprobs"][-1]["logprob"]
        # bytes, not the per-token strings, rebuild the text (tokens may split UTF-8 characters); a
        # character left incomplete at the end is in `bytes` but held back from the text
        joined = b"".join(bytes(t["bytes"]) for t in content).decode(errors="replace")
        assert joined.rstrip("\ufffd") == choice["message"]["content"].rstrip("\ufffd")
    usage = body["usage"]
    prompt = client.post("/tokenize", json={"messages": USER})
    assert usage["prompt_tokens"] == prompt.json()["count"]
    assert usage["completion_tokens"] == 12 and usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}


def test_chat_stream_matches_the_whole_answer(client):
    whole = chat(client, temperature=0, **LONG).json()
    with client.stream("POST", "/v1/chat/completions", json={"messages": USER, "temperature": 0, "stream": True,
                                                              "stream_options": {"include_usage": True}, **LONG}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]

    with client.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True, **LONG}) as r:
        plain = sse_events(r.iter_lines())
    assert all("usage" not in c for c in plain[:-1])


def test_completions_batch_of_prompts_streamed_and_not(client, server_engine):
    prompts = ["The KV cache", "Continuous batching"]
    body = {"prompt": prompts, "n": 2, "logprobs": 2, "temperature": 0, **LONG}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion"
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    for choice in whole["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    ids = [server_engine.tokenizer.encode(p) for p in prompts]
    assert whole["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert whole["usage"]["completion_tokens"] == 24
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in whole["choices"]]

    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    texts: dict[int, str] = {}
    for chunk in events[:-1]:
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}  # greedy: same text either way


def test_cached_prompt_pages_are_reported_and_salted(client):
    messages = [{"role": "user", "content": "The KV cache holds keys and values of every token. " * 3}]

    def cached(**extra) -> int:
        body = {"messages": messages, "max_tokens": 2, **extra}
        return client.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached() == 0
    assert cached() >= 64  # whole 16-token pages of the repeated prompt
    assert cached(cache_salt="tenant-a") == 0  # another salt shares nothing


ERRORS = [
    ({"messages": []}, 400, "messages", None),
    ({"messages": USER, "n": "2"}, 400, "n", None),
    ({"messages": USER, "n": 0}, 400, "n", None),
    ({"messages": USER, "n": 129}, 400, "n", None),
    ({"messages": USER, "temperature": 2.5}, 400, "temperature", None),
    ({"messages": USER, "top_p": 0}, 400, "top_p", None),
    ({"messages": USER, "top_p": 1.5}, 400, "top_p", None),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"messages": USER, "logit_bias": {"100000": 5}}, 400, "logit_bias", None),
    ({"messages": USER, "logit_bias": {"the": 5}}, 400, "logit_bias.the", None),
    ({"messages": USER, "logit_bias": {"1": 101}}, 400, "logit_bias.1", None),
    ({"messages": USER, "stop_token_ids": [100000], "min_tokens": 2}, 400, "stop_token_ids", None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.[0].role", None),
    ({"messages": USER, "max_tokens": 10_000}, 400, "messages", "context_length_exceeded"),
    ({"messages": USER, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({}, 400, "messages", "missing_required_parameter"),
    ({"messages": USER, "temprature": 0.5}, 400, "temprature", "unknown_parameter"),  # a typo is not ignored
    ({"messages": USER, "stream": True, "stream_options": {"usage": True}}, 400, "stream_options.usage",
     "unknown_parameter"),
]


@pytest.mark.parametrize("body,status,param,code", ERRORS)
def test_chat_errors_have_openai_shape(client, body, status, param, code):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_a_response_message_echoed_into_the_history_is_accepted(client):
    """The openai client's message objects carry refusal/annotations/audio/function_call; agents append
    them to the history as they are, so those (null, or citations) must not be unknown fields."""
    first = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4}).json()
    echoed = first["choices"][0]["message"] | {"refusal": None, "annotations": [], "audio": None,
                                               "function_call": None}
    body = {"messages": USER + [echoed, {"role": "user", "content": "more"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_context_length_error_uses_openai_wording(client):
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 600})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert error["message"].startswith("This model's maximum context length is 512 tokens. However, you requested")


def test_malformed_requests(client):
    r = client.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": [], "max_tokens": 2}).status_code == 400
    for body in (b'{"prompt": "a\xffb"}', b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"):  # not UTF-8; deep
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/v1/completions", json={"prompt": [1, 10**6]}).json()["error"]["param"] == "prompt"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/nothing)"
    assert client.get("/v1/chat/completions").json()["error"]["type"] == "invalid_request_error"  # 405


def test_body_size_limit(server_engine):
    client = TestClient(api(server_engine, max_body_bytes=2000))
    big = {"messages": [{"role": "user", "content": "x" * 3000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = client.post("/v1/chat/completions", content=iter([b'{"messages": [', b" " * 3000, b"]}"]),
                          headers={"content-type": "application/json"})  # no Content-Length
    assert chunked.status_code == 413
    assert chat(client, **LONG).status_code == 200


def test_api_key_denies_every_path_but_health_and_the_chat_page(server_engine):
    client = TestClient(api(server_engine, api_key="sk-test"))
    assert client.get("/health").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "static/chat/main.js" in page.text
    for script in ("chat/main.js", "chat/markdown.js", "vendor/markdown-it.min.js", "vendor/purify.min.js"):
        assert client.get(f"/static/{script}").status_code == 200, script
    for path in ("/v1/models", "/metrics", "/openapi.json", "/v1/nothing"):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200


def test_health_while_loading_and_after_a_failed_load(checkpoint):
    release, loaded = threading.Event(), []

    def slow_loader():
        assert release.wait(10)
        loaded.append(make_engine(checkpoint("llama"), num_blocks=32))
        return loaded[0]

    with TestClient(api(slow_loader)) as client:
        assert client.get("/health").json() == {"status": "loading"}
        assert client.get("/health").status_code == 503
        r = chat(client, **LONG)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "server_loading"
        release.set()
        assert wait_until(lambda: client.get("/health").status_code == 200)
        assert chat(client, **LONG).status_code == 200
    assert loaded[0].process.poll() is not None  # the app shut down the engine process it started

    def broken():
        raise FileNotFoundError("no config.json")

    with TestClient(api(broken)) as client:
        assert wait_until(lambda: client.get("/health").json().get("status") == "failed")
        assert "no config.json" in client.get("/health").json()["error"]


def test_models_tokenize_detokenize(client, server_engine):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 512
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/gpt-4o").json()["error"]["code"] == "model_not_found"

    tok = client.post("/tokenize", json={"prompt": "Héllo wörld"}).json()
    tokenizer = server_engine.tokenizer
    assert tok["tokens"] == tokenizer.encode("Héllo wörld") and tok["count"] == len(tok["tokens"])
    assert client.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Héllo wörld"}
    chat_ids = client.post("/tokenize", json={"messages": USER}).json()["tokens"]
    assert chat_ids == tokenizer.encode_chat(USER)
    assert client.post("/tokenize", json={}).status_code == 400
    assert client.post("/detokenize", json={"tokens": [10**6]}).json()["error"]["param"] == "tokens"


def test_metrics_count_tokens_and_read_engine_load(server_engine):
    client = TestClient(api(server_engine))
    usage = chat(client, n=2, **LONG).json()["usage"]
    text = client.get("/metrics").text

    def value(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(f'chatscale:{name}{{model_name="{MODEL}"}}'))
        return float(line.split()[-1])

    assert value("prompt_tokens_total") == usage["prompt_tokens"]
    assert value("generation_tokens_total") == usage["completion_tokens"] == 12
    assert value("num_requests_running") == value("num_requests_waiting") == value("kv_cache_usage_perc") == 0


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                 "/detokenize"):
        assert path in spec["paths"], path
    chat_op = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "404", "429"} <= set(chat_op["responses"])


# JSON may escape a lone UTF-16 surrogate, which no UTF-8 text (so no tokenizer, no response) can hold.
LONE = "a\ud800b"
SURROGATE_FIELDS = [
    ("/v1/completions", {"prompt": LONE}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", LONE]}, "prompt.[1]"),
    ("/v1/completions", {"prompt": "hi", "stop": LONE}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["ok", LONE]}, "stop.[1]"),
    ("/v1/completions", {"prompt": "hi", "user": LONE}, "user"),
    ("/v1/completions", {"prompt": "hi", "model": LONE}, "model"),
    ("/v1/completions", {"prompt": "hi", "cache_salt": LONE}, "cache_salt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages.[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     "messages.[0].content.[0].text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": LONE}]}, "messages.[0].name"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {LONE: 1}}, "logit_bias."),
    ("/tokenize", {"prompt": LONE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, "messages.[0].content"),
    ("/detokenize", {"tokens": [1], "model": LONE}, "model"),
]


@pytest.mark.parametrize("path,body,param", SURROGATE_FIELDS)
def test_lone_surrogates_are_a_400_naming_the_field(client, path, body, param):
    r = client.post(path, content=json.dumps({"max_tokens": 2, **body}), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or param.endswith(".") and error["param"].startswith(param)  # a dict key


def test_a_lone_surrogate_leaves_the_connection_usable(server_engine):
    with running(api(server_engine)) as url:
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        bad = json.dumps({"prompt": LONE, "max_tokens": 2})  # json.dumps escapes it as \ud800
        conn.request("POST", "/v1/completions", bad, {"content-type": "application/json"})
        first = conn.getresponse()
        assert first.status == 400 and json.loads(first.read())["error"]["param"] == "prompt"
        sock = conn.sock
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}),
                     {"content-type": "application/json"})
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["choices"]
        assert conn.sock is sock  # the same keep-alive connection answered both
        conn.close()


VALIDATION = [  # each a 400 naming the field, as vLLM and OpenAI answer
    ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stream": False, "stream_options": {}}, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "system"}, *USER]}, "messages.[0].content"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4.5}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, -2]}, "prompt.[1]"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids.[0]"),
    ("/detokenize", {"tokens": [-1]}, "tokens.[0]"),
    ("/tokenize", {"prompt": "hi", "messages": USER}, "prompt"),
    ("/tokenize", {"prompt": None, "messages": USER}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", VALIDATION)
def test_validation_names_the_field(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_integral_floats_are_integers_as_the_schema_says(client):
    r = client.post("/v1/completions", json={"prompt": [1.0, 2.0], "max_tokens": 4.0, "min_tokens": 0.0, "n": 2.0,
                                             "ignore_eos": True, "stop_token_ids": [3.0], "seed": 7.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] == 8
    chat_r = chat(client, max_completion_tokens=3.0, logprobs=True, top_logprobs=2.0, ignore_eos=True)
    assert chat_r.status_code == 200 and chat_r.json()["usage"]["completion_tokens"] == 3
    assert client.post("/detokenize", json={"tokens": [1.0]}).status_code == 200
    assistant = [*USER, {"role": "assistant", "content": None}, {"role": "user", "content": "Go on."}]
    assert chat(client, messages=assistant, **LONG).status_code == 200  # an assistant turn may have no content


def test_schema_states_what_validation_enforces(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["TokenizeRequest"]["oneOf"] == [{"required": ["prompt"]}, {"required": ["messages"]}]
    assert schemas["TokenizeRequest"]["properties"]["prompt"]["type"] == "string"  # not nullable
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["minimum"] == 0
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "integer", "minimum": 0} in [p["items"] for p in prompt if p["type"] == "array"]
    assert schemas["CompletionRequest"]["properties"]["stop_token_ids"]["anyOf"][0]["items"]["minimum"] == 0


def test_context_length_error_names_the_prompt_of_a_text_completion(client):
    error = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 600}).json()["error"]
    assert "prompt" in error["message"] and "messages" not in error["message"]
    error = chat(client, max_tokens=600).json()["error"]
    assert "in the messages" in error["message"] and error["param"] == "messages"


def test_api_key_scheme_is_case_insensitive(server_engine):
    client = TestClient(api(server_engine, api_key="sk-test"))
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert client.get("/v1/models", headers={"Authorization": f"{scheme} sk-test"}).status_code == 200, scheme
    assert client.get("/v1/models", headers={"Authorization": "Basic sk-test"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "bearer sk-tes"}).status_code == 401
