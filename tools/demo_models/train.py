"""Train one demo model from scratch on the generated conversations, and ship it in the package.

Plain PyTorch around transformers' model classes (nothing from the chatscale engine), CPU, bf16
autocast, a fixed seed and a fixed number of steps so a rerun gives the same model. The loss is taken
on assistant tokens only (answers and their <|im_end|>): the demo must learn to answer, not to ask.
Writes config.json, model.safetensors (bf16), generation_config.json and a model card into
src/chatscale/models/demo/NAME/ (the tokenizer files are already there, from tokenizer.py), and the
loss curve to docs/img/demo_NAME_loss.png.

    .venv/bin/python tools/demo_models/tokenizer.py             # once, before the first model
    .venv/bin/python tools/demo_models/train.py --model target  # then draft, moe
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import data
import stages
from tokenizer import CHAT_TEMPLATE, DEMO_DIR, ENDOFTEXT, IM_END, IM_START, ROOT

IGNORE = -100


@dataclass(frozen=True)
class Recipe:
    """Shape and schedule of one demo model."""

    arch: str  # "llama" or "mixtral"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    steps: int
    batch_tokens: int  # padded tokens per optimizer step
    lr: float
    experts: int = 0
    top_k: int = 0
    finetune: dict[int, tuple[int, float]] = field(default_factory=dict)  # issue 19: stage: (steps, peak LR)


RECIPES = {
    # Several times the draft's cost per token (speculative decoding needs that) yet shallow enough to
    # learn in a few hundred steps on a shared 2-core machine: 12x384 was still at held-out 4.4 after
    # 100 steps. Twice the draft's width wants about half its learning rate: at 3e-3 this shape
    # stalled at 0.18 and mixed up topics.
    "target": Recipe("llama", 512, 4, 8, 2, 1536, steps=500, batch_tokens=2048, lr=1.5e-3,
                     finetune={1: (250, 5e-4), 2: (200, 1e-3), 3: (400, 8e-4), 4: (300, 1.5e-3),
                               5: (400, 1e-3), 6: (300, 1e-3), 7: (250, 1e-3), 8: (1000, 1.5e-3), 9: (300, 5e-4)}),
    # Two layers: many times cheaper per token than the target, trained on the same batches so it agrees.
    "draft": Recipe("llama", 256, 2, 4, 2, 768, steps=600, batch_tokens=2048, lr=3e-3,
                    finetune={1: (300, 1e-3), 3: (400, 1e-3), 8: (1000, 3e-3)}),
    "moe": Recipe("mixtral", 256, 4, 4, 2, 320, steps=400, batch_tokens=2048, lr=2.5e-3, experts=8, top_k=2),
}
N_TRAIN, N_HELDOUT, DATA_SEED = 30000, 300, 0
MAX_LEN = 1024  # a tool prompt with four tools is about 700 tokens of the demo tokenizer
FINETUNE_HELDOUT = 60  # tool prompts are long: a smaller held-out set
EVALS = 6  # held-out evaluations per run, evenly spaced


def model_config(r: Recipe, vocab_size: int, ids: dict[str, int]) -> LlamaConfig | MixtralConfig:
    common = dict(
        vocab_size=vocab_size, hidden_size=r.hidden, num_hidden_layers=r.layers,
        num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, intermediate_size=r.intermediate,
        head_dim=r.hidden // r.heads, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT],
    )
    if r.arch == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    return MixtralConfig(**common, num_local_experts=r.experts, num_experts_per_tok=r.top_k,
                         router_aux_loss_coef=0.02, sliding_window=None)


def zero_residual_writes(model: torch.nn.Module) -> None:
    """Zero the projections that write into the residual stream (attention out, MLP and expert down).

    Every layer then starts as the identity and the token embeddings reach the head undisturbed, as in
    modded-nanogpt. (It did not shorten the plateau of a 12-layer target; see docs/demo_models.md.)
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.zero_()


def encode(tok: Tokenizer, convs: list[data.Conversation]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per conversation, labels = ids on assistant answers and IGNORE elsewhere.

    Each message is encoded piece by piece so the mask is exact; the pieces are checked to join into
    exactly the ids of the whole rendered chat template, so training matches inference.
    """
    pieces: list[list[tuple[str, bool]]] = []
    for conv in convs:
        pieces.append([])
        for m in conv:
            answer = m["role"] == "assistant"
            pieces[-1] += [(f"{IM_START}{m['role']}\n", False), (m["content"], answer), (IM_END, answer), ("\n", False)]
    encs = iter(tok.encode_batch([p for conv in pieces for p, _ in conv], add_special_tokens=False))
    out = []
    for conv in pieces:
        ids, labels = [], []
        for _, train in conv:
            enc = next(encs).ids
            ids += enc
            labels += enc if train else [IGNORE] * len(enc)
        out.append((ids[:MAX_LEN], labels[:MAX_LEN]))
    whole = tok.encode_batch([render(c) for c in convs], add_special_tokens=False)
    assert all(w.ids[:MAX_LEN] == ids for w, (ids, _) in zip(whole, out)), "piecewise encoding differs"
    return out


_TEMPLATE = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def render(conv: data.Conversation) -> str:
    """The conversation as the shipped chat template writes it."""
    return _TEMPLATE.render(messages=conv, add_generation_prompt=False)


def batches(examples: list[tuple[list[int], list[int]]], batch_tokens: int, rng: random.Random):
    """Endless batches of similar-length conversations, right-padded (causal attention then needs no
    mask: padding only follows real tokens). Each pass over the data is a new shuffle."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        groups = []
        for start in range(0, len(order), 2000):  # sort within windows: little padding, still random
            window = sorted(order[start:start + 2000], key=lambda i: len(examples[i][0]))
            group: list[int] = []
            for i in window:
                longest = max([len(examples[j][0]) for j in group] + [len(examples[i][0])])
                if group and longest * (len(group) + 1) > batch_tokens:
                    groups.append(group)
                    group = []
                group.append(i)
            groups.append(group)
        rng.shuffle(groups)
        for group in groups:
            yield collate([examples[i] for i in group])


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    return ids, labels


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token loss on answer tokens, the same plus the MoE load-balancing loss if any)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, output_router_logits=isinstance(model, MixtralForCausalLM))
    logits = out.logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    aux = getattr(out, "aux_loss", None)
    return loss, loss if aux is None else loss + model.config.router_aux_loss_coef * aux


@torch.no_grad()
def evaluate(model: torch.nn.Module, heldout: list[tuple[list[int], list[int]]]) -> float:
    """Mean loss per answer token over the held-out conversations."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(heldout), 32):
        ids, labels = collate(heldout[start:start + 32])
        n = int((labels[:, 1:] != IGNORE).sum())
        total += lm_loss(model, ids, labels)[0].item() * n
        count += n
    model.train()
    return total / count


def lr_at(step: int, r: Recipe) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, r.steps // 20)
    if step < warm:
        return r.lr * (step + 1) / warm
    progress = (step - warm) / max(1, r.steps - warm)
    return r.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def plot(name: str, log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, train = zip(*log["train"])
    ax.plot(steps, train, lw=0.6, alpha=0.4, label="train (per step)")
    smooth, acc = [], train[0]
    for v in train:
        acc = 0.95 * acc + 0.05 * v
        smooth.append(acc)
    ax.plot(steps, smooth, lw=1.5, label="train (EMA)")
    ax.plot(*zip(*log["heldout"]), "o-", ms=3, label="held-out")
    ax.set(xlabel="step", ylabel="loss per answer token (nats)", yscale="log",
           title=f"demo {name}: {log['params'] / 1e6:.1f}M params, final held-out {log['heldout'][-1][1]:.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def model_card(name: str, r: Recipe, cfg, log: dict, command: str, n_heldout: int, tokenizer_command: str) -> str:
    arch = "MixtralForCausalLM" if r.arch == "mixtral" else "LlamaForCausalLM"
    moe = f", {r.experts} experts, top-{r.top_k} routing" if r.experts else ""
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
---
# chatscale demo {name}

A tiny chat model trained from scratch for chatscale's out-of-the-box demo and its tests.
**Intended use: demos and tests only.** It knows a narrow domain and nothing else.

- Architecture: {arch}, hidden {r.hidden}, {r.layers} layers, {r.heads} query heads, {r.kv_heads} key/value
  heads (GQA), MLP {r.intermediate}{moe}, tied embeddings, RoPE, max {cfg.max_position_embeddings} positions.
- Parameters: {log['params']:,} ({log['params'] / 1e6:.2f}M), stored in bf16.
- Tokenizer: byte-level BPE, {cfg.vocab_size} tokens, shared by all chatscale demo models; ChatML chat
  template; stops at `<|im_end|>` (or `<|endoftext|>`).
- Data: synthetic conversations generated by `tools/demo_models/data.py` (seed {DATA_SEED}): chatscale
  concepts (KV cache, batching, speculative decoding, MoE, metrics, ...), how to run chatscale, simple
  facts, small arithmetic, unit conversions, greetings, polite refusals. No downloaded data.
- Training: {r.steps} steps of about {r.batch_tokens} padded tokens, AdamW, peak LR {r.lr}, bf16
  autocast on CPU, loss on answer tokens only; {log['wall_s'] / 60:.1f} min on 2 CPU cores.
- Final held-out loss: {log['heldout'][-1][1]:.4f} nats per answer token ({n_heldout} held-out conversations
  from the same generator, none of them verbatim in training).
- Reproduce: `{command}` (after `{tokenizer_command}`).

Limitations: it answers fluently only inside its training domain, and can be wrong (arithmetic
especially, and anything outside it). Do not use it for anything but demos and tests.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(RECIPES), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the recipe (smoke tests)")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    ap.add_argument("--stage", "--finetune", dest="finetune", type=int, default=0, metavar="STAGE",
                    help="train on a tool-call and JSON mixture (tools/demo_models/stages.py): stages 1-7 continue "
                         "from the weights in --out, stage 8 trains a new model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a shared 2-core machine 2 threads ran 2-5x slower")
    ap.add_argument("--out", type=Path, default=None, help=f"default {DEMO_DIR}/MODEL")
    ap.add_argument("--plot", type=Path, default=None, help="default docs/img/demo_MODEL_loss.png")
    args = ap.parse_args()
    r = RECIPES[args.model]
    if args.finetune:
        if args.finetune not in r.finetune:
            raise SystemExit(f"no fine-tuning stage {args.finetune} for {args.model}")
        steps, lr = r.finetune[args.finetune]
        r = Recipe(**{**r.__dict__, "steps": steps, "lr": lr, "batch_tokens": 4096})
        stage = stages.STAGES[args.finetune]
    overrides = {"steps": args.steps, "lr": args.lr}
    r = Recipe(**{**r.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    out = args.out or DEMO_DIR / args.model
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in (ENDOFTEXT, IM_START, IM_END)}
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    if args.finetune:
        train_convs, heldout_convs = stages.finetune_split(stage, FINETUNE_HELDOUT)
    else:
        train_convs, heldout_convs = data.split(N_TRAIN, N_HELDOUT, DATA_SEED)
    train, heldout = encode(tok, train_convs), encode(tok, heldout_convs)
    cfg = model_config(r, tok.get_vocab_size(), ids)
    model_class = LlamaForCausalLM if r.arch == "llama" else MixtralForCausalLM
    if args.finetune and not stage.scratch:
        model = model_class.from_pretrained(out, torch_dtype=torch.float32)
    else:
        model = model_class(cfg)
        zero_residual_writes(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.2f}M params, {len(train)} train / {len(heldout)} held-out", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=r.lr, betas=(0.9, 0.95))
    log = {"params": params, "train": [], "heldout": []}
    stream = batches(train, r.batch_tokens, random.Random(args.seed))
    t0 = time.time()
    for step in range(r.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r)
        ids_b, labels_b = next(stream)
        loss, total = lm_loss(model, ids_b, labels_b)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log["train"].append((step, loss.item()))
        if step % max(1, r.steps // (EVALS - 1)) == 0 or step == r.steps - 1:
            log["heldout"].append((step, evaluate(model, heldout)))
            print(f"step {step} loss {loss.item():.4f} held-out {log['heldout'][-1][1]:.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    log["wall_s"] = time.time() - t0

    model.to(torch.bfloat16).save_pretrained(out)
    gen = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, bos_token_id=None,
                           do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=256)
    gen.save_pretrained(out)
    command = f".venv/bin/python tools/demo_models/train.py --model {args.model}"
    command += "".join(f" --{k} {v}" for k, v in overrides.items() if v is not None)
    command += f" --stage {args.finetune}" if args.finetune else ""
    if not args.finetune or stage.scratch:
        tokenizer_command = ".venv/bin/python tools/demo_models/tokenizer.py"
        tokenizer_command += " --digit-groups --out DIR" if args.finetune and stage.digit_groups else ""
        (out / "README.md").write_text(model_card(args.model, r, cfg, log, command, len(heldout), tokenizer_command))
    if args.finetune:
        how = "trained from scratch" if stage.scratch else "fine-tuned"
        finetune = (f"- Issue 19, stage {args.finetune} ({how}): {r.steps} steps of about {r.batch_tokens} "
                    f"padded tokens at peak LR {r.lr} on `tools/demo_models/stages.py` (seed {stage.seed}, "
                    f"{stage.tool_share:.0%} tool {'sessions' if stage.sessions else 'calls'} in the server's "
                    f"default Hermes-style format, {stage.json_share:.0%} JSON answers, {stage.copy_share:.0%} "
                    f"copying exercises, the rest the original conversations); "
                    f"{log['wall_s'] / 60:.1f} min; held-out loss on that mixture {log['heldout'][-1][1]:.4f}. "
                    f"Reproduce: `{command}`.")
        finetune = textwrap.fill(finetune, 110, subsequent_indent="  ", break_on_hyphens=False) + "\n"
        head, tail = (out / "README.md").read_text().split("\nLimitations:", 1)
        head = head.split(f"- Issue 19, stage {args.finetune}")[0].rstrip("\n")  # a rerun replaces it
        (out / "README.md").write_text(f"{head}\n{finetune}\nLimitations:{tail}")
    suffix = f"_finetune{args.finetune}" if args.finetune else ""
    plot(args.model + suffix.replace("_", " "), log,
         args.plot or ROOT / "docs" / "img" / f"demo_{args.model}{suffix}_loss.png")
    Path(f"/tmp/demo_{args.model}{suffix}_log.json").write_text(json.dumps(log))
    print(f"done: {out} in {log['wall_s'] / 60:.1f} min, held-out {log['heldout'][-1][1]:.4f}")


if __name__ == "__main__":
    sys.exit(main())
