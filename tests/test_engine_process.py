"""The engine core in its own process, seen from the server: a failing step fails only its own
requests; too many in a row, or a killed engine process, turn /health to 503 and end every open
stream with an error event at once; the server never hangs."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
from fault_executors import POISON
from server_utils import MODEL, api, engine_idle, make_engine, running, sse_events, wait_until

NORMAL = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 40, "ignore_eos": True, "temperature": 0}
POISONED = {**NORMAL, "prompt": [5, POISON, 7]}


def stream(client: httpx.Client, body: dict) -> list:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return sse_events(r.iter_lines())


def test_a_failing_step_fails_only_its_requests_and_the_engine_goes_on(checkpoint):
    """One sequence at a time: a normal request runs, a poisoned one and another normal one queue.
    The poisoned request's step raises: it alone ends with an error; the others finish."""
    engine = make_engine(checkpoint("llama"), num_blocks=64, executor="fault_executors:PoisonedExecutor",
                         max_failed_steps=2, max_num_seqs=1)
    try:
        with running(api(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
            results: dict[str, list] = {"first": [], "poisoned": [], "last": []}

            def send(name: str, body: dict, waiting: int) -> threading.Thread:
                worker = threading.Thread(target=lambda: results[name].extend(stream(client, body)))
                worker.start()
                assert wait_until(lambda: engine.snapshot.num_running == 1 and engine.snapshot.num_waiting == waiting)
                return worker

            workers = [send("first", NORMAL, 0), send("poisoned", POISONED, 1), send("last", NORMAL, 2)]
            for w in workers:
                w.join(60)
            failed = results["poisoned"]
            assert failed[-1] == "[DONE]" and failed[-2]["error"]["type"] == "server_error"
            assert "injected device error" in failed[-2]["error"]["message"]
            for name in ("first", "last"):
                events = results[name]
                assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", name
            assert client.get("/health").json() == {"status": "ok"}
            r = client.post("/v1/completions", json=POISONED)
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert wait_until(lambda: engine_idle(engine)), engine.snapshot  # failed requests left no pages
            # A second failed step in a row (max_failed_steps=2): the engine is declared dead.
            assert client.post("/v1/completions", json=POISONED).status_code in (500, 503)
            assert wait_until(lambda: client.get("/health").status_code == 503, 5)
            assert client.get("/health").json()["status"] == "failed"
            r = client.post("/v1/completions", json=NORMAL)
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_failed"
    finally:
        engine.shutdown()


def test_a_killed_engine_process_fails_every_stream_at_once(checkpoint):
    engine = make_engine(checkpoint("llama"), num_blocks=64, executor="fault_executors:SlowExecutor")
    try:
        with running(api(engine)) as url, httpx.Client(base_url=url, timeout=30) as client:
            results: list[list] = [[] for _ in range(3)]
            long = {**NORMAL, "max_tokens": 400}
            workers = [threading.Thread(target=lambda out=out: out.extend(stream(client, long))) for out in results]
            for w in workers:
                w.start()
            assert wait_until(lambda: engine.snapshot.num_running == 3)
            os.kill(engine.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            assert wait_until(lambda: client.get("/health").status_code == 503, 1.0)
            for w in workers:
                w.join(10)
                assert not w.is_alive(), "a client hung on a dead engine"
            assert time.monotonic() - killed < 5
            for events in results:
                assert events[-1] == "[DONE]" and "exited unexpectedly" in events[-2]["error"]["message"]
            assert client.get("/health").json()["status"] == "failed"
    finally:
        engine.shutdown()


def test_stop_strings_end_the_stream_in_the_server_and_the_overshoot_is_dropped(checkpoint):
    """The engine process runs on while the server finds the stop string: the streamed text stops
    exactly before it, and the choice's overshoot never reaches the client."""
    engine = make_engine(checkpoint("llama"), num_blocks=64, block_size=4)
    try:
        with running(api(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
            body = {**NORMAL, "max_tokens": 30}
            base = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            stop = base[7:12]
            assert stop and base.find(stop) >= 7
            events = stream(client, {**body, "stop": [stop], "n": 2})
            for index in (0, 1):
                text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]
                               and e["choices"][0]["index"] == index)
                assert text == base[:base.find(stop)]
            finals = [e["choices"][0] for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
            assert sorted(c["index"] for c in finals) == [0, 1] and {c["finish_reason"] for c in finals} == {"stop"}
            assert wait_until(lambda: engine_idle(engine)), engine.snapshot  # the stopped choices were freed
    finally:
        engine.shutdown()
