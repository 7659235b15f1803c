"""Held-out loss of a demo model on the original conversations: does fine-tuning make it forget?

The same 300 held-out conversations and per-answer-token loss as the model card's figure
(tools/demo_models/train.py, data seed 0), for any weights, so a fine-tuned model can be compared
with the one it started from.

    .venv/bin/python tools/demo_models/heldout_loss.py [--model PATH ...]
"""

from __future__ import annotations

import argparse

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

import data
from tokenizer import DEMO_DIR
from train import DATA_SEED, N_HELDOUT, N_TRAIN, encode, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=[str(DEMO_DIR / "target"), str(DEMO_DIR / "draft")])
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, heldout_convs = data.split(N_TRAIN, N_HELDOUT, DATA_SEED)
    for path in args.model:
        heldout = encode(Tokenizer.from_file(f"{path}/tokenizer.json"), heldout_convs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        print(f"{path}: held-out loss {evaluate(model, heldout):.4f}")


if __name__ == "__main__":
    main()
