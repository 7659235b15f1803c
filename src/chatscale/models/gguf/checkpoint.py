"""A GGUF file as a checkpoint: its config, its tensors under Hugging Face names, its tokenizer data.

The file is read with the `gguf` package (llama.cpp's own reader), which maps it into memory: nothing
is allocated until a tensor is decoded, and `open_gguf` checks everything first (architecture,
tensor types, every tensor's bytes inside the file), so an unsupported or damaged file is refused
before any weight is loaded.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from chatscale.models.config import UnsupportedModelError
from chatscale.models.gguf import blocks
from chatscale.models.quant.weight import QuantizedWeight

log = logging.getLogger("chatscale.models")

# general.architecture -> the HF class; llama.cpp stores Mixtral as "llama" with experts.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}

# GGUF tensor name within a block -> HF name within a layer ("{e}": the expert, for stacked experts).
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj", "ffn_down_exps": "mlp.experts.{e}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
MIXTRAL_NAMES = {"mlp.gate": "block_sparse_moe.gate", "mlp.experts.{e}.gate_proj": "block_sparse_moe.experts.{e}.w1",
                 "mlp.experts.{e}.up_proj": "block_sparse_moe.experts.{e}.w3",
                 "mlp.experts.{e}.down_proj": "block_sparse_moe.experts.{e}.w2"}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(ValueError):
    """A file that is not a GGUF we can load; the message says why."""


@dataclass
class _Tensor:
    name: str  # the HF name
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: [out, in] for a matrix
    data: np.ndarray  # the bytes, mapped from the file
    permute_heads: int = 0  # llama q/k rows are interleaved for rope by llama.cpp's converter: heads to undo
    expert: int | None = None  # a stacked expert tensor's slice


class GGUFCheckpoint:
    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        try:
            self.reader = GGUFReader(str(path))
        except (ValueError, IndexError, KeyError, OSError, TypeError) as e:
            raise GGUFError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from e
        self.meta: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                           "tokenizer.ggml.scores"):
                self.meta[key] = field.contents()
        arch = self.meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"{path.name}: unsupported GGUF architecture {arch!r}; "
                                        f"supported: {', '.join(ARCHITECTURES)}")
        self.arch = arch
        for t in self.reader.tensors:
            if t.tensor_type not in blocks.SUPPORTED:
                raise GGUFError(f"{path.name}: tensor {t.name} has type {t.tensor_type.name}, which is not "
                                f"supported; supported: {', '.join(q.name for q in blocks.SUPPORTED)}")
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            if t.data_offset + t.n_elements // block * type_size > size or t.data.nbytes != t.n_bytes:
                raise GGUFError(f"{path.name}: tensor {t.name} runs past the end of the file: truncated")

    @functools.cached_property
    def tensors(self) -> dict[str, "_Tensor"]:
        """HF name -> the file's tensor (the model's; a tokenizer needs only the metadata)."""
        self._tensors: dict[str, _Tensor] = {}
        for t in self.reader.tensors:
            self._add(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape)), t.data)
        return self._tensors

    def _add(self, name: str, qtype: GGMLQuantizationType, shape: tuple[int, ...], data: np.ndarray) -> None:
        base, _, suffix = name.rpartition(".")
        if base == "rope_freqs":
            raise UnsupportedModelError(f"{self.path.name}: Llama-3 rope frequency factors (rope_freqs) "
                                        "are not supported yet")
        if base in GLOBAL_NAMES:
            full = f"{GLOBAL_NAMES[base]}.{suffix}"
            self._tensors[full] = _Tensor(full, qtype, shape, data)
            return
        parts = base.split(".")
        if len(parts) != 3 or parts[0] != "blk" or parts[2] not in LAYER_NAMES:
            raise GGUFError(f"{self.path.name}: unexpected tensor {name!r} for {self.arch}")
        hf = LAYER_NAMES[parts[2]]
        if self.hf_config["architectures"][0] == "MixtralForCausalLM":
            hf = MIXTRAL_NAMES.get(hf, hf)
        prefix = f"model.layers.{parts[1]}."
        heads = 0
        if self.arch == "llama" and parts[2] in ("attn_q", "attn_k"):
            cfg = self.hf_config
            heads = cfg["num_attention_heads"] if parts[2] == "attn_q" else cfg["num_key_value_heads"]
        if "{e}" in hf:  # stacked experts [E, out, in]: one HF tensor per expert
            for e in range(shape[0]):
                full = prefix + hf.format(e=e) + "." + suffix
                self._tensors[full] = _Tensor(full, qtype, shape[1:], data, expert=e)
            return
        if parts[2] == "ffn_gate_inp_shexp":
            shape = (1, *shape)  # HF stores the shared expert's gate as a [1, hidden] matrix
        full = prefix + hf + "." + suffix
        self._tensors[full] = _Tensor(full, qtype, shape, data, heads)

    def _key(self, name: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{name}", default)

    @functools.cached_property
    def hf_config(self) -> dict[str, Any]:
        """The file's hyper-parameters as an HF config.json dict (what ModelConfig and the planner read)."""
        arch = ARCHITECTURES[self.arch]
        experts = self._key("expert_count") or 0
        if self.arch == "llama" and experts:
            arch = "MixtralForCausalLM"
        heads = self._key("attention.head_count")
        hidden = self._key("embedding_length")
        missing = [k for k, v in {"block_count": self._key("block_count"), "embedding_length": hidden,
                                  "attention.head_count": heads}.items() if v is None]
        if missing:
            raise GGUFError(f"{self.path.name}: metadata lacks {', '.join(f'{self.arch}.{k}' for k in missing)}")
        if self._key("rope.scaling.type") not in (None, "none"):
            raise UnsupportedModelError(f"{self.path.name}: rope scaling {self._key('rope.scaling.type')!r} "
                                        "is not supported")
        cfg: dict[str, Any] = {
            "architectures": [arch],
            "vocab_size": self._key("vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data),
            "hidden_size": hidden,
            "intermediate_size": self._key("feed_forward_length") or 0,
            "num_hidden_layers": self._key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._key("attention.head_count_kv") or heads,
            "head_dim": self._key("attention.key_length") or hidden // heads,
            "max_position_embeddings": self._key("context_length", 2048),
            "rms_norm_eps": self._key("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._key("rope.freq_base", 10000.0),
            "tie_word_embeddings": not any(t.name == "output.weight" for t in self.reader.tensors),
            "hidden_act": "silu",
            "dtype": "float32",
            "bos_token_id": self.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta.get("tokenizer.ggml.eos_token_id"),
        }
        if self._key("attention.sliding_window"):
            cfg["sliding_window"] = self._key("attention.sliding_window")
        if experts:
            cfg |= {"num_local_experts": experts, "num_experts": experts,
                    "num_experts_per_tok": self._key("expert_used_count"),
                    "moe_intermediate_size": self._key("expert_feed_forward_length") or cfg["intermediate_size"],
                    "shared_expert_intermediate_size": self._key("expert_shared_feed_forward_length") or 0,
                    "norm_topk_prob": bool(self._key("expert_weights_norm", self.arch != "qwen2moe"))}
            if not cfg["intermediate_size"]:
                cfg["intermediate_size"] = cfg["moe_intermediate_size"]
            names = {t.name for t in self.reader.tensors}  # a layer without a router is dense (Qwen-MoE)
            cfg["mlp_only_layers"] = [i for i in range(cfg["num_hidden_layers"])
                                      if f"blk.{i}.ffn_gate_inp.weight" not in names]
        return cfg

    def type_counts(self) -> Counter[str]:
        return Counter(t.tensor_type.name for t in self.reader.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | QuantizedWeight:
        """The tensor under its HF name: fp32 dense, or a QuantizedWeight for a block-quantized matrix.
        `rows` [start, end) reads only those rows from the mapped file (a column-parallel shard; for
        q/k, whole heads, which llama.cpp's rope interleaving never crosses)."""
        t = self.tensors[name]
        data, shape = t.data, t.shape
        if t.expert is not None:
            data = data[t.expert]
        if rows is not None:
            data, shape = data[rows[0]:rows[1]], (rows[1] - rows[0], *shape[1:])
        out = blocks.decode(data, t.qtype, shape)
        heads = t.permute_heads * shape[0] // t.shape[0]
        return _unpermute(out, heads) if heads else out


def _unpermute(w: torch.Tensor | QuantizedWeight, heads: int) -> torch.Tensor | QuantizedWeight:
    """Undo llama.cpp's q/k row order (each head's two rope halves interleaved) back to HF's halves."""
    rows = w.shape[0]
    order = torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)
    if isinstance(w, QuantizedWeight):
        off = None if w.offset is None else w.offset[order]
        return QuantizedWeight(w.q[order], w.scale[order], off, w.group, w.bits, w.source)
    return w[order]


def find_gguf(path: Path) -> Path | None:
    """`path` itself if it is a .gguf file; the one .gguf in a directory without config.json; else None."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise GGUFError(f"{path}: holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); "
                            "name one with --model")
        return files[0] if files else None
    return None


def open_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """The checkpoint, opened once per process for the model, its tokenizer and its generation defaults
    (a changed file is opened again)."""
    stat = Path(path).stat()
    return _open(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open(path: str, size: int, mtime_ns: int) -> GGUFCheckpoint:
    checkpoint = GGUFCheckpoint(Path(path))
    counts = ", ".join(f"{n} {k}" for k, n in checkpoint.type_counts().most_common())
    log.info("%s: GGUF %s, tensors: %s", Path(path).name, checkpoint.arch, counts)
    return checkpoint
