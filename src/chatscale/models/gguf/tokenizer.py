"""A GGUF file's vocabulary -> a `tokenizers` tokenizer and the special tokens our Tokenizer reads.

GGUF keeps no tokenizer.json, only llama.cpp's description: the model kind (`gpt2`: byte-level BPE
with merges; `llama`: SentencePiece BPE with scores, byte fallback and a "▁" word prefix), the
pre-tokenizer's name, the tokens with their types (3: control, 4: user-defined, 6: byte) and the
special ids. The result encodes exactly as transformers' GGUF tokenizer (tests/test_gguf_tokenizer.py).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from chatscale.models.gguf.checkpoint import GGUFCheckpoint, GGUFError

log = logging.getLogger("chatscale.models")

CONTROL, USER_DEFINED = 3, 4

# Split patterns of the byte-level vocabularies whose merges were learned on other pieces than
# GPT-2's (llama.cpp's `tokenizer.ggml.pre` names); any other name splits like GPT-2.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3,
          "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
GPT2_SPLITS = ("default", "gpt-2", "gpt2", "smollm", "starcoder", "refact", "olmo", "mpt")


@cache
def _byte_alphabet() -> frozenset[str]:
    return frozenset(pre_tokenizers.ByteLevel.alphabet())


def _byte_spelling(token: str) -> str:
    """A token as byte-level BPE spells it: its UTF-8 bytes mapped to GPT-2's printable alphabet."""
    if set(token) <= _byte_alphabet():
        return token
    table = _gpt2_bytes()
    return "".join(table[b] for b in token.encode("utf-8"))


@cache
def _gpt2_bytes() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merges, only each token's score: every split of a token into two
    vocabulary pieces is a merge, ranked by the token's score (best first), then by the pieces'
    lengths, ties in vocabulary order."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ids and token[i:] in ids]
        pairs.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        found += [(score, len(left), len(right), left, right) for left, right in pairs]
    found.sort(key=lambda m: m[:3], reverse=True)
    return [(m[3], m[4]) for m in found]


def _field(ckpt: GGUFCheckpoint, key: str) -> Any:
    field = ckpt.reader.fields.get(key)
    return None if field is None else field.contents()


def build_tokenizer(ckpt: GGUFCheckpoint) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer and a tokenizer_config.json-like dict (special tokens, BOS policy, chat template)."""
    kind = ckpt.meta.get("tokenizer.ggml.model")
    tokens: list[str] = _field(ckpt, "tokenizer.ggml.tokens") or []
    types: list[int] = _field(ckpt, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens:
        raise GGUFError(f"{ckpt.path.name}: no vocabulary (tokenizer.ggml.tokens)")
    if kind == "gpt2":
        vocab = {_byte_spelling(t): i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in _field(ckpt, "tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        pre = ckpt.meta.get("tokenizer.ggml.pre", "default")
        if pre in SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            if pre not in GPT2_SPLITS:
                log.warning("%s: pre-tokenizer %r unknown here; splitting text like GPT-2", ckpt.path.name, pre)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        is_token = _byte_alphabet()
    elif kind == "llama":
        merges = _field(ckpt, "tokenizer.ggml.merges")
        if merges:
            merges = [tuple(m.split(" ", 1)) for m in merges]
        else:
            merges = _merges_from_scores(tokens, _field(ckpt, "tokenizer.ggml.scores") or [0.0] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        is_token = None
    else:
        raise GGUFError(f"{ckpt.path.name}: unsupported tokenizer model {kind!r}; supported: gpt2 (byte-level BPE), "
                        "llama (SentencePiece BPE)")
    # Control tokens are special (kept whole, skipped on decode); a byte-level one outside the byte
    # alphabet is a mislabelled piece of text, which transformers leaves out too.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                            if ty == CONTROL and (is_token is None or set(t) <= is_token)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                    if ty == USER_DEFINED and (is_token is None or set(t) <= is_token)])

    def special(key: str) -> str | None:
        index = ckpt.meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    add_bos = ckpt.meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    config = {"bos_token": special("bos_token_id"), "eos_token": special("eos_token_id"),
              "pad_token": special("padding_token_id"), "unk_token": special("unknown_token_id"),
              "add_bos_token": bool(add_bos), "chat_template": ckpt.meta.get("tokenizer.chat_template")}
    return tok, config


def gguf_eos_ids(ckpt: GGUFCheckpoint) -> list[int]:
    """Tokens that end a generation: EOS, and the end-of-turn / end-of-message ids llama.cpp stops on."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    return sorted({ckpt.meta[f"tokenizer.ggml.{k}"] for k in keys if f"tokenizer.ggml.{k}" in ckpt.meta})
