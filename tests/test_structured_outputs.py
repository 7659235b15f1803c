"""Structured outputs in the engine: masks, compilation cache, grammar state, and outputs that
always match their grammar (random JSON schemas and regexes), with n > 1, mixed batches,
preemption, prefix caching and speculative decoding (every verified position masked, rollback exact).

The tiny random models write whatever the mask lets through, so bounded grammars (strings and arrays
with maximum lengths, integers with ranges) are used: their outputs end well within max_tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.structured.bitmask import allocate_bitmask, apply_bitmask
from chatscale.engine.structured.compiler import GrammarCompiler
from chatscale.engine.structured.spec import GrammarError, GrammarSpec, check

PROMPT = "The KV cache holds keys"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint("llama")), threads=1, num_blocks=256)


def _texts(outs) -> list[tuple[str, str]]:
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


# ---- pieces -------------------------------------------------------------------------------------
def test_apply_bitmask_matches_a_loop_and_leaves_other_rows_alone():
    vocab = 70  # not a multiple of 32: the last word is partly padding
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32, generator=gen)
    logits = torch.randn(4, vocab + 30, generator=gen)  # a padded vocabulary beyond the mask's 96 bits
    want = logits.clone()
    for i, row in enumerate([3, 1]):
        for t in range(want.shape[1]):
            if t >= 96 or not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                want[row, t] = float("-inf")
    apply_bitmask(logits, bitmask, [3, 1])
    assert torch.equal(logits, want)


def test_compiler_caches_by_spec_and_compiles_on_its_own_thread(llm):
    compiler: GrammarCompiler = llm.engine.core.structured.compiler
    spec = GrammarSpec.json_schema(PERSON)
    first = compiler.compile(spec)
    assert compiler.compile(GrammarSpec.json_schema(json.loads(json.dumps(PERSON)))) is first  # same schema
    assert compiler.compile(GrammarSpec("regex", "[0-9]{4}")) is not first
    first.result(timeout=30)
    assert compiler.hits >= 1 and compiler.misses >= 2
    assert compiler._pool._threads and all(t.name.startswith("grammar-compile") for t in compiler._pool._threads)


def test_unsupported_json_schema_keyword_is_named():
    with pytest.raises(GrammarError, match="uniqueItems"):
        check(GrammarSpec.json_schema({"type": "array", "uniqueItems": True}))
    with pytest.raises(GrammarError, match="regex"):
        check(GrammarSpec("regex", "a(b"))
    check(GrammarSpec("grammar", 'root ::= "yes" | "no"'))  # GBNF is converted to Lark


def test_rollback_restores_the_exact_masks(llm):
    compiler = llm.engine.core.structured.compiler
    grammar = compiler.compile(GrammarSpec.json_schema(PERSON)).result(timeout=30)
    tok = llm.engine.tokenizer
    tokens = tok.encode('{"name": "ab", "age": 42, "tags": ["a"]}')
    state, fresh = grammar.new_state(), grammar.new_state()
    masks, again = allocate_bitmask(len(tokens) + 1, llm.engine.vocab_size), allocate_bitmask(1, llm.engine.vocab_size)
    for i, t in enumerate(tokens):
        state.fill_bitmask(masks, i)
        assert state.accept([t])
    state.fill_bitmask(masks, len(tokens))
    for back in (len(tokens), 5, 1):
        state.rollback(back)
        state.fill_bitmask(again, 0)
        assert torch.equal(again[0], masks[len(tokens) - back]), back
        assert state.accept(tokens[len(tokens) - back:])
    assert not state.accept([tok.encode("}")[0]])  # refused, and nothing changed:
    state.fill_bitmask(again, 0)
    assert torch.equal(again[0], masks[-1]) and fresh.num_tokens == 0


# ---- outputs that match -------------------------------------------------------------------------
def _bounded_schemas():
    leaf = st.one_of(
        st.just({"type": "boolean"}), st.just({"type": "null"}),
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-50, 50), st.integers(0, 200)),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.builds(lambda v: {"enum": v}, st.lists(st.text("abxyz ", min_size=1, max_size=4), min_size=1,
                                                  max_size=3, unique=True)),
    )

    def obj(props: dict, required: list[bool]):
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": [k for k, r in zip(props, required) if r]}

    return st.recursive(leaf, lambda inner: st.one_of(
        st.dictionaries(st.text("abcdef", min_size=1, max_size=4), inner, min_size=1, max_size=3).flatmap(
            lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(
                lambda req: obj(props, req))),
        st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner, st.integers(0, 2)),
        st.builds(lambda opts: {"anyOf": opts}, st.lists(inner, min_size=2, max_size=3)),
    ), max_leaves=5)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_bounded_schemas(), seed=st.integers(0, 2**16))
def test_random_json_schemas_always_validate(llm, schema, seed):
    constrained = SamplingParams(n=2, temperature=1.0, seed=seed, max_tokens=300,
                                 structured=GrammarSpec.json_schema(schema))
    free = SamplingParams(temperature=1.0, seed=seed, max_tokens=20)
    outs = llm.generate([PROMPT, PROMPT], [constrained, free])
    for text, reason in _texts(outs[:1]):
        assert reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def _regexes():
    atom = st.one_of(st.sampled_from(list("abcxyz019-_ ")), st.sampled_from(["[a-c]", "[0-9]", "[xyz]", "[A-Z]"]))
    piece = st.builds(lambda a, q: a + q, atom, st.sampled_from(["", "", "?", "{1,3}", "{2}"]))
    seq = st.lists(piece, min_size=1, max_size=5).map("".join)
    return st.lists(seq, min_size=1, max_size=3).map(lambda alts: "(" + "|".join(alts) + ")" if len(alts) > 1
                                                    else alts[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=_regexes(), seed=st.integers(0, 2**16))
def test_random_regexes_always_match(llm, pattern, seed):
    params = SamplingParams(n=3, temperature=1.0, seed=seed, max_tokens=64, structured=GrammarSpec("regex", pattern))
    for text, reason in _texts(llm.generate(PROMPT, params)):
        assert reason == "stop" and re.fullmatch(pattern, text), (pattern, text)


def test_objects_take_only_their_listed_properties(llm):
    """An object schema that lists properties and says nothing of others gets no others (OpenAI's
    strict mode; LangChain's tool schemas look like this): a random model would invent keys."""
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2]}}}
    outs = llm.generate(PROMPT, SamplingParams(n=8, temperature=1.0, seed=0, max_tokens=60,
                                                structured=GrammarSpec.json_schema(schema)))
    for text, reason in _texts(outs):
        assert reason == "stop" and set(json.loads(text)) <= {"a", "b"}, text
        jsonschema.validate(json.loads(text), schema)


def test_choice_and_grammar_kinds(llm):
    outs = llm.generate([PROMPT] * 2, [
        SamplingParams(n=4, temperature=1.0, seed=1, structured=GrammarSpec.choice(["yes", "no", "maybe not"])),
        SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=64,
                       structured=GrammarSpec("grammar", 'root ::= "(" [0-9] ("+" [0-9])* ")"'))])
    assert all(t in ("yes", "no", "maybe not") for t, _ in _texts(outs[:1]))
    assert all(re.fullmatch(r"\([0-9](\+[0-9])*\)", t) for t, r in _texts(outs[1:]) if r == "stop")


def test_preemption_and_prefix_cache_keep_the_grammar(checkpoint):
    """A sequence preempted (recomputed) mid-answer keeps its grammar state: the same greedy
    output as without preemption, still valid; a second request reuses the cached prompt."""
    spec = GrammarSpec.json_schema(PERSON)
    params = [SamplingParams(temperature=0.0, max_tokens=120, structured=spec) for _ in range(6)]
    prompts = [PROMPT + " " * i for i in range(6)]
    roomy = LLM(str(checkpoint("llama")), threads=1, num_blocks=256, block_size=4)
    tight = LLM(str(checkpoint("llama")), threads=1, num_blocks=40, block_size=4)
    want, got = roomy.generate(prompts, params), tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert _texts(got) == _texts(want)
    for text, _ in _texts(got):
        jsonschema.validate(json.loads(text), PERSON)
    again = roomy.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=120, structured=spec))
    assert again[0].num_cached_tokens > 0 and again[0].outputs[0].text == want[0].outputs[0].text


def test_a_grammar_that_fails_to_compile_ends_its_request(llm):
    out = llm.generate(PROMPT, SamplingParams(structured=GrammarSpec("regex", "a(b")))[0].outputs[0]
    assert out.finish_reason == "abort" and "grammar" in out.stop_reason


# ---- speculative decoding -----------------------------------------------------------------------
class MaskAudit:
    """Wraps the engine's mask filling: every row it fills for a sequence and its proposals is
    compared with the mask of a fresh grammar state replayed over the same tokens; after each
    step every grammar must sit exactly at its sequence's output (rejected proposals rolled back)."""

    def __init__(self, llm: LLM, spec: GrammarSpec) -> None:
        self.llm, self.structured = llm, llm.engine.core.structured
        self.grammar = self.structured.compiler.compile(spec).result(timeout=30)
        self.speculative_rows = 0
        original = self.structured.fill_masks

        def audited(rows):
            constrained = [(seq, row, tokens) for seq, row, tokens in rows if seq.grammar is not None]
            expected = [self._replay(seq.output_token_ids, tokens) for seq, _, tokens in constrained]
            future = original(rows)
            if future is None:
                return None
            masks = future.result()
            at = 0
            for (seq, _, tokens), want in zip(constrained, expected):
                n = len(tokens) + 1
                assert torch.equal(masks.bitmask[at:at + n], want), f"mask rows of {seq.request_id} differ"
                self.speculative_rows += len(tokens)
                at += n
            return future

        self.structured.fill_masks = audited

    def _replay(self, output: list[int], proposals: list[int]) -> torch.Tensor:
        state = self.grammar.new_state()
        assert state.accept(output)
        rows = allocate_bitmask(len(proposals) + 1, self.llm.engine.vocab_size)
        for i in range(len(proposals) + 1):
            state.fill_bitmask(rows, i)
            if i < len(proposals) and (proposals[i] in self.llm.engine.eos_token_ids
                                       or not state.accept([proposals[i]])):
                rows[i + 1:] = -1  # past EOS or a refused proposal nothing is filled (never used)
                break
        return rows

    def check_positions(self) -> None:
        for seq in self.llm.engine.scheduler.running:
            if seq.grammar is not None:
                assert seq.grammar.num_tokens == seq.num_output_tokens
                got, want = allocate_bitmask(1, self.llm.engine.vocab_size), self._replay(seq.output_token_ids, [])
                seq.grammar.fill_bitmask(got, 0)
                assert torch.equal(got, want)


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_speculative_decoding_under_a_grammar(checkpoint, proposer):
    spec = GrammarSpec.json_schema(PERSON)
    draft = str(checkpoint("qwen2")) if proposer == "draft" else "ngram"
    plain = LLM(str(checkpoint("llama")), threads=1, num_blocks=128)
    fast = LLM(str(checkpoint("llama")), threads=1, num_blocks=128, speculative_model=draft,
               num_speculative_tokens=3, speculative_max_batch=64)
    audit = MaskAudit(fast, spec)
    prompts = [PROMPT, "Continuous batching keeps", "def f(x):"]
    params = [SamplingParams(temperature=0.0, max_tokens=120, structured=spec) for _ in prompts]
    params.append(SamplingParams(temperature=0.0, max_tokens=30))  # a free request in the same batch
    prompts.append(PROMPT)
    for p, sp in zip(prompts, params):
        fast.engine.add_request(p, sp)
    done = {}
    while fast.engine.has_unfinished_requests():
        for out in fast.engine.step():
            if out.finished:
                done[out.request_id] = out
        audit.check_positions()
    got = [done[f"req-{i}"] for i in range(len(prompts))]
    assert _texts(got) == _texts(plain.generate(prompts, params))  # greedy output unchanged
    assert audit.speculative_rows > 0 and fast.engine.spec_stats.draft_tokens > fast.engine.spec_stats.accepted_tokens
    for text, _ in _texts(got[:3]):
        jsonschema.validate(json.loads(text), PERSON)


def test_sampled_speculation_under_a_grammar_stays_valid(checkpoint):
    """Sampling with a draft: the draft's own distributions are masked too, so every proposal is
    grammatical and rejection sampling stays exact (here: outputs valid for many seeds)."""
    fast = LLM(str(checkpoint("llama")), threads=1, num_blocks=128, speculative_model=str(checkpoint("qwen2")),
               num_speculative_tokens=3, speculative_max_batch=64)
    spec = GrammarSpec.json_schema(PERSON)
    outs = fast.generate([PROMPT] * 4, [SamplingParams(n=2, temperature=1.0, seed=s, max_tokens=150, structured=spec)
                                        for s in range(4)])
    for text, reason in _texts(outs):
        assert reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)
    assert fast.engine.spec_stats.draft_tokens > 0
