"""The training stages of issue 19 (tool calls and JSON): each stage's data, and the questions the
held-out evaluation must leave out (or that a stage must not train on).

Stages 1 and 2 mix single-question tool conversations (tools/demo_models/tool_data.py) and JSON
answers into the original conversations; stage 3 adds the copying curriculum of
tools/demo_models/copy_data.py and asks several questions per tool prompt. The rest of each mixture
is the original conversations, so the model keeps its answers. Stage 8 is the same kind of mixture
for a model trained from scratch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import copy_data
import data
import tool_data


@dataclass(frozen=True)
class Stage:
    """One fine-tuning stage's data: its seed and mixture (shares of conversations)."""

    seed: int
    tool_share: float
    json_share: float
    n_train: int = 20000
    copy_share: float = 0.0  # copy_data.repeat_conversation
    copy_len: int = 3  # parts of a phrase to repeat, at most
    sessions: bool = False  # tool conversations are copy_data.tool_session (several questions, invented arguments)
    invented_p: float = 0.6  # in sessions, the share of questions with invented arguments
    invented: tool_data.Pools = copy_data.INVENTED  # where invented arguments come from
    scratch: bool = False  # train a new model on this mixture instead of continuing one
    avoid_eval: bool = False  # draw again any tool question of the held-out evaluation's 100
    digit_groups: bool = False  # for the digit-group tokenizer (tokenizer.py --digit-groups)


# Stage 1 taught the format and the tool choice but copied arguments poorly (5 of 100 held-out
# questions right); stage 2, from stage 1's weights, shows three times as many tool calls. Stage 3,
# from the shipped weights, adds invented arguments and copying exercises: it learned that cities
# are invented names and copied nothing, not even in "repeat after me" (0 of 100). Stage 4, from
# stage 3, is mostly short copying exercises (cheap steps): it copied one-token city names and
# parts of numbers, and wrote no more tool calls; stage 5, from stage 4, the tool sessions again
# with more copying exercises (3 of 100); stage 6, from stage 5, the same mixture on fresh
# conversations (4 of 100); stage 7, from stage 6, the same with invented arguments only (so that
# it leaves the evaluation's questions as they are): 0 of 100, it wrote four-digit numbers like the
# invented ones ("2474 - 244" for 247 - 24). Scores on the evaluation as it stands with all six stages left out
# (docs/demo_models.md). Stage 8 trains new models on the digit-group tokenizer (tokenizer.py
# --digit-groups: every number below 1000 one token, the tool prompt half as long), with tool
# sessions from the start and none of the evaluation's 100 questions; stage 9 continues stage 8.
STAGES = {1: Stage(seed=100, tool_share=0.45, json_share=0.10), 2: Stage(seed=200, tool_share=0.75, json_share=0.10),
          3: Stage(seed=300, tool_share=0.35, json_share=0.05, copy_share=0.15, sessions=True),
          4: Stage(seed=400, tool_share=0.0, json_share=0.0, copy_share=0.7, copy_len=8),
          5: Stage(seed=500, tool_share=0.35, json_share=0.05, copy_share=0.3, copy_len=8, sessions=True),
          6: Stage(seed=600, tool_share=0.35, json_share=0.05, copy_share=0.3, copy_len=8, sessions=True),
          7: Stage(seed=700, tool_share=0.35, json_share=0.05, copy_share=0.3, copy_len=8, sessions=True,
                   invented_p=1.0),
          8: Stage(seed=800, tool_share=0.25, json_share=0.05, n_train=30000, copy_share=0.1, copy_len=4,
                   sessions=True, invented_p=0.5, invented=copy_data.INVENTED_3DIGIT, scratch=True, avoid_eval=True,
                   digit_groups=True),
          9: Stage(seed=900, tool_share=0.25, json_share=0.05, n_train=30000, copy_share=0.1, copy_len=4,
                   sessions=True, invented_p=0.5, invented=copy_data.INVENTED_3DIGIT, avoid_eval=True,
                   digit_groups=True)}
EVAL_QUESTIONS = 100


def finetune_conversations(stage: Stage, n: int, seed: int) -> list[data.Conversation]:
    """`n` conversations of the stage's mixture: tool conversations, JSON answers, copying
    exercises and the original kinds."""
    rng = random.Random(seed)
    avoid = frozenset(t.question for _, t in tool_data.eval_questions(EVAL_QUESTIONS)) if stage.avoid_eval \
        else frozenset()
    out = []
    for _ in range(n):
        r = rng.random()
        if r < stage.tool_share:
            out.append(copy_data.tool_session(rng, stage.invented_p, stage.invented, avoid) if stage.sessions
                       else tool_data.tool_conversation(rng))
        elif r < stage.tool_share + stage.json_share:
            out.append(tool_data.json_conversation(rng))
        elif r < stage.tool_share + stage.json_share + stage.copy_share:
            out.append(copy_data.repeat_conversation(rng, stage.copy_len))
        else:
            out.append(data.conversation(rng))
    return out


def finetune_split(stage: Stage, n_heldout: int) -> tuple[list[data.Conversation], list[data.Conversation]]:
    """Training and held-out conversations of a stage; no held-out one appears verbatim in training."""
    train = finetune_conversations(stage, stage.n_train, stage.seed)
    seen = {json.dumps(c, sort_keys=True) for c in train}
    heldout = [c for c in finetune_conversations(stage, 4 * n_heldout, stage.seed + 1)
               if json.dumps(c, sort_keys=True) not in seen]
    return train, heldout[:n_heldout]


def training_questions(numbers: tuple[int, ...]) -> frozenset[str]:
    """Every user message of these stages (an evaluation of their models leaves these out)."""
    return frozenset(m["content"] for stage in (STAGES[n] for n in numbers)
            for conv in finetune_conversations(stage, stage.n_train, stage.seed)
            for m in conv if m["role"] == "user")
