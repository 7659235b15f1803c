"""Load a checkpoint: a Hugging Face directory (config, (sharded) safetensors, generation defaults) or a
GGUF file (or a directory holding one), with dense or weight-only quantized linear layers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from chatscale.models.config import ModelConfig
from chatscale.models.dtype_policy import compute_dtype
from chatscale.models.gguf.checkpoint import GGUFCheckpoint, find_gguf, open_gguf
from chatscale.models.llama import LlamaForCausalLM
from chatscale.models.quant.policy import Weight, WeightFormat

if TYPE_CHECKING:
    from chatscale.distributed.group import TensorParallelGroup
    from chatscale.distributed.sharding import Shard

log = logging.getLogger("chatscale.models")


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
        """From generation_config.json, or a GGUF file's EOS ids (its sampling keys are llama.cpp's own)."""
        gguf = find_gguf(path)
        if gguf is not None:
            from chatscale.models.gguf.tokenizer import gguf_eos_ids

            return cls(gguf_eos_ids(open_gguf(gguf)))
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


def iter_weights(path: Path, shard: Shard | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the safetensors files; with a tensor-parallel `shard`, only its slice of each
    (safetensors reads just those bytes, so a rank's peak host memory stays near its shard)."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                view = f.get_slice(name)
                part = None if shard is None else shard.slice_for(name, tuple(view.get_shape()))
                if part is None:
                    yield name, f.get_tensor(name)
                else:
                    yield name, view[part.start:part.end] if part.dim == 0 else view[:, part.start:part.end]


def gguf_weights(checkpoint: GGUFCheckpoint, shard: Shard | None = None) -> Iterator[tuple[str, Weight]]:
    """Every tensor of a GGUF file, decoded one at a time; with a `shard`, column-parallel slices read
    only their rows, and row-parallel ones are cut from the decoded tensor (on group boundaries)."""
    for name in checkpoint.names():
        part = None if shard is None else shard.slice_for(name, checkpoint.tensors[name].shape)
        if part is not None and part.dim == 0:
            yield name, checkpoint.get(name, (part.start, part.end))
        else:
            w = checkpoint.get(name)
            yield name, w if shard is None else shard.take(name, w)


def model_path(path: str | Path) -> Path:
    """`path` as a model: an HF directory, a .gguf file, or a directory holding one; else a clear error."""
    path = Path(path)
    if find_gguf(path) is None and not path.is_dir():
        what = "file" if path.suffix == ".gguf" or path.is_file() else "directory"
        raise FileNotFoundError(f"model {what} {str(path)!r} does not exist" if not path.exists() else
                                f"{str(path)!r} is neither a GGUF file nor a model directory")
    return path


def model_config(path: str | Path) -> ModelConfig:
    """The model's configuration, from config.json or the GGUF file's metadata."""
    gguf = find_gguf(Path(path))
    return ModelConfig.from_dict(open_gguf(gguf).hf_config) if gguf is not None else ModelConfig.from_dir(path)


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu", quantization: str | None = None,
               group_size: int = 32, tp: TensorParallelGroup | None = None) -> LlamaForCausalLM:
    """The model at `path` (HF directory, .gguf file, or a directory holding one .gguf), with its linear
    layers quantized at load when `quantization` is "int8" or "int4" (groups of `group_size`); under
    tensor parallelism, rank `tp.rank`'s shard of it, read slice by slice."""
    path = model_path(path)
    gguf = find_gguf(path)
    shard = None if tp is None else tp.shard
    if gguf is not None:
        checkpoint = open_gguf(gguf)  # maps every tensor: an unexpected one is refused before allocating
        cfg = ModelConfig.from_dict(checkpoint.hf_config)
        weights = gguf_weights(checkpoint, shard)
    else:
        cfg = ModelConfig.from_dir(path)
        weights = iter_weights(path, shard)
    device = torch.device(device)
    torch_dtype = compute_dtype(dtype, cfg.dtype, device)
    model = LlamaForCausalLM(cfg if shard is None else shard.local_config(), torch_dtype, device, tp)
    model.load_weights(weights, WeightFormat(torch_dtype, device, quantization, group_size))
    log.info("%s: %.1f MiB of weights read per forward, %.1f MiB resident (with prepacked copies)", path.name,
             model.weight_bytes() / 2**20, model.resident_bytes() / 2**20)
    return model.eval()
