"""Offline throughput: chatscale vs transformers' generate, against this machine's roofline.

One run measures, on a random bf16 SmolLM2-135M-shaped Llama:
  1. the roofline: memory read bandwidth and bf16 matmul FLOP/s (planner.measure_this_machine);
  2. chatscale's offline throughput on N requests (prompts of 128-512 tokens, 128 output tokens,
     ignore_eos), all queued at once;
  3. transformers' `generate` with static batches (left-padded), sweeping the batch size, best kept;
  4. single-stream decode speed vs the bandwidth roofline (weight bytes / bandwidth);
  5. large-batch decode FLOP/s vs the bf16 compute roofline.

    .venv/bin/python benchmarks/throughput.py [--requests 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import torch
from common import save_json, smollm2_checkpoint

from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams
from chatscale.planner.catalog import from_hf_config
from chatscale.planner.hardware import measure_this_machine
from chatscale.planner.roofline import decode_flops, prefill_flops


def make_requests(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def ours_offline(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    generated = sum(o.num_generated_tokens for o in outs)
    return {"seconds": elapsed, "output_tok_s": generated / elapsed,
            "total_tok_s": (generated + sum(map(len, prompts))) / elapsed}


def ours_single_stream(llm: LLM, prompt: list[int], output_len: int) -> float:
    """Decode tokens/s of one request, from its first token to its last (prefill excluded)."""
    stamps = [time.perf_counter() for _ in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=output_len,
                                                                              ignore_eos=True))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def ours_batch_decode(llm: LLM, batch: int, prompt_len: int, steps: int, model) -> dict:
    """Steady decode steps of `batch` sequences: seconds per step and achieved FLOP/s."""
    e = llm.engine
    rng = random.Random(1)
    for _ in range(batch):
        e.add_request([rng.randrange(100, 49000) for _ in range(prompt_len)],
                      SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    while any(s.num_output_tokens == 0 for r in e.requests.values() for s in r.seqs):
        e.step()  # prefill everything first
    for _ in range(2):
        e.step()
    flops, t = 0.0, time.perf_counter()
    for _ in range(steps):
        flops += sum(decode_flops(model, s.num_tokens) for r in e.requests.values() for s in r.seqs)
        e.step()
    seconds = (time.perf_counter() - t) / steps
    for rid in list(e.requests):
        e.abort_request(rid)
    return {"batch": batch, "step_s": seconds, "tok_s": batch / seconds, "flop_s": flops / steps / seconds}


def hf_static_batches(path, prompts: list[list[int]], output_len: int, batch_sizes: list[int],
                      max_requests: dict[int, int]) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    result = {}
    for bs in batch_sizes:
        subset = prompts[: max_requests.get(bs, bs)]
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
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--min-prompt", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="1,8,32,64,128")
    ap.add_argument("--decode-batch", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every measurement (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = smollm2_checkpoint()
    model = from_hf_config(path / "config.json")
    hw = measure_this_machine(seconds=3.0)
    weight_bytes = model.total_params * 2
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"roofline: {hw.memory_bandwidth / 1e9:.1f} GB/s, bf16 {hw.bf16_flops / 1e12:.3f} TFLOP/s, "
          f"ridge {hw.ridge_point('bf16'):.1f} FLOP/byte; weights {weight_bytes / 1e6:.0f} MB", flush=True)

    prompts = make_requests(args.requests, args.min_prompt, args.max_prompt)
    max_ctx = args.max_prompt + args.output
    llm = LLM(str(path), kv_cache_bytes=int(1.1 * args.requests * max_ctx * 23040),
              max_num_seqs=args.requests, max_num_batched_tokens=args.max_num_batched_tokens)
    single = ours_single_stream(llm, prompts[0][:128], args.output)
    print(f"chatscale single-stream decode: {single:.1f} tok/s", flush=True)
    decode = ours_batch_decode(llm, args.decode_batch, 128, 16, model)
    print(f"chatscale batch-{args.decode_batch} decode: {decode['tok_s']:.0f} tok/s, "
          f"{decode['flop_s'] / 1e12:.3f} TFLOP/s", flush=True)
    offline = ours_offline(llm, prompts, args.output)
    print(f"chatscale offline: {offline['output_tok_s']:.1f} output tok/s in {offline['seconds']:.0f} s", flush=True)
    del llm
    gc.collect()

    sizes = [int(x) for x in args.hf_batch_sizes.split(",")]
    hf = hf_static_batches(path, prompts, args.output, sizes, {1: 2, 8: 16})
    best_bs = max(hf, key=hf.get)

    bandwidth_roofline = hw.memory_bandwidth / weight_bytes
    # The workload's own compute floor: every prompt token and every generated token at peak FLOP/s.
    workload_flops = sum(prefill_flops(model, len(p)) + sum(decode_flops(model, len(p) + j)
                                                            for j in range(args.output)) for p in prompts)
    compute_bound_tok_s = args.requests * args.output / (workload_flops / hw.bf16_flops)
    rows = [
        ("output throughput vs transformers best", offline["output_tok_s"], hf[best_bs], ">= 10x"),
        ("output throughput vs the workload's compute roofline", offline["output_tok_s"], compute_bound_tok_s,
         "(physical limit)"),
        ("single-stream decode vs bandwidth roofline", single, bandwidth_roofline, ">= 0.70"),
        (f"batch-{args.decode_batch} decode FLOP/s vs bf16 peak", decode["flop_s"], hw.bf16_flops, ">= 0.40"),
    ]
    print(f"\n| measure | chatscale | reference | ratio | target |\n|---|---|---|---|---|")
    for name, ours, ref, target in rows:
        print(f"| {name} | {ours:,.1f} | {ref:,.1f} | {ours / ref:.2f} | {target} |")
    print(f"\ntransformers sweep (output tok/s): " + ", ".join(f"bs{b} {v:.0f}" for b, v in hf.items()))
    save_json(args.json, {"hardware": {"bandwidth": hw.memory_bandwidth, "bf16_flops": hw.bf16_flops},
                          "compute_bound_output_tok_s": compute_bound_tok_s,
                          "ours": {"offline": offline, "single_stream_tok_s": single, "batch_decode": decode},
                          "transformers": hf, "best_batch": best_bs})


if __name__ == "__main__":
    main()
