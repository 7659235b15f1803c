"""Tool calls read back out of the model's text: whole (`parse`) or while it streams (`ToolStream`).

Two formats, as real checkpoints write them:
  hermes       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call, text
               around them is content (Qwen2.5/Qwen3, Hermes, and chatscale's default tool prompt);
  llama3_json  the whole answer is `{"name": ..., "parameters": {...}}` (Llama 3.1/3.2), optionally
               after `<|python_tag|>`, several separated by `;`.
A call's `arguments` is the model's own JSON text of them (so a stream's fragments add up to exactly
the non-streamed string); a block that does not parse stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def parser_for_template(chat_template: str | None) -> str:
    """The format a checkpoint's template teaches; hermes (the default tool prompt's) otherwise."""
    if chat_template and "<tool_call>" not in chat_template and (
            "<|python_tag|>" in chat_template or '"parameters"' in chat_template):
        return "llama3_json"
    return "hermes"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _call(block: str) -> ParsedCall | None:
    """A complete call's JSON object, or None if it is not one."""
    head = _HEAD.match(block)
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if head is not None:  # the model's own text of the arguments
        raw, end = json.JSONDecoder().raw_decode(block, head.end())
        return ParsedCall(obj["name"], block[head.end():end])
    return ParsedCall(obj["name"], json.dumps(args))


def parse(text: str, parser: str) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a finished answer; content is None when only calls were written."""
    calls: list[ParsedCall] = []
    if parser == "llama3_json":
        objects = _json_objects(text.strip().removeprefix("<|python_tag|>"))
        calls = [c for c in map(_call, objects or []) if c is not None]
        return (None, calls) if objects and len(calls) == len(objects) else (text, [])
    content, rest = [], text
    while OPEN in rest:
        before, after = rest.split(OPEN, 1)
        block, closed, rest = after.partition(CLOSE)
        call = _call(block.strip())
        if call is None:
            content.append(before + OPEN + block + closed)
            continue
        content.append(before)
        calls.append(call)
    content.append(rest)
    joined = "".join(content).strip()
    return (joined or None) if calls else text, calls


def _json_objects(body: str) -> list[str] | None:
    """`{...}; {...}` as its objects' texts, or None if it is anything else."""
    objects, at, decoder = [], 0, json.JSONDecoder()
    while at < len(body):
        if body[at] in " \n\t;":
            at += 1
            continue
        if body[at] != "{":
            return None
        try:
            _, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return None
        objects.append(body[at:end])
        at = end
    return objects


@dataclass
class CallDelta:
    """What a stream step adds to call number `index`: its name (first time), argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that could start `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolStream:
    """Incremental parsing of one streamed choice: `feed(delta)` returns the content and call deltas
    that are safe to send now. Text that may still turn out to be a call is held back; a call's
    name goes out as soon as it is complete, then its arguments as they grow."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.text = ""
        self.pos = 0  # text before this is sent (as content) or belongs to a finished call
        self.calls: list[ParsedCall] = []
        self._tag_start = 0  # where the open call's framing began (its text, if it is no call after all)
        self._open: int | None = None  # where the open call's JSON starts
        self._named = False  # the open call's name was sent (it is self.calls[-1])
        self._args_sent = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        self.text += delta
        content: list[str] = []
        deltas: list[CallDelta] = []
        while True:
            if self._open is None:
                start = self._call_start(final)
                if start is None:
                    end = len(self.text) if final else len(self.text) - self._hold()
                    trailing = self.text[self.pos:].strip(" \n\t;")
                    if final and self.parser == "llama3_json" and self.calls and not trailing:
                        self.pos = end  # trailing separators after the calls are no content
                    content.append(self.text[self.pos:end])
                    self.pos = max(self.pos, end)
                    return "".join(content), deltas
                content.append(self.text[self.pos:start[0]])
                self._tag_start, self._open, self.pos = start[0], start[1], start[1]
                self._named, self._args_sent = False, 0
            end = self._call_end(final)
            block = self.text[self._open:end if end is not None else len(self.text)]
            if self.parser == "hermes" and end is not None:
                block = self.text[self._open:self.text.find(CLOSE, self._open)]
            head = _HEAD.match(block)
            if head is not None and not self._named:
                self.calls.append(ParsedCall(json.loads(head.group(1)), ""))
                self._named = True
                deltas.append(CallDelta(len(self.calls) - 1, self.calls[-1].id, self.calls[-1].name))
            if end is None:
                if self._named:
                    # Held back: what may be the call's closing brace, whitespace, a partial closing tag.
                    kept = block[head.end():]
                    kept = kept[:len(kept) - max(_held_suffix(kept, "\n" + CLOSE), _held_suffix(kept, CLOSE))].rstrip()
                    self._send_args(kept[:-1] if kept.endswith("}") else kept, deltas)
                if not final:
                    return "".join(content), deltas
                end = len(self.text)  # cut off mid-call (max_tokens): what came is what it is
            self._finish_call(block, end, content, deltas)

    def _finish_call(self, block: str, end: int, content: list[str], deltas: list[CallDelta]) -> None:
        call = _call(block.strip())
        if call is not None and not self._named:  # keys in an unusual order: name and arguments at once
            self.calls.append(call)
            deltas.append(CallDelta(len(self.calls) - 1, call.id, call.name, call.arguments))
        elif call is not None:
            self._send_args(call.arguments, deltas)
        elif not self._named:  # it was no call after all: it is content
            content.append(self.text[self._tag_start:end])
        else:  # a named call that never completed: send what it wrote
            self._send_args(block[_HEAD.match(block).end():], deltas)
        self._open, self.pos = None, end

    def _call_start(self, final: bool) -> tuple[int, int] | None:
        """(where content stops, where the call's JSON starts) if a call begins in unsent text."""
        if self.parser == "hermes":
            at = self.text.find(OPEN, self.pos)
            return None if at < 0 else (at, at + len(OPEN))
        rest = self.text[self.pos:]
        body = rest.lstrip().removeprefix("<|python_tag|>").lstrip().lstrip(";").lstrip()
        if body.startswith("{") and (not self.calls and self.pos == 0 or self.calls):
            return self.pos, len(self.text) - len(body)
        return None

    def _call_end(self, final: bool) -> int | None:
        """Where the open call's text ends (framing included), once it is complete."""
        if self.parser == "hermes":
            at = self.text.find(CLOSE, self._open)
            return None if at < 0 else at + len(CLOSE)
        try:
            _, end = json.JSONDecoder().raw_decode(self.text, self._open)
        except json.JSONDecodeError:
            return None
        return end

    def _hold(self) -> int:
        """Characters at the end that may still begin a call."""
        rest = self.text[self.pos:]
        if self.parser == "hermes":
            return _held_suffix(rest, OPEN)
        if not self.calls and self.pos == 0 and rest.strip() in ("", "<|python_tag|>"[:len(rest.strip())]):
            return len(rest)  # nothing but the start of a bare JSON call so far
        if self.calls and not rest.strip(" \n\t;"):
            return len(rest)  # separators between calls
        return 0

    def _send_args(self, args: str, deltas: list[CallDelta]) -> None:
        new = args[self._args_sent:] if args.startswith(self.calls[-1].arguments[:self._args_sent]) else ""
        if new:
            self._args_sent = len(args)
            self.calls[-1].arguments = args
            deltas.append(CallDelta(len(self.calls) - 1, arguments=new))
