"""llguidance vs xgrammar on one tokenizer: how chatscale chose its grammar library (issue 19).

For each library, same run, same tokenizer (default: the demo target's; pass SmolLM2's tokenizer.json
for the real 49,152-token vocabulary):
  prepare   time to turn the tokenizer into the library's form (once per process)
  compile   time to compile each grammar, first and again (a cache hit where the library keeps one)
  mask      per decode step, time to fill the token bitmask of a batch of B sequences that each walk
            the same valid document token by token (fill, then accept), B = 1 and 16
  apply     time to apply a [B, vocab] bitmask to fp32 logits (chatscale's own torch op, shared)
Both libraries fill a batch with their own thread pools (2 threads here: the machine has 2 cores).

  python benchmarks/grammar_libraries.py --tokenizer /path/to/smollm2/tokenizer.json --json g.json

xgrammar is optional (`pip install --no-deps xgrammar apache-tvm-ffi`): its wheel declares
transformers and triton, which chatscale's runtime install must not pull in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_json  # noqa: E402

from chatscale.engine.structured.bitmask import apply_bitmask, bitmask_words  # noqa: E402
from chatscale.models.demo import demo_model_path  # noqa: E402

TOOL_CALL = {
    "type": "object",
    "properties": {"name": {"const": "get_weather"},
                   "arguments": {"type": "object",
                                 "properties": {"city": {"type": "string"},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                 "required": ["city", "unit"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["street", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "score", "active"],
    "additionalProperties": False,
}
GRAMMARS = {  # name: (kind, source, a valid document to walk)
    "json_object": ("json", {"type": "object"},
                    '{"city": "Paris", "days": [1, 2, 3], "metric": true, "note": "sunny, then rain"}'),
    "tool_call": ("json", TOOL_CALL, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'),
    "person": ("json", PERSON,
               '{"name": "Ada Lovelace", "age": 36, "email": "ada@math.org", "tags": ["math", "poetry"], '
               '"address": {"street": "12 St James Square", "zip": "SW1Y"}, "score": 9.5, "active": false}'),
    "regex": ("regex", r"[0-9]{3}-[0-9]{4} \([A-Z][a-z]+\)", "555-1234 (Office)"),
}


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 4)


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, eos: int, vocab: int, threads: int) -> None:
        import llguidance
        import llguidance.torch

        self.ll, self.lt = llguidance, llguidance.torch
        start = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
        self.prepare_s = time.perf_counter() - start
        self.executor = llguidance.LLExecutor(threads)

    def compile(self, kind: str, source):
        g = (self.ll.LLMatcher.grammar_from_json_schema(source) if kind == "json"
             else self.ll.LLMatcher.grammar_from_regex(source))
        matcher = self.ll.LLMatcher(self.tok, g)
        assert not matcher.is_error(), matcher.get_error()
        return g

    def matchers(self, compiled, n: int) -> list:
        return [self.ll.LLMatcher(self.tok, compiled) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matchers: list, token: int) -> None:
        for m in matchers:
            assert m.consume_token(token), m.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, eos: int, vocab: int, threads: int) -> None:
        import xgrammar

        self.xg = xgrammar
        start = time.perf_counter()
        meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        vocab_list = [tok.id_to_token(i) or "" for i in range(vocab)]
        info = xgrammar.TokenizerInfo(vocab_list, meta["vocab_type"], vocab_size=vocab, stop_token_ids=[eos],
                                      add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads)
        self.prepare_s = time.perf_counter() - start
        self.batch = xgrammar.BatchGrammarMatcher(threads)

    def compile(self, kind: str, source):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(source))
        return self.compiler.compile_regex(source)

    def matchers(self, compiled, n: int) -> list:
        return [self.xg.GrammarMatcher(compiled) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers: list, token: int) -> None:
        for m in matchers:
            assert m.accept_token(token)


def measure(lib, tokenizer, vocab: int, batches: list[int]) -> dict:
    out = {"prepare_s": round(lib.prepare_s, 3), "grammars": {}}
    for name, (kind, source, doc) in GRAMMARS.items():
        start = time.perf_counter()
        compiled = lib.compile(kind, source)
        first = time.perf_counter() - start
        start = time.perf_counter()
        lib.compile(kind, source)
        again = time.perf_counter() - start
        tokens = tokenizer.encode(doc, add_special_tokens=False).ids
        row = {"compile_ms": round(first * 1e3, 2), "compile_again_ms": round(again * 1e3, 2),
               "doc_tokens": len(tokens)}
        for b in batches:
            matchers = lib.matchers(compiled, b)
            bitmask = torch.zeros(b, bitmask_words(vocab), dtype=torch.int32)
            fills = []
            for token in tokens:
                start = time.perf_counter()
                lib.fill(matchers, bitmask)
                fills.append(time.perf_counter() - start)
                assert (bitmask[0, token // 32] >> (token % 32)) & 1, f"{lib.name}: {token} masked out in {name}"
                lib.accept(matchers, token)
            row[f"mask_ms_b{b}"] = _median_ms(fills)
        out["grammars"][name] = row
    return out


def measure_apply(vocab: int, batches: list[int], repeats: int = 50) -> dict:
    result = {}
    for b in batches:
        logits = torch.randn(b, vocab)
        bitmask = torch.randint(-2**31, 2**31 - 1, (b, bitmask_words(vocab)), dtype=torch.int32)
        times = []
        for _ in range(repeats):
            x = logits.clone()
            start = time.perf_counter()
            apply_bitmask(x, bitmask)
            times.append(time.perf_counter() - start)
        result[f"apply_ms_b{b}"] = _median_ms(times)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(demo_model_path("target") / "tokenizer.json"))
    p.add_argument("--eos", type=int, default=None, help="EOS token id (default: <|im_end|>)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--libraries", default="llguidance,xgrammar")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    from tokenizers import Tokenizer

    text = Path(args.tokenizer).read_text()
    tokenizer = Tokenizer.from_str(text)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    eos = args.eos if args.eos is not None else tokenizer.token_to_id("<|im_end|>")
    batches = [int(b) for b in args.batches.split(",")]
    result = {"tokenizer": args.tokenizer, "vocab": vocab, "threads": args.threads,
              "apply": measure_apply(vocab, batches)}
    for name in args.libraries.split(","):
        cls = {"llguidance": Llguidance, "xgrammar": Xgrammar}[name]
        result[name] = measure(cls(text, eos, vocab, args.threads), tokenizer, vocab, batches)
    print(json.dumps(result, indent=2))
    save_json(args.json, result)


if __name__ == "__main__":
    main()
