"""Tensor parallelism on this machine's CPU: one rank against two, and the collectives' measured time
per step against the planner's communication term, in one run.

Two gloo ranks on one host share its cores and its memory bandwidth, so TP=2 cannot be faster here
(the issue says so: on a CPU this is for correctness); what this measures is what the collectives
cost and how well the planner predicts it. The link is measured first, in the same run: a large
all-reduce between two processes gives gloo's bus bandwidth (what the planner's term divides by),
a small one (one decode token's activations) its latency (which the planner's term counts only where
the hardware gives `link_latency`: the table shows it without, then with the measured one).
Then the engine decodes --output-len greedy tokens for a batch of --batch requests, on one rank
(all cores) and on two (the cores split), and every decode step's duration and collective seconds
(`StepStats.collective_s`, rank 0's wall time inside all-reduces and the logits' all-gather) are
kept; the table shows medians over --repeats runs.

    .venv/bin/python benchmarks/tensor_parallel.py [--model PATH] [--batch 1 --batch 8] [--output-len 64]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from common import save_json  # noqa: E402

SMALL_ELEMENTS = 512  # a decode token's activations in the demo target (hidden 512)
LARGE_BYTES = 64 << 20


def _link_rank(rank: int, port: int, small: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    times = {}
    for name, numel, repeats in (("small", small, 400), ("large", LARGE_BYTES // 4, 8)):
        x = torch.ones(numel)
        dist.all_reduce(x)  # warm the connection
        samples = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    if rank == 0:
        out.update(times)
    dist.destroy_process_group()


def measure_link(small_elements: int) -> tuple[float, float]:
    """gloo between two local processes: (small all-reduce latency s, bus bandwidth bytes/s)."""
    from chatscale.bench.launch import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_link_rank, args=(free_port(), small_elements, out), nprocs=2)
        small, large = out["small"], out["large"]
    return small, 2 * (2 - 1) / 2 * LARGE_BYTES / large  # a ring moves 2(n-1)/n buffers per rank


def decode_steps(model: str, tp: int, batch: int, output_len: int, threads: int) -> list[tuple[float, float, int]]:
    """(seconds, collective seconds, summed context) of every decode step of one greedy batch."""
    from chatscale import LLM, SamplingParams

    steps = []
    with LLM(model, tensor_parallel_size=tp, threads=max(1, threads // tp)) as llm:
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        prompts = [[(7 * i + j) % 200 + 10 for j in range(32)] for i in range(batch)]
        llm.generate(prompts, params)  # warm-up
        llm.engine.step_listeners.append(
            lambda s: steps.append((s.duration_s, s.collective_s, sum(c + n for c, n in s.chunks)))
            if s.num_prefill_tokens == 0 else None)
        llm.generate(prompts, params)
    return steps


# A Llama large enough that its weights, not torch's runtime, set a process's peak memory: 0.5B
# parameters, 1 GB in bf16.
LOAD_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, bos_token_id=0,
                  eos_token_id=0)
PEAK_PROBE = """
import json, os, sys
from pathlib import Path
from chatscale import LLM

def peak_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

with LLM(sys.argv[1], tensor_parallel_size=int(sys.argv[2]), threads=1, num_blocks=16) as llm:
    ranks = getattr(llm.engine.core.executor, "ranks", [])  # the other ranks' processes
    print(json.dumps([peak_mib(os.getpid())] + [peak_mib(p.pid) for p in ranks]))
"""


def peak_memory_at_load(tp: int) -> list[float]:
    """Peak resident MiB of each rank's process once the model is loaded (rank 0 first)."""
    import json
    import subprocess

    from common import random_llama_checkpoint

    path = random_llama_checkpoint("llama-0.5b-random-bf16", LOAD_SHAPE)
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(path), str(tp)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from chatscale.models.demo import demo_model_path
    from chatscale.planner.catalog import from_hf_config
    from chatscale.planner.hardware import Hardware
    from chatscale.planner.roofline import Layout, step_cost

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(demo_model_path("target")))
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads in all: one rank takes them all, two ranks half each (at least one)")
    p.add_argument("--output-json")
    args = p.parse_args()
    batches = args.batch or [1, 8]
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.threads} threads")

    import json

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    shape = from_hf_config(cfg)
    latency, bandwidth = measure_link(cfg["hidden_size"])
    print(f"gloo, 2 local ranks: all-reduce of {cfg['hidden_size']} fp32 {latency * 1e6:.0f} us (median); "
          f"bus bandwidth {bandwidth / 1e9:.2f} GB/s ({LARGE_BYTES >> 20} MiB all-reduce)")
    link = Hardware("this CPU over gloo", 1.0, 1.0, 1.0, nvlink_bandwidth=bandwidth, gpus_per_node=2)
    timed_link = replace(link, link_latency=latency)
    dtype_name = {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.get("torch_dtype") or cfg.get("dtype"), "fp32")

    rows = []
    for batch in batches:
        per_tp = {}
        for tp in (1, 2):
            runs = [decode_steps(args.model, tp, batch, args.output_len, args.threads) for _ in range(args.repeats)]
            steps = [s for run in runs for s in run]
            per_tp[tp] = steps
        one = statistics.median(s[0] for s in per_tp[1])
        two = statistics.median(s[0] for s in per_tp[2])
        coll = statistics.median(s[1] for s in per_tp[2])
        context = int(statistics.median(s[2] for s in per_tp[2]))
        contexts = [max(1, context // batch)] * batch
        layout = Layout(tp=2, weight_dtype=dtype_name, kv_dtype=dtype_name)
        planner = step_cost(shape, link, layout, decode_contexts=contexts).comm_s
        with_latency = step_cost(shape, timed_link, layout, decode_contexts=contexts).comm_s
        rows.append(dict(batch=batch, step_ms_tp1=one * 1e3, step_ms_tp2=two * 1e3, collective_ms=coll * 1e3,
                         planner_comm_ms=planner * 1e3, planner_plus_latency_ms=with_latency * 1e3,
                         collective_share=coll / two, tp2_over_tp1_tokens_per_s=one / two))
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print("| batch | step TP=1 | step TP=2 | collectives / step (TP=2) | share | planner's comm term | "
          "with the measured latency | tok/s TP=2 / TP=1 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms_tp1']:.2f} ms | {r['step_ms_tp2']:.2f} ms | {r['collective_ms']:.2f} ms "
              f"| {r['collective_share']:.0%} | {r['planner_comm_ms']:.4f} ms | {r['planner_plus_latency_ms']:.2f} ms "
              f"| {r['tp2_over_tp1_tokens_per_s']:.2f}x |")
    peaks = {tp: peak_memory_at_load(tp) for tp in (1, 2)}
    print(f"peak resident memory after loading a 0.5B-parameter Llama (1 GB in bf16): one rank "
          f"{peaks[1][0]:.0f} MiB; two ranks {peaks[2][0]:.0f} MiB (rank 0, the engine process) and "
          f"{peaks[2][1]:.0f} MiB (rank 1)")
    save_json(args.output_json, dict(load_before=load, load_after=load_after, latency_s=latency,
                                     bus_bandwidth=bandwidth, rows=rows, peak_mib=peaks))


if __name__ == "__main__":
    main()
