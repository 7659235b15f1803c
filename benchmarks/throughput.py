"""Offline throughput against the step-level roofline, with transformers as the peer, in one run.

The roofline of a step is the time its work needs at this machine's measured limits: its FLOPs
(step_work, the planner's formulas on the step's real batch) at the GEMM rate measured on the model's
own layer shapes at that step's token count, or its bytes (every weight once, every sequence's KV) at
the measured read bandwidth, whichever is longer. Summed over every step of an offline run and
divided by the run's measured step time, it says how close to the machine the engine runs.

One run measures:
  1. the machine: read bandwidth (planner.measure_this_machine) and GEMM FLOP/s on the model's
     gate/up projection at 1 to 2048 tokens, in the serving dtype;
  2. chatscale offline on N requests (prompts of 128-512 tokens, 128 output tokens, ignore_eos),
     all queued at once; every step's stats against its roofline;
  3. one stream's decode against weight bytes / bandwidth;
  4. transformers' `generate` with static batches (left-padded), the batch sweep's best (the peer).

    .venv/bin/python benchmarks/throughput.py --model ~/.cache/chatscale-bench/smollm2-135m-instruct-f32
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from common import save_json, smollm2_checkpoint

from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams
from chatscale.planner.catalog import from_hf_config
from chatscale.planner.hardware import best_seconds, measure_this_machine
from chatscale.step_work import step_work

GEMM_TOKENS = (1, 4, 16, 64, 256, 1024, 2048)


def make_requests(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def gemm_flops_by_tokens(layer: torch.nn.Module, dtype: torch.dtype, seconds: float = 0.3) -> dict[int, float]:
    """Measured FLOP/s of one of the served model's linear layers, run as the engine runs it (the
    kernel it chose: prepacked oneDNN, weight-only int8/int4, ...), at each token count."""
    rates = {}
    with torch.no_grad():
        for t in GEMM_TOKENS:
            x = torch.randn(t, layer.in_features, dtype=dtype)
            rates[t] = 2 * t * layer.in_features * layer.out_features / best_seconds(lambda: layer(x), seconds)
    return rates


def rate_at(rates: dict[int, float], tokens: int) -> float:
    """GEMM FLOP/s at `tokens`, interpolated in log(tokens) between the measured points."""
    xs = np.log(list(rates))
    return float(np.interp(np.log(max(tokens, 1)), xs, list(rates.values())))


def single_stream(llm: LLM, prompt: list[int], output_len: int) -> float:
    """Decode tokens/s of one request, from its first token to its last (prefill excluded)."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    stamps = [time.perf_counter() for _ in llm.stream(prompt, params)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def offline(llm: LLM, prompts: list[list[int]], output_len: int, shape, dtype: str, bandwidth: float,
            rates: dict[int, float]) -> dict:
    steps = []
    llm.engine.step_listeners.append(steps.append)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    seconds = time.perf_counter() - start
    llm.engine.step_listeners.remove(steps.append)
    bound = measured = 0.0
    by_kind = {"decode": [0.0, 0.0, 0], "prefill or mixed": [0.0, 0.0, 0]}
    for s in steps:
        work = step_work(shape, dtype, s.chunks, s.expert_tokens)
        t = max(work.flops / rate_at(rates, s.num_tokens), work.bytes / bandwidth)
        bound += t
        measured += s.duration_s
        kind = by_kind["prefill or mixed" if s.num_prefill_tokens else "decode"]
        kind[0] += t
        kind[1] += s.duration_s
        kind[2] += 1
    generated = sum(o.num_generated_tokens for o in outs)
    return {"seconds": seconds, "output_tok_s": generated / seconds, "steps": len(steps),
            "roofline_s": bound, "step_s": measured, "fraction_of_roofline": bound / measured,
            "by_kind": {k: {"roofline_s": v[0], "step_s": v[1], "steps": v[2],
                            "fraction": v[0] / v[1] if v[1] else None} for k, v in by_kind.items()}}


def hf_static_batches(path, prompts: list[list[int]], output_len: int, batch_sizes: list[int],
                      dtype: torch.dtype, per_size: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    result = {}
    for bs in batch_sizes:
        subset = prompts[: max(bs, per_size)]
        generated, t = 0, time.perf_counter()
        for i in range(0, len(subset), bs):
            chunk = subset[i: i + bs]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                     do_sample=False, pad_token_id=0)
            generated += (out.shape[1] - width) * len(chunk)
        result[bs] = generated / (time.perf_counter() - t)
        print(f"  transformers bs={bs}: {result[bs]:.1f} output tok/s", flush=True)
    del model
    gc.collect()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint (default: random weights of SmolLM2-135M's shape)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="8,32,64", help="'' to skip the transformers peer")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model).expanduser() if args.model else smollm2_checkpoint()
    shape = from_hf_config(path / "config.json")
    print(f"load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}; {path.name}", flush=True)

    max_ctx = args.max_prompt + args.output
    llm = LLM(str(path), threads=args.threads, max_num_seqs=args.requests,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_ctx + 16)
    model = llm.engine.model
    dtype = llm.engine.info.dtype
    hw = measure_this_machine(seconds=2.0)
    rates = gemm_flops_by_tokens(model.layers[0].mlp.gate_up, model.dtype)
    weights = model.weight_bytes()
    print(f"read bandwidth {hw.memory_bandwidth / 1e9:.1f} GB/s; {dtype} GEMM on gate_up "
          + ", ".join(f"{t} tok {r / 1e9:.0f}" for t, r in rates.items()) + " GFLOP/s; "
          f"weights {weights / 1e6:.0f} MB", flush=True)
    prompts = make_requests(args.requests, args.min_prompt, args.max_prompt, shape.vocab)
    single = single_stream(llm, prompts[0][:128], args.output)
    print(f"chatscale single-stream decode: {single:.1f} tok/s", flush=True)
    ours = offline(llm, prompts, args.output, shape, dtype, hw.memory_bandwidth, rates)
    print(f"chatscale offline: {ours['output_tok_s']:.1f} output tok/s in {ours['seconds']:.0f} s, "
          f"{ours['fraction_of_roofline']:.2f} of the step-level roofline", flush=True)
    del llm
    gc.collect()
    sizes = [int(x) for x in args.hf_batch_sizes.split(",") if x]
    hf = hf_static_batches(path, prompts, args.output, sizes, model.dtype, 32) if sizes else {}
    best = max(hf, key=hf.get) if hf else None

    print("\n| measure | chatscale | reference | ratio | target |\n|---|---:|---:|---:|---|")
    print(f"| offline: step time at the step-level roofline / measured step time | "
          f"{ours['step_s']:.1f} s | {ours['roofline_s']:.1f} s | **{ours['fraction_of_roofline']:.2f}** | ≥ 0.6 |")
    for kind, v in ours["by_kind"].items():
        if v["steps"]:
            print(f"| ... {kind} steps ({v['steps']}) | {v['step_s']:.1f} s | {v['roofline_s']:.1f} s | "
                  f"{v['fraction']:.2f} | |")
    roof = hw.memory_bandwidth / weights
    print(f"| one stream's decode vs weights / bandwidth | {single:.1f} tok/s | {roof:.1f} tok/s | "
          f"**{single / roof:.2f}** | ≥ 0.9 |")
    if best is not None:
        print(f"| offline output tok/s vs transformers' best static batch (bs {best}) | {ours['output_tok_s']:.1f} | "
              f"{hf[best]:.1f} | {ours['output_tok_s'] / hf[best]:.2f}x | |")
    save_json(args.json, {"bandwidth": hw.memory_bandwidth, "gemm_flops": rates, "weight_bytes": weights,
                          "ours": {"offline": ours, "single_stream_tok_s": single}, "transformers": hf})


if __name__ == "__main__":
    main()
