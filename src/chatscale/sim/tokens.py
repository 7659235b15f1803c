"""Synthetic token ids that make prefix reuse real for the KV cache.

The simulator has no text, only token counts; but the KVCacheManager finds shared pages by their
token ids. So a token is a function of (prefix key, position): a conversation's turn N+1 repeats
turn N's prompt and answer token for token, a Mooncake request repeats the pages of the hash ids it
shares, and unrelated requests share nothing.
"""

from __future__ import annotations

from chatscale.sim.workloads import Workload

FIRST_TOKEN = 3  # keep clear of the usual special ids (pad, bos, eos)


def token_at(key: int, pos: int, vocab: int) -> int:
    """The token at position `pos` of the stream named `key`."""
    return FIRST_TOKEN + ((key * 1_000_003 + 7_919) ^ (pos * 2_654_435_761)) % (vocab - FIRST_TOKEN)


def token_ids(key: int, start: int, stop: int, vocab: int) -> list[int]:
    """Tokens at positions [start, stop) of the stream named `key`."""
    return [token_at(key, pos, vocab) for pos in range(start, stop)]


def prompt_token_ids(w: Workload, i: int, vocab: int) -> list[int]:
    """Prompt of request `i`: its conversation's stream, or its Mooncake pages then private tokens."""
    n = int(w.prompt[i])
    if w.hash_ids is None:
        return token_ids(int(w.conv[i]), 0, n, vocab)
    out: list[int] = []
    for h in w.hash_ids[i]:
        if len(out) >= n:
            break
        out += token_ids(h, 0, min(w.hash_block, n - len(out)), vocab)
    return out + token_ids(-1 - i, len(out), n, vocab)


def answer_key(w: Workload, i: int) -> int:
    """The stream the answer's tokens come from: the conversation's, so the next turn hits them."""
    return int(w.conv[i]) if w.hash_ids is None else -1 - i
