"""`chatscale chat`: a multi-turn conversation in the terminal, streamed token by token."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from chatscale.engine.config import EngineConfig
from chatscale.engine.llm import LLM


def _questions(args: argparse.Namespace) -> Iterator[str]:
    if args.prompt:
        yield " ".join(args.prompt)
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def run_chat(args: argparse.Namespace) -> int:
    llm = LLM(**vars(EngineConfig.from_args(args)))
    overrides = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        overrides["temperature"] = args.temperature
    params = llm.engine.default_sampling_params(**overrides)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatscale: {llm.engine.model_path.name} loaded; empty line or Ctrl-D to quit.", file=sys.stderr)
    for question in _questions(args):
        messages.append({"role": "user", "content": question})
        answer = ""
        print("assistant> ", end="", flush=True)
        for out in llm.stream(llm.chat_prompt(messages), params):
            piece = out.outputs[0].delta_text
            answer += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": answer})
    return 0
