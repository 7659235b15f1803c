"""Turn a step's logits into tokens, honouring each sequence's own sampling parameters.

The batch is processed as a whole: bias and penalties as a few scatters over the rows that have
them, then greedy rows take the argmax and the others are tempered, truncated (top-k, top-p, min-p)
and sampled with the exponential race (argmax of p / Exp(1)), which needs one noise draw per row
and so lets a seeded request keep its own generator whatever else shares the batch. Truncation
never sorts the vocabulary: the candidates are a top-k (the largest k asked for, or TOP_P_CANDIDATES
when only top-p is), and only a row whose top-p mass lies beyond them sorts in full. Tokens and
logprobs come back to the host in one transfer: the step's one host sync.
"""

from __future__ import annotations

import numpy as np
import torch

from chatscale.engine.messages import TokenLogprobs
from chatscale.engine.sequence import Sequence

TOP_P_CANDIDATES = 256  # top-p is decided among this many tokens unless their mass falls short of p


def host_tensor(values: list | np.ndarray, device: torch.device, dtype: np.dtype | type = np.int64) -> torch.Tensor:
    """Small per-step values (rows, temperatures) as a tensor on `device`, copied without blocking:
    `torch.tensor(list, device=cuda)` would wait for the device, a host sync in the middle of a step."""
    return torch.from_numpy(np.asarray(values, dtype=dtype)).to(device, non_blocking=True)


def seq_generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    if seq.params.seed is None:
        return None
    if seq.rng is None:
        seq.rng = torch.Generator(device=device)
        # Each of the n choices gets its own stream, so they differ yet reproduce; any int64 seed fits.
        seq.rng.manual_seed((seq.params.seed * 1_000_003 + seq.index) % (1 << 63))
    return seq.rng


def _padded(lists: list[list[int]], fill: int = 0) -> np.ndarray:
    """Ragged id lists as one [rows, longest] array (at least one column), padded with `fill`."""
    out = np.full((len(lists), max(1, max(map(len, lists), default=0))), fill, dtype=np.int64)
    for i, ids in enumerate(lists):
        out[i, :len(ids)] = ids
    return out


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> None:
    """Logit bias, repetition penalty (prompt + output, as HF) and OpenAI presence/frequency
    penalties (output only), in place; and EOS/stop ids banned until min_tokens is reached. Each is
    one scatter over the rows that need it."""
    device, vocab = logits.device, logits.shape[-1]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    if biased:
        ids = _padded([list(seqs[i].params.logit_bias) for i in biased])
        vals = np.zeros(ids.shape, dtype=np.float32)
        for r, i in enumerate(biased):
            bias = list(seqs[i].params.logit_bias.values())
            vals[r, :len(bias)] = bias
        rows = tensor(np.array(biased))
        logits[rows] = logits[rows].scatter_add(1, tensor(ids), tensor(vals).to(logits.dtype))
    rep = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        rows = tensor(np.array(rep))
        seen = torch.zeros(len(rep), vocab, dtype=torch.bool, device=device)
        seen.scatter_(1, tensor(_padded([seqs[i].token_ids for i in rep], seqs[rep[0]].token_ids[0])), True)
        penalty = tensor(np.array([seqs[i].params.repetition_penalty for i in rep], dtype=np.float32))[:, None]
        vals = logits[rows]
        logits[rows] = torch.where(seen, torch.where(vals > 0, vals / penalty, vals * penalty), vals)
    counted = [i for i, s in enumerate(seqs) if (s.params.presence_penalty or s.params.frequency_penalty)
               and s.num_output_tokens]
    if counted:
        rows = tensor(np.array(counted))
        outs = [seqs[i].output_token_ids for i in counted]
        ones = tensor(_padded([[1] * len(o) for o in outs]).astype(np.float32)).to(logits.dtype)
        counts = torch.zeros(len(counted), vocab, dtype=logits.dtype, device=device)
        counts.scatter_add_(1, tensor(_padded(outs)), ones)
        freq = tensor(np.array([seqs[i].params.frequency_penalty for i in counted], dtype=np.float32))[:, None]
        pres = tensor(np.array([seqs[i].params.presence_penalty for i in counted], dtype=np.float32))[:, None]
        logits[rows] -= freq.to(logits.dtype) * counts + pres.to(logits.dtype) * (counts > 0).to(logits.dtype)
    banned = [(i, list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else sorted(eos_token_ids)))
              for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
    banned = [(i, ids) for i, ids in banned if ids]
    if banned:
        ids = _padded([ids for _, ids in banned], -1)
        rows, cols = np.nonzero(ids >= 0)
        logits[tensor(np.array([i for i, _ in banned])[rows]), tensor(ids[rows, cols])] = float("-inf")


def truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Mask everything outside each row's top-k, nucleus (top-p) and min-p set to -inf, without
    sorting the vocabulary. The candidates are each row's largest logits: as many as the largest
    top-k asked for, or TOP_P_CANDIDATES when some row has none. Only a row without top-k whose
    nucleus reaches past the candidates needs a full sort; checking for one is the only device value
    this reads, and only when such a row exists."""
    vocab, device = logits.shape[-1], logits.device
    top_ks = [k if 0 < k < vocab else 0 for k in top_k]
    width = min(vocab, max(top_ks) if all(top_ks) else max(TOP_P_CANDIDATES, *top_ks))
    k = host_tensor([kk or vocab for kk in top_ks], device)
    p = host_tensor(top_p, device, np.float32)
    probs = logits.softmax(dim=-1)
    cand_logits, cand = logits.topk(width, dim=-1)  # sorted, descending
    cand_probs = probs.gather(1, cand)
    ranks = torch.arange(width, device=device)
    drop = ranks[None, :] >= k[:, None]
    drop |= (cand_probs.cumsum(dim=-1) - cand_probs) > p[:, None]  # the token crossing p stays
    drop |= cand_probs < host_tensor(min_p, device, np.float32)[:, None] * cand_probs[:, :1]
    drop[:, 0] = False
    out = torch.full_like(logits, float("-inf")).scatter_(1, cand, cand_logits.masked_fill(drop, float("-inf")))
    if width == vocab or not any(kk == 0 and pp < 1.0 for kk, pp in zip(top_ks, top_p)):
        return out
    short = (k > width) & (cand_probs.sum(dim=-1) < p)  # the nucleus reaches past the candidates
    if bool(short.any()):
        rows = short.nonzero().flatten()
        out[rows] = _truncate_sorted(logits[rows], k[rows], p[rows], host_tensor(min_p, device, np.float32)[rows])
    return out


def _truncate_sorted(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The same truncation by a full sort (the rare rows whose nucleus is wider than the candidates)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = torch.arange(logits.shape[-1], device=logits.device)[None, :] >= k[:, None]
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _tempered(logits: torch.Tensor, ps: list) -> torch.Tensor:
    """Rows divided by their temperature and truncated to their top-k / top-p / min-p sets."""
    x = logits / host_tensor([p.temperature for p in ps], logits.device, np.float32).to(logits.dtype)[:, None]
    if any(p.top_k or p.top_p < 1.0 or p.min_p > 0.0 for p in ps):
        x = truncate(x, [p.top_k for p in ps], [p.top_p for p in ps], [p.min_p for p in ps])
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

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], extra: torch.Tensor | None = None
                 ) -> tuple[list[int], list[TokenLogprobs | None], list[int]]:
        """Tokens, logprobs where asked, and `extra` (a step's other small integer results, e.g. MoE
        expert counts) as a list: all in the step's one transfer to the host."""
        raw = logits
        logits = self._biased(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = host_tensor(sampled_rows, logits.device)
            probs = _tempered(logits[rows], [seqs[i].params for i in sampled_rows]).softmax(dim=-1)
            tokens[rows] = exponential_race(probs, [seqs[i] for i in sampled_rows])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if extra is None:
            extra = tokens.new_zeros(0)
        if not want:
            values = torch.cat([tokens, extra.flatten().to(tokens.dtype)]).tolist()
            return values[:len(seqs)], [None] * len(seqs), values[len(seqs):]
        return self._with_logprobs(raw, tokens, seqs, want, extra.flatten())

    def distribution(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's sampling distribution (bias, penalties, temperature, truncation applied);
        greedy rows are one-hot at their argmax. Speculative decoding tests proposals against these."""
        logits = self._biased(logits, seqs)
        probs = torch.zeros_like(logits)
        probs.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = host_tensor(sampled_rows, logits.device)
            probs[rows] = _tempered(logits[rows], [seqs[i].params for i in sampled_rows]).softmax(dim=-1)
        return probs

    def _biased(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if any(s.params.logit_bias or s.params.needs_penalties or s.params.min_tokens for s in seqs):
            logits = logits.clone()
            apply_penalties(logits, seqs, self.eos_token_ids)
        return logits

    @staticmethod
    def _with_logprobs(raw: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence], want: list[int],
                       extra: torch.Tensor) -> tuple[list[int], list[TokenLogprobs | None], list[int]]:
        """Tokens, and for the rows that asked, the log-probability of the model's own distribution
        (before penalties and temperature) of the sampled token and the top k: one host transfer."""
        rows = host_tensor(want, raw.device)
        lp = raw[rows].log_softmax(dim=-1)
        k = max(1, max(seqs[i].params.logprobs for i in want))
        top_vals, top_ids = lp.topk(k, dim=-1)
        chosen = lp.gather(1, tokens[rows][:, None])
        # Token ids are exact in float64, so one tensor carries everything back.
        packed = torch.cat([tokens.double(), chosen.double().flatten(), top_ids.double().flatten(),
                            top_vals.double().flatten(), extra.double()]).tolist()
        n, w = len(seqs), len(want)
        token_list = [int(t) for t in packed[:n]]
        chosen_lp, ids = packed[n:n + w], packed[n + w:n + w + w * k]
        vals, rest = packed[n + w + w * k:n + w + 2 * w * k], [int(x) for x in packed[n + w + 2 * w * k:]]
        result: list[TokenLogprobs | None] = [None] * n
        for j, i in enumerate(want):
            kk = seqs[i].params.logprobs
            top = [(int(t), v) for t, v in zip(ids[j * k:j * k + kk], vals[j * k:j * k + kk])]
            result[i] = TokenLogprobs(token_list[i], chosen_lp[j], top)
        return token_list, result, rest
