"""Which slice of every checkpoint tensor a tensor-parallel rank holds (Megatron's layout, as vLLM
and SGLang shard Llama-family models).

- Column-parallel (output rows split): q/k/v, gate/up, every expert's gate/up (w1/w3) and the
  shared expert's: each rank computes its own heads and its own slice of the MLP's intermediate.
- Row-parallel (inputs split): o and down (w2): each rank's partial sum is all-reduced, one
  all-reduce after attention and one after the MLP.
- KV heads split over the ranks when they divide; when the ranks are a multiple of the KV heads
  (MQA, or GQA with few KV heads) each rank keeps the one KV head its query heads read, replicated.
- Vocabulary-parallel: the embedding table and the LM head split by rows (ceil(V / N) a rank, the
  last rank's share shorter); a lookup is all-reduced, the LM head's logits all-gathered.
- Mixture-of-experts layers split *within* experts: every rank holds every expert's slice of the
  intermediate, so each rank's work is the same whatever the router picks (expert parallelism
  would leave a rank idle whenever its experts are unpopular, and needs an all-to-all per layer).
  The router and the norms are replicated.

A quantized tensor is split in its integer-and-scales form (QuantizedWeight) before it is packed
for a kernel; a row-parallel split must fall on a quantization-group boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from chatscale.models.config import ModelConfig
from chatscale.models.quant.weight import QuantizedWeight

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3")
ROW_PARALLEL = ("o_proj", "down_proj", "w2")
VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")


class ShardingError(ValueError):
    """The model's shape does not split over this many ranks; the message names the sizes."""


@dataclass(frozen=True)
class Slice:
    """Rows (dim 0) or input columns (dim 1) [start, end) of a tensor."""

    dim: int
    start: int
    end: int

    def of(self, w: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
        if isinstance(w, QuantizedWeight):
            return w.rows(self.start, self.end) if self.dim == 0 else w.columns(self.start, self.end)
        return w[self.start:self.end] if self.dim == 0 else w[:, self.start:self.end]


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size` tensor-parallel ranks over a model of shape `cfg` (the whole model's)."""

    rank: int
    size: int
    cfg: ModelConfig

    def __post_init__(self) -> None:
        check_divides(self.cfg, self.size)

    # ---- the rank's model shape ---------------------------------------------------------------------
    def local_config(self) -> ModelConfig:
        """The shape this rank's layers have: its heads, its slice of every intermediate; the
        vocabulary size stays the model's (the table's rows are the vocab range's)."""
        c, n = self.cfg, self.size
        return replace(c, num_heads=c.num_heads // n, num_kv_heads=max(1, c.num_kv_heads // n),
                       intermediate_size=c.intermediate_size // n,
                       moe_intermediate_size=c.moe_intermediate_size // n,
                       shared_expert_intermediate_size=c.shared_expert_intermediate_size // n)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.cfg.vocab_size // self.size)

    @property
    def vocab_range(self) -> tuple[int, int]:
        """The token ids whose embedding rows and logits this rank holds."""
        start = self.rank * self.vocab_per_rank
        return min(start, self.cfg.vocab_size), min(start + self.vocab_per_rank, self.cfg.vocab_size)

    # ---- checkpoint tensors -----------------------------------------------------------------------------
    def slice_for(self, name: str, shape: tuple[int, ...]) -> Slice | None:
        """The part of checkpoint tensor `name` (of full `shape`) this rank holds; None: all of it."""
        if name in VOCAB_PARALLEL:
            return Slice(0, *self.vocab_range)
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if module in ("k_proj", "v_proj") and self.cfg.num_kv_heads < self.size:
            head = self.rank * self.cfg.num_kv_heads // self.size  # the KV head this rank's queries read
            hd = self.cfg.head_dim
            return Slice(0, head * hd, (head + 1) * hd)
        if module in COLUMN_PARALLEL:
            return self._even(0, shape[0], name)
        if module in ROW_PARALLEL and parts[-1] == "weight":
            return self._even(1, shape[1], name)
        return None  # norms, the router, a shared expert's gate: replicated

    def _even(self, dim: int, length: int, name: str) -> Slice:
        if length % self.size:
            raise ShardingError(f"tensor parallelism over {self.size} ranks: {name} has {length} "
                                f"{'rows' if dim == 0 else 'inputs'}, which do not split evenly")
        part = length // self.size
        return Slice(dim, self.rank * part, (self.rank + 1) * part)

    def take(self, name: str, w: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
        """This rank's part of a whole checkpoint tensor (a copy: the whole one can be freed)."""
        part = self.slice_for(name, tuple(w.shape))
        if part is None:
            return w
        try:
            out = part.of(w)
        except ValueError as exc:  # a row-parallel split inside a quantization group
            raise ShardingError(f"tensor parallelism over {self.size} ranks cannot split {name}: {exc}") from exc
        return out.clone() if isinstance(out, torch.Tensor) else out


def check_divides(cfg: ModelConfig, size: int) -> None:
    """Refuse, naming the sizes, a model whose heads or intermediates do not split over `size` ranks."""
    if size < 1:
        raise ShardingError(f"--tensor-parallel-size must be at least 1, got {size}")
    problems = []
    if cfg.num_heads % size:
        problems.append(f"{cfg.num_heads} query heads")
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        problems.append(f"{kv} KV heads (the ranks must divide them, or be a multiple of them)")
    for what, n in (("MLP intermediate size", cfg.intermediate_size),
                    ("expert intermediate size", cfg.moe_intermediate_size),
                    ("shared-expert intermediate size", cfg.shared_expert_intermediate_size)):
        if n % size:
            problems.append(f"an {what} of {n}")
    if problems:
        raise ShardingError(f"{cfg.architecture} does not split over {size} tensor-parallel ranks: "
                            + "; ".join(problems) + f" do not divide by {size}")
