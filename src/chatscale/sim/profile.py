"""`chatscale simulate profile`: measure a real chatscale engine's step times on this machine across
batch shapes and fit the linear step-cost model the twin runs on.

Each shape queues a batch of requests at once and steps the engine until they finish, timing every
`LLMEngine.step()` call whole (scheduling, the forward pass, sampling, detokenizing: everything a
served step costs) against the step's chunks from `StepStats`. Shapes cover decode batches from 1
to 64 sequences at short and long contexts, lone prefills of 16 to 1,536 tokens, prefills with a
cached prefix, prefills that share a step with decodes (chunked prefill), and stretches of mixed
traffic (random lengths, a fixed number of requests in flight), whose steps mix all of these with
uneven contexts the way served traffic does.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from chatscale.engine.sampling_params import SamplingParams
from chatscale.sim.cost import LinearStepCost
from chatscale.sim.progress import progress


@dataclass(frozen=True)
class Shape:
    """`batch` requests of `prompt` tokens generating `output` tokens, plus `late` requests of
    `late_prompt` tokens added once the batch is decoding (prefill mixed with decodes)."""

    batch: int
    prompt: int
    output: int
    late: int = 0
    late_prompt: int = 0
    shared: int = 0  # leading prompt tokens every request of the batch shares (prefix-cache hits)


MIXES = ((4, 24), (16, 64), (48, 128))  # mixed traffic: (requests in flight, requests)


def default_shapes(max_len: int) -> list[Shape]:
    shapes = [Shape(b, p, 24) for b in (1, 2, 4, 8, 16, 32, 48, 64) for p in (16, 256, min(1024, max_len // 2))]
    shapes += [Shape(1, p, 2) for p in (16, 64, 128, 256, 512, 768, 1024, 1536) if p < max_len - 8]
    shapes += [Shape(4, p, 2, shared=p - p // 8) for p in (256, 1024) if p < max_len - 8]
    shapes += [Shape(b, 64, 32, late=l, late_prompt=lp) for b in (4, 16, 32) for l, lp in ((1, 512), (4, 128))]
    return shapes


def _mixed_traffic(engine, concurrency: int, requests: int, rng: random.Random, record) -> None:
    """Keep `concurrency` requests of random prompt (16-1024) and answer (8-96) lengths in flight."""
    added = 0
    while added < requests or engine.has_unfinished_requests():
        while added < requests and engine.num_running + engine.num_waiting < concurrency:
            engine.add_request(_ids(rng.randint(16, 1024), engine.vocab_size, rng),
                               SamplingParams(max_tokens=rng.randint(8, 96), ignore_eos=True))
            added += 1
        record()


def _ids(n: int, vocab: int, rng: random.Random, head: list[int] | None = None) -> list[int]:
    head = list(head or [])
    return head + [rng.randrange(3, vocab) for _ in range(n - len(head))]


def profile_engine(engine, shapes: list[Shape], repeats: int = 1, seed: int = 0,
                   show_progress: bool = False) -> tuple[list[list[tuple[int, int]]], list[float]]:
    """Run every shape `repeats` times; returns each step's chunks and its wall seconds."""
    rng = random.Random(seed)
    vocab = engine.vocab_size
    steps, seconds = [], []

    def record() -> None:
        start = time.perf_counter()
        engine.step()
        took = time.perf_counter() - start
        if engine.last_step.chunks:
            steps.append(list(engine.last_step.chunks))
            seconds.append(took)

    bar = progress((len(shapes) + len(MIXES)) * repeats, "profile", show_progress, unit="shape")
    for _ in range(repeats):
        for shape in shapes:
            engine.kv.reset_prefix_cache()
            shared = _ids(shape.shared, vocab, rng)
            for _ in range(shape.batch):
                engine.add_request(_ids(shape.prompt, vocab, rng, shared),
                                   SamplingParams(max_tokens=shape.output, ignore_eos=True))
            late = shape.late
            while engine.has_unfinished_requests():
                if late and engine.num_waiting == 0 and engine.num_running == shape.batch:
                    for _ in range(late):
                        engine.add_request(_ids(shape.late_prompt, vocab, rng),
                                           SamplingParams(max_tokens=2, ignore_eos=True))
                    late = 0
                record()
            bar.update()
        for concurrency, requests in MIXES:
            _mixed_traffic(engine, concurrency, requests, rng, record)
            bar.update()
    bar.close()
    return steps, seconds


def run_profile(model: str = "", threads: int = 1, repeats: int = 2, num_blocks: int | None = 4096,
                show_progress: bool = True) -> LinearStepCost:
    """Load the engine, warm it up, profile the default shapes and fit."""
    import torch

    from chatscale.engine.config import EngineConfig
    from chatscale.engine.engine import LLMEngine
    from chatscale.models.attention.torch_ref import DECODE_GROUP
    from chatscale.planner.hardware import _cpu_name

    engine = LLMEngine(EngineConfig(model=model, threads=threads, max_num_seqs=128), num_blocks=num_blocks)
    shapes = default_shapes(engine.max_model_len)
    profile_engine(engine, shapes[:6], seed=99)  # warm-up: allocator, kernels, caches
    steps, seconds = profile_engine(engine, shapes, repeats, show_progress=show_progress)
    return LinearStepCost.fit(steps, seconds, group=DECODE_GROUP, source={
        "model": _model_label(engine.config.model), "threads": threads, "device": engine.config.device,
        "cpu": _cpu_name(), "torch": torch.__version__, "num_blocks": engine.kv.num_blocks,
        "block_size": engine.kv.block_size, "vocab": engine.vocab_size,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _model_label(path: str) -> str:
    """A shipped model by its place in the package (the same in every checkout), others as given."""
    package = Path(__file__).resolve().parents[1]
    resolved = Path(path).resolve()
    return str(Path(package.name, resolved.relative_to(package))) if resolved.is_relative_to(package) else path
