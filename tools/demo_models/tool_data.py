"""Tool-call and JSON conversations for the demo models (issue 19), in the server's own rendering.

Each tool conversation offers two to four tools from a small pool, in the default Hermes-style tool
prompt the server writes for checkpoints whose template does not render tools
(`chatscale.server.tools.prompt.with_default_tools`), so training text and serving text are the
same. The user asks something: if an offered tool answers it, the assistant calls it (two calls for
"X and Y" questions), often followed by the tool's result and an answer that uses it; if none does,
the assistant answers in plain text, as in the other conversations. JSON conversations ask for the
answer as a JSON object. Arguments and results are computed here, never typed by hand.

`tool_question(rng)` is also the held-out evaluation's source (tools/demo_models/eval_tools.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import data
from chatscale.server.tools.prompt import with_default_tools

Call = tuple[str, dict]


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = {
    "get_weather": _fn("get_weather", "Current weather in a city",
                       {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       ["city"]),
    "convert_units": _fn("convert_units", "Convert a value between units",
                         {"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
                         ["value", "from_unit", "to_unit"]),
    "calculator": _fn("calculator", "Evaluate an arithmetic expression", {"expression": {"type": "string"}},
                      ["expression"]),
    "get_capital": _fn("get_capital", "The capital city of a country", {"country": {"type": "string"}}, ["country"]),
    "get_time": _fn("get_time", "The local time in a city", {"city": {"type": "string"}}, ["city"]),
    "get_server_metric": _fn("get_server_metric", "Read a live metric of a chatscale server",
                             {"server": {"type": "string"},
                              "metric": {"type": "string", "enum": ["kv_cache_usage", "batch_size", "ttft",
                                                                    "requests_waiting"]}},
                             ["server", "metric"]),
    "search_docs": _fn("search_docs", "Search the chatscale documentation", {"query": {"type": "string"}}, ["query"]),
    "set_timer": _fn("set_timer", "Start a timer", {"minutes": {"type": "integer"}}, ["minutes"]),
}

CITIES = ["Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Lisbon", "Oslo", "Cairo", "Lima", "Seoul", "Vienna",
          "Dublin", "Nairobi", "Bangkok", "Hanoi", "Warsaw", "Athens", "Toronto", "Sydney", "Chicago", "Boston",
          "Mumbai", "Zurich", "Prague", "Helsinki", "Santiago", "Denver", "Milan", "Munich", "Osaka"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear"]
SERVERS = ["eu-1", "eu-2", "us-east-1", "us-west-2", "ap-1", "ap-2", "replica-3", "replica-7", "gpu-4", "local"]
METRICS = {  # metric: (how people ask, how the answer names it)
    "kv_cache_usage": (["KV cache usage", "KV cache use", "cache usage"], "KV cache usage"),
    "batch_size": (["batch size", "current batch size"], "batch size"),
    "ttft": (["TTFT", "time to first token"], "time to first token"),
    "requests_waiting": (["number of waiting requests", "queue length", "requests waiting"], "requests waiting"),
}
DOC_QUERIES = ["prefix caching", "speculative decoding", "rate limits", "the gateway", "metrics", "the planner",
               "the simulator", "KV cache", "continuous batching", "chunked prefill", "admission control",
               "tool calling", "structured outputs", "the demo models", "preemption"]
DOC_PAGES = ["docs/metrics.md", "docs/gateway.md", "docs/planning.md", "docs/simulations.md", "docs/benchmarks.md",
             "docs/demo_models.md", "README.md"]


@dataclass(frozen=True)
class Pools:
    """Where a question's arguments come from. `REAL` is the evaluation's (a few dozen cities, small
    numbers: a model can memorise them); copy_data.INVENTED draws from pools far too large to memorise,
    so only copying the argument out of the question lowers the loss. Each field is drawn with the
    same rng calls as the original literals, so `REAL` keeps the evaluation's questions unchanged."""

    city: Callable[[random.Random], str]
    country: Callable[[random.Random], str]  # as asked; its capital comes from `capital`
    capital: Callable[[str], str]
    server: Callable[[random.Random], str]
    doc_query: Callable[[random.Random], str]
    calc_a: tuple[int, int]
    calc_b: tuple[int, int]
    count: tuple[int, int]  # conversion values
    minutes: tuple[int, int]


REAL = Pools(city=lambda rng: rng.choice(CITIES), country=lambda rng: rng.choice(list(data.CAPITALS)),
             capital=data.CAPITALS.__getitem__, server=lambda rng: rng.choice(SERVERS),
             doc_query=lambda rng: rng.choice(DOC_QUERIES), calc_a=(2, 999), calc_b=(2, 99), count=(1, 30),
             minutes=(1, 90))


@dataclass
class ToolTurn:
    """A question that one offered tool answers: the calls, their results and the final answer."""

    question: str
    calls: list[Call]
    results: list[dict]
    answer: str


def _weather(rng: random.Random, pools: Pools = REAL) -> ToolTurn:
    city = pools.city(rng)
    unit = "fahrenheit" if rng.random() < 0.25 else None
    temp = rng.randint(-5, 35) if unit is None else rng.randint(25, 95)
    sky = rng.choice(SKIES)
    if unit:
        q = rng.choice([f"What's the weather in {city} in Fahrenheit?", f"How warm is it in {city}, in fahrenheit?",
                        f"Tell me the temperature in {city} in degrees Fahrenheit."])
    else:
        q = rng.choice([f"What's the weather in {city}?", f"What is the weather like in {city}?",
                        f"Is it raining in {city}?", f"How warm is it in {city} right now?",
                        f"Weather in {city}?", f"Should I take an umbrella in {city} today?"])
    args = {"city": city} | ({"unit": unit} if unit else {})
    shown = "Fahrenheit" if unit else "Celsius"
    result = {"city": city, "temperature": temp, "unit": unit or "celsius", "sky": sky}
    return ToolTurn(q, [("get_weather", args)], [result], f"It is {temp} degrees {shown} and {sky} in {city}.")


def _conversion(rng: random.Random, pools: Pools = REAL) -> ToolTurn:
    src, dst, k, one = rng.choice(data.CONVERSIONS)
    n = rng.randint(*pools.count)
    unit = one if n == 1 else src
    q = rng.choice([f"Convert {n} {unit} to {dst}.", f"How many {dst} are in {n} {unit}?",
                    f"What is {n} {unit} in {dst}?"])
    return ToolTurn(q, [("convert_units", {"value": n, "from_unit": src, "to_unit": dst})],
                    [{"value": n * k, "unit": dst}], f"{n} {unit} is {n * k} {dst}.")


def _calculation(rng: random.Random, pools: Pools = REAL) -> ToolTurn:
    a, b = rng.randint(*pools.calc_a), rng.randint(*pools.calc_b)
    sym, word, value = rng.choice([("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b)])
    expr = f"{a} {sym} {b}"
    q = rng.choice([f"What is {expr}?", f"Calculate {expr}.", f"What's {a} {word} {b}?", f"Compute {expr} for me."])
    return ToolTurn(q, [("calculator", {"expression": expr})], [{"result": value}], f"{expr} = {value}.")


def _capital(rng: random.Random, pools: Pools = REAL) -> ToolTurn:
    country = pools.country(rng)
    q = rng.choice(data.CAPITAL_QUESTIONS).format(c=country)
    capital = pools.capital(country)
    name = country[0].upper() + country[1:]
    return ToolTurn(q, [("get_capital", {"country": name})], [{"capital": capital}],
                    f"The capital of {country} is {capital}.")


def _time(rng: random.Random, pools: Pools = REAL) -> ToolTurn:
    city = pools.city(rng)
    t = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    q = rng.choice([f"What time is it in {city}?", f"What's the local time in {city}?", f"Time in {city}?"])
    return ToolTurn(q, [("get_time", {"city": city})], [{"city": city, "time": t}], f"It is {t} in {city}.")


def _metric(rng: random.Random, pools: Pools = REAL) -> ToolTurn:
    server = pools.server(rng)
    metric = rng.choice(list(METRICS))
    asked, named = METRICS[metric]
    value = {"kv_cache_usage": round(rng.random(), 2), "batch_size": rng.randint(1, 256),
             "ttft": round(rng.uniform(0.05, 3), 2), "requests_waiting": rng.randint(0, 40)}[metric]
    phrase = rng.choice(asked)
    q = rng.choice([f"What is the {phrase} on {server}?", f"Check the {phrase} of server {server}.",
                    f"How is {server} doing? Show me its {phrase}."])
    unit = " seconds" if metric == "ttft" else ""
    return ToolTurn(q, [("get_server_metric", {"server": server, "metric": metric})], [{"value": value}],
                    f"The {named} of {server} is {value}{unit}.")


def _docs(rng: random.Random, pools: Pools = REAL) -> ToolTurn:
    query = pools.doc_query(rng)
    page = rng.choice(DOC_PAGES)
    q = rng.choice([f"Search the docs for {query}.", f"Find the documentation about {query}.",
                    f"Where do the docs explain {query}?"])
    return ToolTurn(q, [("search_docs", {"query": query})], [{"page": page}], f"{page} explains {query}.")


def _timer(rng: random.Random, pools: Pools = REAL) -> ToolTurn:
    m = rng.randint(*pools.minutes)
    q = rng.choice([f"Set a timer for {m} minutes.", f"Start a {m} minute timer.", f"Remind me in {m} minutes."])
    return ToolTurn(q, [("set_timer", {"minutes": m})], [{"ok": True}], f"Your timer is set for {m} minutes.")


MAKERS: dict[str, Callable[[random.Random, Pools], ToolTurn]] = {
    "get_weather": _weather, "convert_units": _conversion, "calculator": _calculation, "get_capital": _capital,
    "get_time": _time, "get_server_metric": _metric, "search_docs": _docs, "set_timer": _timer,
}
PAIRED = ("get_weather", "get_time", "get_capital")  # "X and Y" questions make two calls


def _offered(rng: random.Random, needed: list[str]) -> list[dict]:
    names = set(needed)
    names.update(rng.sample([n for n in TOOLS if n not in names], rng.randint(max(0, 2 - len(names)), 3)))
    order = sorted(names)
    rng.shuffle(order)
    return [TOOLS[n] for n in order]


def ask(rng: random.Random, name: str, pools: Pools = REAL, pair_p: float = 0.15) -> ToolTurn:
    """A question tool `name` answers; for PAIRED tools, with probability `pair_p`, two: two calls."""
    turn = MAKERS[name](rng, pools)
    if name in PAIRED and rng.random() < pair_p:
        other = MAKERS[name](rng, pools)
        if other.calls != turn.calls:
            joiner = rng.choice([" And ", " Also, "])
            turn = ToolTurn(turn.question + joiner + other.question[0].lower() + other.question[1:],
                            turn.calls + other.calls, turn.results + other.results, f"{turn.answer} {other.answer}")
    return turn


def tool_question(rng: random.Random, pools: Pools = REAL) -> tuple[list[dict], ToolTurn]:
    """(offered tools, a question one of them answers); sometimes two calls of the same tool."""
    name = rng.choice(list(MAKERS))
    turn = ask(rng, name, pools)
    return _offered(rng, [name]), turn


EVAL_SEED = 7


def eval_questions(n: int, pools: Pools = REAL,
                   leave_out: frozenset[str] = frozenset()) -> list[tuple[list[dict], ToolTurn]]:
    """The held-out evaluation's questions (tools/demo_models/eval_tools.py): the first `n` of seed
    EVAL_SEED not in `leave_out`. Stage 8 trains no tool call on the first 100 (stages.py)."""
    rng, out = random.Random(EVAL_SEED), []
    while len(out) < n:
        tools, turn = tool_question(rng, pools)
        if turn.question not in leave_out:
            out.append((tools, turn))
    return out


def call_message(calls: list[Call], rng: random.Random) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call_{rng.getrandbits(32):08x}", "type": "function",
         "function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls]}


def tool_conversation(rng: random.Random) -> data.Conversation:
    """Tools offered: a call and often its result and the answer; or a question no tool fits."""
    system = [{"role": "system", "content": rng.choice(data.SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    if rng.random() < 0.25:  # nothing offered fits: answer as usual
        q, a = data._docs_conversation(rng)[0] if rng.random() < 0.6 else data._simple_turn(rng)
        fitting = {"calculator", "convert_units", "get_capital"}
        tools = _offered(rng, rng.sample([n for n in TOOLS if n not in fitting], 2))
        msgs = system + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return with_default_tools(msgs, tools)
    tools, turn = tool_question(rng)
    msgs = system + [{"role": "user", "content": data._vary(turn.question, rng)}, call_message(turn.calls, rng)]
    if rng.random() < 0.6:
        msgs += [{"role": "tool", "content": json.dumps(r)} for r in turn.results]
        msgs.append({"role": "assistant", "content": turn.answer})
    return with_default_tools(msgs, tools)


JSON_SYSTEM = ["Reply with a JSON object.", "Answer in JSON.", "Respond only with JSON.",
               "You are a helpful assistant. Reply with a JSON object."]


def json_conversation(rng: random.Random) -> data.Conversation:
    """A question answered as a small JSON object (JSON mode and response_format requests)."""
    r = rng.random()
    if r < 0.35:
        c = rng.choice(list(data.CAPITALS))
        q = rng.choice(data.CAPITAL_QUESTIONS).format(c=c)
        answer = {"country": c[0].upper() + c[1:], "capital": data.CAPITALS[c]}
    elif r < 0.6:
        turn = _weather(rng)
        q, answer = turn.question, {k: v for k, v in turn.results[0].items()}
    elif r < 0.8:
        q, a = data._arithmetic(rng)
        answer = {"answer": a}
    else:
        qs, a = rng.choice(data.FACTS)
        q, answer = rng.choice(qs), {"answer": a}
    sys_or_user = rng.random() < 0.5
    msgs = [{"role": "system", "content": rng.choice(JSON_SYSTEM)}] if sys_or_user else []
    ask = "" if sys_or_user else " " + rng.choice(["Answer in JSON.", "Reply in JSON."])
    msgs.append({"role": "user", "content": q + ask})
    msgs.append({"role": "assistant", "content": json.dumps(answer)})
    return msgs
