"""PNG plots of a simulation: latency distributions and per-replica KV usage and batch over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chatscale.sim.results import RequestLog, Timeline


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(logs: dict[str, RequestLog], path: str | Path, title: str = "") -> None:
    """TTFT and TPOT distributions of several runs, one line each."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, log in logs.items():
        for ax, values in zip(axes, (log.ttft, log.tpot)):
            v = np.sort(values[~np.isnan(values)])
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=name)
    for ax, label in zip(axes, ("TTFT (s)", "TPOT (s)")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline(tl: Timeline, path: str | Path, title: str = "", show: int = 6) -> None:
    """KV usage and running batch over time: fleet median and p10-p90 band, plus `show` replicas."""
    plt = _pyplot()
    t = np.array(tl.time) / 60
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    for ax, data, label in zip(axes, (tl.kv_usage, tl.batch, tl.waiting),
                               ("KV-cache usage", "running batch", "queued requests")):
        m = np.array(data, dtype=float)
        if m.size == 0:
            continue
        lo, mid, hi = np.percentile(m, [10, 50, 90], axis=1)
        ax.fill_between(t, lo, hi, alpha=0.25, label="replicas p10-p90")
        ax.plot(t, mid, lw=2, label="median replica")
        for r in np.linspace(0, m.shape[1] - 1, min(show, m.shape[1])).astype(int):
            ax.plot(t, m[:, r], lw=0.6, alpha=0.6)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
