"""Load a Hugging Face model directory: config, (sharded) safetensors and generation defaults."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from chatscale.models.config import ModelConfig
from chatscale.models.dtype_policy import compute_dtype
from chatscale.models.llama import LlamaForCausalLM



@dataclass
class GenerationDefaults:
    """generation_config.json: the checkpoint author's stop tokens and sampling defaults, read as
    transformers reads them. Sampling is on only where the file sets `do_sample`; without it (or
    without the file) generation is greedy, as transformers' `generate` is: a chat model's card
    values (temperature, top_p) are not meant without do_sample, and temperature 1 over a small
    model's full vocabulary gives gibberish. `max_new_tokens` becomes the default `max_tokens`."""

    eos_token_ids: list[int] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0})

    @classmethod
    def from_dir(cls, path: Path) -> "GenerationDefaults":
        file = path / "generation_config.json"
        cfg = json.loads(file.read_text()) if file.is_file() else {}
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        keys = ("temperature", "top_p", "top_k", "min_p") if cfg.get("do_sample") else ()
        sampling = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        if not cfg.get("do_sample"):
            sampling["temperature"] = 0.0
        if cfg.get("repetition_penalty") is not None:  # transformers applies it to greedy search too
            sampling["repetition_penalty"] = cfg["repetition_penalty"]
        if cfg.get("max_new_tokens"):
            sampling["max_tokens"] = cfg["max_new_tokens"]
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




def model_dir(path: str | Path) -> Path:
    """`path` as a model directory, or a clear error naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    return path


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu") -> LlamaForCausalLM:
    path = model_dir(path)
    cfg = ModelConfig.from_dir(path)
    device = torch.device(device)
    model = LlamaForCausalLM(cfg, compute_dtype(dtype, cfg.dtype, device), device)
    model.load_weights(iter_weights(path))
    return model.eval()
