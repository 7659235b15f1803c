"""The gateway in front of real chatscale servers (tiny model, one torch thread each) on 127.0.0.1.

The replicas run in this process (three torch imports in three processes take over a minute on a
busy two-core machine); the replica-killing test runs last: it leaves the fleet one replica short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from server_utils import api, cli_server, free_port, make_engine, running, sse_events, wait_until

from chatscale.gateway.app import create_app
from chatscale.gateway.config import hash_key, parse

KEYS = {name: f"sk-{name}" for name in ("alice", "bob", "carol", "blocked", "cat", "single", "tokens")}


def key_entry(name: str, **extra) -> dict:
    return {"name": name, "sha256": hash_key(KEYS[name]), **extra}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


class Replica:
    """A real chatscale server (tiny model, one torch thread) in this process, which can crash:
    kill() aborts every open connection and stops listening, as a killed process looks on the wire."""

    def __init__(self, path: Path, engine_config: dict | None = None, **settings):
        self.engine = make_engine(path, **(engine_config or {}))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sock, self.url = sock, f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(api(self.engine, **settings), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.server.started, 20)

    def kill(self) -> None:
        loop = self.server.servers[0].get_loop() if self.server.servers else None
        if loop is not None:
            loop.call_soon_threadsafe(self._abort)
        self.server.should_exit = self.server.force_exit = True

    def _abort(self) -> None:
        for server in self.server.servers:
            server.close()
        for conn in list(self.server.server_state.connections):
            conn.transport.abort()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def replicas(checkpoint) -> Iterator[list[Replica]]:
    fleet = [Replica(checkpoint("llama")) for _ in range(3)]
    yield fleet
    for r in fleet:
        r.stop()


def fleet_config(urls: list[str], **extra) -> dict:
    return {"regions": {"local": {"replicas": [{"name": f"r{i}", "url": u} for i, u in enumerate(urls)]}},
            "scrape_interval": 0.2, "keys": [key_entry("alice"), key_entry("bob")], **extra}


@contextmanager
def gateway(cfg: dict, path: Path | None = None, **kwargs) -> Iterator[str]:
    app = create_app(parse(cfg), path, **kwargs)
    with running(app) as url:
        yield url


def chat(content: str, max_tokens: int = 8, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True, **extra}


QUESTION = "Tell me how the paged KV cache keeps every conversation's keys and values, page by page, please."


def test_proxies_whole_and_streamed_answers_with_request_ids(replicas, tmp_path):
    log = tmp_path / "requests.jsonl"
    with gateway(fleet_config([r.url for r in replicas]), request_log=log) as url:
        whole = httpx.post(f"{url}/v1/chat/completions", json=chat(QUESTION), headers={**auth("alice"),
                           "x-request-id": "req-42"}, timeout=30)
        assert whole.status_code == 200, whole.text
        assert whole.headers["x-request-id"] == "req-42" and whole.json()["usage"]["completion_tokens"] == 8
        with httpx.stream("POST", f"{url}/v1/completions", headers=auth("alice"), timeout=30, json={
                "model": "tiny", "prompt": "Hello", "max_tokens": 5, "ignore_eos": True, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{url}/v1/models", headers=auth("alice")).json()["data"][0]["id"] == "tiny"
        assert httpx.get(f"{url}/health").json()["replicas_up"] == 3
        metrics = httpx.get(f"{url}/metrics").text
        assert 'chatscale_gateway:routed_total{region="local",replica="r' in metrics
        assert "chatscale_gateway:score_term_count" in metrics
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["request_id"] for r in rows][0] == "req-42"
    assert rows[0]["output_tokens"] == 8 and rows[1]["output_tokens"] == 5 and rows[0]["status"] == 200


def test_turn_two_lands_on_turn_one_replica(replicas):
    with gateway(fleet_config([r.url for r in replicas])) as url, httpx.Client(timeout=30) as client:
        first_replica, histories = {}, {}
        for c in range(6):
            messages = [{"role": "user", "content": f"Conversation {c}. {QUESTION}"}]
            r = client.post(f"{url}/v1/chat/completions", headers=auth("alice"),
                            json={**chat(""), "messages": messages})
            first_replica[c] = r.headers["x-chatscale-replica"]
            histories[c] = [*messages, r.json()["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        assert len(set(first_replica.values())) == 3  # new conversations spread over the idle fleet
        for c, messages in histories.items():
            r = client.post(f"{url}/v1/chat/completions", headers=auth("alice"),
                            json={**chat(""), "messages": messages})
            assert r.headers["x-chatscale-replica"] == first_replica[c]


def test_keys_limits_and_policies(replicas, tmp_path):
    cfg = fleet_config([r.url for r in replicas])
    cfg["keys"] = [key_entry("alice", rpm=3), key_entry("blocked", policies=["block"]),
                   key_entry("cat", policies=[{"action": "rewrite"}]), key_entry("bob"),
                   key_entry("single", concurrency=1), key_entry("tokens", tpm=700)]
    with gateway(cfg) as url, httpx.Client(base_url=url, timeout=30) as client:
        post = lambda key, body: client.post("/v1/chat/completions", headers=auth(key) if key else {}, json=body)
        assert post(None, chat("hi")).status_code == 401
        assert client.post("/v1/chat/completions", json=chat("hi"),
                           headers={"Authorization": "Bearer sk-nobody"}).status_code == 401
        assert post("blocked", chat("hi")).status_code == 403
        answers = [post("alice", chat("hi")) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
        refused = answers[3]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-chatscale-reject-reason"] == "rpm"
        plain = post("bob", chat(QUESTION)).json()["usage"]["prompt_tokens"]
        as_cat = post("cat", chat(QUESTION)).json()["usage"]["prompt_tokens"]
        assert as_cat > plain + 10  # the system message reached the replica
        # TPM reserves prompt + max_tokens and settles to what was used: 250 reserved, ~30 used each.
        stop_now = chat("hi", max_tokens=250, ignore_eos=False, stop_token_ids=list(range(300)))
        assert [post("tokens", stop_now).status_code for _ in range(4)] == [200] * 4
        too_big = post("tokens", chat("hi", max_tokens=800))
        assert too_big.status_code == 429 and too_big.headers["x-chatscale-reject-reason"] == "tpm"

        async def two_at_once() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as ac:
                async with ac.stream("POST", "/v1/chat/completions", headers=auth("single"),
                                     json=chat("hi", 400, stream=True)) as first:
                    lines = first.aiter_lines()  # kept: dropping the iterator drops the connection
                    await anext(lines)
                    second = await ac.post("/v1/chat/completions", headers=auth("single"), json=chat("hi"))
                    return [first.status_code, second.status_code]

        assert asyncio.run(two_at_once()) == [200, 429]
        # The slot comes back once the gateway sees the first client hang up (asynchronously).
        deadline = time.monotonic() + 10
        while (again := post("single", chat("hi"))).status_code == 429 and time.monotonic() < deadline:
            assert again.headers["x-chatscale-reject-reason"] == "concurrency"
            time.sleep(0.1)
        assert again.status_code == 200


def test_config_reload_and_dns_replicas(replicas, tmp_path):
    port = int(replicas[0].url.rsplit(":", 1)[1])
    path = tmp_path / "fleet.yaml"
    cfg = {"regions": {"k8s": {"dns": [{"host": "localhost", "port": port}]}}, "scrape_interval": 0.1,
           "keys": [key_entry("alice")]}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    with gateway(cfg, path) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=chat("hi"), headers=auth("alice"),
                          timeout=30).headers["x-chatscale-replica"] == "localhost/127.0.0.1"
        assert httpx.post(f"{url}/v1/chat/completions", json=chat("hi"), headers=auth("bob")).status_code == 401
        cfg["keys"].append(key_entry("bob"))
        time.sleep(0.05)  # a new mtime even on coarse clocks
        path.write_text(json.dumps(cfg))
        assert wait_until(lambda: httpx.post(f"{url}/v1/chat/completions", json=chat("hi"), headers=auth("bob"),
                                             timeout=30).status_code == 200, 5)


DEEP = b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
MALFORMED = [  # what the gateway reads itself (prompt, messages, n, max_tokens, stream_options) must not 500
    ("/v1/chat/completions", b'{"messages": 5}', "messages"),
    ("/v1/chat/completions", b'{"messages": [5]}', "messages.[0]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "messages.[0].content.[0].text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.[0].content"),
    ("/v1/completions", b'{"prompt": ["a", 1]}', "prompt.[1]"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"prompt": {"a": 1}}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "n": "2"}', "n"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2.5}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "n": 129}', "n"),
    ("/v1/completions", b'{"prompt": "hi", "stream": true, "stream_options": 3}', "stream_options"),
    ("/v1/completions", DEEP, None),
    ("/v1/completions", b'{"prompt": "a\xffb"}', None),  # not UTF-8
    ("/v1/completions", b"[1]", None),
]


@pytest.mark.parametrize("path,body,param", MALFORMED)
def test_malformed_bodies_are_openai_shaped_400s(replicas, path, body, param):
    cfg = fleet_config([r.url for r in replicas])
    cfg["keys"].append(key_entry("cat", policies=[{"action": "rewrite"}]))
    with gateway(cfg) as url:
        for key in ("alice", "cat"):  # the rewrite policy reads the messages too
            r = httpx.post(f"{url}{path}", content=body, timeout=30,
                           headers={**auth(key), "content-type": "application/json"})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
            assert error["param"] == param


def test_valid_bodies_the_gateway_does_not_model_are_forwarded(replicas):
    with gateway(fleet_config([r.url for r in replicas])) as url, httpx.Client(base_url=url, timeout=30) as c:
        batch = c.post("/v1/completions", headers=auth("alice"),  # a batch of token-id prompts
                       json={"model": "tiny", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2, "n": 2.0})
        assert batch.status_code == 200, batch.text
        assert len(batch.json()["choices"]) == 4
        lone = c.post("/v1/chat/completions", headers={**auth("alice"), "content-type": "application/json"},
                      content=json.dumps(chat("hi", stop="\ud800")))  # a field only the replica reads
        assert lone.status_code == 400 and lone.json()["error"]["param"] == "stop"


def test_request_bodies_are_bounded(replicas):
    cfg = fleet_config([r.url for r in replicas], max_body_bytes=100_000, body_timeout=1.0)
    big = json.dumps(chat("x" * 200_000)).encode()
    with gateway(cfg) as url:
        for headers in ({}, {"transfer-encoding": "chunked"}):  # declared, and not
            content = big if not headers else iter([big[i:i + 65536] for i in range(0, len(big), 65536)])
            r = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=30,
                           headers={**auth("alice"), "content-type": "application/json", **headers})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                         b"Authorization: Bearer " + KEYS["alice"].encode() + b"\r\n\r\n{")
            slow.settimeout(10)
            assert slow.recv(4096).startswith(b"HTTP/1.1 408")
        assert httpx.post(f"{url}/v1/chat/completions", json=chat("hi"), headers=auth("alice"),
                          timeout=30).status_code == 200


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        assert wait_until(lambda: _pings(client), 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(client) -> bool:
    import redis

    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_two_gateways_share_limits_and_affinity_through_redis(replicas, redis_url):
    cfg = fleet_config([r.url for r in replicas])
    cfg["keys"] = [key_entry("alice", rpm=6), key_entry("bob")]
    with gateway(cfg, redis_url=redis_url) as one, gateway(cfg, redis_url=redis_url) as two:
        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as ac:
                answers = await asyncio.gather(*(ac.post(f"{(one, two)[i % 2]}/v1/chat/completions",
                                                         headers=auth("alice"), json=chat("hi")) for i in range(12)))
            return [a.status_code for a in answers]

        codes = asyncio.run(burst())
        assert codes.count(200) == 6 and codes.count(429) == 6  # atomic across both gateways
        huge = httpx.post(f"{one}/v1/chat/completions", headers=auth("bob"), json=chat("hi", 1e300), timeout=30)
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "max_tokens"  # was a 500 from Redis
        for c in range(3):
            messages = [{"role": "user", "content": f"Shared conversation {c}. {QUESTION}"}]
            r1 = httpx.post(f"{one}/v1/chat/completions", headers=auth("bob"), timeout=30,
                            json={**chat(""), "messages": messages})
            messages += [r1.json()["choices"][0]["message"], {"role": "user", "content": "More."}]
            r2 = httpx.post(f"{two}/v1/chat/completions", headers=auth("bob"), timeout=30,
                            json={**chat(""), "messages": messages})
            assert r2.headers["x-chatscale-replica"] == r1.headers["x-chatscale-replica"]


@pytest.fixture
def slow_replica(checkpoint) -> Iterator[Replica]:
    """A real server whose every step takes 20 ms more: a stream of 400 tokens lasts 8 s or more."""
    replica = Replica(checkpoint("llama"), engine_config={"executor": "fault_executors:SlowExecutor"})
    yield replica
    replica.stop()


def test_a_killed_gateway_gives_its_concurrency_slots_back(slow_replica, redis_url, tmp_path):
    """Two gateways on one Redis; the key may hold 2 requests. One gateway holds both, and is killed -9:
    within the lease (1 s here) the other admits the key again, where it had refused it for an hour."""
    cfg = fleet_config([slow_replica.url], concurrency_lease=1.0)
    cfg["keys"] = [key_entry("single", concurrency=2)]
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps(cfg))
    proc, doomed = cli_server(["gateway", "--config", str(path), "--redis-url", redis_url], timeout=30)
    try:
        with gateway(cfg, redis_url=redis_url) as survivor, httpx.Client(timeout=60) as client:
            streams = [client.stream("POST", f"{doomed}/v1/chat/completions", headers=auth("single"),
                                     json=chat("hi", 400, stream=True)) for _ in range(2)]
            lines = [s.__enter__().iter_lines() for s in streams]  # kept: dropping one drops its connection
            assert all(next(one).startswith("data: ") for one in lines)
            refused = client.post(f"{survivor}/v1/chat/completions", headers=auth("single"), json=chat("hi", 2))
            assert refused.status_code == 429 and refused.headers["x-chatscale-reject-reason"] == "concurrency"
            time.sleep(3)  # three lease periods: the living gateway renews its leases
            again = client.post(f"{survivor}/v1/chat/completions", headers=auth("single"), json=chat("hi", 2))
            assert again.status_code == 429
            proc.kill()
            proc.wait(10)
            killed = time.monotonic()
            assert wait_until(lambda: client.post(f"{survivor}/v1/chat/completions", headers=auth("single"),
                                                  json=chat("hi", 2)).status_code == 200, 10)
            assert time.monotonic() - killed < 4  # the lease (1 s), its pruning and one request
            for s in streams:
                with contextlib.suppress(httpx.HTTPError):
                    s.__exit__(None, None, None)
    finally:
        proc.kill()


def test_overload_five_times_queues_fairly_and_says_at_capacity(replicas):
    """Capacity 6 (3 replicas x 2 outstanding); alice runs 20 clients, bob 10: 5x the fleet. Both
    keys sit in one band, so each gets half of what is served, whatever their demand."""
    cfg = fleet_config([r.url for r in replicas], admission={
        "max_queue": 6, "max_wait": 3, "saturation": {"outstanding": 2, "kv_usage": 0.9}})
    served, refusals, others = {"alice": 0, "bob": 0}, [], []

    async def client_loop(ac: httpx.AsyncClient, url: str, key: str, until: float) -> None:
        while time.monotonic() < until:
            r = await ac.post(f"{url}/v1/chat/completions", headers=auth(key), json=chat("hi", 6))
            if r.status_code == 200:
                served[key] += 1
            elif r.status_code == 429:
                refusals.append((r.headers.get("retry-after"), r.json()["error"]["message"]))
                await asyncio.sleep(0.05)
            else:
                others.append(r.status_code)

    async def overload(url: str) -> None:
        until = time.monotonic() + 10
        async with httpx.AsyncClient(timeout=60) as ac:
            await asyncio.gather(*(client_loop(ac, url, "alice" if i < 20 else "bob", until) for i in range(30)))

    with gateway(cfg) as url:
        asyncio.run(overload(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert not others, f"statuses other than 200/429: {others}"
    assert refusals and all(ra is not None and int(ra) >= 1 and "at capacity" in msg for ra, msg in refusals)
    assert "chatscale_gateway:queued_total" in metrics
    a, b = served["alice"], served["bob"]
    assert min(a, b) > 20 and abs(a - b) / max(a, b) <= 0.10, served


def test_replicas_that_require_an_api_key(checkpoint, monkeypatch):
    """Each replica's own key, from fleet.yaml or (kept out of the file) an environment variable."""
    locked = [Replica(checkpoint("llama"), api_key=f"sk-replica-{i}") for i in range(2)]
    try:
        assert httpx.post(f"{locked[0].url}/v1/chat/completions", json=chat("hi")).status_code == 401
        monkeypatch.setenv("REPLICA_1_KEY", "sk-replica-1")
        cfg = {"regions": {"local": {"replicas": [
            {"name": "r0", "url": locked[0].url, "api_key": "sk-replica-0"},
            {"name": "r1", "url": locked[1].url, "api_key_env": "REPLICA_1_KEY"}]}},
            "scrape_interval": 0.2, "keys": [key_entry("alice")], "policy": "round-robin"}
        with gateway(cfg) as url, httpx.Client(base_url=url, timeout=30) as client:
            answers = [client.post("/v1/chat/completions", json=chat("hi"), headers=auth("alice")) for _ in range(4)]
            assert [a.status_code for a in answers] == [200] * 4
            assert {a.headers["x-chatscale-replica"] for a in answers} == {"r0", "r1"}
            assert client.get("/v1/models", headers=auth("alice")).json()["data"][0]["id"] == "tiny"
            # the load scrape (GET /metrics, behind the key) reaches the replicas too: it sees their KV in use
            with client.stream("POST", "/v1/chat/completions", json=chat("hi", 400, stream=True),
                               headers=auth("alice")) as busy:
                assert busy.status_code == 200
                assert wait_until(lambda: any(line.startswith("chatscale_gateway:replica_kv_usage{")
                                              and float(line.split()[-1]) > 0
                                              for line in client.get("/metrics").text.splitlines()))
    finally:
        for r in locked:
            r.stop()


def test_replica_credentials_must_resolve():
    with pytest.raises(ValueError, match="NO_SUCH_KEY"):
        parse({"regions": {"a": {"replicas": [{"url": "http://127.0.0.1:1", "api_key_env": "NO_SUCH_KEY"}]}}})
    with pytest.raises(ValueError, match="one of"):
        parse({"regions": {"a": {"replicas": [{"url": "http://127.0.0.1:1", "api_key": "x", "api_key_env": "Y"}]}}})


def failing_replica(status: int, retry_after: str | None = None) -> FastAPI:
    """A replica that looks healthy to probes and fails every generation before its first byte."""
    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/metrics")(lambda: PlainTextResponse("chatscale:num_requests_running 0\n"))
    headers = {"retry-after": retry_after} if retry_after else {}
    app.post("/v1/chat/completions")(lambda: JSONResponse({"error": {"message": "down"}}, status, headers=headers))
    return app


def test_failed_attempts_are_rerouted_ejected_or_cooled(replicas):
    with running(failing_replica(500)) as broken, running(failing_replica(503, "30")) as busy:
        cfg = {"regions": {"a": {"replicas": [{"name": "broken", "url": broken}, {"name": "busy", "url": busy}]},
                           "b": {"replicas": [{"name": "good", "url": replicas[0].url}]}},
               "keys": [key_entry("alice")], "policy": "round-robin"}
        with gateway(cfg) as url:
            answers = [httpx.post(f"{url}/v1/chat/completions", json=chat("hi"), headers=auth("alice"), timeout=30)
                       for _ in range(6)]
            metrics = httpx.get(f"{url}/metrics").text
    assert all(a.status_code == 200 and a.headers["x-chatscale-replica"] == "good" for a in answers)
    assert 'ejected_total{region="a",replica="broken",why="http 500"} 1.0' in metrics
    assert 'retried_total{region="a",replica="busy"} 1.0' in metrics  # then cooled down for 30 s
    assert 'replica_up{region="a",replica="busy"} 0.0' in metrics


def test_killing_a_replica_under_load_loses_no_unstarted_request(replicas):
    """Runs last in this module: it kills the third replica."""
    cfg = fleet_config([r.url for r in replicas], admission={"saturation": {"outstanding": 4, "kv_usage": 0.9}})
    results: list[tuple[int, list]] = []

    async def one(ac: httpx.AsyncClient, url: str, i: int) -> None:
        async with ac.stream("POST", f"{url}/v1/chat/completions", headers=auth("alice"),
                             json=chat(f"{i} {QUESTION}", 48, stream=True)) as r:
            results.append((r.status_code, sse_events([line async for line in r.aiter_lines()])))

    async def load(url: str) -> None:
        async with httpx.AsyncClient(timeout=120) as ac:
            tasks = []
            for i in range(24):  # arrivals before, during and after the crash
                tasks.append(asyncio.create_task(one(ac, url, i)))
                await asyncio.sleep(0.03)
                if i == 8:
                    replicas[2].kill()
            await asyncio.gather(*tasks)

    with gateway(cfg) as url:
        asyncio.run(load(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert len(results) == 24 and all(status == 200 for status, _ in results)
    for _, events in results:
        assert events[-1] == "[DONE]"
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        content = [e for e in events if isinstance(e, dict) and "choices" in e
                   and e["choices"][0]["delta"].get("content")]
        if errors:  # broken mid-stream: only a request that had started streaming may end this way
            assert content and errors[0]["error"]["code"] == "stream_broken"
        else:
            assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert 'routed_total{region="local",replica="r2"}' in metrics
    assert 'ejected_total{region="local",replica="r2"' in metrics
