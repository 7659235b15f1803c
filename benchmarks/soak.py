"""Soak `chatscale serve`: a steady mixed load for a while, the memory of both processes sampled.

The server process (HTTP, tokenizing, detokenizing) and its engine process (scheduler, KV cache,
model) are sampled separately (RSS, and tracemalloc's traced total with --trace), so a growth
names its process. The load mixes what a day of traffic holds: streamed and whole chat and text
completions, n > 1, logprobs, stop strings, clients that disconnect mid-stream, bad requests (400s),
/tokenize and /metrics scrapes, every prompt new (the prefix cache keeps filling and evicting).

    .venv/bin/python benchmarks/soak.py --minutes 10 --out soak.json
    # where the memory goes: tracemalloc snapshots of both processes every --trace-every seconds
    .venv/bin/python benchmarks/soak.py --minutes 10 --trace /tmp/soak-trace --out soak-trace.json
    .venv/bin/python benchmarks/soak.py --compare /tmp/soak-trace   # top growth sites per process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import httpx
import psutil

from chatscale.bench.launch import free_port, running

PROBE = Path(__file__).resolve().parent / "soak_probe"
WORDS = ["cache", "page", "batch", "token", "model", "engine", "prefix", "decode", "stream", "queue", "region",
         "replica", "latency", "budget", "chunk", "sample", "answer", "prompt", "memory", "kernel"]


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + f" #{rng.randrange(1 << 30)}"


async def one_request(http: httpx.AsyncClient, url: str, model: str, rng: random.Random) -> str:
    """One request of a random kind; returns its kind (for the tally)."""
    kind = rng.choice(["chat_stream", "chat", "completion_n", "logprobs", "stop", "disconnect", "bad",
                       "tokenize", "metrics"])
    chat = {"model": model, "messages": [{"role": "user", "content": prompt(rng, rng.randint(5, 60))}],
            "max_tokens": rng.randint(4, 48), "temperature": 0.8}
    if kind == "chat_stream":
        async with http.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}) as r:
            async for _ in r.aiter_lines():
                pass
    elif kind == "chat":
        (await http.post(f"{url}/v1/chat/completions", json=chat)).raise_for_status()
    elif kind == "completion_n":
        body = {"model": model, "prompt": prompt(rng, 20), "max_tokens": 16, "n": 4}
        (await http.post(f"{url}/v1/completions", json=body)).raise_for_status()
    elif kind == "logprobs":
        (await http.post(f"{url}/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 5})
         ).raise_for_status()
    elif kind == "stop":
        (await http.post(f"{url}/v1/chat/completions", json={**chat, "stop": ["e", "a t"], "max_tokens": 40})
         ).raise_for_status()
    elif kind == "disconnect":
        async with http.stream("POST", f"{url}/v1/chat/completions",
                               json={**chat, "stream": True, "max_tokens": 64, "ignore_eos": True}) as r:
            async for i, _ in aenumerate(r.aiter_lines()):
                if i >= 4:
                    break  # leaving the block closes the connection mid-stream
    elif kind == "bad":
        r = await http.post(f"{url}/v1/chat/completions", json={**chat, "temperature": 9})
        assert r.status_code == 400, r.text
    elif kind == "tokenize":
        (await http.post(f"{url}/tokenize", json={"prompt": prompt(rng, 30)})).raise_for_status()
    else:
        (await http.get(f"{url}/metrics")).raise_for_status()
    return kind


async def aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


def processes(server_pid: int) -> dict[str, psutil.Process]:
    """The `chatscale serve` process and its engine process (its one Python child)."""
    server = psutil.Process(server_pid)
    engines = [c for c in server.children() if "core_process" in " ".join(c.cmdline())]
    return {"server": server, "engine": engines[0]}


async def soak(url: str, server_pid: int, seconds: float, concurrency: int, every: float, seed: int) -> dict:
    procs = processes(server_pid)
    samples, done, kinds, errors = [], 0, {}, 0
    start = time.monotonic()
    stop_at = start + seconds

    async def worker(i: int) -> None:
        nonlocal done, errors
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(timeout=120) as http:
            model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
            while time.monotonic() < stop_at:
                try:
                    kind = await one_request(http, url, model, rng)
                    kinds[kind] = kinds.get(kind, 0) + 1
                    done += 1
                except (httpx.HTTPError, AssertionError) as exc:
                    errors += 1
                    print(f"error: {exc!r}", file=sys.stderr)

    def sample() -> None:
        row = {"t": round(time.monotonic() - start, 1), "requests": done}
        for name, p in procs.items():
            row[f"{name}_rss_mb"] = round(p.memory_info().rss / 2**20, 1)
        samples.append(row)
        print(json.dumps(row), flush=True)

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            sample()
            await asyncio.sleep(every)

    await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    sample()
    return {"samples": samples, "requests": done, "errors": errors, "kinds": kinds}


def compare(trace_dir: Path, top: int = 15) -> None:
    """Per process: the allocation sites that grew most between its first snapshot (taken once the
    load has run --trace-every seconds) and its last."""
    by_proc: dict[str, list[Path]] = {}
    for p in sorted(trace_dir.glob("*.snap")):
        by_proc.setdefault(p.name.rsplit("-", 1)[0], []).append(p)
    for proc, snaps in by_proc.items():
        if len(snaps) < 2:
            continue
        first, last = tracemalloc.Snapshot.load(str(snaps[0])), tracemalloc.Snapshot.load(str(snaps[-1]))
        total = sum(s.size for s in last.statistics("filename")) - sum(s.size for s in first.statistics("filename"))
        print(f"\n== {proc}: {snaps[0].name} -> {snaps[-1].name}, traced {total / 2**20:+.2f} MiB")
        for stat in last.compare_to(first, "traceback")[:top]:
            frames = stat.traceback[::-1][:5]  # innermost first
            where = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in frames)
            print(f"{stat.size_diff / 2**20:+8.2f} MiB {stat.count_diff:+8d} blocks  {where}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--every", type=float, default=15.0, help="seconds between memory samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="--threads 1 --kv-cache-bytes 256MiB",
                   help="extra `chatscale serve` arguments")
    p.add_argument("--trace", type=Path, help="write tracemalloc snapshots of both processes here")
    p.add_argument("--trace-every", type=float, default=120.0)
    p.add_argument("--compare", type=Path, help="only print the growth between snapshots in this folder")
    p.add_argument("--out", help="JSON report")
    args = p.parse_args()
    if args.compare:
        return compare(args.compare)
    if args.trace:  # every Python process the server starts imports the probe (sitecustomize)
        args.trace.mkdir(parents=True, exist_ok=True)
        os.environ.update(CHATSCALE_SOAK_TRACE=str(args.trace), CHATSCALE_SOAK_TRACE_S=str(args.trace_every),
                          PYTHONPATH=os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    cmd = [sys.executable, "-m", "chatscale.cli", "serve", "--port", str(port), *args.serve_args.split()]
    with tempfile.TemporaryDirectory() as work, running(cmd, port, Path(work) / "serve.log") as url:
        server_pid = next(c.pid for c in psutil.Process().children() if "chatscale.cli" in " ".join(c.cmdline()))
        report = asyncio.run(soak(url, server_pid, args.minutes * 60, args.concurrency, args.every, args.seed))
    report.update(command=" ".join(sys.argv), load_average=os.getloadavg(), serve_args=args.serve_args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    first, last = report["samples"][1], report["samples"][-1]
    print(f"{report['requests']} requests, {report['errors']} errors; RSS MB server {first['server_rss_mb']} -> "
          f"{last['server_rss_mb']}, engine {first['engine_rss_mb']} -> {last['engine_rss_mb']}")


if __name__ == "__main__":
    main()
