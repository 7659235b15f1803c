"""Tensor parallelism's executor: one process per rank, driven by the engine core's one scheduler.

Rank 0 is the engine process itself (as vLLM's "driver worker" was): it holds its shard and runs
everything the single-device executor runs — the sampler, grammar masks, speculative proposals,
with the draft model whole on rank 0 only (it is small, and its tokens must be the same for every
rank anyway). Ranks 1..N-1 are processes this executor starts (distributed/worker.py). Each step,
rank 0's runner broadcasts the step's flat layout once; every rank turns it into the same tensors
and runs its shard, meeting at two all-reduces a layer; rank 0 gets every rank's logits.

Keeping rank 0 in the engine process means no sequence state is mirrored anywhere: the sampler
reads the engine's own Sequence objects, and a rank needs nothing but the layout.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from chatscale.bench.launch import free_port
from chatscale.distributed.group import TensorParallelGroup, rank_device
from chatscale.distributed.sharding import Shard
from chatscale.distributed.worker import COLLECTIVE_TIMEOUT_S, command, threads_per_rank
from chatscale.engine.async_engine import same_path_env
from chatscale.engine.config import EngineConfig
from chatscale.engine.errors import EngineDeadError
from chatscale.engine.executor import InProcessExecutor, ModelOutput
from chatscale.engine.scheduler import SchedulerOutput
from chatscale.engine.structured.hook import StructuredOutputs
from chatscale.models.dtype_policy import compute_dtype
from chatscale.models.loader import model_config

log = logging.getLogger("chatscale.engine")


class TensorParallelExecutor(InProcessExecutor):
    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], num_blocks: int | None = None,
                 structured: StructuredOutputs | None = None) -> None:
        import torch

        size = config.tensor_parallel_size
        cfg = model_config(config.model)
        shard = Shard(0, size, cfg)  # refuses a shape that does not split, before any process starts
        device = rank_device(config.device, 0)
        # Every rank must compute in the same dtype: decide it here ("auto" may measure) and pass it on.
        dtype = str(compute_dtype(config.dtype, cfg.dtype, device)).removeprefix("torch.")
        config = replace(config, dtype=dtype, device=str(device))
        torch.set_num_threads(threads_per_rank(config))
        port = free_port()
        self.error_dir = tempfile.TemporaryDirectory(prefix="chatscale-tp-")
        self.ranks = [subprocess.Popen([sys.executable, *command(config, rank, port, self._error_file(rank))],
                                       env=same_path_env()) for rank in range(1, size)]
        self.tp: TensorParallelGroup | None = None
        try:
            self.tp = TensorParallelGroup(shard, port, device, COLLECTIVE_TIMEOUT_S)
            super().__init__(config, eos_token_ids, num_blocks, structured, self.tp)
        except BaseException as exc:
            dead = self._dead_ranks(wait_s=1.0)
            self.shutdown()
            if dead:
                raise EngineDeadError(f"tensor parallelism failed to start: {dead}") from exc
            raise
        log.info("tensor parallelism: %d ranks (%s), rank 0 in the engine process, the others' pids %s",
                 size, "NCCL" if device.type == "cuda" else "gloo", [p.pid for p in self.ranks])

    def _error_file(self, rank: int) -> Path:
        return Path(self.error_dir.name) / f"rank{rank}.txt"

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        try:
            out = super().execute(plan)
        except Exception as exc:
            dead = self._dead_ranks(wait_s=1.0)
            if dead:
                raise EngineDeadError(f"a tensor-parallel rank died: {dead}") from exc
            raise
        out.collective_s = self.tp.take_seconds()
        return out

    def _dead_ranks(self, wait_s: float = 0.0) -> str:
        """What is known of ranks that exited ("" if none did): their exit codes and errors. After a
        failed collective, `wait_s` gives a dying rank time to exit."""
        dead = []
        for rank, p in enumerate(self.ranks, start=1):
            try:
                p.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            error = self._error_file(rank)
            why = f": {error.read_text()}" if error.is_file() else ""
            dead.append(f"rank {rank} (pid {p.pid}) exited with code {p.returncode}{why}")
        return "; ".join(dead)

    def shutdown(self) -> None:
        """Tell the ranks to stop (if the group still stands), then make sure they have."""
        if self.tp is not None:
            try:
                if not self._dead_ranks():
                    self.tp.broadcast(None)
            except Exception:  # a rank already gone: nothing to tell
                pass
            self.tp.destroy()
            self.tp = None
        for p in self.ranks:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.error_dir.cleanup()
