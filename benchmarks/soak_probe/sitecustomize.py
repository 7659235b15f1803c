"""Imported at start-up by every Python process benchmarks/soak.py starts (it is on their PYTHONPATH).

With CHATSCALE_SOAK_TRACE=DIR set, traces allocations (tracemalloc, 8 frames) and writes a snapshot
to DIR/<role>-<pid>-<k>.snap every CHATSCALE_SOAK_TRACE_S seconds, from a daemon thread, so the
server and its engine process can be compared over a soak without any hook in chatscale itself.
"""

import os

if os.environ.get("CHATSCALE_SOAK_TRACE"):
    import threading
    import time
    import tracemalloc

    def _dump(folder: str, every: float) -> None:
        with open("/proc/self/cmdline", "rb") as f:  # sys.argv is not yet set for `python -m`
            role = "engine" if b"core_process" in f.read() else "server"
        k = 0
        while True:
            time.sleep(every)
            tracemalloc.take_snapshot().dump(os.path.join(folder, f"{role}-{os.getpid()}-{k:03d}.snap"))
            k += 1

    tracemalloc.start(8)
    threading.Thread(target=_dump, args=(os.environ["CHATSCALE_SOAK_TRACE"],
                                         float(os.environ.get("CHATSCALE_SOAK_TRACE_S", "120"))),
                     daemon=True, name="soak-tracemalloc").start()
