"""The server's own metrics against what a client measured, and the step roofline at rising load.

`chatscale serve` runs the demo target model (13M, trained: its answers have text, so the client's
TTFT is the first token's) or a random bf16 SmolLM2-135M-shaped Llama (`--model smollm2`: a real
memory footprint, but no text, so the client's TTFT is its last byte), with 2 threads;
`chatscale bench serve` drives it with 1, 8 and 32 closed-loop users. Around each run /metrics is
scraped, and the deltas give what the server says happened: tokens generated (must equal the
client's count), mean TTFT and end-to-end latency (from the server's arrival; the client's add the
HTTP hop and its own event loop), mean ITL against the client's TPOT, the mean batch, arithmetic
intensity against the ridge point, MFU and MBU. Results: docs/metrics.md, "Measured".

    flock /tmp/chatscale-bench.lock .venv/bin/python benchmarks/metrics_vs_client.py \
        [--model smollm2] [--output-json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from common import save_json, smollm2_checkpoint

from chatscale.bench.launch import free_port, running
from chatscale.models.demo import demo_model_path
from chatscale.scrape import Scrape

RUNS = ((1, 8), (8, 32), (32, 64))  # (users, requests)


def scrape(url: str) -> Scrape:
    return Scrape.from_text(httpx.get(f"{url}/metrics", timeout=10).text)


def mean(before: Scrape, after: Scrape, histogram: str) -> float:
    d = lambda k: after.values[f"{histogram}_{k}"] - before.values[f"{histogram}_{k}"]  # noqa: E731
    return d("sum") / d("count")


def one_run(url: str, users: int, requests: int, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        before = scrape(url)
        subprocess.run([sys.executable, "-m", "chatscale.cli", "bench", "serve", "--base-url", url,
                        "--endpoint", "completions", "--concurrency", str(users), "--num-requests", str(requests),
                        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                        "--warmup", "0", "--no-progress", "--output-json", out.name],
                       check=True, stdout=subprocess.DEVNULL)
        after = scrape(url)
        client = json.loads(Path(out.name).read_text())
    client = client["report"]
    v = lambda k: after.values[k] - before.values[k]  # noqa: E731
    busy = v("step_seconds_total")
    ms = lambda histogram: 1000 * mean(before, after, histogram)  # noqa: E731
    return {
        "users": users, "requests": requests,
        "client_output_tokens": client["output_tokens"], "server_generation_tokens": v("generation_tokens_total"),
        "client_ttft_ms_mean": client["ttft_ms"]["mean"], "server_ttft_ms_mean": ms("time_to_first_token_seconds"),
        "client_e2e_ms_mean": client["e2e_ms"]["mean"], "server_e2e_ms_mean": ms("e2e_request_latency_seconds"),
        "client_tpot_ms_mean": client["tpot_ms"]["mean"], "server_itl_ms_mean": ms("inter_token_latency_seconds"),
        "batch_sequences_mean": mean(before, after, "step_sequences"),
        "batch_tokens_mean": mean(before, after, "iteration_tokens_total"),
        "intensity": v("step_flops_total") / v("step_bytes_total"), "ridge": after.values["ridge_point"],
        "mfu": v("step_flops_total") / busy / after.values["peak_flops"],
        "mbu": v("step_bytes_total") / busy / after.values["peak_memory_bandwidth"],
        "busy_fraction": busy / client["duration_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("demo", "smollm2"), default="demo")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    port = free_port()
    model = demo_model_path("target") if args.model == "demo" else smollm2_checkpoint()
    cmd = [sys.executable, "-m", "chatscale.cli", "serve", "--model", str(model),
           "--port", str(port), "--threads", "2"]
    with running(cmd, port, Path(tempfile.gettempdir()) / "metrics_vs_client.log", timeout=300) as url:
        rows = [one_run(url, users, requests, args) for users, requests in RUNS]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    save_json(args.output_json, {"runs": rows})


if __name__ == "__main__":
    main()
