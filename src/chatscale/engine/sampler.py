"""Turn a step's logits into tokens, honouring each sequence's own sampling parameters.

Rows are processed as one batch: bias and penalties, then greedy rows take the argmax and the
others are tempered, truncated (top-k, top-p, min-p) and sampled with the exponential race
(argmax of p / Exp(1)), which needs one noise draw per row and so lets a seeded request keep
its own generator whatever else shares the batch.
"""

from __future__ import annotations

import torch

from chatscale.engine.messages import TokenLogprobs
from chatscale.engine.sequence import Sequence


def seq_generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    if seq.params.seed is None:
        return None
    if seq.rng is None:
        seq.rng = torch.Generator(device=device)
        # Each of the n choices gets its own stream, so they differ yet reproduce; any int64 seed fits.
        seq.rng.manual_seed((seq.params.seed * 1_000_003 + seq.index) % (1 << 63))
    return seq.rng


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> None:
    """Logit bias, repetition penalty (prompt + output, as HF) and OpenAI presence/frequency
    penalties (output only), in place; and EOS/stop ids banned until min_tokens is reached."""
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            logits[row, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if p.needs_penalties:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
                vals = logits[row, seen]
                logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if out.numel():
                counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if banned:
                logits[row, banned] = float("-inf")


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k, nucleus (top-p) and min-p set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab)
    drop = ranks[None, :] >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # the token crossing p stays
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _tempered(logits: torch.Tensor, ps: list) -> torch.Tensor:
    """Rows divided by their temperature and truncated to their top-k / top-p / min-p sets."""
    x = logits / torch.tensor([p.temperature for p in ps], device=logits.device)[:, None]
    if any(p.top_k or p.top_p < 1.0 or p.min_p > 0.0 for p in ps):
        x = truncate(
            x,
            torch.tensor([min(p.top_k, x.shape[-1]) for p in ps], device=x.device),
            torch.tensor([p.top_p for p in ps], device=x.device),
            torch.tensor([p.min_p for p in ps], device=x.device),
        )
    return x


def exponential_race(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row drawn from `probs` as argmax(p / Exp(1)); a seeded sequence draws its
    noise from its own generator, so its tokens do not depend on what shares the batch."""
    noise = torch.empty_like(probs).exponential_()
    for j, seq in enumerate(seqs):
        gen = seq_generator(seq, probs.device)
        if gen is not None:
            noise[j].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        raw = logits
        logits = self._biased(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            probs = _tempered(logits[rows], [seqs[i].params for i in sampled_rows]).softmax(dim=-1)
            tokens[rows] = exponential_race(probs, [seqs[i] for i in sampled_rows])
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, seqs, token_list)

    def distribution(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's sampling distribution (bias, penalties, temperature, truncation applied);
        greedy rows are one-hot at their argmax. Speculative decoding tests proposals against these."""
        logits = self._biased(logits, seqs)
        probs = torch.zeros_like(logits)
        probs.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            probs[rows] = _tempered(logits[rows], [seqs[i].params for i in sampled_rows]).softmax(dim=-1)
        return probs

    def _biased(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if any(s.params.logit_bias or s.params.needs_penalties or s.params.min_tokens for s in seqs):
            logits = logits.clone()
            apply_penalties(logits, seqs, self.eos_token_ids)
        return logits

    @staticmethod
    def _logprobs(raw: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprobs | None]:
        """Log-probabilities of the model's own distribution (before penalties and temperature)."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[TokenLogprobs | None] = [None] * len(seqs)
        if not want:
            return result
        lp = raw[want].log_softmax(dim=-1)
        k = max(seqs[i].params.logprobs for i in want)
        top_vals, top_ids = lp.topk(max(k, 1), dim=-1)
        for j, i in enumerate(want):
            kk = seqs[i].params.logprobs
            top = list(zip(top_ids[j, :kk].tolist(), top_vals[j, :kk].tolist()))
            result[i] = TokenLogprobs(tokens[i], float(lp[j, tokens[i]]), top)
        return result
