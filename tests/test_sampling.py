"""Sampling: seeds, truncation masks, penalties and stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from chatscale.engine.detokenizer import IncrementalDetokenizer
from chatscale.engine.llm import LLM
from chatscale.engine.sampler import Sampler, apply_penalties, truncate
from chatscale.engine.sampling_params import SamplingParams, SamplingParamsError
from chatscale.engine.sequence import Sequence
from chatscale.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint("llama")), num_blocks=256, block_size=4)


def test_seeded_requests_reproduce_whatever_shares_the_batch(llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate("The KV cache", p)[0].outputs[0].token_ids
    noisy = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True) for _ in range(3)]
    crowd = llm.generate(["abc", "The KV cache", "Hello"], [noisy[0], p, noisy[1]])
    assert crowd[1].outputs[0].token_ids == alone
    other = llm.generate("The KV cache", SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def test_n_choices_are_independent_and_seeded(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    a = llm.generate("Hello", p)[0]
    b = llm.generate("Hello", p)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_truncation_masks():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    out = truncate(logits, top_k=[2, 0, 0], top_p=[1.0, 0.8, 1.0], min_p=[0.0, 0.0, 0.25])
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False, False]  # top-2
    assert kept[1].tolist() == [True, True, True, False, False]  # 0.5+0.2 < 0.8: the crossing token stays
    assert kept[2].tolist() == [True, True, True, False, False]  # min_p: p >= 0.25 * 0.5
    assert torch.equal(out[kept], logits[kept])


def test_top_k_one_is_greedy_even_at_high_temperature(llm):
    greedy = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    topk = llm.generate("Hello", SamplingParams(temperature=2.0, top_k=1, max_tokens=10, ignore_eos=True))
    assert greedy[0].outputs[0].token_ids == topk[0].outputs[0].token_ids


def test_sampling_follows_the_distribution():
    """Empirical frequencies of the exponential-race sampler match softmax(logits / T)."""
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    seqs = [Sequence("r", [0], SamplingParams(temperature=1.0)) for _ in range(4000)]
    tokens, _, _ = Sampler(frozenset())(logits, seqs)
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_penalties():
    seq = Sequence("r", [0, 1], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                                               logit_bias={4: 3.0}))
    for t in (2, 2, 3):
        seq.append_token(t)
    logits = torch.tensor([[1.0, -1.0, 2.0, 4.0, 0.0, 1.0]])
    apply_penalties(logits, [seq], frozenset())
    # repetition: prompt and output tokens (0,1,2,3) divided (positive) or multiplied (negative) by 2;
    # then presence 0.5 once and frequency 0.25 per occurrence for output tokens 2 (x2) and 3 (x1).
    expected = [0.5, -2.0, 1.0 - 0.5 - 0.5, 2.0 - 0.5 - 0.25, 3.0, 1.0]
    assert logits[0].tolist() == pytest.approx(expected)


def test_min_tokens_bans_eos():
    seq = Sequence("r", [0], SamplingParams(min_tokens=2, stop_token_ids=[3]))
    logits = torch.zeros(1, 5)
    apply_penalties(logits, [seq], frozenset({2}))
    assert math.isinf(logits[0, 2]) and math.isinf(logits[0, 3]) and logits[0, 1] == 0


def test_params_are_validated():
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(top_p=0)
    assert e.value.param == "top_p"
    with pytest.raises(SamplingParamsError):
        SamplingParams(logprobs=21)
    with pytest.raises(SamplingParamsError):
        SamplingParams(temperature=-1)


def stream_text(tok: Tokenizer, text: str, stop: list[str]) -> tuple[str, str, str | None]:
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], stop)
    pieces = []
    for t in ids:
        d.add(t)
        pieces.append(d.flush(False))
        if d.stopped_by:
            break
    pieces.append(d.flush(True))
    return "".join(pieces), d.text, d.stopped_by


def test_incremental_detokenization_handles_multibyte_text(checkpoint):
    tok = Tokenizer.from_dir(checkpoint("llama"))
    text = "Héllo wörld! 東京 ありがとう 🙂 naïve café"
    streamed, full, _ = stream_text(tok, text, [])
    assert streamed == full == text


def test_stop_string_spanning_tokens_never_leaks(checkpoint):
    tok = Tokenizer.from_dir(checkpoint("llama"))
    text = "The KV cache holds keys and values of every token."
    stop = "keys and val"
    assert len(tok.encode(stop)) > 1  # the stop string spans several tokens
    streamed, full, by = stream_text(tok, text, [stop, "never"])
    assert by == stop
    assert streamed == full == "The KV cache holds "


def test_engine_stops_on_stop_string_and_reports_it(llm):
    base = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    stop = base.text[5:9]
    assert stop and base.text.find(stop) >= 5
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    o = out.outputs[0]
    assert o.text == base.text[: base.text.find(stop)]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_truncation_without_a_full_sort_equals_the_sorted_reference():
    """Random rows with every mix of top-k, top-p and min-p: the candidate-based truncation keeps
    exactly the tokens a full sort keeps, including rows whose nucleus is wider than the candidates."""
    from chatscale.engine.sampler import _truncate_sorted

    g = torch.Generator().manual_seed(0)
    vocab = 2000
    logits = torch.randn(64, vocab, generator=g) * torch.linspace(0.1, 8, 64)[:, None]  # flat to peaked
    top_k = torch.randint(0, 40, (64,), generator=g) * (torch.rand(64, generator=g) < 0.5)
    top_p = torch.where(torch.rand(64, generator=g) < 0.7, torch.rand(64, generator=g) * 0.99 + 0.01,
                        torch.ones(64))
    min_p = torch.where(torch.rand(64, generator=g) < 0.3, torch.rand(64, generator=g) * 0.2, torch.zeros(64))
    ours = torch.isfinite(truncate(logits, top_k.tolist(), top_p.tolist(), min_p.tolist()))
    ref = torch.isfinite(_truncate_sorted(logits, torch.where(top_k > 0, top_k, vocab), top_p, min_p))
    assert torch.equal(ours, ref)
    assert (ours.sum(-1) > 256).any()  # some nucleus was wider than the candidates: the fallback ran
