"""Clients that leave and servers that stop: a dropped client (queued or mid-stream) frees its
engine request and KV blocks at once, and SIGTERM drains in-flight requests before exiting 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_utils import api, engine_idle, free_port, make_engine, running, wait_until

BODY = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 400, "ignore_eos": True}


@pytest.fixture()
def slow_engine(checkpoint):
    """One sequence at a time, 20 ms a step: requests queue, and a stream lasts seconds, not ms."""
    engine = make_engine(checkpoint("llama"), num_blocks=64, max_num_seqs=1)
    step = engine.engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    engine.engine.step = slow_step
    yield engine
    engine.shutdown()


def test_dropped_clients_abort_their_requests_and_free_kv_blocks(slow_engine):
    core = slow_engine.engine
    app = api(slow_engine)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as running_client, \
            httpx.Client(base_url=url, timeout=30) as queued_client:
        with running_client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as streaming:
            events = (line for line in streaming.iter_lines() if line.startswith("data: "))
            assert [next(events) for _ in range(3)] and core.kv.usage > 0
            with queued_client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as queued:
                queued_lines = queued.iter_lines()  # kept: dropping the iterator drops the connection
                assert next(queued_lines)  # its role chunk is out; the engine holds it waiting
                assert wait_until(lambda: core.num_waiting == 1)
                # a non-streamed request that gives up after a second, also while queued
                outcome: list[BaseException] = []
                gave_up = threading.Thread(target=_post_and_give_up, args=(url, outcome))
                gave_up.start()
                assert wait_until(lambda: core.num_waiting == 2)
            gave_up.join()
            assert isinstance(outcome[0], httpx.ReadTimeout)
            assert wait_until(lambda: core.num_waiting == 0), "queued requests were not aborted"
            assert core.num_running == 1 and next(events)  # the first one is still streaming
        assert wait_until(lambda: engine_idle(slow_engine)), "the mid-stream drop was not aborted"
        assert wait_until(lambda: app.state.server.in_flight == 0)
        r = running_client.post("/v1/chat/completions", json={**BODY, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def _post_and_give_up(url: str, outcome: list[BaseException]) -> None:
    try:
        httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=httpx.Timeout(30, read=1.0))
    except httpx.HTTPError as exc:
        outcome.append(exc)


def _serve(checkpoint, log, drain_timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatscale.cli", "serve", "--model", str(checkpoint("llama")), "--port", str(port),
         "--threads", "1", "--kv-cache-bytes", "4MiB", "--drain-timeout", str(drain_timeout)],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, "chatscale serve exited"
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(healthy, 90), "chatscale serve did not become healthy"
    return proc, url


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return False
    except httpx.TransportError:  # refused, or cut mid-reply by a server going down (RemoteProtocolError)
        return True


# n=16 choices of 480 tokens: seconds of work on this tiny model, so SIGTERM lands mid-request.
LONG = {"prompt": "Hello", "max_tokens": 480, "n": 16, "ignore_eos": True, "stream": True}


def _sigterm_mid_stream(checkpoint, tmp_path, drain_timeout: float) -> tuple[list[str], bool, int, str]:
    """Start a long stream, SIGTERM the server after its first event, and read on. Returns the
    events after the signal, whether the stream was cut, the exit code and the server's log."""
    with (tmp_path / "serve.log").open("w+") as log:
        proc, url = _serve(checkpoint, log, drain_timeout)
        rest, cut = [], False
        try:
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
        finally:
            proc.kill()
        log.seek(0)
        return rest, cut, code, log.read()


def test_sigterm_drains_in_flight_requests_then_exits_0(checkpoint, tmp_path):
    rest, cut, code, log = _sigterm_mid_stream(checkpoint, tmp_path, drain_timeout=60)
    assert not cut and rest[-1] == "data: [DONE]" and sum('"finish_reason":"length"' in x for x in rest) == 16
    assert code == 0
    assert "Waiting for connections to close" in log  # the request really was in flight


def test_drain_timeout_cuts_what_is_left_and_still_exits_0(checkpoint, tmp_path):
    _, cut, code, log = _sigterm_mid_stream(checkpoint, tmp_path, drain_timeout=0.5)
    assert cut and code == 0  # the stream ended without [DONE]
    assert "timeout graceful shutdown exceeded" in log
