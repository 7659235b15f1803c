"""The gateway's routing policies against each other on one fleet, and the gateway's own cost (issue 7).

One run, every timing under `flock /tmp/chatscale-bench.lock`:

  1. For each policy (cache-affinity, round-robin, least-outstanding): a fresh fleet of R
     `chatscale serve` replicas (the shipped 13M demo model, one torch thread and 256 MiB of KV each
     (the default, a quarter of free memory each, kills a 4-replica fleet); fresh so that no
     policy inherits another's warm caches) behind `chatscale gateway`, then two workloads through
     `chatscale bench serve` with the same arrivals for every policy:
       chat:     multi-turn conversations (Poisson session starts, think time between turns; turn
                 N+1 resends the whole conversation), long turns and short answers, so prefill —
                 what a prefix-cache hit saves — dominates the work;
       mooncake: whole conversations of mooncake_conversation.jsonl (a seeded `--mooncake-share` of its
                 prefix families, over the trace's whole hour), lengths x `--length-scale` (its 512-token
                 hash blocks become shared prompt text of 512 x scale tokens), arrivals rescaled to a
                 rate. The first N requests would not do: they span half a minute, before any
                 conversation's next turn, and share only the system block every request starts with
                 (4% of their tokens). The trace's ideal hit rate at this scale (an unbounded prefix
                 cache, whole 16-token pages) is printed beside the measured ones.
     Reported: TTFT p50/p99, throughput, rejections (from the client and the gateway), the prefix
     hit rate (replicas' prefix_cache_hits / prefix_cache_queries) and the load spread: the busiest
     replica's prefill tokens computed (prompt tokens minus hits) and requests, over the mean.
  2. The gateway's cost: one replica, one client, 1-token answers, direct and through the gateway:
     added p50/p99 latency. Then the most requests/s it proxies, against an upstream that answers
     at once (a canned completion), so that the model is not what is measured.

    flock /tmp/chatscale-bench.lock .venv/bin/python benchmarks/routing.py [--replicas 4] [--json out.json]
        [--workloads chat mooncake] [--skip-gateway-cost]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from common import save_json

from chatscale.bench.launch import free_port, running
from chatscale.bench.workloads import MOONCAKE_BLOCK_TOKENS, TraceRecord, load_trace, scale_lengths
from chatscale.gateway.config import hash_key
from chatscale.traces import trace_path

ROOT = Path(__file__).resolve().parents[1]
TRACE = trace_path("mooncake_conversation.jsonl")  # shipped with chatscale (chatscale.traces)
PAGE = 16  # the replicas' KV page: prefix-cache hits come in whole pages
MAX_INPUT, MAX_OUTPUT = 1800, 32  # scaled prompts and answers, clipped to the demo model's 2,048 positions
KEY = "sk-bench"
POLICIES = ("cache-affinity", "round-robin", "least-outstanding")
CLI = [sys.executable, "-m", "chatscale.cli"]


def metric_sums(url: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """name -> {label text: value} from a Prometheus page (label text '' for unlabelled)."""
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line:
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        if name in out:
            out[name][labels.rstrip("}")] = float(value)
    return out


@contextmanager
def fleet(n: int, logs: Path):
    """n replicas started at once (each imports torch: slow, so in parallel), all healthy."""
    ports: list[int] = []
    while len(ports) < n:  # distinct, though each is only free when asked
        port = free_port()
        if port not in ports:
            ports.append(port)
    with ExitStack() as stack:
        procs = [subprocess.Popen([*CLI, "serve", "--threads", "1", "--kv-cache-bytes", "256MiB", "--port", str(p)],
                                  stdout=(logs / f"replica-{p}.log").open("w"), stderr=subprocess.STDOUT)
                 for p in ports]
        stack.callback(lambda: [(p.terminate(), p.wait(30)) for p in procs])
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        deadline = time.monotonic() + 300
        for url, proc in zip(urls, procs):
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (logs / f"replica-{url.rsplit(':', 1)[1]}.log").read_text()[-3000:]
                    raise RuntimeError(f"replica {url} did not start (exit {proc.poll()}):\n{log}")
                time.sleep(0.5)
        yield urls


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def gateway(urls: list[str], policy: str, logs: Path):
    cfg = {"policy": policy, "regions": {"local": {"replicas": [{"name": f"r{i}", "url": u}
                                                               for i, u in enumerate(urls)]}},
           "keys": [{"name": "bench", "sha256": hash_key(KEY)}],
           "admission": {"max_wait": 120, "max_queue": 1024}}
    path = logs / f"fleet-{policy}.yaml"
    path.write_text(json.dumps(cfg))
    port = free_port()
    with running([*CLI, "gateway", "--config", str(path), "--port", str(port)], port, logs / f"gw-{policy}.log",
                 timeout=120) as url:
        yield url


def mooncake_families(share: float, out: Path, seed: int = 0) -> Path:
    """A `share` of the trace's prefix families (requests with the same first two blocks: one
    conversation's turns), drawn with `seed`, every request of each, written as a trace file."""
    lines = [line for line in TRACE.read_text().splitlines() if line.strip()]
    family = [tuple(json.loads(line)["hash_ids"][:2]) for line in lines]
    keys = sorted(set(family))
    random.Random(seed).shuffle(keys)
    chosen = set(keys[:max(1, round(share * len(keys)))])
    out.write_text("\n".join(line for line, f in zip(lines, family) if f in chosen) + "\n")
    return out


def ideal_hit_rate(records: list[TraceRecord], scale: float) -> float:
    """Prompt tokens an unbounded prefix cache serves, once lengths are scaled and clipped as the
    replay does: each request's leading blocks seen before, in whole pages, over all prompt tokens."""
    block = MOONCAKE_BLOCK_TOKENS * scale
    scaled = scale_lengths(records, scale, MAX_INPUT, MAX_OUTPUT)
    seen: set[int] = set()
    hit = total = 0
    for r, s in zip(records, scaled):
        shared = next((i for i, h in enumerate(r.hash_ids) if h not in seen), len(r.hash_ids))
        seen.update(r.hash_ids)
        hit += int(min(shared * block, s.input_tokens - 1)) // PAGE * PAGE
        total += s.input_tokens
    return hit / total


def bench(url: str, out: Path, *flags: str) -> dict:
    subprocess.run([*CLI, "bench", "serve", "--base-url", url, "--api-key", KEY, "--output-json", str(out),
                    "--no-progress", *flags], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["report"]


def measure(args, policy: str, logs: Path, trace: Path) -> dict:
    results = {}
    with fleet(args.replicas, logs) as urls, gateway(urls, policy, logs) as gw:
        workloads = {
            "chat": ["--dataset", "conversation", "--num-requests", str(args.chat_requests), "--turns", "4",
                     "--input-len", str(args.chat_input), "--output-len", "16", "--think-time", "1",
                     "--arrival", "poisson", "--request-rate", str(args.chat_rate), "--warmup", "0"],
            "mooncake": ["--dataset", "trace", "--arrival", "trace", "--trace", str(trace),
                         "--num-requests", str(len(load_trace(trace))), "--length-scale", str(args.length_scale),
                         "--max-input-len", str(MAX_INPUT), "--max-output-len", str(MAX_OUTPUT), "--request-rate",
                         str(args.mooncake_rate), "--warmup", "0"],
        }
        workloads = {name: flags for name, flags in workloads.items() if name in args.workloads}
        names = ("chatscale:prefix_cache_queries_total", "chatscale:prefix_cache_hits_total")
        for name, flags in workloads.items():
            before = [metric_sums(u, names) for u in urls]
            routed_before = metric_sums(gw, ("chatscale_gateway:routed_total",))["chatscale_gateway:routed_total"]
            report = bench(gw, logs / f"{policy}-{name}.json", *flags)
            after = [metric_sums(u, names) for u in urls]
            gw_metrics = metric_sums(gw, ("chatscale_gateway:routed_total", "chatscale_gateway:rejected_total"))
            q = [sum(a[names[0]].values()) - sum(b[names[0]].values()) for a, b in zip(after, before)]
            h = [sum(a[names[1]].values()) - sum(b[names[1]].values()) for a, b in zip(after, before)]
            computed = [qi - hi for qi, hi in zip(q, h)]
            routed = [v - routed_before.get(k, 0.0)
                      for k, v in sorted(gw_metrics["chatscale_gateway:routed_total"].items())]
            results[name] = {
                "ttft_p50_ms": report["ttft_ms"]["p50"], "ttft_p99_ms": report["ttft_ms"]["p99"],
                "req_per_s": report["request_throughput"], "tok_per_s": report["total_token_throughput"],
                "completed": report["completed"], "failed": report["failed"], "errors": report["errors"],
                "gateway_rejected": sum(gw_metrics["chatscale_gateway:rejected_total"].values()),
                "hit_rate": sum(h) / max(sum(q), 1.0),
                "prefill_computed_per_replica": computed, "requests_per_replica": routed,
                "prefill_spread": max(computed) / max(statistics.mean(computed), 1.0),
                "request_spread": max(routed) / max(statistics.mean(routed), 1.0),
            }
            print(policy, name, json.dumps(results[name]), flush=True)
    return results


# ---- the gateway's own cost ------------------------------------------------------------------------

CANNED = {"id": "x", "object": "chat.completion", "created": 0, "model": "null",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def null_upstream():
    """An OpenAI-shaped server that answers at once: only the gateway's own work is left to measure."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/metrics")(lambda: PlainTextResponse("chatscale:num_requests_running 0\n"))
    app.post("/v1/chat/completions")(lambda: CANNED)
    return app


async def closed_loop(url: str, seconds: float, users: int) -> tuple[float, int]:
    body = {"model": "null", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    done, errors = 0, 0
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=users)) as client:
        end = time.perf_counter() + seconds

        async def user() -> None:
            nonlocal done, errors
            while time.perf_counter() < end:
                r = await client.post(f"{url}/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {KEY}"})
                done, errors = done + (r.status_code == 200), errors + (r.status_code != 200)

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(users)))
        return done / (time.perf_counter() - t0), errors


async def alternating(direct: str, gw: str, n: int) -> dict[str, float]:
    """One client, requests alternately direct and through the gateway: p50/p99 of the difference's
    two sides, so drifting machine load hits both alike."""
    body = {"model": "null", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    times: dict[str, list[float]] = {direct: [], gw: []}
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(2 * n + 20):
            url = (direct, gw)[i % 2]
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            r.raise_for_status()
            if i >= 20:  # warm connections first
                times[url].append(time.perf_counter() - t0)
    q = {u: statistics.quantiles(t, n=100) for u, t in times.items()}
    return {"p50": (q[gw][49] - q[direct][49]) * 1000, "p99": (q[gw][98] - q[direct][98]) * 1000}


def gateway_cost(args, logs: Path) -> dict:
    out = {}
    with fleet(1, logs) as urls, gateway(urls, "cache-affinity", logs) as gw:
        flags = ["--dataset", "random", "--input-len", "16", "--output-len", "1", "--concurrency", "1",
                 "--num-requests", str(args.overhead_requests), "--warmup", "5"]
        direct = bench(urls[0], logs / "direct.json", *flags)
        proxied = bench(gw, logs / "proxied.json", *flags)
        for p in ("p50", "p99"):
            out[f"direct_e2e_{p}_ms"] = direct["e2e_ms"][p]
            out[f"gateway_e2e_{p}_ms"] = proxied["e2e_ms"][p]
            out[f"added_{p}_ms"] = proxied["e2e_ms"][p] - direct["e2e_ms"][p]
    null_port = free_port()
    with running([sys.executable, "-c", f"import sys, uvicorn; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                  "from routing import null_upstream; "
                  f"uvicorn.run(null_upstream(), port={null_port}, log_level='warning')"],
                 null_port, logs / "null.log") as null, gateway([null], "cache-affinity", logs) as gw:
        added = asyncio.run(alternating(null, gw, args.overhead_requests))
        out |= {f"null_added_{p}_ms": v for p, v in added.items()}
        out["null_direct_req_per_s"], _ = asyncio.run(closed_loop(null, args.seconds, args.users))
        out["gateway_max_req_per_s"], out["gateway_errors"] = asyncio.run(closed_loop(gw, args.seconds, args.users))
    print("gateway cost", json.dumps(out), flush=True)
    return out


def table(results: dict) -> str:
    lines = []
    for name in results["args"]["workloads"]:
        ideal = f" (the trace's ideal hit rate at this scale: {results['mooncake_ideal_hit_rate']:.2f})" \
            if name == "mooncake" else ""
        lines += [f"\n{name}{ideal}", "| policy | TTFT p50 ms | TTFT p99 ms | req/s | tok/s | failed | rejected | "
                  "hit rate | max/mean prefill | max/mean requests |", "|---|---|---|---|---|---|---|---|---|---|"]
        for policy in [p for p in POLICIES if p in results]:
            r = results[policy][name]
            lines.append(f"| {policy} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['req_per_s']:.2f} | "
                         f"{r['tok_per_s']:.0f} | {r['failed']} | {r['gateway_rejected']:.0f} | "
                         f"{r['hit_rate']:.2f} | {r['prefill_spread']:.2f} | {r['request_spread']:.2f} |")
        if "round-robin" in results and "cache-affinity" in results:
            base = results["round-robin"][name]["ttft_p50_ms"]
            ratio = base / results["cache-affinity"][name]["ttft_p50_ms"]
            lines.append(f"p50 TTFT, round-robin / cache-affinity: {ratio:.2f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--chat-requests", type=int, default=64, help="requests in all (conversations of 4 turns)")
    p.add_argument("--chat-input", type=int, default=300, help="new tokens per turn")
    p.add_argument("--chat-rate", type=float, default=0.5, help="conversations started per second")
    p.add_argument("--mooncake-share", type=float, default=0.03,
                   help="share of the trace's prefix families (conversations) replayed, whole")
    p.add_argument("--length-scale", type=float, default=1 / 16)
    p.add_argument("--mooncake-rate", type=float, default=1.5, help="mean requests/s of the replay")
    p.add_argument("--workloads", nargs="+", default=["chat", "mooncake"], choices=["chat", "mooncake"])
    p.add_argument("--overhead-requests", type=int, default=200)
    p.add_argument("--users", type=int, default=32, help="closed-loop clients for the max req/s")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each max req/s run")
    p.add_argument("--skip-policies", action="store_true", help="only the gateway's own cost")
    p.add_argument("--skip-gateway-cost", action="store_true", help="only the policies")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatscale-routing-") as tmp:
        logs = Path(tmp)
        results: dict = {"args": vars(args)}
        trace = mooncake_families(args.mooncake_share, logs / "mooncake-families.jsonl")
        records = load_trace(trace)
        results["mooncake_requests"] = len(records)
        results["mooncake_ideal_hit_rate"] = ideal_hit_rate(records, args.length_scale)
        print(f"mooncake: {len(records)} requests over {records[-1].timestamp:.0f} s of trace, ideal hit rate "
              f"{results['mooncake_ideal_hit_rate']:.3f} at length scale {args.length_scale:g}", flush=True)
        if not args.skip_policies:
            for policy in args.policies:
                results[policy] = measure(args, policy, logs, trace)
            print(table(results))
        if not args.skip_gateway_cost:
            results["gateway_cost"] = gateway_cost(args, logs)
    save_json(args.json, results)


if __name__ == "__main__":
    main()
