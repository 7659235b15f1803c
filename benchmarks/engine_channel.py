"""The engine process's channel: a request in and a step's results out, ZeroMQ + msgspec vs a pipe + pickle.

The API server and the engine core exchange one small message per request and one per engine step
(the new tokens of every running sequence, a stats record, a load snapshot). This measures the
round trip of exactly those messages between two processes, as `AsyncEngine` and
`engine/core_process.py` send them: ZeroMQ PUSH/PULL over IPC sockets with msgspec's msgpack,
against multiprocessing's Pipe with pickle. A step on this CPU takes milliseconds; the channel
must cost a small fraction of that.

    .venv/bin/python benchmarks/engine_channel.py --iterations 3000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import tempfile
import time

import zmq

from chatscale.engine.messages import (
    AddRequest, EngineSnapshot, FromEngine, SeqDelta, StepResult, StepStats, ToEngine, decoder, encoder,
)
from chatscale.engine.sampling_params import SamplingParams


def step_result(batch: int) -> StepResult:
    """A decode step of `batch` sequences: one new token each."""
    deltas = [SeqDelta(f"cmpl-{i:032x}-0", 0, [1234], None, None, None, 0, 1.0) for i in range(batch)]
    return StepResult(deltas, EngineSnapshot(num_running=batch, num_blocks=4096, num_used_blocks=100),
                      StepStats(batch, batch, 0, 0.01, 1.0, [(128 + i, 1) for i in range(batch)]))


def request() -> AddRequest:
    return AddRequest("cmpl-" + "0" * 32 + "-0", list(range(128)), SamplingParams(max_tokens=64), None, 1.0)


def zmq_echo(requests_addr: str, results_addr: str, batch: int) -> None:
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(requests_addr)
    outbox.connect(results_addr)
    receive, send = decoder(ToEngine).decode, encoder().encode
    reply = step_result(batch)
    while True:
        message = receive(inbox.recv())
        if message.request_id == "stop":
            break
        outbox.send(send(reply))
    ctx.destroy(linger=0)


def pipe_echo(conn, batch: int) -> None:
    reply = step_result(batch)
    while True:
        message = pickle.loads(conn.recv_bytes())
        if message.request_id == "stop":
            break
        conn.send_bytes(pickle.dumps(reply))


def measure_zmq(iterations: int, batch: int) -> list[float]:
    folder = tempfile.mkdtemp(prefix="chatscale-channel-")
    ctx = zmq.Context()
    to_engine, from_engine = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    requests_addr, results_addr = f"ipc://{folder}/requests", f"ipc://{folder}/results"
    to_engine.bind(requests_addr)
    from_engine.bind(results_addr)
    child = mp.get_context("spawn").Process(target=zmq_echo, args=(requests_addr, results_addr, batch))
    child.start()
    send, receive = encoder().encode, decoder(FromEngine).decode
    message, times = request(), []
    for _ in range(iterations):
        t = time.perf_counter()
        to_engine.send(send(message))
        receive(from_engine.recv())
        times.append(time.perf_counter() - t)
    to_engine.send(send(AddRequest("stop", [1], SamplingParams())))
    child.join()
    ctx.destroy(linger=0)
    return times


def measure_pipe(iterations: int, batch: int) -> list[float]:
    ours, theirs = mp.get_context("spawn").Pipe()
    child = mp.get_context("spawn").Process(target=pipe_echo, args=(theirs, batch))
    child.start()
    message, times = request(), []
    for _ in range(iterations):
        t = time.perf_counter()
        ours.send_bytes(pickle.dumps(message))
        pickle.loads(ours.recv_bytes())
        times.append(time.perf_counter() - t)
    ours.send_bytes(pickle.dumps(AddRequest("stop", [1], SamplingParams())))
    child.join()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.iterations} round trips each; medians (p99) in us")
    print("| step batch | ZeroMQ + msgspec | Pipe + pickle | result bytes (msgpack / pickle) |")
    print("|---:|---:|---:|---:|")
    for batch in args.batches:
        z = measure_zmq(args.iterations, batch)[100:]
        q = measure_pipe(args.iterations, batch)[100:]
        sizes = len(encoder().encode(step_result(batch))), len(pickle.dumps(step_result(batch)))

        def fmt(xs: list[float]) -> str:
            return f"{statistics.median(xs) * 1e6:.0f} ({statistics.quantiles(xs, n=100)[98] * 1e6:.0f})"

        print(f"| {batch} | {fmt(z)} | {fmt(q)} | {sizes[0]} / {sizes[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
