"""Does the second KV tier pay on this machine? Restore time per page against recompute time.

Measured at start-up, on this engine's own model and pages: the cheaper way to get a prefix's KV
back is the one the engine uses. On a GPU, host memory over PCIe usually beats recomputing long
prefixes; on a CPU, copying a page from the disk area (the page cache) is weighed against a
prefill chunk of the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.sequence import Sequence

if TYPE_CHECKING:
    from chatscale.engine.kv_cache import KVCacheManager
    from chatscale.engine.runner import ModelRunner


@dataclass(frozen=True)
class TierCosts:
    restore_s_per_page: float
    recompute_s_per_page: float

    @property
    def pays(self) -> bool:
        return self.restore_s_per_page < self.recompute_s_per_page

    def __str__(self) -> str:
        return (f"restore {self.restore_s_per_page * 1e6:.0f} us/page vs recompute "
                f"{self.recompute_s_per_page * 1e6:.0f} us/page")


def measure_tier_costs(runner: "ModelRunner", kv: "KVCacheManager", pages: int = 8) -> TierCosts:
    """Time a round trip of `pages` pages through the tier and a prefill of as many tokens."""
    pages = min(pages, kv.num_free_blocks, runner.host_pages.shape[3])
    tokens = pages * kv.block_size
    seq = Sequence("tier-probe", [1] * tokens, SamplingParams(max_tokens=1))
    if not kv.allocate(seq, tokens):
        raise RuntimeError("no free KV pages to measure the second tier with")
    try:
        runner.execute([(seq, tokens)])  # warm-up
        t = time.perf_counter()
        runner.execute([(seq, tokens)])
        recompute = (time.perf_counter() - t) / pages
        moves = [("out", b, i) for i, b in enumerate(seq.block_table)]
        runner.apply_copies(moves)  # warm-up
        t = time.perf_counter()
        runner.apply_copies([("in", i, b) for _, b, i in moves])
        restore = (time.perf_counter() - t) / pages
    finally:
        kv.free(seq)
    return TierCosts(restore, recompute)
