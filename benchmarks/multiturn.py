"""Multi-turn chat and a Mooncake replay: prefix caching and the second KV tier (issue 5).

One run, on a random bf16 Llama (SHAPE below) with 16-token KV pages and one torch thread unless
told otherwise, measures:

  1. Multi-turn chat in real time: C conversations x T turns, staggered starts, think time between
     a turn's answer and the next question. Turn N+1's prompt is turn N's prompt + its answer + a
     new user message, as token ids, so the prefix property holds exactly. Per turn: TTFT p50/p99
     (first token minus the planned arrival, so time spent waiting for a step to end counts) and
     prefill tokens computed (prompt minus cached), for: cache off; cache on with a KV budget that
     holds every conversation; cache on with a third of it; and that third plus the second tier.
  2. A replay of the first N requests of mooncake_conversation.jsonl, scaled: 512-token hash blocks
     become 512/scale tokens, lengths are divided by `scale`, arrivals compressed by `speedup`. A
     block's tokens are drawn from a generator seeded by its hash id, so equal ids are equal tokens.
     The engine's hit rate (kv.stats hits / queries) is compared with the ideal, infinite-cache hit
     rate of the same prompts, counted the way the engine counts hits: whole pages, chained, and
     at least one token of every prompt left to compute.

    .venv/bin/python benchmarks/multiturn.py [--threads 1] [--part chat|mooncake|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import random_llama_checkpoint, save_json

from chatscale.engine.config import EngineConfig
from chatscale.engine.engine import LLMEngine
from chatscale.engine.sampling_params import SamplingParams
from chatscale.traces import TRACES_DIR

# The demo target's layout (GQA, tied embeddings), halved in width and depth so that the cache-off
# run of the chat workload takes about a minute on two shared CPU cores; 8192 positions hold the
# longest scaled Mooncake prompts.
SHAPE = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=4096, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
)
PAGE = 16
TRACE = TRACES_DIR / "mooncake_conversation.jsonl"
STATS = ("queries", "hits", "evictions", "recomputed", "tier_stores", "tier_restores")  # kv.stats counters


def page_bytes() -> int:
    """KV bytes of one page of SHAPE in bf16: K and V, every layer, every KV head."""
    head_dim = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    return 2 * SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * head_dim * 2 * PAGE


@dataclass(eq=False)
class Request:
    rid: str
    prompt: list[int]
    max_tokens: int
    arrival: float  # planned, seconds after the run starts
    turn: int = 1
    conversation: int = 0
    ttft: float | None = None
    queued: float | None = None  # first scheduled minus planned arrival: waiting for pages or a batch slot
    cached: int = 0
    output: list[int] = field(default_factory=list)


FollowUp = Callable[[Request, float], Request | None]


def replay(engine: LLMEngine, first: list[Request], follow_up: FollowUp) -> tuple[list[Request], float]:
    """Serve requests at their planned arrival times, stepping the engine in this thread; a finished
    request may plan another (the user's next turn). Returns the finished requests and the wall time."""
    order = itertools.count()
    pending = [(r.arrival, next(order), r) for r in first]
    heapq.heapify(pending)
    live: dict[str, Request] = {}
    done: list[Request] = []
    t0 = time.monotonic()
    while pending or live:
        now = time.monotonic() - t0
        while pending and pending[0][0] <= now:
            req = heapq.heappop(pending)[2]
            engine.add_request(req.prompt, SamplingParams(temperature=0, max_tokens=req.max_tokens, ignore_eos=True),
                               req.rid)
            live[req.rid] = req
        if not live:
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        for out in engine.step():
            req = live[out.request_id]
            if req.ttft is None and out.metrics.first_token_time is not None:
                req.ttft = out.metrics.first_token_time - t0 - req.arrival
                req.queued = out.metrics.first_scheduled_time - t0 - req.arrival
            if out.finished:
                req.cached, req.output = out.num_cached_tokens, list(out.outputs[0].token_ids)
                done.append(live.pop(req.rid))
                nxt = follow_up(req, time.monotonic() - t0)
                if nxt is not None:
                    heapq.heappush(pending, (nxt.arrival, next(order), nxt))
    return done, time.monotonic() - t0


def make_engine(path: Path, args: argparse.Namespace, num_blocks: int, prefix_caching: bool = True,
                tier_pages: int = 0) -> LLMEngine:
    """An engine warmed up by one request, with its prefix cache emptied again."""
    config = EngineConfig(model=str(path), threads=args.threads, enable_prefix_caching=prefix_caching,
                          kv_host_bytes=tier_pages * page_bytes(), max_num_batched_tokens=args.max_num_batched_tokens)
    engine = LLMEngine(config, num_blocks=num_blocks)
    engine.add_request([7] * 600, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "warm-up")
    while engine.has_unfinished_requests():
        engine.step()
    engine.kv.reset_prefix_cache()
    return engine


def run(name: str, path: Path, args: argparse.Namespace, first: list[Request], follow_up: FollowUp,
        num_blocks: int, **engine_kw) -> dict:
    """One configuration: its finished requests and what the KV manager counted while they ran."""
    engine = make_engine(path, args, num_blocks, **engine_kw)
    before = {k: getattr(engine.kv.stats, k) for k in STATS}
    scheduled, preemptions = engine.total_scheduled_tokens, engine.scheduler.num_preemptions
    load = os.getloadavg()[0]
    done, wall = replay(engine, first, follow_up)
    stats = {k: getattr(engine.kv.stats, k) - before[k] for k in STATS}
    result = {
        "name": name, "requests": done, "wall_s": wall, "load_before": load, "load_after": os.getloadavg()[0],
        "kv_pages": num_blocks, "kv_mb": num_blocks * page_bytes() / 2**20, "stats": stats,
        "tokens_computed": engine.total_scheduled_tokens - scheduled,
        "preemptions": engine.scheduler.num_preemptions - preemptions,
        "tier": None if engine.tier_report is None else f"{'on' if engine.kv.tier else 'off'} ({engine.tier_report})",
    }
    hit = stats["hits"] / max(1, stats["queries"])
    queued = [r.queued for r in done]
    print(f"  {name}: {wall:.0f} s, {result['tokens_computed']:,} tokens computed, hit rate {hit:.1%}, "
          f"queued p50/p99 {pct(queued, 50) * 1e3:,.0f}/{pct(queued, 99) * 1e3:,.0f} ms, "
          f"{stats['evictions']:,} pages evicted, {stats['recomputed']:,} tokens recomputed, "
          f"{stats['tier_stores']:,}/{stats['tier_restores']:,} tier stores/restores, "
          f"{result['preemptions']} preemptions, tier {result['tier']}, load {load:.2f} -> {result['load_after']:.2f}",
          flush=True)
    return result


# ---- 1. multi-turn chat -------------------------------------------------------------------------

@dataclass
class Chat:
    """C users, each with T messages and T-1 think times drawn once, so every configuration serves
    the same conversations; only when each next turn arrives depends on the configuration."""

    conversations: int
    turns: int
    first_len: int
    user_len: int
    answer_len: int
    think_s: float
    stagger_s: float
    seed: int = 0
    messages: list[list[list[int]]] = field(init=False)
    thinks: list[list[float]] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        vocab = SHAPE["vocab_size"]

        def message(n: int) -> list[int]:
            return [rng.randrange(10, vocab) for _ in range(n)]

        def later() -> list[int]:
            return message(rng.randint(self.user_len * 3 // 4, self.user_len * 5 // 4))

        self.messages = [[message(self.first_len)] + [later() for _ in range(self.turns - 1)]
                         for _ in range(self.conversations)]
        self.thinks = [[rng.uniform(self.think_s / 2, self.think_s * 3 / 2) for _ in range(self.turns - 1)]
                       for _ in range(self.conversations)]

    def first(self) -> list[Request]:
        return [Request(f"c{c}-t1", self.messages[c][0], self.answer_len, c * self.stagger_s, 1, c)
                for c in range(self.conversations)]

    def follow_up(self, req: Request, now: float) -> Request | None:
        c, t = req.conversation, req.turn
        if t == self.turns:
            return None
        prompt = req.prompt + req.output + self.messages[c][t]
        return Request(f"c{c}-t{t + 1}", prompt, self.answer_len, now + self.thinks[c][t - 1], t + 1, c)

    def pages_for_all(self) -> int:
        """Pages holding every conversation's whole history at its end, plus one per conversation."""
        lengths = [sum(map(len, m)) + self.turns * self.answer_len for m in self.messages]
        return sum(math.ceil(n / PAGE) for n in lengths) + self.conversations


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 32 values is their maximum)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def chat_tables(chat: Chat, results: list[dict]) -> dict:
    names = [res["name"] for res in results]
    summary: dict[int, dict] = {}
    for t in range(1, chat.turns + 1):
        turn = {res["name"]: [r for r in res["requests"] if r.turn == t] for res in results}
        summary[t] = {"prompt": statistics.mean(len(r.prompt) for r in turn[names[0]])}
        for name, reqs in turn.items():
            ttfts = [r.ttft for r in reqs]
            summary[t][name] = {"ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
                                "prefill": statistics.mean(len(r.prompt) - r.cached for r in reqs)}
    print("\nTTFT p50 / p99 (ms) per turn\n")
    print("| turn | prompt tokens (mean) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for t, row in summary.items():
        cells = [f"{row[n]['ttft_p50'] * 1e3:,.0f} / {row[n]['ttft_p99'] * 1e3:,.0f}" for n in names]
        print(f"| {t} | {row['prompt']:,.0f} | " + " | ".join(cells) + " |")
    print("\nprefill tokens computed per request (mean: prompt minus cached) per turn\n")
    print("| turn | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for t, row in summary.items():
        print(f"| {t} | " + " | ".join(f"{row[n]['prefill']:,.0f}" for n in names) + " |")
    long_turns = [t for t in summary if summary[t]["prompt"] >= 2048] or [chat.turns]  # short runs: the last
    off, on = results[0], results[1]
    ratios = {}
    for q in (50, 99):
        off_q = pct([r.ttft for r in off["requests"] if r.turn in long_turns], q)
        on_q = pct([r.ttft for r in on["requests"] if r.turn in long_turns], q)
        ratios[f"p{q}"] = off_q / on_q
    flat = summary[chat.turns][on["name"]]["ttft_p50"] / summary[1][on["name"]]["ttft_p50"]
    print(f"\nturns {long_turns} (prompts >= 2k tokens, else the last): TTFT {off['name']} / {on['name']}: "
          f"p50 {ratios['p50']:.1f}x, p99 {ratios['p99']:.1f}x (target >= 5x); "
          f"{on['name']} TTFT p50 turn {chat.turns} / turn 1: {flat:.2f} (flat: ~1)")
    return {"per_turn": summary, "long_turns": long_turns, "off_on_ratio": ratios, "on_last_first": flat}


def chat_part(path: Path, args: argparse.Namespace) -> dict:
    chat = Chat(args.conversations, args.turns, args.first_len, args.user_len, args.answer_len, args.think,
                args.stagger)
    all_pages = chat.pages_for_all()
    print(f"\n== multi-turn chat: {chat.conversations} conversations x {chat.turns} turns, first message "
          f"{chat.first_len} tokens, then {chat.user_len} +-25% per turn, answers {chat.answer_len} tokens, "
          f"think {chat.think_s} s +-50%, starts {chat.stagger_s} s apart; KV budget for all "
          f"{all_pages} pages ({all_pages * page_bytes() / 2**20:.0f} MiB), a third {all_pages // 3}", flush=True)
    third = all_pages // 3
    results = [
        run("cache off", path, args, chat.first(), chat.follow_up, all_pages, prefix_caching=False),
        run("on, all", path, args, chat.first(), chat.follow_up, all_pages),
        run("on, third", path, args, chat.first(), chat.follow_up, third),
        run("on, third + tier", path, args, chat.first(), chat.follow_up, third, tier_pages=all_pages),
    ]
    return {"results": results, "tables": chat_tables(chat, results)}


# ---- 2. Mooncake replay -------------------------------------------------------------------------

def mooncake_requests(n: int, scale: int, speedup: float) -> list[Request]:
    """The trace's first n requests, scaled; a hash id's block is always the same tokens."""
    block = 512 // scale
    blocks: dict[int, list[int]] = {}

    def tokens_of(h: int) -> list[int]:
        if h not in blocks:
            rng = random.Random(h)
            blocks[h] = [rng.randrange(10, SHAPE["vocab_size"]) for _ in range(block)]
        return blocks[h]

    requests = []
    with open(TRACE) as f:
        for i, line in enumerate(itertools.islice(f, n)):
            r = json.loads(line)
            prompt = [t for h in r["hash_ids"] for t in tokens_of(h)][: max(1, r["input_length"] // scale)]
            requests.append(Request(f"mc{i}", prompt, max(1, r["output_length"] // scale),
                                    r["timestamp"] / 1000 / speedup))
    return sorted(requests, key=lambda r: r.arrival)


def ideal_hit_rate(requests: list[Request]) -> tuple[float, int]:
    """Infinite-cache hit rate in arrival order, counted as the engine counts hits: a prompt's
    leading full pages that an earlier prompt filled, chained (a page's identity is its tokens and
    its parent's), at most (len - 1) // PAGE of them. Also returns the distinct pages seen."""
    ids: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent page id, tokens) -> page id
    hits = queries = 0
    for r in requests:
        parent, hit, full = -1, 0, len(r.prompt) // PAGE
        limit = (len(r.prompt) - 1) // PAGE
        for i in range(full):
            key = (parent, tuple(r.prompt[i * PAGE:(i + 1) * PAGE]))
            page = ids.get(key)
            if page is None:
                page = ids[key] = len(ids)
            elif i == hit and i < limit:
                hit += 1
            parent = page
        hits += hit * PAGE
        queries += len(r.prompt)
    return hits / queries, len(ids)


def mooncake_part(path: Path, args: argparse.Namespace) -> dict:
    requests = mooncake_requests(args.mooncake_requests, args.mooncake_scale, args.mooncake_speedup)
    ideal, distinct = ideal_hit_rate(requests)
    longest = max(math.ceil((len(r.prompt) + r.max_tokens) / PAGE) for r in requests)
    budget = max(int(distinct * args.mooncake_kv_fraction), 2 * longest)
    # Everything: every distinct prompt page, plus the pages answers fill (cached too, never reused).
    everything = distinct + sum(r.max_tokens // PAGE + 2 for r in requests)
    print(f"\n== Mooncake replay: first {len(requests)} requests, 512-token blocks -> {512 // args.mooncake_scale} "
          f"tokens, lengths / {args.mooncake_scale}, arrivals {args.mooncake_speedup}x faster "
          f"({requests[-1].arrival:.0f} s); prompts {sum(len(r.prompt) for r in requests):,} tokens, "
          f"{distinct:,} distinct pages; ideal hit rate {ideal:.1%}", flush=True)

    def fresh() -> list[Request]:
        return [Request(r.rid, r.prompt, r.max_tokens, r.arrival) for r in requests]

    def no_follow_up(_: Request, __: float) -> None:
        return None

    configs = [("holds all", everything, 0),
               (f"{args.mooncake_kv_fraction:.0%} of distinct", budget, 0),
               (f"{args.mooncake_kv_fraction:.0%} + tier", budget, distinct)]
    results = [run(name, path, args, fresh(), no_follow_up, pages, tier_pages=tier) for name, pages, tier in configs]
    print("\n| KV budget | pages (MiB) | second tier | hit rate | ideal | gap (points) | TTFT p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for res, (_, _, tier) in zip(results, configs):
        rate = res["stats"]["hits"] / res["stats"]["queries"]
        ttfts = [r.ttft for r in res["requests"]]
        rows.append({"name": res["name"], "hit_rate": rate, "gap_points": (ideal - rate) * 100})
        second = f"{tier:,} pages, {res['tier']}" if tier else "none"
        print(f"| {res['name']} | {res['kv_pages']:,} ({res['kv_mb']:.0f}) | {second} | {rate:.1%} | {ideal:.1%} | "
              f"{(ideal - rate) * 100:.1f} | {pct(ttfts, 50) * 1e3:,.0f} / {pct(ttfts, 99) * 1e3:,.0f} |")
    return {"ideal_hit_rate": ideal, "distinct_pages": distinct, "results": results, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["chat", "mooncake", "all"], default="all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1 by default)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--first-len", type=int, default=512, help="tokens of each conversation's first message")
    ap.add_argument("--user-len", type=int, default=200, help="mean tokens of each later user message")
    ap.add_argument("--answer-len", type=int, default=64)
    ap.add_argument("--think", type=float, default=4.0, help="mean seconds between an answer and the next question")
    ap.add_argument("--stagger", type=float, default=0.25, help="seconds between conversation starts")
    ap.add_argument("--mooncake-requests", type=int, default=1000)
    ap.add_argument("--mooncake-scale", type=int, default=32, help="divide lengths (and 512-token blocks) by this")
    ap.add_argument("--mooncake-speedup", type=float, default=3.0, help="compress arrival times by this")
    ap.add_argument("--mooncake-kv-fraction", type=float, default=0.2,
                    help="KV budget as a fraction of the replay's distinct pages")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    path = random_llama_checkpoint("llama-256x6-random-bf16", SHAPE)
    shape = ", ".join(f"{k} {SHAPE[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "vocab_size"))
    print(f"model: random bf16 Llama ({shape}; {SHAPE['max_position_embeddings']} positions), {PAGE}-token "
          f"pages of {page_bytes() / 1024:.0f} KiB; torch threads {args.threads}; load {os.getloadavg()}", flush=True)
    out = {"shape": SHAPE, "threads": args.threads, "args": vars(args)}
    if args.part in ("chat", "all"):
        out["chat"] = chat_part(path, args)
    if args.part in ("mooncake", "all"):
        out["mooncake"] = mooncake_part(path, args)
    for part in ("chat", "mooncake"):
        for res in out.get(part, {}).get("results", []):
            res["requests"] = [{"rid": r.rid, "turn": r.turn, "prompt": len(r.prompt), "cached": r.cached,
                                "ttft": r.ttft, "queued": r.queued} for r in res["requests"]]
    save_json(args.json, out)


if __name__ == "__main__":
    main()
