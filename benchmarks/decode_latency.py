"""One stream's decode: time per token against the weight-streaming roofline and llama.cpp, one run.

Batch-1 decode reads every weight once per token, so its limit is weight bytes / read bandwidth,
both measured here in the same run; what is left above that is per-step fixed cost (Python, op
launches, host syncs), which a tiny model shows undiluted. For each model the engine decodes
--output-len tokens of one greedy request (ignore_eos), eagerly and with the compiled decode graph,
`--repeats` times alternating; the table shows medians. With --gguf (the same weights as a GGUF) and
a llama.cpp build, `llama-bench -p 0 -n N` decodes with the same threads in the same run.

    .venv/bin/python benchmarks/decode_latency.py --model tiny --model SMOLLM2_F32 \
        --gguf SmolLM2-135M-Instruct-f32.gguf --llama-dir LLAMA_CPP_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import random_llama_checkpoint, save_json  # noqa: E402

# The fixed-cost probe: a 3-layer Llama with hidden size 64 (weights are noise; cost is shape).
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0)


def decode_ms_per_token(model: str, threads: int, compile_: bool, prompt_len: int,
                        output_len: int) -> tuple[Callable[[], float], float, int]:
    """An engine on `model`, warmed up: (a function timing one greedy run's ms per decoded token, the
    first run's seconds (the compile, when compiled), the model's weight bytes)."""
    from chatscale import LLM, SamplingParams

    llm = LLM(model, threads=threads, dtype="float32", compile=compile_, kv_cache_bytes=64 << 20)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    prompt = list(range(10, 10 + prompt_len))
    start = time.perf_counter()
    list(llm.stream(prompt, params))  # warm-up, and the compile of the decode graph
    warm_s = time.perf_counter() - start

    def one() -> float:
        stamps = [time.perf_counter() for _ in llm.stream(prompt, params)]
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3

    return one, warm_s, llm.engine.model.weight_bytes()


def llama_bench_tok_s(llama_dir: Path, gguf: Path, threads: int, output_len: int, repeats: int) -> float:
    bench = llama_dir / "build" / "bin" / "llama-bench"
    out = subprocess.run([str(bench), "-m", str(gguf), "-p", "0", "-n", str(output_len), "-t", str(threads),
                          "-r", str(repeats), "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None,
                   help="'tiny' (3 layers, hidden 64) or an fp32 HF checkpoint; repeatable (default: tiny)")
    p.add_argument("--gguf", type=Path, default=None, help="the last --model's weights as a GGUF, for llama-bench")
    p.add_argument("--llama-dir", type=Path, default=None, help="llama.cpp source with its build/")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled decode graph")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    from chatscale.planner.hardware import measure_this_machine

    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}", flush=True)
    machine = measure_this_machine()
    bandwidth = machine.memory_bandwidth
    print(f"{machine.name}: read bandwidth {bandwidth / 1e9:.1f} GB/s ({args.threads} threads)", flush=True)
    results = {"load_before": os.getloadavg(), "bandwidth": bandwidth, "models": {}}
    for name in args.model or ["tiny"]:
        path = str(random_llama_checkpoint("tiny-llama-3x64-fp32", TINY, "float32")) if name == "tiny" else name
        modes = {"eager": False} if args.no_compiled else {"eager": False, "compiled": True}
        runs, row = {}, {}
        for mode, compile_ in modes.items():
            one, warm_s, nbytes = decode_ms_per_token(path, args.threads, compile_, args.prompt_len, args.output_len)
            runs[mode] = one
            row[f"{mode}_first_run_s"] = warm_s
        samples = {mode: [] for mode in runs}
        for r in range(args.repeats):
            for mode in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                samples[mode].append(runs[mode]())
        roofline_ms = nbytes / bandwidth * 1e3
        row |= {"weight_bytes": nbytes, "roofline_ms": roofline_ms}
        for mode, values in samples.items():
            ms = statistics.median(values)
            row[mode] = {"ms_per_token": ms, "tok_s": 1e3 / ms, "fraction_of_roofline": roofline_ms / ms,
                         "samples_ms": values}
            print(f"{Path(name).name} {mode}: {ms:.3f} ms/token ({1e3 / ms:.1f} tok/s), roofline {roofline_ms:.3f} "
                  f"ms ({roofline_ms / ms:.2f} of it); first run {row[f'{mode}_first_run_s']:.1f} s", flush=True)
        results["models"][name] = row
    if args.gguf and args.llama_dir:
        tok_s = llama_bench_tok_s(args.llama_dir, args.gguf, args.threads, args.output_len, args.repeats)
        results["llama_bench"] = {"gguf": args.gguf.name, "tok_s": tok_s}
        last = results["models"][(args.model or ["tiny"])[-1]]
        best = max(last[m]["tok_s"] for m in ("eager", "compiled") if m in last)
        print(f"llama-bench {args.gguf.name}: {tok_s:.1f} tok/s; chatscale's best {best:.1f} "
              f"({best / tok_s:.2f}x)", flush=True)
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after']}")
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
