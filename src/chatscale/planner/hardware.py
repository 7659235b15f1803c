"""Accelerators as the roofline sees them: memory, bandwidths, peak FLOP/s and an hourly price.

Catalog entries are datasheet numbers, each cited where it is defined; "this machine" is measured at
run time by `measure_this_machine`, never written down, because a number we did not measure in the
same run is a number we cannot trust for a benchmark.

Conventions, chosen because they are what a roofline needs:
- FLOP/s are *dense* peaks. NVIDIA datasheets print the 2:4-sparsity figure first (twice the dense
  one); serving does not use structured sparsity, so we store the dense figure.
- Link bandwidths are *per direction*: a ring all-reduce or a pipeline send moves bytes one way per
  link, while datasheets print the sum of both directions.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

# Bytes per element of the number formats the planner knows. int4 is weight-only (no chip here has an
# int4 matmul unit: it computes at the bf16 rate), in groups of 128 with a bf16 scale and zero each.
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5 + 4 / 128}

GB = 1e9
TB = 1e12
TFLOPS = 1e12


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or this machine's CPU) with the numbers a roofline needs."""

    name: str
    memory_bytes: float
    memory_bandwidth: float  # bytes/s, device memory (HBM) read
    bf16_flops: float  # dense FLOP/s
    fp8_flops: float | None = None  # None: no FP8 unit
    int8_flops: float | None = None  # None: no INT8 unit
    fp32_flops: float | None = None  # None: not on the datasheet
    nvlink_bandwidth: float | None = None  # bytes/s per direction, GPU to GPU inside a node
    pcie_bandwidth: float | None = None  # bytes/s per direction, host link
    network_bandwidth: float | None = None  # bytes/s per direction and GPU, between nodes
    gpus_per_node: int = 1
    price_per_hour: float | None = None  # USD per GPU-hour; None: no price known
    # Seconds a small collective (a decode step's all-reduce) takes on the link whatever its bytes;
    # None: not known, counted as 0 (then the communication term is a lower bound for decode steps).
    link_latency: float | None = None

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for matmuls whose weights are stored as `dtype`.

        A chip without a unit for a narrow format (an A100 has no FP8) still serves such weights by
        widening them to BF16 before the matmul (weight-only quantization): it saves memory and
        bandwidth but computes at the BF16 rate, so that is the rate returned.
        """
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        if dtype == "fp32":
            if self.fp32_flops is None:
                raise ValueError(f"{self.name} has no FP32 FLOP/s figure")
            return self.fp32_flops
        narrow = {"fp8": self.fp8_flops, "int8": self.int8_flops}.get(dtype)
        return narrow or self.bf16_flops

    def ridge_point(self, dtype: str = "bf16") -> float:
        """FLOPs per byte at which a kernel stops being bandwidth bound (the ops:bytes ratio)."""
        return self.flops(dtype) / self.memory_bandwidth

    def with_price(self, price_per_hour: float) -> Hardware:
        """The same chip at another hourly price (prices move; datasheets do not)."""
        return replace(self, price_per_hour=price_per_hour)


_A100_COMMON = dict(
    # NVIDIA A100 Tensor Core GPU datasheet (2021), SXM column: BF16 312 TFLOPS, INT8 624 TOPS (dense;
    # 624 / 1248 with sparsity), FP32 19.5 TFLOPS, NVLink 600 GB/s, PCIe Gen4 64 GB/s (both directions).
    bf16_flops=312 * TFLOPS,
    int8_flops=624 * TFLOPS,
    fp32_flops=19.5 * TFLOPS,
    nvlink_bandwidth=300 * GB,
    pcie_bandwidth=32 * GB,
    # DGX A100 user guide: one 200 Gb/s HDR InfiniBand ConnectX-6 per GPU for the compute fabric.
    network_bandwidth=25 * GB,
    gpus_per_node=8,
    # The seed's GPT-4 training estimate prices an A100 at about $1 per hour.
    price_per_hour=1.0,
)

_H100_COMMON = dict(
    # NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM column: FP8 3,958 TFLOPS and BF16 1,979
    # TFLOPS *with sparsity*, so 1,979 / 989.4 dense; INT8 3,958 TOPS sparse, 1,979 dense; FP32 67
    # TFLOPS; NVLink 900 GB/s; PCIe Gen5 128 GB/s (both directions).
    bf16_flops=989.4 * TFLOPS,
    fp8_flops=1979 * TFLOPS,
    int8_flops=1979 * TFLOPS,
    fp32_flops=67 * TFLOPS,
    nvlink_bandwidth=450 * GB,
    pcie_bandwidth=64 * GB,
    # DGX H100 datasheet: eight ConnectX-7 at 400 Gb/s NDR InfiniBand, one per GPU.
    network_bandwidth=50 * GB,
    gpus_per_node=8,
)

CATALOG: dict[str, Hardware] = {
    "a100-40gb": Hardware(
        name="A100 40GB SXM",
        # A100 datasheet: 40 GB HBM2 at 1,555 GB/s.
        memory_bytes=40 * GB,
        memory_bandwidth=1555 * GB,
        **_A100_COMMON,
    ),
    "a100-80gb": Hardware(
        name="A100 80GB SXM",
        # A100 datasheet: 80 GB HBM2e at 2,039 GB/s.
        memory_bytes=80 * GB,
        memory_bandwidth=2039 * GB,
        **_A100_COMMON,
    ),
    "h100": Hardware(
        name="H100 SXM",
        # H100 datasheet: 80 GB HBM3 at 3.35 TB/s.
        memory_bytes=80 * GB,
        memory_bandwidth=3.35 * TB,
        # The seed's figure: 8,192 H100s "at $2 per H100-hour".
        price_per_hour=2.0,
        **_H100_COMMON,
    ),
    "h200": Hardware(
        name="H200 SXM",
        # NVIDIA H200 Tensor Core GPU datasheet (2024): 141 GB HBM3e at 4.8 TB/s; compute, NVLink and
        # PCIe as H100 SXM.
        memory_bytes=141 * GB,
        memory_bandwidth=4.8 * TB,
        # Not a datasheet figure: a rough 2024-25 rental price; override with --price.
        price_per_hour=3.0,
        **_H100_COMMON,
    ),
    "b200": Hardware(
        name="B200",
        # NVIDIA DGX B200 datasheet (2024), per GPU (eight per system): 1,440 GB HBM3e total = 180 GB,
        # 64 TB/s total = 8 TB/s; FP8 72 PFLOPS and FP16/BF16 36 PFLOPS *with sparsity* per system,
        # so 4.5 / 2.25 PFLOPS dense per GPU; INT8 as FP8. Fifth-generation NVLink 1.8 TB/s per GPU
        # (both directions); PCIe Gen5 and 400 Gb/s ConnectX-7 per GPU as DGX H100. No FP32 figure.
        memory_bytes=180 * GB,
        memory_bandwidth=8 * TB,
        bf16_flops=2250 * TFLOPS,
        fp8_flops=4500 * TFLOPS,
        int8_flops=4500 * TFLOPS,
        nvlink_bandwidth=900 * GB,
        pcie_bandwidth=64 * GB,
        network_bandwidth=50 * GB,
        gpus_per_node=8,
        # Not a datasheet figure: a rough 2025 rental price; override with --price.
        price_per_hour=5.0,
    ),
}

ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "this": "this-machine"}


def get_hardware(name: str) -> Hardware:
    """A catalog entry by name, or this machine measured now (`this-machine`, `this`)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "this-machine":
        return measure_this_machine()
    if key not in CATALOG:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join([*CATALOG, 'this-machine'])}")
    return CATALOG[key]


def best_seconds(fn: Callable[[], object], budget: float, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of repeated runs of `fn` within `budget` seconds (at least three runs).

    The best run is the one least disturbed by other processes sharing the machine, so it is the
    closest to what the hardware can do.
    """
    fn()  # warm up: first-touch page faults, kernel selection
    sync()
    best = float("inf")
    deadline = time.perf_counter() + budget
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
        runs += 1
    return best


def _host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cpu_name() -> str:
    """The CPU's marketing name where Linux tells it, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_this_machine(seconds: float = 1.5, device: str | None = None) -> Hardware:
    """Measure this machine's roofline now: memory read bandwidth and BF16 / FP32 matmul FLOP/s.

    The first CUDA device is measured when there is one (or `device` names it), else the CPU. Memory
    bandwidth is read from summing a tensor far larger than any cache; FLOP/s from square matmuls,
    best of several runs. `seconds` is split across the three measurements. FP8 and INT8 are not
    measured (None), links are absent (one device), and there is no price.
    """
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    matmul_n = 8192 if on_gpu else 2048
    # Far beyond any cache, and long enough per call that waking the CPU's worker threads on a busy
    # shared machine does not dominate: 1 GiB on a GPU, 256 MiB on a CPU.
    stream_elems = (1 << 30 if on_gpu else 1 << 28) // 4

    with torch.inference_mode():
        big = torch.ones(stream_elems, dtype=torch.float32, device=dev)
        read_s = best_seconds(lambda: big.sum(), seconds * 0.3, sync)
        bandwidth = big.numel() * big.element_size() / read_s
        del big

        def matmul_flops(dtype: torch.dtype, budget: float) -> float:
            a = torch.randn(matmul_n, matmul_n, device=dev).to(dtype)
            b = torch.randn(matmul_n, matmul_n, device=dev).to(dtype)
            return 2 * matmul_n**3 / best_seconds(lambda: a @ b, budget, sync)

        bf16 = matmul_flops(torch.bfloat16, seconds * 0.4)
        fp32 = matmul_flops(torch.float32, seconds * 0.3)

    if on_gpu:
        props = torch.cuda.get_device_properties(dev)
        name, memory = f"this machine ({props.name})", float(props.total_memory)
    else:
        name = f"this machine ({_cpu_name()}, {torch.get_num_threads()} threads)"
        memory = _host_memory_bytes()
    return Hardware(
        name=name,
        memory_bytes=memory,
        memory_bandwidth=bandwidth,
        bf16_flops=bf16,
        fp32_flops=fp32,
    )
