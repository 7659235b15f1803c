"""Train the demo models' byte-level BPE tokenizer and write it into each demo model folder.

Byte-level, so any Unicode text encodes (the token tools split arbitrary documents with it); digits
are split one by one so the models can learn arithmetic digit by digit; ChatML special tokens and
template so the chat format is the one most open checkpoints use. The three demo models share this
tokenizer, which speculative decoding requires of a draft and its target.

`--digit-groups` writes issue 19's stage-8 tokenizer instead (not shipped): digits in groups of up
to three, as Llama 3 splits them, every number below 1000 one token, so a model copies a number out
of a question into a tool's arguments in one step (split digit by digit, "933 - 31" came out as
"933 - 313"); and a vocabulary learned on tool calls in the server's tool prompt too, which halves
that prompt (430-970 tokens -> 200-270).

    .venv/bin/python tools/demo_models/tokenizer.py [--digit-groups --out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import data
import tool_data

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "src" / "chatscale" / "models" / "demo"
MODEL_NAMES = ("target", "draft", "moe")

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
VOCAB_SIZE = 4096
# ChatML on one line: whitespace control is then identical under HF's and chatscale's Jinja settings.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def corpus(n: int, seed: int, digit_groups: bool = False) -> list[str]:
    """Message texts of the training conversations (roles too, as the template writes them); with
    digit groups also tool conversations with the evaluation's arguments (never invented names:
    each would become a token) and every number below 1000."""
    convs = data.conversations(n, seed)
    if digit_groups:
        rng = random.Random(seed)
        convs += [tool_data.tool_conversation(rng) for _ in range(n // 10)]
    texts = [m["role"] + "\n" + m["content"] for conv in convs for m in conv]
    return texts + [" ".join(str(i) for i in range(1000))] * 3 if digit_groups else texts


def train_tokenizer(n_conversations: int = 20000, seed: int = 0, digit_groups: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    digits = pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated") if digit_groups \
        else pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(n_conversations, seed, digit_groups), trainer=trainer)
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json as both transformers' AutoTokenizer and chatscale's Tokenizer read it."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "bos_token": None,
        "add_bos_token": False,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEMO_DIR, help="writes OUT/{target,draft,moe}/")
    ap.add_argument("--digit-groups", action="store_true", help="issue 19's stage-8 tokenizer (not shipped)")
    args = ap.parse_args()
    tok = train_tokenizer(seed=args.seed, digit_groups=args.digit_groups)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    for name in MODEL_NAMES:
        write(tok, args.out / name)
    print(f"vocab {tok.get_vocab_size()} -> {', '.join(str(args.out / n) for n in MODEL_NAMES)}")


if __name__ == "__main__":
    main()
