"""A replica reduced to service curves, for the request-level fleet.

Derived from the same step-cost model the twin runs on: the time of a decode step as a function of
batch size and context, and the extra time a prompt's prefill adds to the steps it shares with a
batch of decodes. Buckets are powers of two, so a lookup is a `bit_length`, not a search.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatscale.sim.cost import StepCostModel

MAX_BUCKET = 18  # contexts and prompts up to 2^18 tokens


def bucket_value(k: int) -> int:
    """The token count a bucket stands for: bucket k holds [2^(k-1), 2^k), represented by 1.5 x 2^(k-1)."""
    return 1 if k == 0 else 3 << (k - 1) >> 1


@dataclass
class ReplicaCurves:
    decode: list[list[float]]  # [context bucket][batch size] -> seconds of one decode step
    prefill_per_token: list[list[float]]  # [prompt bucket][batch bucket] -> marginal seconds per token
    capacity_tokens: int  # KV cache, tokens
    max_seqs: int
    block_size: int

    @classmethod
    def from_cost(cls, cost: StepCostModel, capacity_tokens: int, max_seqs: int, block_size: int = 16,
                  max_batched_tokens: int = 2048) -> ReplicaCurves:
        cost = cost.expected()
        decode = [[0.0] + [cost.step_seconds([(bucket_value(k), 1)] * b) for b in range(1, max_seqs + 1)]
                  for k in range(MAX_BUCKET + 1)]
        prefill = []
        for k in range(MAX_BUCKET + 1):
            n = bucket_value(k)
            row = []
            for kb in range(max_seqs.bit_length() + 1):
                b = min(max_seqs, bucket_value(kb) if kb else 0)
                decodes = [(1024, 1)] * b
                base = cost.step_seconds(decodes) if b else 0.0
                extra, done = 0.0, 0
                while done < n:  # chunked prefill: one chunk per step, each sharing a step with the batch
                    chunk = min(max_batched_tokens - b, n - done)
                    extra += cost.step_seconds(decodes + [(done, chunk)]) - base
                    done += chunk
                row.append(extra / n)
            prefill.append(row)
        return cls(decode, prefill, capacity_tokens, max_seqs, block_size)

    def decode_seconds(self, batch: int, context: int) -> float:
        return self.decode[min(MAX_BUCKET, context.bit_length())][batch]

    def prefill_seconds(self, tokens: int, batch: int) -> float:
        return tokens * self.prefill_per_token[min(MAX_BUCKET, tokens.bit_length())][batch.bit_length()]
