"""Speculative decoding speedup on the demo pair, against plain decoding and HF assisted generation.

Workloads (greedy, so every configuration emits the very same tokens):
  chat       questions in the demo models' domain, answered by the 13M target;
             proposers: the shipped 2M draft model, n-gram lookup.
  summarise  "Summarize: <paragraph>": the answer copies its input, n-gram lookup's best case.
For each batch size B (concurrent requests), plain and speculative engines run the same requests
in alternation, `--repeats` times; the table shows median output tokens/s, the speedup and the
acceptance rate. The speculative engine decides per step whether speculation pays (the roofline
policy, measured at start-up); `draft (forced)` speculates at every batch size, to show what the
policy avoids. Peer, same run: transformers' generate vs its assisted generation (draft model, and
prompt lookup) at batch 1, the only batch size it supports. The physical limit: batch-1 decode
cannot beat memory bandwidth / weight bytes without speculation.

  python benchmarks/spec_decode.py --threads 1 --json spec.json
  python benchmarks/spec_decode.py --model smollm2 --threads 2 --batches 1,4   # n-gram lookup on SmolLM2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_json  # noqa: E402

from chatscale.engine.llm import LLM  # noqa: E402
from chatscale.engine.sampling_params import SamplingParams  # noqa: E402
from chatscale.models.demo import demo_model_path  # noqa: E402
from chatscale.planner.hardware import measure_this_machine  # noqa: E402

QUESTIONS = [
    "What is a KV cache?", "Why does batching matter?", "How do I run the server?", "What is prefix caching?",
    "What is speculative decoding?", "What is continuous batching?", "What does chunked prefill do?",
    "What is a Mixture of Experts model?", "What is arithmetic intensity?", "Why is decoding memory bound?",
    "What is time to first token?", "What is preemption?", "How does the gateway route requests?",
    "What is admission control?", "What is the capital of France?", "What is paged attention?",
]


def _chat(llm: LLM, question: str, prefix: str = "") -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": prefix + question}])


def build_workloads(llm: LLM, output_len: int) -> dict[str, list[list[int]]]:
    chat = [_chat(llm, q) for q in QUESTIONS]
    # The paragraphs to summarise are the model's own answers, so its summary repeats them.
    answers = llm.generate(chat, SamplingParams(max_tokens=output_len, temperature=0.0))
    summarise = [_chat(llm, a.outputs[0].text, "Summarize: ") for a in answers]
    return {"chat": chat, "summarise": summarise}


def run_batch(llm: LLM, prompts: list[list[int]], batch: int, output_len: int) -> tuple[float, int]:
    """Output tokens/s with `batch` requests in flight (prompts cycled), and tokens emitted."""
    todo = [prompts[i % len(prompts)] for i in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0)
    llm.engine.kv.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(todo, params)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - start), tokens


def measure(engines: dict[str, LLM], workload: list[list[int]], batches: list[int], output_len: int,
            repeats: int) -> list[dict]:
    rows = []
    for batch in batches:
        speeds: dict[str, list[float]] = {name: [] for name in engines}
        before = {name: _snapshot(llm) for name, llm in engines.items()}
        tokens = {}
        for _ in range(repeats):
            for name, llm in engines.items():  # alternate, so drift hits every engine alike
                tps, tokens[name] = run_batch(llm, workload, batch, output_len)
                speeds[name].append(tps)
        base = statistics.median(speeds["plain"])
        for name, llm in engines.items():
            drafted, accepted, passes = (a - b for a, b in zip(_snapshot(llm), before[name]))
            rows.append(dict(batch=batch, engine=name, tokens=tokens[name],
                             tok_s=statistics.median(speeds[name]),
                             speedup=statistics.median(speeds[name]) / base,
                             acceptance=accepted / drafted if drafted else None,
                             tokens_per_pass=1 + accepted / passes if passes else None))
    return rows


def _snapshot(llm: LLM) -> tuple[int, int, int]:
    s = llm.engine.spec_stats
    return (s.draft_tokens, s.accepted_tokens, s.drafts) if s else (0, 0, 0)


def hf_assisted(prompts: list[list[int]], output_len: int, repeats: int) -> dict[str, float]:
    """transformers' generate at batch 1: plain, with the draft as assistant, with prompt lookup."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(demo_model_path("target"), dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(demo_model_path("draft"), dtype=torch.bfloat16).eval()
    modes = {"hf plain": {}, "hf assisted (draft)": {"assistant_model": draft},
             "hf prompt lookup": {"prompt_lookup_num_tokens": 4}}
    result = {}
    for name, extra in modes.items():
        speeds = []
        for _ in range(repeats):
            tokens, start = 0, time.perf_counter()
            for ids in prompts:
                x = torch.tensor([ids])
                with torch.no_grad():
                    out = target.generate(x, max_new_tokens=output_len, do_sample=False, **extra)
                tokens += out.shape[1] - x.shape[1]
            speeds.append(tokens / (time.perf_counter() - start))
        result[name] = statistics.median(speeds)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--output", type=int, default=128, help="max tokens per answer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--model", default=None,
                    help="another model than the demo pair (e.g. smollm2): plain vs n-gram lookup only, no peer")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = measure_this_machine(1.0)
    common = dict(threads=args.threads, num_blocks=2048) | ({"model": args.model} if args.model else {})
    plain = LLM(**common)
    engines = {"plain": plain} | ({} if args.model else {
        "draft": LLM(**common, speculative_model="demo-draft"),
        "draft (forced)": LLM(**common, speculative_model="demo-draft", speculative_max_batch=10**6),
    }) | {"ngram": LLM(**common, speculative_model="ngram")}
    batches = [int(b) for b in args.batches.split(",")]
    workloads = build_workloads(plain, args.output)
    policy = engines["ngram"].engine.core.spec_policy
    report = dict(command=" ".join(sys.argv), hardware=hw.name, bandwidth_gb_s=hw.memory_bandwidth / 1e9,
                  bf16_tflop_s=hw.bf16_flops / 1e12, ridge_tokens=policy.ridge_tokens,
                  policy_largest_batch=policy.largest_batch(policy.PRIOR_ACCEPTANCE),
                  roofline_batch1_tok_s=hw.memory_bandwidth / plain.engine.model.weight_bytes(), results={})
    for name, prompts in workloads.items():
        chosen = engines if name == "chat" else {k: engines[k] for k in ("plain", "ngram")}
        report["results"][name] = measure(chosen, prompts, batches, args.output, args.repeats)
    if not args.skip_hf and not args.model:
        report["hf_batch1_chat"] = hf_assisted(workloads["chat"][:8], args.output, args.repeats)
        report["hf_batch1_summarise"] = hf_assisted(workloads["summarise"][:8], args.output, args.repeats)

    print(f"{hw.name}: {report['bandwidth_gb_s']:.1f} GB/s, bf16 {report['bf16_tflop_s']:.2f} TFLOP/s; "
          f"ridge {policy.ridge_tokens:.1f} tokens/step; the policy speculates up to batch "
          f"{report['policy_largest_batch']} (acceptance prior {policy.PRIOR_ACCEPTANCE}); "
          f"batch-1 bandwidth roofline without speculation {report['roofline_batch1_tok_s']:.0f} tok/s")
    for name, rows in report["results"].items():
        print(f"\n{name}\n{'batch':>5} {'engine':<16} {'tok/s':>8} {'speedup':>8} {'accept':>7} {'tok/pass':>8}")
        for r in rows:
            acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
            tpp = f"{r['tokens_per_pass']:.2f}" if r["tokens_per_pass"] is not None else "-"
            print(f"{r['batch']:>5} {r['engine']:<16} {r['tok_s']:>8.1f} {r['speedup']:>7.2f}x {acc:>7} {tpp:>8}")
    for key in ("hf_batch1_chat", "hf_batch1_summarise"):
        if key in report:
            base = report[key]["hf plain"]
            print(f"\n{key}: " + ", ".join(f"{k} {v:.1f} tok/s ({v / base:.2f}x)" for k, v in report[key].items()))
    save_json(args.json, report)


if __name__ == "__main__":
    main()
