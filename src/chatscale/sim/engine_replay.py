"""Replay a workload on a real LLMEngine in real time (open loop), logging what the twin logs.

Requests are added when the wall clock passes their arrival, between steps, as a server's engine
loop does; TTFT counts from the planned arrival, so waiting for a running step counts too. The
same token ids the twin uses are sent, so prefix-cache hits are the same pages.
"""

from __future__ import annotations

import time

from chatscale.engine.sampling_params import SamplingParams
from chatscale.sim.replay import new_log
from chatscale.sim.results import RequestLog
from chatscale.sim.tokens import prompt_token_ids
from chatscale.sim.workloads import Workload


def replay_on_engine(engine, w: Workload) -> RequestLog:
    log = new_log(w)
    vocab = engine.vocab_size
    prompts = [prompt_token_ids(w, i, vocab) for i in range(len(w))]  # ready before the clock starts
    engine.kv.reset_prefix_cache()
    n, i = len(w), 0
    t0 = time.monotonic()
    while i < n or engine.has_unfinished_requests():
        now = time.monotonic() - t0
        while i < n and w.arrival[i] <= now:
            engine.add_request(prompts[i], SamplingParams(max_tokens=int(w.output[i]), ignore_eos=True),
                               request_id=str(i))
            log.replica[i] = 0
            i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, float(w.arrival[i]) - (time.monotonic() - t0)))
            continue
        outs = engine.step()
        now = time.monotonic() - t0
        for out in outs:
            j = int(out.request_id)
            if log.first_token[j] != log.first_token[j]:  # NaN: no token yet
                log.first_token[j] = now
                log.cached[j] = out.num_cached_tokens
            if out.finished:
                log.finish[j] = now
                log.output[j] = out.num_generated_tokens
    return log
