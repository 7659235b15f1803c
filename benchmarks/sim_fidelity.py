"""Fidelity of the replica twin: a real chatscale engine and its twin on the same request streams.

In one run (take it under `flock /tmp/chatscale-bench.lock`, so profile and replays see the same
machine): profile the demo target engine (threads=1) and fit the linear step-cost model; then, per
workload, replay it in real time on the engine and on the twin (same token ids, same KV pages,
same scheduler limits) and compare TTFT p50/p90, TPOT p50 and output throughput.

Workloads: Poisson arrivals with uniform prompt 32-512 and answer 16-128 tokens, at two rates; the
Mooncake conversation trace, lengths divided by 16 (512-token hash blocks become 32-token pages
of shared prefix), a window of it replayed at two speed-ups.

    flock /tmp/chatscale-bench.lock .venv/bin/python benchmarks/sim_fidelity.py --json fidelity.json
"""

from __future__ import annotations

import argparse
import time

from common import save_json

from chatscale.engine.config import EngineConfig
from chatscale.engine.engine import LLMEngine
from chatscale.sim import workloads as W
from chatscale.sim.engine_replay import replay_on_engine
from chatscale.sim.profile import run_profile
from chatscale.sim.replay import simulate_replica
from chatscale.sim.twin import TwinConfig

FIGURES = (("ttft", "p50"), ("ttft", "p90"), ("tpot", "p50"))


def workloads(seconds: float, rates: tuple[float, float], speedups: tuple[float, float]) -> dict[str, W.Workload]:
    out = {f"poisson {r:g}/s": W.poisson(r, seconds, (32, 512), (16, 128), seed=k) for k, r in enumerate(rates)}
    trace = W.mooncake().scaled(length=1 / 16, max_prompt=1536, max_output=256)
    for s in speedups:
        out[f"mooncake x{s:g}"] = trace.scaled(rate=s).window(600 / s, seconds)
    return out


def compare(real: dict, twin: dict) -> dict:
    rows = {f"{a} {b}": (real[a][b], twin[a][b]) for a, b in FIGURES}
    rows["throughput tok/s"] = (real["throughput_tok_s"], twin["throughput_tok_s"])
    return {k: {"engine": r, "twin": t, "error": (t - r) / r} for k, (r, t) in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0, help="length of each replay")
    ap.add_argument("--rates", type=float, nargs=2, default=(3.0, 7.0))
    ap.add_argument("--speedups", type=float, nargs=2, default=(0.6, 1.2))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile-out", default=None, help="save the fitted profile JSON here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t0 = time.time()
    cost = run_profile(threads=args.threads, repeats=1)
    if args.profile_out:
        cost.save(args.profile_out)
    print(f"profile: {cost.coefficients} fit error {cost.source['mean_abs_error']:.1%} ({time.time() - t0:.0f} s)")
    engine = LLMEngine(EngineConfig(threads=args.threads, max_num_seqs=128), num_blocks=4096)
    config = TwinConfig(num_blocks=engine.kv.num_blocks, block_size=engine.kv.block_size,
                        max_num_seqs=engine.config.max_num_seqs,
                        max_num_batched_tokens=engine.config.max_num_batched_tokens,
                        max_model_len=engine.max_model_len, vocab=engine.vocab_size)
    results = {"profile": {"coefficients": cost.coefficients, **cost.source}, "workloads": {}}
    for name, w in workloads(args.seconds, tuple(args.rates), tuple(args.speedups)).items():
        real = replay_on_engine(engine, w).summary()
        twin = simulate_replica(w, cost, config)[0].summary()
        rows = compare(real, twin)
        results["workloads"][name] = {"requests": len(w), "engine": real, "twin": twin, "compare": rows}
        print(f"\n{name}: {len(w)} requests, engine hit rate {real['cache_hit_rate']:.1%} "
              f"twin {twin['cache_hit_rate']:.1%}")
        for k, v in rows.items():
            print(f"  {k:18s} engine {v['engine']:9.4f}  twin {v['twin']:9.4f}  error {v['error']:+6.1%}")
    results["wall_s"] = time.time() - t0
    save_json(args.json, results)


if __name__ == "__main__":
    main()
