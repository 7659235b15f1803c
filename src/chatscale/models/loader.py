"""Load a checkpoint: a Hugging Face directory (config, (sharded) safetensors, generation defaults) or a
GGUF file (or a directory holding one), with dense or weight-only quantized linear layers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from chatscale.models.config import ModelConfig
from chatscale.models.gguf.checkpoint import find_gguf, open_gguf
from chatscale.models.llama import LlamaForCausalLM
from chatscale.models.quant.policy import WeightFormat

log = logging.getLogger("chatscale.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerationDefaults:
    """generation_config.json: the checkpoint author's stop tokens and sampling defaults."""

    eos_token_ids: list[int] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, path: Path) -> "GenerationDefaults":
        """From generation_config.json, or a GGUF file's EOS ids (its sampling keys are llama.cpp's own)."""
        gguf = find_gguf(path)
        if gguf is not None:
            from chatscale.models.gguf.tokenizer import gguf_eos_ids

            return cls(gguf_eos_ids(open_gguf(gguf)))
        file = path / "generation_config.json"
        if not file.is_file():
            return cls()
        cfg = json.loads(file.read_text())
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        sampling = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        if cfg.get("do_sample") is False:
            sampling["temperature"] = 0.0
        return cls(eos_ids, sampling)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (model.safetensors or shards with an index)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{path}: the shard index names {f.name}, which is missing")
    return files


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def resolve_dtype(cfg: ModelConfig, requested: str) -> torch.dtype:
    name = cfg.dtype if requested == "auto" else requested
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu", quantization: str | None = None,
               group_size: int = 32) -> LlamaForCausalLM:
    """The model at `path` (HF directory, .gguf file, or a directory holding one .gguf), with its linear
    layers quantized at load when `quantization` is "int8" or "int4" (groups of `group_size`)."""
    path = Path(path)
    gguf = find_gguf(path)
    if gguf is None and not path.is_dir():
        what = "file" if path.suffix == ".gguf" or path.is_file() else "directory"
        raise FileNotFoundError(f"model {what} {str(path)!r} does not exist" if not path.exists() else
                                f"{str(path)!r} is neither a GGUF file nor a model directory")
    if gguf is not None:
        checkpoint = open_gguf(gguf)
        cfg = ModelConfig.from_dict(checkpoint.hf_config)
        names = checkpoint.names()  # maps every tensor: an unexpected one is refused before allocating
        weights = ((name, checkpoint.get(name)) for name in names)
    else:
        cfg = ModelConfig.from_dir(path)
        weights = iter_weights(path)
    torch_dtype = resolve_dtype(cfg, dtype)
    model = LlamaForCausalLM(cfg, torch_dtype, torch.device(device))
    model.load_weights(weights, WeightFormat(torch_dtype, torch.device(device), quantization, group_size))
    log.info("%s: %.1f MiB of weights resident", path.name, model.weight_bytes() / 2**20)
    return model.eval()
