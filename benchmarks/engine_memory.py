"""Where the engine process's memory goes: the engine core alone under a closed loop of mixed requests.

The same EngineCore (scheduler, KV cache, model, sampler) the server's engine process runs, without
ZeroMQ and HTTP, so every byte is the engine's. Every --every seconds it prints the RSS and glibc's
heap (mallinfo2: bytes in use, bytes free but kept), and what malloc_trim gives back at the end.
With --memray it records every native allocation (memray, with C/C++ stacks) and prints the sites
holding the most memory at the end, grouped by the library frame that asked for it.

    .venv/bin/python benchmarks/engine_memory.py --seconds 600
    .venv/bin/python benchmarks/engine_memory.py --steps 1500 --memray /tmp/engine.memray
"""

from __future__ import annotations

import argparse
import ctypes
import random
import time
from collections import Counter

import psutil

from chatscale.engine.config import EngineConfig
from chatscale.engine.core import EngineCore
from chatscale.engine.messages import AddRequest
from chatscale.engine.sampling_params import SamplingParams

MB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def memory() -> dict[str, float]:
    """RSS, and glibc's heap: bytes handed out (in use), freed but kept (free), in mmap'ed chunks."""
    m = LIBC.mallinfo2()
    return {"rss_mb": psutil.Process().memory_info().rss / MB, "heap_in_use_mb": m.uordblks / MB,
            "heap_free_mb": m.fordblks / MB, "mmap_mb": m.hblkhd / MB}


def run(core: EngineCore, seconds: float, steps: int, every: float, seed: int) -> list[dict]:
    """A closed loop of six requests at a time: prompts of 10-200 tokens, 4-48 new tokens, n=1 or 4,
    some with logprobs, some aborted mid-way (as disconnecting clients are)."""
    rng = random.Random(seed)
    live: dict[str, bool] = {}  # request id -> abort it early
    rows, k, step, start, last = [], 0, 0, time.monotonic(), -every
    while time.monotonic() - start < seconds and step < steps:
        while len(live) < 6:
            params = SamplingParams(n=rng.choice([1, 1, 1, 4]), max_tokens=rng.randint(4, 48), temperature=0.8,
                                    logprobs=rng.choice([None, None, 5]))
            prompt = [rng.randrange(3, 1000) for _ in range(rng.randint(10, 200))]
            core.add_request(AddRequest(f"r{k}", prompt, params))
            live[f"r{k}"] = rng.random() < 0.1
            k += 1
        core.step()
        step += 1
        for request_id, abort in list(live.items()):
            if request_id not in core.requests:
                del live[request_id]
            elif abort and rng.random() < 0.2:
                core.abort(request_id)
                del live[request_id]
        t = time.monotonic() - start
        if t - last >= every or step == steps:
            last = t
            rows.append({"t": round(t), "steps": step, "requests": k, **{n: round(v) for n, v in memory().items()}})
            print(rows[-1], flush=True)
    return rows


def live_native_sites(path: str, top: int) -> None:
    """The allocations still live at the end, summed by the first frame outside the allocator
    and torch's own allocation wrappers (what asked for the memory)."""
    from memray import FileReader

    skip = ("malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "operator new", "c10::", "alloc_cpu",
            "memalign", "_PyObject", "PyMem_", "_PyMem")
    sites: Counter = Counter()
    counts: Counter = Counter()
    for record in FileReader(path).get_leaked_allocation_records(merge_threads=True):
        frames = [f for f in record.native_stack_trace() if not any(s in f[0] for s in skip)]
        site = " <- ".join(f"{name[:60]} ({lib.rsplit('/', 1)[-1]})" for name, lib, _ in frames[:2]) or "?"
        sites[site] += record.size
        counts[site] += record.n_allocations
    total = sum(sites.values())
    print(f"\nlive at the end: {total / MB:.0f} MB natively allocated; the largest sites:")
    for site, size in sites.most_common(top):
        print(f"{size / MB:8.1f} MB {counts[site]:7d} blocks  {site}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--steps", type=int, default=1 << 62)
    p.add_argument("--every", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--memray", help="record native allocations to this file and report the live ones")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    core = EngineCore(EngineConfig(threads=1, kv_cache_bytes=256 * MB, dtype=args.dtype))
    print(f"engine: {core.dtype_name} on {core.model.device}, {core.kv.num_blocks} KV pages")
    if args.memray:
        import memray

        with memray.Tracker(args.memray, native_traces=True, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
            run(core, args.seconds, args.steps, args.every, args.seed)
        live_native_sites(args.memray, args.top)
    else:
        run(core, args.seconds, args.steps, args.every, args.seed)
    before = memory()
    LIBC.malloc_trim(0)
    after = memory()
    print(f"malloc_trim(0): RSS {before['rss_mb']:.0f} -> {after['rss_mb']:.0f} MB "
          f"(heap free but kept: {before['heap_free_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
