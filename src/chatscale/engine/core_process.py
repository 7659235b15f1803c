"""The engine core's own process: schedule -> forward -> sample -> bookkeeping, never stalled by HTTP.

The API server starts it (`python -m chatscale.engine.core_process`, a clean interpreter that never
re-runs the caller's script) and binds two ZeroMQ sockets on local IPC paths: requests and aborts
come in on one, every step's token deltas, stats and load snapshot go out on the other,
msgpack-encoded.
With no work the loop blocks on its input (no spinning: on two cores a spinning loop would steal the
server's), and after a second of that gives the heap's free pages back to the OS, as it does once a
minute while busy (engine/native_memory.py). It ignores SIGINT/SIGTERM — the server drains first,
then sends Shutdown — and exits by itself if the server process disappears.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
import traceback

import msgspec
import zmq

from chatscale.engine.config import EngineConfig
from chatscale.engine.messages import (
    Abort, AddRequest, Dead, Ready, Shutdown, StepResult, ToEngine, decoder, encoder,
)
from chatscale.engine.native_memory import RELEASE_EVERY_S, release_free_heap

log = logging.getLogger("chatscale.engine")
IDLE_POLL_MS = 1000  # how often an idle engine checks that its server is still there


def run_engine_core(config: EngineConfig, num_blocks: int | None, requests_addr: str, results_addr: str,
                    parent_pid: int, log_level: int = logging.INFO) -> None:
    """Load the model, say Ready (or Dead), then serve steps until Shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine] %(message)s")
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # a slow reader must never stall a step
    inbox.connect(requests_addr)
    outbox.connect(results_addr)
    send = encoder().encode
    try:
        from chatscale.engine.core import EngineCore

        core = EngineCore(config, num_blocks)
    except BaseException as exc:
        log.exception("loading the engine failed")
        outbox.send(send(Dead(f"loading the model failed: {type(exc).__name__}: {exc}")))
        return _close(ctx)
    outbox.send(send(Ready(core.info())))
    try:
        _loop(core, inbox, outbox, parent_pid)
    except BaseException as exc:
        log.error("the engine stopped:\n%s", "".join(traceback.format_exception(exc)))
        outbox.send(send(Dead(f"{type(exc).__name__}: {exc}")))
    finally:
        core.shutdown()
        _close(ctx)


def _loop(core, inbox: zmq.Socket, outbox: zmq.Socket, parent_pid: int) -> None:
    send, receive = encoder().encode, decoder(ToEngine).decode
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    released, stepped = time.monotonic(), False  # when the free heap was last given back; steps since
    while True:
        if not core.has_work():
            while not poller.poll(IDLE_POLL_MS):
                if os.getppid() != parent_pid:
                    return  # the server is gone: nobody to serve
                if stepped:  # idle for a second: give back what the last burst freed
                    release_free_heap()
                    released, stepped = time.monotonic(), False
        elif time.monotonic() - released > RELEASE_EVERY_S:
            release_free_heap()
            released = time.monotonic()
        errors: dict[str, str] = {}
        applied = False
        while True:
            try:
                command = receive(inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            applied = True
            if isinstance(command, Shutdown):
                return
            if isinstance(command, Abort):
                core.abort(command.request_id, command.index, command.keep_tokens)
            elif isinstance(command, AddRequest):
                try:
                    core.add_request(command)
                except ValueError as exc:
                    errors[command.request_id] = str(exc)
        result = core.step()
        stepped = stepped or result is not None
        if errors or (result is None and applied):  # commands change the load: say so
            result = result or StepResult([], core.snapshot())
            result.errors = {**result.errors, **errors}
        if result is not None:
            outbox.send(send(result))


def _close(ctx: zmq.Context) -> None:
    ctx.destroy(linger=1000)


def command(config: EngineConfig, num_blocks: int | None, requests_addr: str, results_addr: str,
            log_level: int) -> list[str]:
    """The arguments that start an engine process for `config` (see `main`)."""
    return ["-m", "chatscale.engine.core_process", "--config", msgspec.json.encode(config).decode(),
            "--num-blocks", str(num_blocks or 0), "--requests", requests_addr, "--results", results_addr,
            "--parent-pid", str(os.getpid()), "--log-level", str(log_level)]


def main() -> None:
    p = argparse.ArgumentParser(description="chatscale's engine core process (started by the API server)")
    p.add_argument("--config", required=True, help="EngineConfig as JSON")
    p.add_argument("--num-blocks", type=int, default=0)
    p.add_argument("--requests", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--log-level", type=int, default=logging.INFO)
    args = p.parse_args()
    config = msgspec.json.decode(args.config, type=EngineConfig)
    run_engine_core(config, args.num_blocks or None, args.requests, args.results, args.parent_pid, args.log_level)


if __name__ == "__main__":
    main()
