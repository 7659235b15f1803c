"""Conversations that can only be learned by copying from the context (issue 19, stage 3).

Stages 1 and 2 taught the demo target the tool-call format and which tool a question wants, but it
wrote arguments it had memorised ("Mumbai" for Hanoi): the original corpus never asks it to copy
anything, and a few dozen cities or small numbers can be memorised. Here the arguments come from
pools far too large for that (`INVENTED`: syllable-made city and country names, numbers up to four
digits, made-up server names), so copying them out of the question is the only way to lower the
loss. Two kinds:

- `repeat_conversation`: short "repeat after me" / "remember this" exchanges, cheap steps on which
  the copying (induction) heads can form before they are needed in long tool prompts;
- `tool_session`: one tool prompt, then several questions with their calls (and often the results
  and an answer), so the 430-970 tokens of tool prompt are paid once for several supervised calls.
"""

from __future__ import annotations

import dataclasses
import json
import random

import data
import tool_data
from chatscale.server.tools.prompt import with_default_tools

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "sh",
          "ch", "h", "j", "w"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "k"]
SERVER_PREFIXES = ["eu", "us-east", "us-west", "ap", "replica", "gpu", "node", "edge", "pool", "shard"]


def invented_word(rng: random.Random) -> str:
    """A pronounceable non-word of two or three syllables, e.g. "tavemor" (lower case)."""
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(2, 3)))


def invented_name(rng: random.Random) -> str:
    return invented_word(rng).capitalize()


def _country(rng: random.Random) -> str:
    return ("the " if rng.random() < 0.1 else "") + invented_name(rng)


def _server(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return invented_word(rng)
    return f"{rng.choice(SERVER_PREFIXES)}-{rng.randint(1, 99)}"


INVENTED = tool_data.Pools(
    city=invented_name, country=_country,
    capital=lambda country: invented_name(random.Random(country)),  # the same capital every time
    server=_server, doc_query=lambda rng: f"{invented_word(rng)} {rng.choice(['settings', 'errors', 'limits'])}",
    calc_a=(2, 9999), calc_b=(2, 999), count=(1, 500), minutes=(1, 240))

# Stage 8's invented arguments: numbers of at most three digits, one token each of the stage-8
# tokenizer, as in the evaluation; the four-digit ones of INVENTED taught stage 7 to write four digits.
INVENTED_3DIGIT = dataclasses.replace(INVENTED, calc_a=(2, 999))

# How often each tool is asked in a session: the arithmetic and two-call questions are the evaluation's
# hardest (half of its questions are calculator ones, a third ask two things).
WEIGHTS = {"calculator": 3.0, "convert_units": 2.0, "get_weather": 2.0, "get_capital": 2.0, "get_time": 1.5,
           "get_server_metric": 1.0, "search_docs": 1.0, "set_timer": 1.0}
PAIR_P = 0.35
MAX_QUESTIONS = 5
REPEAT_ASKS = [("Repeat after me: {p}", "{p}"), ("Say exactly this: {p}", "{p}"), ("Copy this text: {p}", "{p}"),
               ('Please repeat "{p}".', "{p}"), ("The code is {p}. What is the code?", "The code is {p}."),
               ("Remember this: {p}. What did I ask you to remember?", "You asked me to remember {p}."),
               ("My name is {p}. What is my name?", "Your name is {p}.")]


def _phrase(rng: random.Random, most: int) -> str:
    parts = [rng.choice([invented_name, invented_word, lambda r: str(r.randint(0, 99999)),
                         lambda r: r.choice(tool_data.CITIES), _server])(rng) for _ in range(rng.randint(1, most))]
    return " ".join(parts)


def repeat_conversation(rng: random.Random, most: int = 3) -> data.Conversation:
    """Repeat a phrase of one to `most` invented names, numbers and server names."""
    ask, answer = rng.choice(REPEAT_ASKS)
    p = _phrase(rng, most)
    return [{"role": "user", "content": ask.format(p=p)}, {"role": "assistant", "content": answer.format(p=p)}]


def tool_session(rng: random.Random, invented_p: float = 0.6, invented: tool_data.Pools = INVENTED,
                 avoid: frozenset[str] = frozenset()) -> data.Conversation:
    """Two to four tools offered, then one to MAX_QUESTIONS questions: mostly ones an offered tool
    answers (a call, and in half of them its result and an answer), sometimes a chatscale question
    no tool answers (plain text, as in the other conversations). A share `invented_p` of the
    questions take their arguments from `invented`, the rest from the evaluation's pools (REAL); a
    question in `avoid` (the evaluation's) is drawn again."""
    offered = rng.sample(list(tool_data.TOOLS), rng.randint(2, 4))
    msgs = [{"role": "system", "content": rng.choice(data.SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, MAX_QUESTIONS)):
        if rng.random() < 0.15:
            q, a = data._docs_conversation(rng)[0]
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            continue
        name = rng.choices(offered, weights=[WEIGHTS[n] for n in offered])[0]
        made_up = rng.random() < invented_p
        pools = invented if made_up else tool_data.REAL
        turn = tool_data.ask(rng, name, pools, PAIR_P)
        while turn.question in avoid:
            turn = tool_data.ask(rng, name, pools, PAIR_P)
        question = turn.question if made_up else data._vary(turn.question, rng)  # lower case would hide the name
        msgs += [{"role": "user", "content": question}, tool_data.call_message(turn.calls, rng)]
        if rng.random() < 0.5:
            msgs += [{"role": "tool", "content": json.dumps(r)} for r in turn.results]
            msgs.append({"role": "assistant", "content": turn.answer})
    return with_default_tools(msgs, [tool_data.TOOLS[n] for n in offered])
