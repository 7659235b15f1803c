"""The engine process's native memory: bounded caches of matmul kernels, freed heap given back.

On a CPU, a half-precision matmul runs through oneDNN, which compiles kernels for each input shape
and keeps them in two LRU caches of 1,024 entries (oneDNN's own and ideep's, torch's wrapper over
it). A serving engine's token count changes nearly every step (batch size, prefill chunks), so both
fill with kernels for shapes that rarely come back: 0.7 GB of kernel code and 0.5 GB of primitive
descriptors on the demo model after 1,200 mixed steps (memray; docs/benchmarks.md, "Memory over a
soak"). 128 entries keep the kernels of about 25 recent token counts, what a steady decode batch
reuses; a miss costs ~0.4 ms of compiling, and 1,500 mixed steps measured no slower. Values the
user set win.

What the caches evict, glibc keeps: their ~250 KB blocks leave holes that the heap keeps as free
memory (80-360 MB after a few thousand steps). `release_free_heap` hands it back (malloc_trim,
~25 ms), which the engine process does when it goes idle and at most once a minute while busy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MATMUL_KERNEL_CACHE_ENTRIES = 128
CACHE_CAPACITY_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
RELEASE_EVERY_S = 60.0  # while busy


def bound_matmul_kernel_caches(entries: int = MATMUL_KERNEL_CACHE_ENTRIES) -> None:
    """Cap both caches, unless set already. Call before the process's first half-precision CPU
    matmul: each library reads its variable once, when it first builds a kernel."""
    for name in CACHE_CAPACITY_VARIABLES:
        os.environ.setdefault(name, str(entries))


def _malloc_trim():
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


_MALLOC_TRIM = _malloc_trim()


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc; nothing elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
