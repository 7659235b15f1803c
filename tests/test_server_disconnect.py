"""Clients that leave and servers that stop: a dropped client (queued or mid-stream) frees its
engine request and KV blocks at once, and SIGTERM drains in-flight requests before exiting 0."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import httpx
import pytest
from server_utils import api, cli_server, engine_idle, make_engine, running, wait_until

BODY = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 400, "ignore_eos": True}


@pytest.fixture()
def slow_engine(checkpoint):
    """One sequence at a time, 20 ms a step: requests queue, and a stream lasts seconds, not ms."""
    engine = make_engine(checkpoint("llama"), num_blocks=64, max_num_seqs=1, executor="fault_executors:SlowExecutor")
    yield engine
    engine.shutdown()


def test_dropped_clients_abort_their_requests_and_free_kv_blocks(slow_engine):
    def snap():  # the engine process's load, as of its last step or command
        return slow_engine.snapshot

    app = api(slow_engine)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as running_client, \
            httpx.Client(base_url=url, timeout=30) as queued_client:
        with running_client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as streaming:
            events = (line for line in streaming.iter_lines() if line.startswith("data: "))
            assert [next(events) for _ in range(3)] and snap().kv_usage > 0
            with queued_client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as queued:
                queued_lines = queued.iter_lines()  # kept: dropping the iterator drops the connection
                assert next(queued_lines)  # its role chunk is out; the engine holds it waiting
                assert wait_until(lambda: snap().num_waiting == 1)
                # a non-streamed request that gives up after a second, also while queued
                outcome: list[BaseException] = []
                gave_up = threading.Thread(target=_post_and_give_up, args=(url, outcome))
                gave_up.start()
                assert wait_until(lambda: snap().num_waiting == 2)
            gave_up.join()
            assert isinstance(outcome[0], httpx.ReadTimeout)
            assert wait_until(lambda: snap().num_waiting == 0), "queued requests were not aborted"
            assert snap().num_running == 1 and next(events)  # the first one is still streaming
        assert wait_until(lambda: engine_idle(slow_engine)), "the mid-stream drop was not aborted"
        assert wait_until(lambda: app.state.server.slots.held == 0)
        r = running_client.post("/v1/chat/completions", json={**BODY, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def _post_and_give_up(url: str, outcome: list[BaseException]) -> None:
    try:
        httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=httpx.Timeout(30, read=1.0))
    except httpx.HTTPError as exc:
        outcome.append(exc)


def _serve(checkpoint, log, drain_timeout: float) -> tuple[subprocess.Popen, str]:
    # A short drain must find the requests still running: 20 ms steps make them last ~10 s.
    slow = ["--executor", "fault_executors:SlowExecutor"] if drain_timeout < 5 else []
    return cli_server(["serve", "--model", str(checkpoint("llama")), "--threads", "1", "--kv-cache-bytes", "4MiB",
                       "--drain-timeout", str(drain_timeout), *slow], output=log)


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return False
    except httpx.TransportError:  # refused, or cut mid-reply by a server going down (RemoteProtocolError)
        return True


# n=16 choices of 480 tokens: seconds of work on this tiny model, so SIGTERM lands mid-request.
LONG = {"prompt": "Hello", "max_tokens": 480, "n": 16, "ignore_eos": True, "stream": True}
WHOLE = {"prompt": "Hi", "max_tokens": 480, "n": 2, "ignore_eos": True}  # and one not streamed


def _sigterm_mid_stream(checkpoint, tmp_path, drain_timeout: float) -> tuple[list[str], bool, int, str, dict]:
    """Start a whole (not streamed) request and a long stream, SIGTERM the server after the stream's
    first event, and read on. Returns the stream's events after the signal, whether it was cut, the
    exit code, the server's log and the whole request's answer."""
    with (tmp_path / "serve.log").open("w+") as log:
        proc, url = _serve(checkpoint, log, drain_timeout)
        rest, cut, whole = [], False, {}
        waiting = threading.Thread(target=lambda: whole.update(
            httpx.post(f"{url}/v1/completions", json=WHOLE, timeout=60).json()))
        try:
            waiting.start()
            assert wait_until(lambda: _sequences_in_engine(url) == 2, 30)
            with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=60) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                assert wait_until(lambda: _refused(url), 10), "still accepting connections while draining"
                try:
                    rest = [line for line in lines if line.startswith("data: ")]
                except httpx.RemoteProtocolError:
                    cut = True
            code = proc.wait(30)
            waiting.join(30)
        finally:
            proc.kill()
        log.seek(0)
        return rest, cut, code, log.read(), whole


def _sequences_in_engine(url: str) -> int:
    lines = httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
    return sum(int(float(x.split()[-1])) for x in lines
               if x.startswith(("chatscale:num_requests_running{", "chatscale:num_requests_waiting{")))


def _finish_reasons(events: list[str]) -> list[str]:
    chunks = [json.loads(e[6:]) for e in events if e != "data: [DONE]"]
    return [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]


def test_sigterm_drains_in_flight_requests_then_exits_0(checkpoint, tmp_path):
    rest, cut, code, log, whole = _sigterm_mid_stream(checkpoint, tmp_path, drain_timeout=60)
    assert not cut and rest[-1] == "data: [DONE]" and _finish_reasons(rest) == ["length"] * 16
    assert [c["finish_reason"] for c in whole["choices"]] == ["length"] * 2
    assert code == 0
    assert "Waiting for connections to close" in log  # the request really was in flight


def test_drain_timeout_ends_what_is_left_with_abort_then_done_and_exits_0(checkpoint, tmp_path):
    rest, cut, code, log, whole = _sigterm_mid_stream(checkpoint, tmp_path, drain_timeout=0.5)
    assert not cut and rest[-1] == "data: [DONE]"  # was: the connection closed mid-stream
    assert sorted(_finish_reasons(rest)) == ["abort"] * 16  # every choice ends, as vLLM's do
    assert [c["finish_reason"] for c in whole["choices"]] == ["abort"] * 2  # the whole answer so far
    assert code == 0 and "timeout graceful shutdown exceeded" not in log
