"""`chatscale plan`: the roofline plan of a model on some GPUs, as a table, JSON or a batch sweep."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from chatscale.planner import catalog, hardware
from chatscale.planner.roofline import Efficiency, Layout, Plan, Throughput, max_batch, plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `plan` on the top-level sub-command parser."""
    p = sub.add_parser("plan", help="roofline capacity and cost plan for a model on some GPUs",
                       description=__doc__)
    p.add_argument("--model", required=True,
                   help=f"one of {', '.join(catalog.CATALOG)}, or a path to a config.json")
    p.add_argument("--hardware", required=True,
                   help=f"one of {', '.join(hardware.CATALOG)}, or this-machine (measured now)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs per replica (default tp x pp, or 1); split as tp = GPUs per node")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence (0: weights only, no KV cache)")
    p.add_argument("--dtype", default="bf16", choices=sorted(hardware.DTYPE_BYTES),
                   help="weight format (matmuls run in it where the chip can)")
    p.add_argument("--kv-dtype", default="bf16", choices=sorted(hardware.DTYPE_BYTES))
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour (overrides catalog)")
    p.add_argument("--utilisation", type=float, default=1.0,
                   help="fraction of paid GPU-hours spent serving at this batch")
    Efficiency.add_cli_args(p)
    p.add_argument("--sweep", choices=["batch"], default=None,
                   help="sweep the batch size from 1 to the most that fits and plot it")
    p.add_argument("--out", type=Path, default=Path("plan-sweep.png"), help="PNG for --sweep")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _layout(args: argparse.Namespace, hw: hardware.Hardware) -> Layout:
    """tp and pp from the flags: given ones win; otherwise fill a node with tp, the rest with pp."""
    tp, pp, gpus = args.tp, args.pp, args.gpus
    if gpus is None:
        gpus = (tp or 1) * (pp or 1)
    if tp is None:
        tp = gpus // pp if pp else min(gpus, hw.gpus_per_node)
    if pp is None:
        pp = gpus // tp
    if tp * pp != gpus:
        raise ValueError(f"--gpus {gpus} is not --tp {tp} x --pp {pp}")
    return Layout(tp=tp, pp=pp, weight_dtype=args.dtype, kv_dtype=args.kv_dtype)


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e12 else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e3:.1f} kB"


def _cost(t: Throughput) -> str:
    return "n/a (no price)" if t.cost_per_1k_tokens is None else f"${t.cost_per_1k_tokens:.5f}"


def _table(p: Plan) -> str:
    lay = p.layout
    speed = [  # the roofline bound, then what the efficiency model expects (the simulator's figures)
        ("step time", lambda t: f"{t.step_s * 1e3:.2f} ms"),
        ("tokens/s per user", lambda t: f"{t.tokens_per_s_per_user:.2f}"),
        ("tokens/s per replica", lambda t: f"{t.tokens_per_s:.0f}"),
        ("tokens/s per GPU", lambda t: f"{t.tokens_per_s_per_gpu:.1f}"),
        ("cost per 1k tokens", _cost),
        ("MFU / MBU", lambda t: f"{t.mfu:.1%} / {t.mbu:.1%}"),
    ]
    rows = [
        ("model", p.model),
        ("hardware", p.hardware),
        ("layout", f"{lay.gpus} GPU{'s' * (lay.gpus > 1)} = tp {lay.tp} x pp {lay.pp}; weights "
                   f"{lay.weight_dtype}, KV {lay.kv_dtype}"),
        ("workload", f"batch {p.batch} x context {p.context}"),
        ("weights per GPU", _fmt_bytes(p.weight_bytes_per_gpu)),
        ("KV cache per token", _fmt_bytes(p.kv_bytes_per_token)),
        ("KV cache per GPU", _fmt_bytes(p.kv_bytes_per_gpu)),
        ("memory per GPU", f"{_fmt_bytes(p.weight_bytes_per_gpu + p.kv_bytes_per_gpu)} of "
                           f"{_fmt_bytes(p.memory_per_gpu)} ({'fits' if p.fits else 'DOES NOT FIT'})"),
        ("max batch at this context", "no limit (no KV cache)" if p.max_batch is None else f"{p.max_batch}"),
        ("decode FLOPs per token", f"{p.decode_flops_per_token / 1e9:.1f} GFLOP"),
        ("arithmetic intensity", f"{p.intensity:.1f} FLOPs/byte (ridge point {p.ridge_point:.0f}): "
                                 f"{p.bound} bound"),
        ("roofline terms", f"compute {p.compute_s * 1e3:.2f} ms, memory {p.memory_s * 1e3:.2f} ms, "
                           f"communication {p.comm_s * 1e3:.2f} ms"),
        ("", f"{'roofline bound':<16}expected at {p.efficiency}"),
        *((name, f"{fmt(p.roofline):<16}{fmt(p.expected)}") for name, fmt in speed),
    ]
    if p.experts_read_per_micro_batch is not None:
        rows.append(("experts read per micro-batch", f"{p.experts_read_per_micro_batch:.2f}, "
                                                     f"{p.tokens_per_expert:.2f} tokens each (mean)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _sweep_batches(most: int) -> list[int]:
    """Powers of two up to `most`, and `most` itself."""
    batches = [1 << i for i in range(most.bit_length()) if 1 << i <= most]
    return batches if batches[-1] == most else [*batches, most]


def _plot(plans: list[Plan], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [p.batch for p in plans]
    panels = [("tokens/s per GPU", "linear", [p.expected.tokens_per_s_per_gpu for p in plans]),
              ("ms per token (per user)", "linear", [p.expected.step_s * 1e3 for p in plans])]
    if plans[0].expected.cost_per_1k_tokens is not None:
        panels.append(("$ per 1k tokens", "log", [p.expected.cost_per_1k_tokens for p in plans]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (label, yscale, values) in zip(axes, panels):
        ax.plot(batches, values, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_yscale(yscale)
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    lay = plans[0].layout
    fig.suptitle(f"{plans[0].model} on {lay.gpus} x {plans[0].hardware} (tp {lay.tp}, pp {lay.pp}), "
                 f"context {plans[0].context}, at {plans[0].efficiency}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Print the plan (or the sweep, plotted to --out); 2 on bad input, with the reason."""
    try:
        model = catalog.get_model(args.model)
        hw = hardware.get_hardware(args.hardware)
        if args.price is not None:
            hw = hw.with_price(args.price)
        layout = _layout(args, hw)
        batches = [args.batch]
        efficiency = Efficiency.from_args(args)
        if args.sweep == "batch":
            most = max_batch(model, hw, layout, args.context)
            if most is None:
                raise ValueError("--sweep batch needs --context above 0 (the KV cache sets the largest batch)")
            if most < 1:
                raise ValueError(f"{model.name} does not fit on {layout.gpus} x {hw.name} at "
                                 f"context {args.context}; nothing to sweep")
            batches = _sweep_batches(most)
        plans = [plan(model, hw, layout, b, args.context, args.utilisation, efficiency=efficiency) for b in batches]
    except ValueError as err:
        print(f"chatscale plan: {err}")
        return 2
    if args.sweep is None:
        print(json.dumps(dataclasses.asdict(plans[0]), indent=2) if args.json else _table(plans[0]))
        return 0
    _plot(plans, args.out)
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in plans], indent=2))
        return 0
    print(f"expected at {plans[0].efficiency} (the roofline bound per GPU in the last column)")
    print(f"{'batch':>6} {'tok/s/GPU':>10} {'ms/token':>9} {'$/1k tok':>10} {'MFU':>6} {'MBU':>6} {'bound':>8} "
          f"{'roofline tok/s/GPU':>19}")
    for p in plans:
        e = p.expected
        cost = "n/a" if e.cost_per_1k_tokens is None else f"{e.cost_per_1k_tokens:.5f}"
        print(f"{p.batch:>6} {e.tokens_per_s_per_gpu:>10.1f} {e.step_s * 1e3:>9.2f} {cost:>10} {e.mfu:>6.1%} "
              f"{e.mbu:>6.1%} {p.bound:>8} {p.roofline.tokens_per_s_per_gpu:>19.1f}")
    print(f"plot: {args.out}")
    return 0
