"""Weight-only kernels vs dense matmuls on one model's linear shapes: where the kernels pay.

For each token count, every linear layer of the model (qkv, o, gate_up, down per layer, and the LM
head once) is timed three ways: the weight-only kernel (bf16 activations), dequantize into the
scratch buffer + dense fp32 matmul, and dense fp32 weights. The crossover sets
`KERNEL_MAX_TOKENS` in chatscale/models/quant/linear.py. Minimum of `--repeats` runs per cell (the
machine is shared), with the load average printed next to the table.

    .venv/bin/python benchmarks/quant_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from chatscale.models.quant.linear import SCRATCH, Int4Linear, Int8Linear, Linear
from chatscale.models.quant.weight import quantize_int4, quantize_int8

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, MLP 1536, 30 layers, vocabulary 49,152.
SMOLLM2 = dict(hidden=576, q=576, kv=192, mlp=1536, layers=30, vocab=49152)


def layer_shapes(m: dict) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's fused linears."""
    h = m["hidden"]
    return [(m["q"] + 2 * m["kv"], h), (h, m["q"]), (2 * m["mlp"], h), (h, m["mlp"])]


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def model_time(layers: list[Linear], head: Linear, num_layers: int, tokens: int, mode: str, repeats: int) -> float:
    """Seconds for all linears of the model on `tokens` tokens: one layer's set x num_layers + the head."""
    def run(layer: Linear) -> Callable[[], object]:
        x = torch.randn(tokens, layer.in_features)
        if mode == "kernel":
            xb = x.to(torch.bfloat16)
            return lambda: layer.kernel(xb).float()
        if mode == "dequant":
            def dequant_dense() -> torch.Tensor:
                w = SCRATCH.get((layer.out_features, layer.in_features), torch.float32, x.device)
                layer.dequantize_into(w)
                return F.linear(x, w)
            return dequant_dense
        w = layer.dense_weight()
        return lambda: F.linear(x, w)
    per_layer = sum(best_time(run(layer), repeats) for layer in layers)
    return per_layer * num_layers + best_time(run(head), repeats)


def build(kind: str, shapes: list[tuple[int, int]], group: int) -> list[Linear]:
    torch.manual_seed(0)
    def make(w: torch.Tensor) -> Linear:
        return Int8Linear(quantize_int8(w)) if kind == "int8" else Int4Linear(quantize_int4(w, group))
    return [make(torch.randn(n, k) * 0.02) for n, k in shapes]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256, 512])
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = SMOLLM2
    print(f"SmolLM2-135M linears, {args.threads} threads, int4 groups of {args.group}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| kind | tokens | kernel ms | dequant + fp32 ms | dense fp32 ms | faster |")
    print("|---|---:|---:|---:|---:|---|")
    for kind in ("int8", "int4"):
        layers = build(kind, layer_shapes(m), args.group)
        head = build("int8", [(m["vocab"], m["hidden"])], args.group)[0]  # the LM head is int8 (see gguf docs)
        for t in args.tokens:
            ms = {mode: 1e3 * model_time(layers, head, m["layers"], t, mode, args.repeats)
                  for mode in ("kernel", "dequant", "dense")}
            best = "kernel" if ms["kernel"] <= ms["dequant"] else "dequant"
            print(f"| {kind} | {t} | {ms['kernel']:.1f} | {ms['dequant']:.1f} | {ms['dense']:.1f} | {best} |",
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
