"""A tensor-parallel rank other than 0: its own process, its shard of the model, its share of every
KV page. It runs whatever step rank 0 lays out, in lockstep (the collectives pair the ranks' layers),
until rank 0 says stop; sampling, the draft model and grammars stay with rank 0.

It is started as `python -m chatscale.distributed.worker` (a clean interpreter, as the engine
process is: a user's script is never re-run). Any error ends the process after writing why to
`--error-file`: rank 0's next collective then fails at once (gloo sees the socket close), and the
engine reports that rank and its error, never hangs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import traceback
from pathlib import Path

import msgspec
import torch

from chatscale.engine.config import EngineConfig

log = logging.getLogger("chatscale.engine")
COLLECTIVE_TIMEOUT_S = 600.0  # a rank alive but stuck this long fails the collective waiting on it


def run_rank(config: EngineConfig, rank: int, port: int, error_file: Path) -> None:
    """The process body of rank `rank` (started by TensorParallelExecutor)."""
    from chatscale.distributed.group import TensorParallelGroup, rank_device
    from chatscale.distributed.sharding import Shard
    from chatscale.engine.native_memory import bound_matmul_kernel_caches
    from chatscale.engine.runner import ModelRunner
    from chatscale.models.loader import load_model, model_config

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine process decides when ranks stop
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}] %(message)s")
    tp = None
    try:
        bound_matmul_kernel_caches()
        torch.set_num_threads(threads_per_rank(config))
        torch.manual_seed(config.seed)
        device = rank_device(config.device, rank)
        shard = Shard(rank, config.tensor_parallel_size, model_config(config.model))
        tp = TensorParallelGroup(shard, port, device, COLLECTIVE_TIMEOUT_S)
        model = load_model(config.model, config.dtype, str(device), config.quantization, config.quant_group_size, tp)
        ModelRunner(model, config).follow()
    except BaseException as exc:
        log.error("tensor-parallel rank %d stopped:\n%s", rank, "".join(traceback.format_exception(exc)))
        error_file.write_text(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
    finally:
        if tp is not None:
            tp.destroy()


def threads_per_rank(config: EngineConfig) -> int:
    """--threads per rank; by default the cores split between the ranks (they share one CPU)."""
    if config.threads:
        return config.threads
    if config.device != "cpu":
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)


def command(config: EngineConfig, rank: int, port: int, error_file: Path) -> list[str]:
    """The arguments that start rank `rank` (see `main`)."""
    return ["-m", "chatscale.distributed.worker", "--config", msgspec.json.encode(config).decode(),
            "--rank", str(rank), "--port", str(port), "--error-file", str(error_file)]


def main() -> None:
    p = argparse.ArgumentParser(description="a tensor-parallel rank of chatscale's engine (started by it)")
    p.add_argument("--config", required=True, help="EngineConfig as JSON")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True, help="rank 0's rendezvous port on 127.0.0.1")
    p.add_argument("--error-file", type=Path, required=True)
    args = p.parse_args()
    run_rank(msgspec.json.decode(args.config, type=EngineConfig), args.rank, args.port, args.error_file)


if __name__ == "__main__":
    main()
