"""`chatscale bench serve`: measure any OpenAI-compatible server under a chosen workload.

    chatscale bench serve --base-url http://127.0.0.1:8000 --concurrency 16 --num-requests 64
    chatscale bench serve --base-url URL --arrival poisson --request-rate 2 --dataset conversation
    chatscale bench serve --base-url URL --arrival trace --trace azure_llm_2023_conv.csv \
        --dataset trace --length-scale 0.1 --max-input-len 512 --max-output-len 128 --request-rate 1

Registration only imports argparse; the client (httpx) loads when the command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatscale.bench.workloads import Session


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark a running server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("serve", help="load any OpenAI-compatible server; report TTFT, TPOT, ITL, throughput",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (no /v1)")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default=None, help="a name for this server in the JSON report")

    a = p.add_argument_group("arrivals")
    a.add_argument("--arrival", choices=["concurrency", "poisson", "gamma", "trace"], default="concurrency",
                   help="closed loop of --concurrency users, a random process at --request-rate, "
                        "or the --trace file's own timestamps")
    a.add_argument("--concurrency", type=int, default=1, help="users in the closed loop")
    a.add_argument("--request-rate", type=float, default=None,
                   help="sessions per second (poisson/gamma); with a trace, rescales it to this mean rate")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    a.add_argument("--trace-speedup", type=float, default=1.0, help="divide the trace's timestamps by this")
    a.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (open loop)")

    d = p.add_argument_group("dataset")
    d.add_argument("--dataset", choices=["random", "conversation", "trace"], default="random")
    d.add_argument("--num-requests", type=int, default=64, help="requests in all (turns included)")
    d.add_argument("--input-len", type=int, default=128, help="prompt tokens (per turn in conversations)")
    d.add_argument("--output-len", type=int, default=64, help="tokens to generate per request")
    d.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- r)")
    d.add_argument("--turns", type=int, default=4, help="turns per conversation")
    d.add_argument("--think-time", type=float, default=0.0, help="mean seconds between a reply and the next turn")
    d.add_argument("--trace", default=None, help="Azure .csv or Mooncake .jsonl file, or a shipped trace: "
                   "azure_llm_2023_code.csv, azure_llm_2023_conv.csv, mooncake_conversation.jsonl")
    d.add_argument("--length-scale", type=float, default=1.0, help="multiply the trace's lengths by this")
    d.add_argument("--max-input-len", type=int, default=None, help="clip scaled trace prompts")
    d.add_argument("--max-output-len", type=int, default=None, help="clip scaled trace outputs")
    d.add_argument("--tokens-per-word", type=float, default=None,
                   help="prompt sizing; default: measured with the server's /tokenize (or estimated)")
    d.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("requests and report")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let answers end early (default: exactly the requested lengths)")
    r.add_argument("--warmup", type=int, default=1, help="unmeasured requests sent first")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    r.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput objective on TTFT")
    r.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput objective on TPOT")
    r.add_argument("--output-json", default=None, help="write the report and every request here")
    r.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=run)


def build_workload(args: argparse.Namespace) -> tuple[list[Session], list[float] | None]:
    """Sessions (without text yet) and their start times (None for the closed loop) from the flags."""
    from chatscale.bench import workloads as w

    needs_trace = args.dataset == "trace" or args.arrival == "trace"
    if needs_trace and not args.trace:
        raise SystemExit("--dataset trace and --arrival trace need --trace FILE")
    records = w.load_trace(args.trace, limit=args.num_requests) if needs_trace else []
    if args.dataset == "trace":
        records = w.scale_lengths(records, args.length_scale, args.max_input_len, args.max_output_len)
        sessions = w.trace_sessions(records)
    elif args.dataset == "conversation":
        sessions = w.conversation_sessions(args.num_requests, args.turns, args.input_len, args.output_len,
                                           args.range_ratio, args.think_time, args.seed)
    else:
        sessions = w.random_sessions(args.num_requests, args.input_len, args.output_len,
                                     args.range_ratio, args.seed)
    if args.arrival == "concurrency":
        return sessions, None
    if args.arrival == "trace":
        if len(records) < len(sessions):
            raise SystemExit(f"{args.trace} has {len(records)} requests; the workload needs {len(sessions)}")
        speedup = args.trace_speedup
        if args.request_rate:
            speedup = args.request_rate / w.trace_rate(records[:len(sessions)])
        return sessions, w.trace_arrivals(records[:len(sessions)], speedup)
    if not args.request_rate:
        raise SystemExit(f"--arrival {args.arrival} needs --request-rate")
    shape = args.burstiness if args.arrival == "gamma" else 1.0
    return sessions, w.gamma_arrivals(len(sessions), args.request_rate, shape, args.seed)


async def _bench(args: argparse.Namespace) -> dict:
    from chatscale.bench.serve import OpenAIClient, run_sessions
    from chatscale.bench.stats import RequestRecord, summarize
    from chatscale.bench.workloads import MOONCAKE_BLOCK_TOKENS, with_text

    sessions, starts = build_workload(args)
    client = OpenAIClient(args.base_url, args.model, args.endpoint, args.ignore_eos, args.temperature,
                          args.timeout, args.api_key)
    try:
        client.model = client.model or await client.first_model()
        if args.tokens_per_word:
            tpw, source = args.tokens_per_word, "given"
        else:
            tpw, source = await client.tokens_per_word()
        block_tokens = round(MOONCAKE_BLOCK_TOKENS * (args.length_scale if args.dataset == "trace" else 1))
        sessions = with_text(sessions, tpw, args.seed, block_tokens)
        first = sessions[0].turns[0]
        for _ in range(args.warmup):
            await client.send([{"role": "user", "content": first.text}], first.output_tokens,
                              RequestRecord(-1, 0, 0.0, 0), 0.0)
        records, duration = await run_sessions(
            client, sessions, tpw, starts=starts,
            concurrency=args.concurrency if starts is None else None,
            max_concurrency=args.max_concurrency, progress=args.progress)
    finally:
        await client.aclose()
    workload = {k: v for k, v in vars(args).items() if k not in ("func", "api_key") and not callable(v)}
    return {
        "label": args.label, "base_url": args.base_url, "model": client.model, "workload": workload,
        "tokens_per_word": tpw, "tokens_per_word_source": source,
        "report": summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms),
        "requests": [{k: v for k, v in asdict(r).items() if k != "chunk_gaps"} for r in records],
    }


def describe(args: argparse.Namespace) -> str:
    """One line saying what load was applied, printed above the table."""
    if args.arrival == "concurrency":
        load = f"{args.concurrency} concurrent users"
    elif args.arrival == "trace":
        load = f"trace {args.trace} timestamps" + (f" at {args.request_rate:g} req/s" if args.request_rate
                                                   else f" x{args.trace_speedup:g}")
    else:
        load = f"{args.arrival} arrivals at {args.request_rate:g} sessions/s"
    return f"{args.base_url}: {args.num_requests} requests, {args.dataset} dataset, {load}"


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from pathlib import Path

    from chatscale.bench.stats import format_report

    result = asyncio.run(_bench(args))
    print(describe(args))
    print(format_report(result["report"]))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return 0 if result["report"]["completed"] else 1
