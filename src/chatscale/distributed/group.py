"""The tensor-parallel group: torch.distributed's collectives between the ranks of one model.

NCCL on CUDA, gloo on CPU; the step's layout (numpy arrays, host objects) always travels over a
gloo group. The model calls three collectives: `all_reduce` after each row-parallel layer,
`embed` (a vocabulary-parallel lookup: each rank fills its rows, zeros elsewhere, all-reduced)
and `gather_logits` (each rank's vocabulary columns all-gathered). They are torch's functional
collectives, so a compiled decode step traces them; eagerly, their time is measured (wall time on
CPU, where gloo returns when the bytes are there; CUDA events on a GPU) for the metrics.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from chatscale.distributed.sharding import Shard

if TYPE_CHECKING:
    from chatscale.models.quant.linear import Linear


def rank_device(device: str, rank: int) -> torch.device:
    """Rank `rank`'s device: "cpu" for every CPU rank, the rank-th GPU from the one named."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    return torch.device(dev.type, (dev.index or 0) + rank)


class TensorParallelGroup:
    def __init__(self, shard: Shard, port: int, device: torch.device, timeout_s: float) -> None:
        """Join the group (every rank calls this; it returns once all have)."""
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group: one tensor-parallel "
                               "engine per process (shut the other down first)")
        self.shard, self.rank, self.size = shard, shard.rank, shard.size
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=self.rank,
                                world_size=self.size, timeout=timedelta(seconds=timeout_s))
        self.group = dist.group.WORLD
        self.host_group = self.group if backend == "gloo" else dist.new_group(backend="gloo")
        self._seconds = 0.0  # collective time since the last take_seconds()
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    # ---- collectives the model calls --------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (a row-parallel layer's partial outputs)."""
        return self._timed(lambda t: funcol.all_reduce(t, "sum", self.group), x)

    def embed(self, table: Linear, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embedding rows of `ids` from a vocabulary-parallel table: each rank looks up the ids in its
        range (zeros for the rest) and the sum is every row."""
        start, end = self.shard.vocab_range
        local = ids - start
        inside = (local >= 0) & (local < end - start)
        rows = table.embed(local.masked_fill(~inside, 0), dtype) * inside[:, None].to(dtype)
        return self.all_reduce(rows)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, vocab] logits from every rank's [T, its vocabulary range] (the last range may be short)."""
        width = self.shard.vocab_per_rank
        padded = F.pad(logits, (0, width - logits.shape[1])).contiguous()
        whole = self._timed(lambda t: funcol.all_gather_single(t, 0, self.group), padded)  # [size * T, width]
        t, vocab = logits.shape[0], self.shard.cfg.vocab_size
        return whole.view(self.size, t, width).transpose(0, 1).reshape(t, self.size * width)[:, :vocab]

    def _timed(self, collective, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return collective(x)
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = funcol.wait_tensor(collective(x))
            end.record()
            self._events.append((start, end))
            return y
        began = time.perf_counter()
        y = funcol.wait_tensor(collective(x))
        self._seconds += time.perf_counter() - began
        return y

    def take_seconds(self) -> float:
        """Seconds this rank spent in the model's collectives since the last call (after the step's
        sync, so a GPU's events have completed)."""
        seconds = self._seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1e3
        self._seconds, self._events = 0.0, []
        return seconds

    # ---- host objects -----------------------------------------------------------------------------------
    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled over the gloo group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
