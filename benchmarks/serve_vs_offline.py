"""One stream: `chatscale serve` against the offline engine on the same model and threads, one run.

The server runs the engine core in its own process, so HTTP, tokenizing, detokenizing and SSE should
cost the decode nothing; the target is a served decode within 10% of offline `LLM.generate`. Both
decode the same prompt for --output-len tokens (ignore_eos); the offline rate is timed from the
first to the last token of `LLM.stream`, the served one is 1 / TPOT from `chatscale bench serve`
(one user). Repeats alternate the order; the table shows medians.

    .venv/bin/python benchmarks/serve_vs_offline.py --model ~/.cache/chatscale-bench/smollm2-135m-instruct-f32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chatscale.bench.launch import free_port, running


def offline_decode_tok_s(model: str, threads: int, input_len: int, output_len: int, dtype: str) -> float:
    from chatscale import LLM, SamplingParams

    llm = LLM(model, threads=threads, dtype=dtype, kv_cache_bytes=256 << 20)
    prompt = list(range(100, 100 + input_len))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for _ in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)):
        pass  # warm-up
    times = [time.perf_counter() for _ in llm.stream(prompt, params)]
    return (output_len - 1) / (times[-1] - times[0])


def served_decode_tok_s(model: str, threads: int, input_len: int, output_len: int, dtype: str,
                        work: Path) -> float:
    port = free_port()
    server = [sys.executable, "-m", "chatscale.cli", "serve", "--model", model, "--port", str(port),
              "--threads", str(threads), "--dtype", dtype, "--kv-cache-bytes", "256MiB"]
    out = work / f"serve-{port}.json"
    with running(server, port, work / f"serve-{port}.log") as url:
        cmd = [sys.executable, "-m", "chatscale.cli", "bench", "serve", "--base-url", url, "--concurrency", "1",
               "--num-requests", "4", "--input-len", str(input_len), "--output-len", str(output_len),
               "--warmup", "1", "--no-progress", "--output-json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return 1000.0 / json.loads(out.read_text())["report"]["tpot_ms"]["mean"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="HF checkpoint directory (default: the demo model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_vs_offline-"))
    results: dict[str, list[float]] = {"offline": [], "served": []}
    for rep in range(args.repeats):
        for name in (["offline", "served"] if rep % 2 == 0 else ["served", "offline"]):
            load = os.getloadavg()[0]
            if name == "offline":
                rate = offline_decode_tok_s(args.model, args.threads, args.input_len, args.output_len, args.dtype)
            else:
                rate = served_decode_tok_s(args.model, args.threads, args.input_len, args.output_len, args.dtype, work)
            results[name].append(rate)
            print(f"  {name} #{rep}: {rate:.1f} tok/s (load average {load:.2f})", flush=True)
    offline, served = (statistics.median(results[k]) for k in ("offline", "served"))
    print("\n| model | threads | offline decode tok/s | served decode tok/s | served / offline |\n"
          "|---|---:|---:|---:|---:|\n"
          f"| {Path(args.model).name or 'demo'} | {args.threads} | {offline:.1f} | {served:.1f} | "
          f"**{served / offline:.2f}x** |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
