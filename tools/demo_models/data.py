"""Synthetic chat conversations the demo models are trained on, generated here with no download.

Why synthetic: the machines that build and test chatscale reach no model hub and no dataset host, yet
`make serve` must answer coherently out of the box. So the corpus is templated conversations in one
narrow domain the demo can master with a few million parameters: chatscale's own concepts (KV cache,
batching, speculative decoding, ...), how to run it, simple facts, small arithmetic and unit
conversions, greetings, and polite refusals for everything else. Every arithmetic and conversion
answer is computed (and checked) here, never typed by hand.

`conversations(n, seed)` is deterministic for a given seed; run this file to print a few samples.
"""

from __future__ import annotations

import argparse
import json
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

Message = dict[str, str]
Conversation = list[Message]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are the chatscale demo assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are a concise, friendly assistant.",
]


@dataclass(frozen=True)
class Topic:
    """One chatscale concept: ways to ask about it, answers, and answers to common follow-ups."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]
    why: str
    example: str


# Each question names the topic ({t} is the topic's short name); phrasings shared by all topics.
GENERIC_QUESTIONS = [
    "What is {t}?",
    "Can you explain {t}?",
    "Explain {t} to me.",
    "Tell me about {t}.",
    "What does {t} mean?",
    "How does {t} work?",
    "I don't understand {t}. Can you help?",
]

WHY_FOLLOWUPS = [
    "Why does that matter?",
    "Why is that important?",
    "Why should I care?",
    "Why does it matter for serving?",
]
EXAMPLE_FOLLOWUPS = [
    "Can you give an example?",
    "How does chatscale use it?",
    "Give me an example.",
    "How do I see that in chatscale?",
]
SIMPLER_FOLLOWUPS = ["Can you say that more simply?", "In one sentence?", "Explain it like I'm new to this."]


def _topic(names: list[str], questions: list[str], answers: list[str], why: str, example: str) -> tuple[list[str], Topic]:
    generic = [q.format(t=n) for n in names for q in GENERIC_QUESTIONS]
    return names, Topic(tuple(questions + generic), tuple(answers), why, example)


TOPICS: dict[str, Topic] = {}
TOPIC_NAMES: dict[str, list[str]] = {}


def _add(key: str, names: list[str], questions: list[str], answers: list[str], why: str, example: str) -> None:
    TOPIC_NAMES[key], TOPICS[key] = _topic(names, questions, answers, why, example)


_add(
    "kv_cache",
    ["a KV cache", "the KV cache", "KV caching"],
    ["Why do LLMs keep a KV cache?", "What is stored in the KV cache?", "What are keys and values in attention?"],
    [
        "A KV cache stores the attention keys and values of every token a sequence has already seen. "
        "When the model generates the next token it reads them instead of recomputing the whole "
        "prompt, so each decoding step only processes one new token.",
        "The KV cache is memory that holds the keys and values computed by each attention layer for "
        "past tokens. Reusing them makes decoding fast, but it grows with every token, so it lives in "
        "scarce accelerator memory.",
    ],
    "Without a KV cache, every new token would recompute attention over the whole conversation, so "
    "the cost of a reply would grow with the square of its length. With it, decoding stays cheap, but "
    "the cache takes GPU memory that all users share.",
    "chatscale keeps the KV cache in fixed-size blocks managed by its KV cache manager, and it reports "
    "how full the cache is as the metric kv_cache_usage_perc.",
)
_add(
    "memory_bottleneck",
    ["the memory bottleneck", "GPU memory pressure"],
    [
        "Why is GPU memory the bottleneck for serving LLMs?",
        "What limits how many users a GPU can serve?",
        "Is compute or memory the bottleneck in LLM serving?",
    ],
    [
        "GPU memory, not compute, is the bottleneck. Every active conversation keeps its KV cache in "
        "accelerator memory shared by all users, so memory decides how many conversations fit at once.",
        "Memory is the limit. The weights take a fixed share and every running conversation needs room "
        "for its KV cache, so the number of users a GPU can serve is set by how much cache fits.",
    ],
    "When memory runs out, idle conversations are evicted. If they come back, the cache miss means the "
    "whole conversation must be computed again, and that costs more the longer it is.",
    "chatscale shows KV cache usage and cache hits and misses as first class metrics, so you can see "
    "the memory pressure directly on the dashboard.",
)
_add(
    "paged_attention",
    ["paged attention", "KV cache blocks", "paging the KV cache"],
    ["Why split the KV cache into blocks?", "What is a KV block?"],
    [
        "Paged attention stores the KV cache in small fixed-size blocks, like pages of virtual memory. "
        "A sequence gets a list of blocks as it grows, so no large contiguous region has to be reserved "
        "up front.",
        "With paged attention the KV cache is a pool of fixed-size blocks. Each sequence has a block "
        "table that points to its blocks, and attention reads keys and values through that table.",
    ],
    "Blocks avoid fragmentation: memory is handed out a block at a time, so almost none is wasted and "
    "more conversations fit in the same GPU.",
    "In chatscale the KV cache manager keeps a pool of free blocks, and the scheduler asks it for a new "
    "block whenever a sequence fills its last one.",
)
_add(
    "prefix_caching",
    ["prefix caching", "the prefix cache", "prompt caching"],
    ["How can two requests share a KV cache?", "What is a cache hit?"],
    [
        "Prefix caching reuses the KV cache of a prompt prefix that was already computed. Blocks are "
        "identified by a hash of their tokens, so a new request with the same system prompt or earlier "
        "turns starts from the cached blocks instead of computing them again.",
        "With prefix caching, full KV blocks are hashed by their content. When a new request starts with "
        "the same tokens, those blocks are a cache hit and only the new part of the prompt is computed.",
    ],
    "Chat requests resend the whole conversation every turn, so most of each prompt is a prefix that "
    "was seen before. Reusing it cuts the time to first token and saves compute.",
    "chatscale counts prefix_cache_hits and prefix_cache_queries, and the gateway routes a conversation "
    "back to the replica that already holds its cache.",
)
_add(
    "eviction",
    ["cache eviction", "a cache miss", "LRU eviction"],
    ["What happens when the KV cache is full?", "What happens to idle conversations?"],
    [
        "When the KV cache is full, blocks of idle conversations are evicted, least recently used first. "
        "If such a conversation comes back, it is a cache miss and its whole history must be computed "
        "again.",
        "A full cache evicts the least recently used blocks that no running request needs. The next turn "
        "of an evicted conversation misses the cache and pays to recompute its prompt.",
    ],
    "A cache miss costs time that grows with the length of the conversation, so the miss rate is one "
    "of the numbers that tells you users are feeling pain.",
    "chatscale keeps freed blocks in an LRU list so they can still be hit until the memory is needed, "
    "and it reports the cache miss rate as a metric.",
)
_add(
    "continuous_batching",
    ["continuous batching", "in-flight batching"],
    ["How does the scheduler batch requests?", "What is iteration level scheduling?"],
    [
        "Continuous batching adds and removes requests at every decoding step instead of waiting for a "
        "whole batch to finish. When one request ends, a waiting one takes its place right away.",
        "With continuous batching the scheduler rebuilds the batch every step. New requests join as soon "
        "as there is room in the KV cache and finished ones leave immediately.",
    ],
    "Requests have very different lengths. A static batch waits for its longest request, while a "
    "continuous batch stays full, so the GPU does useful work almost all the time.",
    "The chatscale scheduler picks the running batch every step, limited by the free KV cache blocks, "
    "and the metric num_requests_running shows the batch size.",
)
_add(
    "batching",
    ["batching", "the batch size"],
    ["Why does batching matter?", "Why is batch size important for cost?", "Why serve many users at once?"],
    [
        "Decoding one token reads every weight of the model from memory once. A batch shares that read "
        "across all its requests, so a large batch makes each token much cheaper.",
        "Batch size decides cost. At batch one the GPU spends its time moving weights, not computing. "
        "With many requests in the batch the same bytes serve many tokens.",
    ],
    "The cost per token falls almost linearly with the batch size until the GPU becomes compute "
    "bound, so a full batch can be many times cheaper than serving users one by one.",
    "chatscale uses continuous batching to keep the batch full, and the planner tells you how large a "
    "batch your hardware needs: chatscale plan.",
)
_add(
    "arithmetic_intensity",
    ["arithmetic intensity", "the ridge point", "the roofline model"],
    ["What is the ops to bytes ratio?", "When is decoding compute bound?", "What is FLOPs per byte?"],
    [
        "Arithmetic intensity is the number of FLOPs done per byte moved from memory. A chip's ridge "
        "point is its peak FLOPs divided by its memory bandwidth. Below it you are memory bound, above "
        "it compute bound.",
        "The roofline model compares a workload's FLOPs per byte with the chip's ops to bytes ratio. An "
        "H100 needs about 591 FLOPs per byte to be compute bound, so decoding needs a large batch.",
    ],
    "It tells you whether the GPU is waiting on memory or on math. GPU utilisation alone cannot tell "
    "you that.",
    "chatscale measures FLOPs and bytes every engine step and shows the arithmetic intensity next to "
    "the ridge point of the hardware.",
)
_add(
    "speculative_decoding",
    ["speculative decoding", "a draft model"],
    ["How can a small model speed up a big one?", "What is a draft model for?"],
    [
        "Speculative decoding lets a small draft model guess several tokens ahead. The large target "
        "model checks all the guesses in one forward pass and keeps the ones it agrees with, using "
        "rejection sampling so the output has exactly the target's distribution.",
        "In speculative decoding a cheap draft model proposes a few tokens and the target model verifies "
        "them in a single step. Accepted tokens come almost for free and the results stay exact.",
    ],
    "At small batch sizes decoding is memory bound, so checking several tokens at once costs about the "
    "same as generating one. Every accepted guess is a token saved.",
    "The chatscale demo ships a draft model and a target model that share one tokenizer, so you can "
    "try speculative decoding on this machine.",
)
_add(
    "moe",
    ["a mixture of experts", "MoE", "a Mixture-of-Experts model"],
    ["How does a router pick experts?", "What is top-2 routing?"],
    [
        "A Mixture of Experts model has many feed-forward experts in each layer, and a router sends each "
        "token to only the top k of them. The model holds many parameters but uses few per token.",
        "In a Mixture of Experts layer a small router scores the experts for each token and only the "
        "best two, for example, run. Compute per token stays low while capacity grows.",
    ],
    "MoE gives the quality of a large model for the compute of a small one, but all experts still sit "
    "in memory, so memory and batching matter even more.",
    "The chatscale demo includes a small Mixtral style model with 8 experts and top-2 routing.",
)
_add(
    "gqa",
    ["grouped-query attention", "GQA", "multi-query attention"],
    ["Why share key and value heads?", "What is MQA?"],
    [
        "Grouped-query attention lets several query heads share one key and value head. The KV cache "
        "shrinks by the group size while quality stays close to full multi-head attention.",
        "With multi-query attention all query heads share a single key and value head, and grouped-query "
        "attention is the middle ground with a few shared heads.",
    ],
    "A smaller KV cache per token means more conversations fit in memory, which allows larger batches "
    "and lower cost.",
    "The chatscale demo models use grouped-query attention: several query heads share each key and "
    "value head.",
)
_add(
    "ttft",
    ["TTFT", "time to first token"],
    ["How long until the first token appears?", "What makes the first token slow?"],
    [
        "Time to first token, or TTFT, is how long a user waits from sending a request until the first "
        "token of the answer arrives. It includes queueing and computing the prompt.",
        "TTFT measures the delay before streaming starts: the time in the queue plus the prefill of the "
        "prompt. Long prompts and cache misses make it worse.",
    ],
    "Users feel TTFT directly, so it is one of the pain metrics together with inter-token latency and "
    "the cache miss rate.",
    "chatscale records TTFT for every request and shows its percentiles on the dashboard.",
)
_add(
    "itl",
    ["inter-token latency", "ITL", "time per output token"],
    ["How fast are tokens streamed?", "What is the time between tokens?"],
    [
        "Inter-token latency is the time between two streamed tokens of the same answer. It decides how "
        "fast the text appears once streaming has started.",
        "ITL measures the gap between tokens during decoding. Larger batches raise it a little, which is "
        "the price paid for a lower cost per token.",
    ],
    "If tokens arrive slower than people read, the service feels sluggish, so ITL is a latency target "
    "just like TTFT.",
    "chatscale records the inter-token latency of every request and exports it to Prometheus.",
)
_add(
    "rate_limits",
    ["rate limiting", "admission control", "a 429 error"],
    ["What happens when the service is at capacity?", "Why did I get a 429?", "What is Retry-After?"],
    [
        "When the fleet is full, chatscale says so honestly: it answers 429 with a Retry-After header "
        "instead of accepting more work than it can serve. Requests queue with priorities and per-user "
        "fairness.",
        "Admission control protects the fleet. Each key has limits on requests and tokens per minute, "
        "and when capacity is used up the gateway returns 429 and says when to retry.",
    ],
    "You cannot autoscale into GPUs that do not exist. Saying no early keeps latency good for the "
    "requests that are accepted, instead of melting down for everyone.",
    "The chatscale gateway checks keys, limits and policies, then admits, queues or rejects each "
    "request before it picks a replica.",
)
_add(
    "routing",
    ["request routing", "the gateway", "cache aware routing"],
    ["How does the gateway pick a replica?", "Should a request go to the nearest region?"],
    [
        "The gateway picks a region and then a replica, scoring each by its prefix cache overlap and its "
        "load. A replica that is ready beats one that is near, because streaming time dwarfs network "
        "round trips.",
        "chatscale routes each request to the replica that already holds its KV cache when that replica "
        "has room, and otherwise to the least loaded one, in any region.",
    ],
    "Good routing raises the cache hit rate and spreads load, which lowers both TTFT and cost.",
    "Run chatscale gateway in front of one or more chatscale serve replicas, and it will route by cache "
    "affinity and load.",
)
_add(
    "make_serve",
    ["make serve", "the demo"],
    [
        "How do I run chatscale?",
        "How do I start the demo?",
        "How do I get started with chatscale?",
        "How do I try chatscale on my laptop?",
    ],
    [
        "Run make serve in the repository. It creates a virtual environment, installs chatscale and "
        "starts a chat with the demo model, which ships with the package, so nothing is downloaded.",
        "Clone the repository and type make serve. The first run installs everything into .venv, then "
        "you can chat with the bundled demo model in your terminal.",
    ],
    "The demo works on any machine with no GPU and no internet, so you can try the engine, the "
    "scheduler and the metrics right away.",
    "For example: make serve, then ask what a KV cache is. Use make test to run the tests.",
)
_add(
    "chatscale_serve",
    ["chatscale serve", "the OpenAI compatible server"],
    ["How do I start the server?", "How do I serve a model over HTTP?", "Does chatscale have an API?"],
    [
        "Run chatscale serve to start an OpenAI compatible HTTP server. It streams tokens with server "
        "sent events on /v1/chat/completions, and it uses the demo model unless you pass --model PATH.",
        "chatscale serve starts the API server. Any OpenAI client can talk to it, and answers stream "
        "token by token.",
    ],
    "An OpenAI compatible API means existing clients and tools work without changes.",
    "For example: chatscale serve --model PATH starts the server with another checkpoint, and "
    "curl can stream an answer from /v1/chat/completions.",
)
_add(
    "chatscale_chat",
    ["chatscale chat", "the terminal chat"],
    ["How do I chat in the terminal?", "Can I ask one question from the command line?"],
    [
        "Run chatscale chat to talk to the model in your terminal. Answers are streamed, and you can "
        "pass one question as an argument to get a single answer.",
        "chatscale chat opens an interactive chat with the demo model. Add --model PATH to use another "
        "checkpoint.",
    ],
    "It is the quickest way to check that the engine works before you start a server.",
    "For example: chatscale chat what is a KV cache.",
)
_add(
    "planner",
    ["the planner", "chatscale plan", "capacity planning"],
    ["How many GPUs do I need?", "How do I estimate cost per token?"],
    [
        "chatscale plan takes the hardware, the model and the workload, and estimates memory use, the "
        "largest batch, tokens per second and the cost per 1000 tokens.",
        "The planner uses the roofline model: weights and KV cache for memory, FLOPs and bytes for speed, "
        "and the price of the GPU for cost per 1000 tokens.",
    ],
    "Planning before buying GPUs tells you whether a model fits, how many users a GPU serves and what "
    "each answer will cost.",
    "For example: chatscale plan with an H100 and a 70B model shows the batch size needed to reach the "
    "ridge point.",
)
_add(
    "simulator",
    ["the simulator", "chatscale simulate", "the digital twin"],
    ["How can I test the scheduler without GPUs?", "What does the simulator do?"],
    [
        "chatscale simulate runs the real scheduler and KV cache manager with a step cost model instead "
        "of a GPU, over request traces, so you can predict latency and cost for a whole fleet.",
        "The simulator is a digital twin: the same scheduler classes as the engine, driven by a model of "
        "how long each step takes.",
    ],
    "Because it runs the real scheduler, what the simulator predicts is what the engine does, and you "
    "can try policies on a whole day of traffic in seconds.",
    "For example: chatscale simulate with a trace file replays real requests against a simulated fleet.",
)
_add(
    "metrics",
    ["the dashboard", "the metrics endpoint", "KV cache usage"],
    ["What should I monitor?", "Which numbers matter when serving LLMs?", "Is GPU utilisation useful?"],
    [
        "Load is KV cache usage plus batch size, efficiency is arithmetic intensity against the ridge "
        "point, and pain is TTFT, inter-token latency and the cache miss rate. GPU utilisation says "
        "almost nothing useful.",
        "Watch kv_cache_usage_perc, num_requests_running and num_requests_waiting for load, and TTFT and "
        "inter-token latency for what users feel.",
    ],
    "A GPU can look busy while it only moves weights at batch one, so the right metrics show whether "
    "you are cheap and fast, not just busy.",
    "chatscale exports its metrics for Prometheus with the same names as vLLM, so existing dashboards "
    "work.",
)
_add(
    "prefill_decode",
    ["prefill", "decode", "prefill and decode"],
    ["What is the difference between prefill and decode?", "Why is the prompt fast but generation slow?"],
    [
        "Prefill processes the whole prompt in one pass and fills the KV cache. Decode then generates one "
        "token per step. Prefill is compute bound, decode is memory bound.",
        "There are two phases: prefill computes all prompt tokens at once, and decode produces the answer "
        "token by token while reading the KV cache.",
    ],
    "The two phases stress the GPU in different ways, so the scheduler mixes them carefully to keep "
    "latency low.",
    "The chatscale scheduler can split a long prefill into chunks so that running decodes are not "
    "stalled.",
)
_add(
    "tensor_parallel",
    ["tensor parallelism", "model parallelism"],
    ["How do you serve a model too large for one GPU?", "How do you split a model across GPUs?"],
    [
        "Tensor parallelism splits each weight matrix across several GPUs, so every GPU holds a slice of "
        "the model and they exchange partial results in each layer.",
        "With tensor parallelism a layer's matrices are divided between GPUs that compute together, "
        "which lets a large model fit and uses the bandwidth of all of them.",
    ],
    "It lets a model that does not fit in one GPU be served, and it adds memory for the KV cache.",
    "The chatscale planner accounts for tensor parallelism when it estimates memory and speed.",
)
_add(
    "chatscale",
    ["chatscale", "this project"],
    ["What is chatscale for?", "What does chatscale do?", "Why was chatscale built?"],
    [
        "chatscale serves a chat model to many users on a scarce, multi region GPU fleet. It has an "
        "engine with continuous batching and a paged KV cache, an OpenAI compatible server, a gateway, "
        "a planner and a simulator.",
        "chatscale is an LLM serving system built around the lessons of scaling a chat service: memory "
        "is the bottleneck, batch size decides cost, and capacity is fixed.",
    ],
    "Serving chat models is expensive, and the GPUs are scarce, so every design choice in chatscale "
    "aims at more users per GPU with good latency.",
    "Start with make serve to chat with the demo model, then try chatscale serve and chatscale plan.",
)
_add(
    "tokenizer",
    ["a tokenizer", "tokenization", "a chat template"],
    ["How many tokens is my text?", "How do I count tokens?", "How do I split a long document?"],
    [
        "A tokenizer turns text into tokens, the units the model reads. The chat template wraps each "
        "message with special tokens such as im_start and im_end.",
        "Models read tokens, not characters. chatscale tokens count FILE counts them, and chatscale "
        "tokens split FILE cuts a long document into chunks that fit a token budget.",
    ],
    "Cost, limits and context length are all measured in tokens, so you need to count them.",
    "For example: chatscale tokens split notes.txt --max-tokens 256 --overlap 32 prints one chunk per "
    "line.",
)
_add(
    "sampling",
    ["temperature", "sampling", "top p"],
    ["What does temperature do?", "What is greedy decoding?"],
    [
        "Temperature scales the model's scores before sampling. A low temperature makes answers more "
        "predictable, a high one more varied, and zero means greedy decoding, always the most likely "
        "token.",
        "Sampling picks each token at random from the model's distribution. Top p keeps only the most "
        "likely tokens that together reach probability p.",
    ],
    "The sampling settings trade predictability for variety, and they change nothing about the cost "
    "of a token.",
    "Pass --temperature to chatscale chat, or temperature and top_p in an API request.",
)
_add(
    "demo_model",
    ["the demo model", "the bundled model"],
    ["Which model are you?", "How were you trained?", "How big is the demo model?"],
    [
        "I am a small demo model trained on this machine from scratch, on generated conversations about "
        "chatscale, simple facts, arithmetic and unit conversions. I am meant for demos and tests only.",
        "The demo models ship inside the chatscale package: a small target model, a tiny draft model "
        "for speculative decoding and a small Mixture of Experts model.",
    ],
    "A bundled model means chatscale works with no download, so anyone can try it in minutes.",
    "Run chatscale chat with no flag to use the demo target model, or pass --model PATH for another "
    "checkpoint.",
)


GREETINGS = (
    ["Hi", "Hello", "Hey", "Hi there", "Hello!", "Good morning", "Hey there!", "Hi!"],
    [
        "Hello! I am the chatscale demo assistant. Ask me about serving LLMs, like KV caches or batching, "
        "or about simple facts and arithmetic.",
        "Hi! How can I help you today? I know about chatscale, LLM serving, simple facts and arithmetic.",
    ],
)
IDENTITY = (
    ["Who are you?", "What are you?", "What can you do?", "What do you know?", "What can I ask you?"],
    [
        "I am a small demo assistant that ships with chatscale. I can explain how LLM serving works, "
        "how to run chatscale, and answer simple facts, arithmetic and unit conversions.",
        "I am the chatscale demo model. Ask me about KV caches, batching, speculative decoding or how to "
        "run the server, or try a sum or a unit conversion.",
    ],
)
HOW_ARE_YOU = (
    ["How are you?", "How are you doing?", "How is it going?"],
    ["I am doing well, thank you! What would you like to know?", "All good here. How can I help?"],
)
THANKS = (
    ["Thanks!", "Thank you.", "Thanks, that helps.", "Great, thanks!", "Thank you so much!", "ok thanks"],
    ["You're welcome! Let me know if you have more questions.", "Happy to help!", "Glad it helped."],
)
BYE = (
    ["Bye", "Goodbye!", "See you later.", "That's all for now."],
    ["Goodbye! Have a nice day.", "See you! Come back any time."],
)
OUT_OF_DOMAIN = (
    [
        "Write a poem about the sea.",
        "What is the meaning of life?",
        "Can you write a story about a dragon?",
        "Who will win the next election?",
        "Translate this into French: good morning.",
        "What is the weather today?",
        "Tell me a joke.",
        "Write a Python function that sorts a list.",
        "What is the stock price of Apple?",
        "Can you help me with my homework essay?",
        "What happened in the news today?",
        "Recommend a good movie.",
    ],
    [
        "I am a small demo model, so I can't help with that. I can explain how chatscale serves LLMs, "
        "answer simple facts, and do small arithmetic and unit conversions.",
        "Sorry, that is outside what I was trained on. Try asking me about KV caches, batching, "
        "speculative decoding, or a simple sum.",
    ],
)

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Russia": "Moscow", "the United Kingdom": "London",
    "the United States": "Washington, D.C.", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "South Korea": "Seoul", "Ireland": "Dublin", "the Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Austria": "Vienna", "Switzerland": "Bern", "Denmark": "Copenhagen",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Peru": "Lima", "Chile": "Santiago", "Nigeria": "Abuja",
}
CAPITAL_QUESTIONS = ["What is the capital of {c}?", "What's the capital city of {c}?", "Which city is the capital of {c}?"]
CAPITAL_ANSWERS = ["The capital of {c} is {a}.", "{a} is the capital of {c}."]

FACTS = [
    (["How many days are in a week?", "How many days does a week have?"], "A week has 7 days."),
    (["How many days are in a year?", "How many days does a year have?"],
     "A year has 365 days, or 366 in a leap year."),
    (["How many hours are in a day?", "How many hours does a day have?"], "A day has 24 hours."),
    (["How many months are in a year?"], "A year has 12 months."),
    (["How many minutes are in an hour?"], "An hour has 60 minutes."),
    (["How many seconds are in a minute?"], "A minute has 60 seconds."),
    (["How many continents are there?"],
     "There are 7 continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    (["What is the largest planet?", "Which planet is the biggest?"],
     "Jupiter is the largest planet in our solar system."),
    (["What is the closest planet to the Sun?", "Which planet is nearest to the Sun?"],
     "Mercury is the closest planet to the Sun."),
    (["How many planets are in the solar system?"], "There are 8 planets in our solar system."),
    (["At what temperature does water boil?", "What is the boiling point of water?"],
     "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level."),
    (["At what temperature does water freeze?", "What is the freezing point of water?"],
     "Water freezes at 0 degrees Celsius, or 32 degrees Fahrenheit."),
    (["What color is the sky?", "Why is the sky blue?"],
     "The sky looks blue because air scatters blue sunlight more than red light."),
    (["What is the chemical formula of water?"], "The chemical formula of water is H2O."),
    (["What is the largest ocean?"], "The Pacific Ocean is the largest ocean on Earth."),
    (["How many legs does a spider have?"], "A spider has 8 legs."),
    (["How many legs does an insect have?"], "An insect has 6 legs."),
    (["What gas do plants take in?", "What do plants need to make food?"],
     "Plants take in carbon dioxide and use sunlight and water to make sugar, releasing oxygen."),
    (["What is the speed of light?"], "Light travels at about 300,000 kilometers per second."),
    (["What is the tallest mountain?", "What is the highest mountain in the world?"],
     "Mount Everest is the highest mountain, at about 8,849 meters."),
    (["What is a byte?"], "A byte is 8 bits."),
    (["What is a GPU?"],
     "A GPU is a processor with thousands of small cores and very fast memory, built for the parallel "
     "math that graphics and neural networks need."),
    (["What is an LLM?", "What is a large language model?"],
     "A large language model is a neural network trained to predict the next token of text. Chat "
     "assistants are LLMs tuned to follow a conversation."),
]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]


OPERATORS: dict[str, tuple[Callable[[int, int], float], str]] = {
    "+": (operator.add, "plus"), "-": (operator.sub, "minus"),
    "*": (operator.mul, "times"), "/": (operator.truediv, "divided by"),
}


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """A small sum, difference, product or quotient with its checked answer."""
    sym = rng.choice("+-*/")
    if sym == "+":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
    elif sym == "-":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
    elif sym == "*":
        a, b = rng.randint(1, 10), rng.randint(1, 10)
    else:
        b = rng.randint(1, 10)
        a = b * rng.randint(1, 10)
    fn, word = OPERATORS[sym]
    r = fn(a, b)
    assert r == int(r) >= 0, (a, sym, b, r)
    r = int(r)
    shown = {"*": "x", "/": "/"}.get(sym, sym)
    q = rng.choice([
        f"What is {a} {shown} {b}?", f"What's {a} {word} {b}?", f"Calculate {a} {shown} {b}.",
        f"How much is {a} {word} {b}?", f"{a} {shown} {b} = ?", f"Can you compute {a} {word} {b}?",
    ])
    ans = rng.choice([f"{a} {shown} {b} = {r}.", f"{a} {word} {b} is {r}.", f"The answer is {r}."])
    return q, ans


# (from unit plural, to unit plural, factor, singular from-unit) -- exact integer factors only.
CONVERSIONS = [
    ("kilometers", "meters", 1000, "kilometer"), ("meters", "centimeters", 100, "meter"),
    ("centimeters", "millimeters", 10, "centimeter"), ("kilograms", "grams", 1000, "kilogram"),
    ("liters", "milliliters", 1000, "liter"), ("hours", "minutes", 60, "hour"),
    ("minutes", "seconds", 60, "minute"), ("days", "hours", 24, "day"), ("weeks", "days", 7, "week"),
    ("feet", "inches", 12, "foot"), ("yards", "feet", 3, "yard"), ("gigabytes", "megabytes", 1000, "gigabyte"),
]
CELSIUS = [-40, -10, 0, 10, 20, 25, 30, 37, 40, 50, 100]


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _conversion(rng: random.Random) -> tuple[str, str]:
    """A unit conversion with its computed answer."""
    if rng.random() < 0.2:
        c = rng.choice(CELSIUS)
        f = c * 9 / 5 + 32
        q = rng.choice([f"What is {c} degrees Celsius in Fahrenheit?", f"Convert {c} C to Fahrenheit.",
                        f"How many Fahrenheit is {c} degrees Celsius?"])
        return q, f"{c} degrees Celsius is {_fmt(f)} degrees Fahrenheit."
    src, dst, k, one = rng.choice(CONVERSIONS)
    n = rng.randint(1, 12)
    unit = one if n == 1 else src
    q = rng.choice([f"How many {dst} are in {n} {unit}?", f"Convert {n} {unit} to {dst}.",
                    f"What is {n} {unit} in {dst}?", f"{n} {unit} is how many {dst}?"])
    return q, f"{n} {unit} is {n * k} {dst}."


def _vary(q: str, rng: random.Random) -> str:
    """Surface variety people type: a greeting or lead-in, lower case, no question mark."""
    r = rng.random()
    if r < 0.15:
        q = rng.choice(["Hi! ", "Hey, ", "Quick question: ", "Hello. ", "Question: "]) + q
    elif r < 0.25:
        q = q[0].lower() + q[1:]
    elif r < 0.32:
        q = q.lower()
    if rng.random() < 0.1:
        q = q.rstrip("?.")
    return q


def _pick(pair: tuple[list[str], list[str]], rng: random.Random) -> tuple[str, str]:
    return rng.choice(pair[0]), rng.choice(pair[1])


def _topic_turn(rng: random.Random, key: str | None = None) -> tuple[str, Topic, str, str]:
    key = key or rng.choice(list(TOPICS))
    t = TOPICS[key]
    return key, t, rng.choice(t.questions), rng.choice(t.answers)


def _simple_turn(rng: random.Random) -> tuple[str, str]:
    """One self-contained question and answer outside the chatscale topics."""
    r = rng.random()
    if r < 0.3:
        return _arithmetic(rng)
    if r < 0.5:
        return _conversion(rng)
    if r < 0.7:
        c = rng.choice(list(CAPITALS))
        q = rng.choice(CAPITAL_QUESTIONS).format(c=c)
        a = rng.choice(CAPITAL_ANSWERS).format(c=c, a=CAPITALS[c])
        return q, a[0].upper() + a[1:]
    if r < 0.88:
        qs, a = rng.choice(FACTS)
        return rng.choice(qs), a
    if r < 0.93:
        return _pick(IDENTITY, rng)
    return _pick(OUT_OF_DOMAIN, rng)


def _docs_conversation(rng: random.Random) -> list[tuple[str, str]]:
    """A chatscale question, often followed by a follow-up about the same topic or another topic."""
    key, t, q, a = _topic_turn(rng)
    turns = [(_vary(q, rng), a)]
    r = rng.random()
    if r < 0.25:
        turns.append((rng.choice(WHY_FOLLOWUPS), t.why))
    elif r < 0.45:
        turns.append((rng.choice(EXAMPLE_FOLLOWUPS), t.example))
    elif r < 0.52:
        turns.append((rng.choice(SIMPLER_FOLLOWUPS), a.split(". ")[0].rstrip(".") + "."))
    elif r < 0.62:
        other = rng.choice([k for k in TOPICS if k != key])
        name = rng.choice(TOPIC_NAMES[other])
        t = TOPICS[other]  # follow-ups now refer to the new topic
        turns.append((rng.choice([f"And what about {name}?", f"What about {name}?", f"And {name}?"]),
                      rng.choice(t.answers)))
    if len(turns) == 2 and rng.random() < 0.3:
        turns.append((rng.choice(WHY_FOLLOWUPS), t.why) if turns[1][1] != t.why else _pick(THANKS, rng))
    return turns


def _small_talk(rng: random.Random) -> list[tuple[str, str]]:
    turns = [_pick(rng.choice([GREETINGS, GREETINGS, HOW_ARE_YOU, IDENTITY]), rng)]
    if rng.random() < 0.6:
        turns.append(_docs_conversation(rng)[0] if rng.random() < 0.5 else _simple_turn(rng))
        if rng.random() < 0.4:
            turns.append(_pick(rng.choice([THANKS, BYE]), rng))
    return turns


def _facts_conversation(rng: random.Random) -> list[tuple[str, str]]:
    q, a = _simple_turn(rng)
    turns = [(_vary(q, rng), a)]
    while rng.random() < 0.35 and len(turns) < 4:
        turns.append(_simple_turn(rng))
    if rng.random() < 0.15:
        turns.append(_pick(THANKS, rng))
    return turns


KINDS: list[tuple[float, Callable[[random.Random], list[tuple[str, str]]]]] = [
    (0.55, _docs_conversation),
    (0.12, _small_talk),
    (0.33, _facts_conversation),
]


def conversation(rng: random.Random) -> Conversation:
    """One random conversation: an optional system prompt, then user/assistant turns."""
    r, acc = rng.random(), 0.0
    for weight, make in KINDS:
        acc += weight
        if r < acc:
            turns = make(rng)
            break
    else:
        turns = KINDS[-1][1](rng)
    msgs: Conversation = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def conversations(n: int, seed: int) -> list[Conversation]:
    """`n` conversations, the same ones for the same seed."""
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(n)]


def split(n_train: int, n_heldout: int, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Training and held-out conversations; no held-out conversation appears verbatim in training."""
    train = conversations(n_train, seed)
    seen = {json.dumps(c, sort_keys=True) for c in train}
    heldout = [c for c in conversations(4 * n_heldout, seed + 1) if json.dumps(c, sort_keys=True) not in seen]
    return train, heldout[:n_heldout]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for c in conversations(args.n, args.seed):
        print(json.dumps(c, ensure_ascii=False))


if __name__ == "__main__":
    main()
