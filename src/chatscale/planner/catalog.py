"""Model shapes for the planner: the published ones the seeds reason about, and any HF config.json.

A `Model` keeps the shape the roofline needs (layers, widths, heads, experts) and two parameter
counts: `shared_params`, which every token uses, and `expert_params`, one expert's MLP over all
layers (a dense model is one expert that every token uses). Counting from a shape is done once, in
`from_shape`; the seeds' GPT-4 is the exception, given by its estimated counts because no full shape
was ever published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Model:
    """A decoder-only transformer, dense or mixture-of-experts, as the roofline sees it."""

    name: str
    layers: int
    d_model: int
    heads: int  # query heads
    kv_heads: int  # key/value heads: = heads for multi-head, 1 for multi-query, between for GQA
    head_dim: int
    vocab: int
    shared_params: int  # used by every token: attention, norms, router, embeddings
    expert_params: int  # one expert's MLP summed over all layers (the whole MLP when dense)
    experts: int = 1
    top_k: int = 1
    tied_embeddings: bool = False  # input embedding is the output projection

    @property
    def total_params(self) -> int:
        return self.shared_params + self.experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: shared ones plus its top-k experts."""
        return self.shared_params + self.top_k * self.expert_params

    @property
    def matmul_params(self) -> int:
        """Active parameters that take part in a matmul: an untied input embedding is a lookup."""
        return self.active_params - (0 if self.tied_embeddings else self.vocab * self.d_model)

    @property
    def attention_width(self) -> int:
        """Width of the query heads, which sets the FLOPs of attending over the context."""
        return self.heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.experts > 1


def from_shape(
    name: str,
    *,
    layers: int,
    d_model: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: int,
    head_dim: int | None = None,
    experts: int = 1,
    top_k: int = 1,
    gated: bool = True,
    tied_embeddings: bool = False,
    shared_expert_ffn: int = 0,
) -> Model:
    """Count a transformer's parameters from its shape.

    Per layer: Q and O projections (d_model x heads*head_dim each), K and V (d_model x
    kv_heads*head_dim each), two norms, a router for MoE, and an MLP of 3 matrices when gated
    (SwiGLU) or 2 when not, `ffn` wide, per expert (plus an always-on shared expert, as in Qwen-MoE).
    Embeddings are counted once when tied. Biases are left out: under 0.1% of any model here.
    """
    head_dim = head_dim or d_model // heads
    mlp_matrices = 3 if gated else 2
    attention = 2 * d_model * heads * head_dim + 2 * d_model * kv_heads * head_dim
    router = d_model * experts if experts > 1 else 0
    per_layer = attention + 2 * d_model + router + mlp_matrices * d_model * shared_expert_ffn
    embeddings = vocab * d_model * (1 if tied_embeddings else 2)
    return Model(
        name=name,
        layers=layers,
        d_model=d_model,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        shared_params=layers * per_layer + embeddings + d_model,  # + the final norm
        expert_params=layers * mlp_matrices * d_model * ffn,
        experts=experts,
        top_k=top_k,
        tied_embeddings=tied_embeddings,
    )


def _llama(name: str, layers: int, d_model: int, heads: int, ffn: int, vocab: int, **kw: Any) -> Model:
    """The Llama family: SwiGLU MLP, untied embeddings, 8 KV heads (GQA), 128-wide heads."""
    return from_shape(name, layers=layers, d_model=d_model, heads=heads, kv_heads=8, ffn=ffn,
                      vocab=vocab, head_dim=128, **kw)


CATALOG: dict[str, Model] = {
    # Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1: 96 layers, d_model
    # 12288, 96 heads of 128; GPT-2's 4x MLP (GELU), BPE vocabulary of 50,257, tied embeddings.
    "gpt3-175b": from_shape("GPT-3 175B", layers=96, d_model=12288, heads=96, kv_heads=96,
                            ffn=4 * 12288, vocab=50257, gated=False, tied_embeddings=True),
    # The seeds' GPT-4 estimate (SemiAnalysis, July 2023): ~1.8T parameters in 120 layers, 16 experts
    # of ~111B MLP parameters, 2 routed per token, ~55B shared attention parameters, multi-query
    # attention. Not in the estimate, so assumed: GPT-3's width (96 heads of 128) and the cl100k
    # vocabulary; they only set attention FLOPs, the KV cache and activation traffic.
    "gpt4-moe": Model(name="GPT-4 (seed estimate)", layers=120, d_model=12288, heads=96, kv_heads=1,
                      head_dim=128, vocab=100256, shared_params=55_000_000_000,
                      expert_params=111_000_000_000, experts=16, top_k=2),
    # The seeds' "1 trillion parameter dense model": a GPT-3-style shape scaled to 1.0T parameters.
    "dense-1t": from_shape("Dense 1T", layers=128, d_model=25600, heads=160, kv_heads=160,
                           ffn=4 * 25600, vocab=50257, gated=False, tied_embeddings=True),
    # Chowdhery et al. 2022, "PaLM", Table 1 and section 2: 118 layers, d_model 18432, 48 heads of 256,
    # multi-query attention, SwiGLU MLP 4 x d_model wide, shared embeddings, 256k vocabulary.
    "palm-540b": from_shape("PaLM 540B", layers=118, d_model=18432, heads=48, kv_heads=1,
                            head_dim=256, ffn=4 * 18432, vocab=256000, tied_embeddings=True),
    # Shapes below are the models' Hugging Face config.json files.
    "llama-2-70b": _llama("Llama-2-70B", layers=80, d_model=8192, heads=64, ffn=28672, vocab=32000),
    "llama-3-8b": _llama("Llama-3-8B", layers=32, d_model=4096, heads=32, ffn=14336, vocab=128256),
    "llama-3-70b": _llama("Llama-3-70B", layers=80, d_model=8192, heads=64, ffn=28672, vocab=128256),
    "mixtral-8x7b": _llama("Mixtral-8x7B", layers=32, d_model=4096, heads=32, ffn=14336, vocab=32000,
                           experts=8, top_k=2),
}


def from_hf_config(source: str | Path | dict[str, Any], name: str | None = None) -> Model:
    """A `Model` from a Hugging Face config.json (a path, its directory, or the parsed dict).

    Reads the Llama-style keys (Llama, Mistral, Qwen2/3, Mixtral, Qwen-MoE) and GPT-2's `n_*` keys.
    """
    if isinstance(source, dict):
        cfg, default_name = source, source.get("_name_or_path") or source.get("model_type", "model")
    else:
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        cfg, default_name = json.loads(path.read_text()), path.parent.name
    if "n_embd" in cfg:  # GPT-2 family
        d_model = cfg["n_embd"]
        return from_shape(name or default_name, layers=cfg["n_layer"], d_model=d_model,
                          heads=cfg["n_head"], kv_heads=cfg["n_head"],
                          ffn=cfg.get("n_inner") or 4 * d_model, vocab=cfg["vocab_size"],
                          gated=False, tied_embeddings=cfg.get("tie_word_embeddings", True))
    try:
        heads = cfg["num_attention_heads"]
        experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 1
        return from_shape(
            name or default_name,
            layers=cfg["num_hidden_layers"],
            d_model=cfg["hidden_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim"),
            ffn=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            experts=experts,
            top_k=cfg.get("num_experts_per_tok", 1) if experts > 1 else 1,
            tied_embeddings=cfg.get("tie_word_embeddings", False),
            shared_expert_ffn=cfg.get("shared_expert_intermediate_size") or 0,
        )
    except KeyError as missing:
        raise ValueError(f"config.json of {default_name!r} lacks {missing}: not a decoder shape "
                         "the planner can read") from None


def get_model(name_or_path: str) -> Model:
    """A catalog model by name, or a Hugging Face config.json (file or model directory)."""
    if name_or_path.lower() in CATALOG:
        return CATALOG[name_or_path.lower()]
    if Path(name_or_path).exists():
        return from_hf_config(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: not one of {', '.join(CATALOG)} "
                     "and not a path to a config.json")
