"""Speculative decoding: greedy output unchanged, sampled output distributed as the target's,
rejected lookahead pages returned, and speculation only where the roofline says it pays."""

from __future__ import annotations

import pytest
import torch

from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.sequence import Sequence
from chatscale.engine.spec_decode import NgramProposer, Proposal, SpecDecodeStats, SpecPolicy, verify

PROMPTS = ["The KV cache holds keys", "Continuous batching keeps the batch full. Prefill computes",
           "def f(x):\n    return x * 2", "Héllo wörld! Ünïcode"]


@pytest.fixture(scope="module")
def pair(checkpoint):
    """A tiny target and a different tiny model with the same tokenizer as its draft."""
    return checkpoint("llama"), checkpoint("qwen2")


def _mixed_params() -> list[SamplingParams]:
    """Greedy requests of several lengths, one with penalties and one with logprobs (which do
    not speculate) and one that stops on a string, batched together."""
    return [SamplingParams(max_tokens=40, temperature=0.0),
            SamplingParams(max_tokens=23, temperature=0.0, frequency_penalty=0.5),
            SamplingParams(max_tokens=31, temperature=0.0, logprobs=2),
            SamplingParams(max_tokens=40, temperature=0.0, stop=["x"])]


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_greedy_output_is_unchanged_in_a_mixed_batch(pair, proposer):
    target, draft = pair
    spec = str(draft) if proposer == "draft" else "ngram"
    plain = LLM(str(target), threads=1, num_blocks=64)
    fast = LLM(str(target), threads=1, num_blocks=64, speculative_model=spec, speculative_max_batch=64)
    want = plain.generate(PROMPTS, _mixed_params())
    got = fast.generate(PROMPTS, _mixed_params())
    for a, b in zip(want, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].text == a.outputs[0].text
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason
    assert got[2].outputs[0].logprobs is not None and len(got[2].outputs[0].logprobs) == 31
    stats = fast.engine.spec_stats
    assert stats.drafts > 0 and 0 <= stats.accepted_tokens <= stats.draft_tokens
    # Every page went back: rejected lookahead pages were trimmed, finished sequences freed.
    assert fast.engine.kv.num_free_blocks == fast.engine.kv.num_blocks


def test_demo_pair_accepts_most_drafts_and_keeps_greedy_output():
    # fp32: in bf16 a verify pass over k+1 tokens may round differently from one-token decodes
    # (docs/architecture.md, Numerics), and this test is about speculation, not rounding.
    plain = LLM(threads=1, num_blocks=128, dtype="float32")
    fast = LLM(threads=1, num_blocks=128, dtype="float32", speculative_model="demo-draft", speculative_max_batch=8)
    msgs = [[{"role": "user", "content": "What is a KV cache?"}], [{"role": "user", "content": "Why batch?"}]]
    params = SamplingParams(max_tokens=60, temperature=0.0)
    for a, b in zip(plain.chat(msgs, params), fast.chat(msgs, params)):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert fast.engine.spec_stats.acceptance_rate > 0.5


def test_preemption_and_rollback_under_page_pressure(pair):
    """Few pages: lookahead reservations cause preemptions; output and accounting stay right."""
    target, draft = pair
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    want = LLM(str(target), threads=1, num_blocks=64).generate(PROMPTS * 2, params)
    fast = LLM(str(target), threads=1, num_blocks=14, max_num_seqs=8, speculative_model=str(draft),
               speculative_max_batch=64)
    got = fast.generate(PROMPTS * 2, params)
    assert fast.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert fast.engine.kv.num_free_blocks == fast.engine.kv.num_blocks


def _chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test (cells with tiny expectations merged into one)."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2.0, dtype=torch.float64), stat / 2))


def test_rejection_sampling_keeps_the_target_distribution():
    """verify() on a tiny vocabulary: the first emitted token follows p, whatever q proposed."""
    torch.manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.3, 0.3]], dtype=torch.float64)
    q = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3], dtype=torch.float64)
    seq = Sequence("r", [1], SamplingParams(temperature=1.0, seed=7))
    trials = 6000
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(trials):
        guess = int(torch.multinomial(q, 1))
        counts[verify(p, Proposal([guess], q[None]), seq)[0]] += 1
    assert _chi_square_p(counts, p[0] * trials) > 1e-3
    assert (q - p[0]).abs().sum() / 2 > 0.3  # the proposals alone would fail this test


def _exact_marginals(path, prompt_ids: list[int], temperature: float, top_k: int) -> list[torch.Tensor]:
    """P(token 1), P(token 2), P(token 3) of the target under temperature and top-k, by enumeration
    with transformers (the reference implementation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def dist(prefixes: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + p for p in prefixes])).logits[:, -1].double() / temperature
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

    p1 = dist([[]])[0]
    firsts = p1.nonzero().flatten().tolist()
    p2s = dist([[a] for a in firsts])
    marg2 = (p1[firsts, None] * p2s).sum(0)
    paths = [(a, b, p1[a] * p2s[i, b]) for i, a in enumerate(firsts) for b in p2s[i].nonzero().flatten().tolist()]
    p3s = dist([[a, b] for a, b, _ in paths])
    marg3 = sum(w * p3s[i] for i, (_, _, w) in enumerate(paths))
    return [p1, marg2, marg3]


@pytest.mark.slow  # ~1 minute for both proposers: thousands of sampled tokens (make test-slow)
@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_sampled_output_follows_the_target_distribution(pair, proposer):
    """Thousands of seeded samples through the engine (tokens 2 and 3 come out of verification):
    each position's empirical distribution matches the target's exact one (chi-square)."""
    target, draft = pair
    temperature, top_k, n = 1.0, 4, 2000
    llm = LLM(str(target), threads=1, num_blocks=512, max_num_seqs=256,
              speculative_model=str(draft) if proposer == "draft" else "ngram", speculative_max_batch=1024)
    # Repetitive, so that n-gram lookup finds continuations for most first tokens.
    prompt = llm.engine.tokenizer.encode("The KV cache holds keys and values. " * 3 + "The")
    params = [SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k, seed=i, ignore_eos=True) for i in range(n)]
    outs = llm.generate([prompt] * n, params)
    assert llm.engine.spec_stats.drafts > 0
    for pos, exact in enumerate(_exact_marginals(target, prompt, temperature, top_k)):
        counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[pos] for o in outs]),
                                minlength=len(exact)).double()
        assert _chi_square_p(counts, exact * n) > 1e-3, f"token {pos + 1}"


def test_ngram_lookup_proposes_what_followed_the_last_match():
    ng = NgramProposer(max_n=3, min_n=1)
    assert ng.lookup([5, 6, 7, 8, 9, 1, 5, 6, 7], 3) == [8, 9, 1]  # the 3-gram 5 6 7
    assert ng.lookup([1, 2, 3, 2, 9, 9, 2], 2) == [9, 9]  # the latest 1-gram match wins
    assert ng.lookup([1, 2, 3], 2) == []
    # Bytes of 256 then 0 contain those of 1 across the token boundary: not a token match.
    assert ng.lookup([256, 0, 5, 1], 2) == []


def test_policy_speculates_only_while_the_verify_pass_is_memory_bound():
    policy = SpecPolicy(num_tokens=4, ridge_tokens=20.0, draft_ratio=0.1)
    assert policy.pays(1, 0.7) and policy.pays(4, 0.7)
    assert not policy.pays(16, 0.7) and not policy.pays(64, 0.9)
    assert not policy.pays(1, 0.0)  # nothing accepted: only the draft's cost remains
    assert policy.largest_batch(0.7) == max(b for b in range(1, 100) if policy.pays(b, 0.7))
    assert SpecPolicy(4, 20.0, 0.1, max_batch=8).pays(8, 0.0)  # the operator's override
    stats = SpecDecodeStats(drafts=10, draft_tokens=40, accepted_tokens=30)
    assert stats.acceptance_rate == 0.75 and stats.mean_acceptance_length == 4.0
    # Each sequence's own record decides, starting from the prior.
    seq = Sequence("r", [1], SamplingParams())
    assert policy.acceptance(seq) == SpecPolicy.PRIOR_ACCEPTANCE
    seq.num_spec_draft_tokens = 400
    assert policy.acceptance(seq) < 0.02 and not policy.pays(1, policy.acceptance(seq))


def test_engine_turns_speculation_off_for_a_large_batch(pair):
    """With the roofline measured on this machine, a 64-sequence batch is past the point where a
    5-token verify pass is memory-bound: no proposals are made."""
    target, draft = pair
    llm = LLM(str(target), threads=1, num_blocks=256, speculative_model=str(draft))
    assert not llm.engine.core.spec_policy.pays(64, 1.0)
    llm.generate(["hi"] * 64, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert llm.engine.spec_stats.drafts == 0
