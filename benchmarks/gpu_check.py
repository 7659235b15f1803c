"""The CUDA path in one run: greedy output against transformers on the GPU, and decode speed against
the GPU's roofline, as one table in a few minutes.

1. Exactness: tiny random Llama (GQA), Qwen3 (q/k norm) and Mixtral (experts) built here with
   transformers, and SmolLM2-135M-Instruct when `--smollm2 DIR` names an HF copy of it: 24 greedy
   tokens for a few prompts, ours (flex attention, compiled decode) vs transformers on CUDA, fp32.
2. Speed: a SmolLM2-135M-shaped model (random weights, bf16) decoding at batch 1, 16 and 64; tokens
   per second, and the bytes each step must read (weights once, every sequence's KV) per second
   against the device's memory bandwidth (the datasheet's, as /metrics uses).

It runs on the GPU machine this project can borrow (torch 2.11 with CUDA 13, Python 3.12, Triton,
transformers; no network): it imports only what `from chatscale import LLM` needs, with `src` on
PYTHONPATH (msgspec travels as a wheel, docs/benchmarks.md). Without a GPU it says so and exits 0.

    PYTHONPATH=src python3 benchmarks/gpu_check.py [--smollm2 DIR] [--output-json gpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = [[5, 17, 42, 8, 99], [3] * 12, list(range(20, 60)), [7, 7, 7, 150, 151, 152, 11]]
SPEED_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True)


def exactness(path: Path, name: str) -> dict:
    from transformers import AutoModelForCausalLM

    from chatscale import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    hf.generation_config.eos_token_id = None
    refs = []
    with torch.no_grad():
        for p in PROMPTS:
            out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False)
            refs.append(out[0, len(p):].tolist())
    del hf
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_bytes=64 << 20)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    same = sum(a == b for a, b in zip(ours, refs))
    return {"model": name, "check": "greedy == transformers (fp32)", "result": f"{same}/{len(PROMPTS)} prompts",
            "ok": same == len(PROMPTS), "backend": llm.engine.runner.backend.name}


def decode_speed(path: Path, batch: int, steps: int = 64) -> dict:
    from chatscale import LLM, SamplingParams
    from chatscale.device_peaks import device_peaks
    from chatscale.engine.runner import kv_bytes_per_block

    llm = LLM(str(path), device="cuda", dtype="bfloat16", kv_cache_bytes=2 << 30, max_num_seqs=max(batch, 1))
    engine = llm.engine
    prompt_len = 128
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        engine.add_request([(i * 7 + j) % 40000 + 10 for j in range(prompt_len)], params)
    while engine.last_step.num_prefill_tokens or not engine.last_step.num_seqs:  # prefill (and compile)
        engine.step()
    for _ in range(3):
        engine.step()  # warm: every batch-size bucket compiled / captured
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    contexts = 0
    while engine.has_unfinished_requests() and n < steps - 8:
        engine.step()
        contexts += sum(c for c, _ in engine.last_step.chunks)
        n += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_token_kv = kv_bytes_per_block(engine.model, 1)
    moved = n * engine.model.weight_bytes() + contexts * per_token_kv
    peaks = device_peaks(engine.runner.device)
    return {"batch": batch, "tok_s": batch * n / seconds, "step_ms": 1e3 * seconds / n,
            "mbu": moved / seconds / peaks.memory_bandwidth, "bandwidth_GBps": peaks.memory_bandwidth / 1e9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm2", type=Path, default=None, help="an HF directory of SmolLM2-135M-Instruct")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (the CUDA path stays unverified).")
        return 0
    from checkpoints import make_checkpoint, write_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    for arch in ("llama", "qwen3", "mixtral"):
        rows.append(exactness(make_checkpoint(work / arch, arch), arch))
        print(rows[-1], flush=True)
    if args.smollm2 is not None:
        rows.append(exactness(args.smollm2, "SmolLM2-135M-Instruct"))
        print(rows[-1], flush=True)
    shaped = work / "smollm2-shape"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SPEED_SHAPE)).to(torch.bfloat16).save_pretrained(shaped)
    write_tokenizer(shaped)
    speed = []
    for batch in (1, 16, 64):
        speed.append(decode_speed(shaped, batch))
        print(speed[-1], flush=True)
    print("\n| model | check | result | attention |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['check']} | {'ok' if r['ok'] else 'DIFFERS'}: {r['result']} | {r['backend']} |")
    print("\n| SmolLM2-135M shape, bf16 | decode tok/s | step ms | MBU (bytes moved / s / bandwidth) |")
    print("|---:|---:|---:|---:|")
    for s in speed:
        print(f"| batch {s['batch']} | {s['tok_s']:.0f} | {s['step_ms']:.2f} | {s['mbu']:.2f} |")
    print(f"\n{time.monotonic() - started:.0f} s in all")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"exactness": rows, "speed": speed}, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
