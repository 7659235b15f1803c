"""A chat request as prompt token ids: messages, tools and agents' template options, checked.

The checkpoint's own template renders everything it knows: `tools` when it mentions them (else the
default Hermes-style tool prompt, tools/prompt.py, and the log says so once), `chat_template_kwargs`,
and either a generation prompt or, with `continue_final_message`, the last assistant message left
open so the model continues it. Content the model cannot take is refused here with a 400 naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jinja2

from chatscale.engine.structured.spec import GrammarSpec
from chatscale.models.tokenizer import Tokenizer
from chatscale.server.errors import APIError
from chatscale.server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from chatscale.server.tools.grammar import tool_grammar
from chatscale.server.tools.parsers import parser_for_template
from chatscale.server.tools.prompt import for_tool_template, template_renders_tools, with_default_tools

log = logging.getLogger("chatscale.server")
RESERVED_TEMPLATE_VARIABLES = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
_warned_default_tools: set[int] = set()


@dataclass
class ToolSetup:
    """How this request's answer is read: `parser` set when tool calls are to be parsed out."""

    parser: str | None = None
    grammar: GrammarSpec | None = None  # calls that follow the schemas: forced ("required", named) or not


def check_content(messages: list[ChatMessage]) -> None:
    for i, m in enumerate(messages):
        part = m.non_text_part()
        if part is not None:
            raise APIError(400, f"messages[{i}].content: content parts of type '{part}' are not supported; "
                                "this model accepts text only.", param=f"messages.[{i}].content")
        if m.role == "tool" and m.tool_call_id is None:
            raise APIError(400, f"messages[{i}]: a tool message needs the tool_call_id it answers.",
                           param=f"messages.[{i}].tool_call_id")


def tool_setup(body: ChatCompletionRequest, tokenizer: Tokenizer, parser: str | None) -> ToolSetup:
    """Check tools and tool_choice; the parser and the grammar of calls (forced for "required" or a
    named tool; with "auto", text or schema-valid calls)."""
    choice = body.tool_choice
    if choice is not None and not body.tools and choice != "none":
        raise APIError(400, "tool_choice is only allowed when tools are specified.", param="tool_choice")
    if not body.tools or choice == "none":
        return ToolSetup()
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools]
    parser = parser or parser_for_template(tokenizer.chat_template if template_renders_tools(
        tokenizer.chat_template) else None)
    if isinstance(choice, NamedToolChoice):
        named = [f for f in functions if f["name"] == choice.function.name]
        if not named:
            raise APIError(400, f"tool_choice names function '{choice.function.name}', which is not in tools.",
                           param="tool_choice")
        return ToolSetup(parser, tool_grammar(named, parser, parallel=False, forced=True))
    return ToolSetup(parser, tool_grammar(functions, parser, body.parallel_tool_calls, forced=choice == "required"))


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                    continue_final_message: bool = False) -> list[int]:
    """The conversation rendered with the checkpoint's own chat template."""
    check_content(messages)
    kwargs = dict(template_kwargs or {})
    reserved = RESERVED_TEMPLATE_VARIABLES & kwargs.keys()
    if reserved:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(sorted(reserved))}.",
                       param="chat_template_kwargs")
    if continue_final_message:
        if add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt false.",
                           param="continue_final_message")
        if messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs an assistant message last.",
                           param="continue_final_message")
    dicts = [m.for_template() for m in messages]
    if template_renders_tools(tokenizer.chat_template):
        dicts = for_tool_template(dicts)
        if tools:
            kwargs["tools"] = tools
    else:
        if tools and id(tokenizer) not in _warned_default_tools:
            _warned_default_tools.add(id(tokenizer))
            log.info("the chat template does not render tools: using chatscale's default Hermes-style tool "
                     "prompt (docs: README, Tool calling)")
        dicts = with_default_tools(dicts, tools)
    try:
        text = tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt, **kwargs)
    except (jinja2.TemplateError, ValueError) as exc:  # the template's raise_exception, or no template
        raise APIError(400, f"The chat template rejected these messages: {exc}", param="messages") from exc
    if continue_final_message:
        final = dicts[-1]["content"]
        at = text.rfind(final)
        if at < 0 or not final:
            raise APIError(400, "continue_final_message: the template does not write the final message verbatim.",
                           param="continue_final_message")
        text = text[:at + len(final)]  # the turn stays open: no end-of-turn after it
    return tokenizer.encode_text(text)


def request_prompt_ids(tokenizer: Tokenizer, body: ChatCompletionRequest, tools: ToolSetup) -> list[int]:
    offered = [t.model_dump(exclude_none=True) for t in body.tools] if tools.parser else None
    return chat_prompt_ids(tokenizer, body.messages, body.add_generation_prompt, offered, body.chat_template_kwargs,
                           body.continue_final_message)
