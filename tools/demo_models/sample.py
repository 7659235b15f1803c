"""Greedy answers of the shipped demo models to in-domain questions, with transformers, as Markdown.

The sanity check behind docs/demo_models.md ("Sample answers"): printed unedited.

    .venv/bin/python tools/demo_models/sample.py [--model target] [--sample]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenizer import DEMO_DIR, MODEL_NAMES

QUESTIONS = [
    "What is a KV cache?",
    "Why does batching matter?",
    "How do I run chatscale?",
    "What is speculative decoding?",
    "Explain prefix caching.",
    "Why did I get a 429?",
    "What is 7 + 8?",
    "How many meters are in 3 kilometers?",
    "What is the capital of Japan?",
    "Hi! Who are you?",
    "Write a poem about the sea.",
]
FOLLOW_UP = [{"role": "user", "content": "What is TTFT?"}, None, {"role": "user", "content": "Why does that matter?"}]


def answer(model, tok, messages: list[dict], sample: bool) -> str:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=120, do_sample=sample)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODEL_NAMES, action="append")
    ap.add_argument("--sample", action="store_true", help="use generation_config.json sampling, not greedy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.model or MODEL_NAMES:
        path = DEMO_DIR / name
        tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
        print(f"\n### {name} ({'sampled, seed 0' if args.sample else 'greedy'})\n")
        for q in QUESTIONS:
            print(f"- **{q}** {answer(model, tok, [{'role': 'user', 'content': q}], args.sample)}")
        first = answer(model, tok, FOLLOW_UP[:1], args.sample)
        chat = [FOLLOW_UP[0], {"role": "assistant", "content": first}, FOLLOW_UP[2]]
        print(f"- **{FOLLOW_UP[0]['content']}** {first} **{FOLLOW_UP[2]['content']}** "
              f"{answer(model, tok, chat, args.sample)}")


if __name__ == "__main__":
    main()
