"""Issue 17 item 6: under a steady load the engine process grew without levelling off. Each new token
count of a step compiled new bf16 matmul kernels, and oneDNN kept them in two caches of 1,024 entries
(1.2 GB on the demo model); what those caches evicted left the heap fragmented."""

from __future__ import annotations

import os
import subprocess
import sys

from chatscale.engine.native_memory import CACHE_CAPACITY_VARIABLES

# A fresh engine core (the caches are per process) computes 120 prompts of 120 different lengths.
PROBE = """
import psutil
from chatscale.engine.config import EngineConfig
from chatscale.engine.core import EngineCore
from chatscale.engine.messages import AddRequest
from chatscale.engine.native_memory import release_free_heap
from chatscale.engine.sampling_params import SamplingParams

core = EngineCore(EngineConfig(threads=1, kv_cache_bytes=32 << 20, dtype="bfloat16", enable_prefix_caching=False))

def prefill(lengths):
    for n in lengths:
        core.add_request(AddRequest(str(n), list(range(5, 5 + n)), SamplingParams(max_tokens=1)))
        while core.has_work():
            core.step()

prefill([8])
before = psutil.Process().memory_info().rss
prefill(range(9, 129))
release_free_heap()
print((psutil.Process().memory_info().rss - before) / 2**20)
"""


def engine_growth_mb(**env: str) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in CACHE_CAPACITY_VARIABLES}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=300, check=True)
    return float(out.stdout.split()[-1])


def test_new_step_shapes_do_not_pile_up_matmul_kernels():
    # measured: ~270 MB with the libraries' 1,024-entry caches, ~70 MB with 128 and the heap trimmed
    assert engine_growth_mb() < 150


def test_a_cache_size_the_user_set_wins():
    assert engine_growth_mb(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024") > 150
