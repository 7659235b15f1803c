"""Does the demo target pick the right tool and arguments? 100 held-out questions, through the API.

Each question offers two to four tools from tools/demo_models/tool_data.py (`eval_questions`: the
first 100 of seed 7; stage 8 trains no tool call on them), sent with the official openai client to
chatscale's own server (in process) with `tool_choice: "auto"`, greedy. A question scores when the
answer's tool calls, names and arguments, are exactly the expected ones. `--invented` asks with
made-up names and numbers instead (copying only: nothing to remember), leaving out stage 8's own
questions; `--leave-out-stages 1 2 3 4 5 6 7` is the set stages 1-7 were measured on. Recorded in
docs/demo_models.md.

    .venv/bin/python tools/demo_models/eval_tools.py [--model PATH] [--n 100] [--invented] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import openai
from fastapi.testclient import TestClient

import copy_data
import stages
import tool_data
from chatscale.engine.async_engine import AsyncEngine
from chatscale.engine.config import EngineConfig
from chatscale.models.demo import demo_model_path
from chatscale.server.api import create_app
from chatscale.server.settings import ServerSettings

def evaluate(model: str, questions: list[tuple[list[dict], tool_data.ToolTurn]]) -> dict:
    engine = AsyncEngine.from_config(EngineConfig(model=model, threads=1))
    rows = []
    with TestClient(create_app(engine, ServerSettings(served_model_name="demo"))) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
        for tools, turn in questions:
            r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": turn.question}],
                                               tools=tools, tool_choice="auto", temperature=0, max_tokens=120)
            msg = r.choices[0].message
            got = [(c.function.name, _loads(c.function.arguments)) for c in msg.tool_calls or []]
            rows.append({"question": turn.question, "offered": [t["function"]["name"] for t in tools],
                         "expected": turn.calls, "got": got, "content": msg.content,
                         "correct": got == [(name, args) for name, args in turn.calls]})
    engine.shutdown()
    correct = sum(r["correct"] for r in rows)
    return {"model": model, "questions": len(rows), "correct": correct, "accuracy": correct / len(rows),
            "right_tool": sum([g[0] for g in r["got"]] == [e[0] for e in r["expected"]] for r in rows), "rows": rows}


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(demo_model_path("target")))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--invented", action="store_true", help="made-up arguments (stage 8's pools)")
    ap.add_argument("--leave-out-stages", type=int, nargs="*", default=[], metavar="STAGE")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.invented:
        questions = tool_data.eval_questions(args.n, copy_data.INVENTED_3DIGIT, stages.training_questions((8,)))
    else:
        questions = tool_data.eval_questions(args.n, leave_out=stages.training_questions(tuple(args.leave_out_stages)))
    result = evaluate(args.model, questions)
    for r in result["rows"]:
        if not r["correct"]:
            print(f"MISS {r['question']!r}: expected {r['expected']}, got {r['got']} {r['content']!r}")
    print(f"{result['correct']}/{result['questions']} right tool and arguments "
          f"({result['accuracy']:.0%}); right tool {result['right_tool']}/{result['questions']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
