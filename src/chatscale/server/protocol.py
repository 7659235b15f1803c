"""OpenAI's request and response bodies as pydantic models: the wire contract and /openapi.json.

Requests are strict (no "1" for 1) with OpenAI's ranges, so a bad field is a 400 naming it before
anything reaches the engine. Fields OpenAI defines that we cannot honour are modelled and refused
with a 400 (`unsupported_fields`); a few are accepted and ignored on purpose (README lists them);
a field nobody defines is refused as OpenAI refuses it ("Unrecognized request argument supplied"),
never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import Ge
from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator,
    model_serializer,
)
from pydantic.json_schema import SkipJsonSchema

from chatscale.engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParamsError


def _well_formed(text: str) -> str:
    """JSON can escape a lone UTF-16 surrogate (\\ud800) that no UTF-8 text can hold: the tokenizer
    and the response encoder would both fail on it, so it is refused at the door, naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a lone UTF-16 surrogate at character {exc.start} is not valid Unicode text") from None
    return text


def _integral(value: Any) -> Any:
    """JSON Schema's `integer` includes 4.0, and schema-driven clients send it; 4.5 stays a float and fails."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[str, AfterValidator(_well_formed)]  # every string a request carries
Int = Annotated[int, BeforeValidator(_integral)]  # every integer a request carries
TokenId = Annotated[int, Ge(0), BeforeValidator(_integral)]  # the bound first, or the schema misstates it
TokenIdKey = Annotated[Text, StringConstraints(pattern=r"^[0-9]+$", max_length=20)]
Bias = Annotated[float, Field(ge=-100, le=100)]
INT64 = 2**63
# Per generated token every stop string is searched for, and a stream holds back the longest one's
# length less one character (so a stop string never leaks): 16 of at most 256 characters bound both
# (OpenAI takes 4 stops; agent frameworks send a few more). Characters, not bytes: the search and the
# hold-back count characters, and JSON Schema's maxLength (so /openapi.json) says the same.
MAX_STOPS, MAX_STOP_CHARS = 16, 256
Stop = Annotated[Text, StringConstraints(max_length=MAX_STOP_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored: no padding is added to chunks


class ContentPart(_Strict):
    """A content part of any type: text is taken; images, audio and files are refused by name
    (`ChatMessage.non_text_part`), not with a schema error."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Text
    text: Text | None = None


class FunctionCall(_Strict):
    name: Text
    arguments: Text = Field(description="the arguments as a JSON object's text")


class ToolCall(_Strict):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    # Only an assistant turn may come without content (OpenAI's, when it called tools).
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"role": {"const": "assistant"}}},
        "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = Field(None, validate_default=True)
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message: the call it answers
    # What a client echoes back when it appends a response's message to its history (the openai
    # client's message objects carry these): null, or annotations (citations), ignored; anything
    # else in them is refused by the schema.
    refusal: None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, content: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if content is None and role not in (None, "assistant"):
            raise ValueError(f"a {role} message needs content")
        return content

    def non_text_part(self) -> str | None:
        """The type of the first content part that is not text, if any."""
        parts = self.content if isinstance(self.content, list) else []
        return next((p.type for p in parts if p.type != "text" or p.text is None), None)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, and `developer` (OpenAI's newer
        name for the system role) as `system`, which open-model templates know."""
        text = self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Strict):
    name: Annotated[Text, StringConstraints(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: Text


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format; an unknown type is a 400 naming the three it can be."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None


class _GenerationRequest(_Strict):
    """Fields shared by chat and text completions, plus the vLLM extensions load tools send."""

    model_config = ConfigDict(json_schema_extra={  # stream_options only with stream: true (as vLLM)
        "dependentSchemas": {"stream_options": {"required": ["stream"], "properties": {"stream": {"const": True}}}}})

    model: Text | None = Field(None, description="defaults to the served model")
    n: Int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[TokenIdKey, Bias] | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    top_k: Int | None = Field(None, ge=-1, lt=2**31)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: Int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: Text | None = Field(None, description="requests share cached prompt pages only with the same salt")
    # Structured output, vLLM's names (`response_format` is chat's): one constraint at most.
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    guided_decoding_backend: Text | None = Field(None, description="accepted and ignored: always llguidance")
    guided_whitespace_pattern: Text | None = None  # refused: JSON layout is fixed
    # Accepted and ignored on purpose (README): bookkeeping fields of OpenAI's that change no output.
    store: bool | None = None
    metadata: dict[str, Text] | None = None
    service_tier: Text | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options can only be set when stream is true")
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_overrides(self) -> dict[str, Any]:
        """SamplingParams fields the client set; the checkpoint's defaults fill the rest."""
        unset_means_default = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        fields = {k: getattr(self, k) for k in unset_means_default if getattr(self, k) is not None}
        fields.update(
            n=self.n, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )
        if self.seed is not None:
            # OpenAI seeds are int64; the engine derives per-choice generator seeds as
            # seed * 1_000_003 + index, which overflows torch's 64-bit seed for large values and
            # would kill the engine loop. Folding to 32 bits keeps every seed reproducible.
            fields["seed"] = self.seed % 2**32
        return fields


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # Refused with a 400 (`unsupported_fields`): OpenAI fields this server cannot honour.
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[Text] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    max_tokens: Int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def sampling_overrides(self) -> dict[str, Any]:
        if self.top_logprobs is not None and not self.logprobs:
            raise SamplingParamsError("top_logprobs", "top_logprobs requires logprobs to be true")
        return {
            **super().sampling_overrides(),
            "max_tokens": self.max_completion_tokens or self.max_tokens,  # None: the rest of the context
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
        }


class CompletionRequest(_GenerationRequest):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: Int | None = Field(16, ge=1)
    logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: Text | None = None  # refused: no fill-in-the-middle

    def sampling_overrides(self) -> dict[str, Any]:
        return {**super().sampling_overrides(), "max_tokens": self.max_tokens, "logprobs": self.logprobs}

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids."""
        p = self.prompt
        if isinstance(p, str) or not p or isinstance(p[0], int):
            return [p]
        return list(p)


# ---- responses --------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_only_if_any(self, handler):  # OpenAI omits tool_calls when there are none
        body = handler(self)
        if body.get("tool_calls") is None:
            body.pop("tool_calls", None)
        return body


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallDelta(BaseModel):
    """A streamed tool call: the first delta of a call has its id, type and name; later ones
    add argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):  # OpenAI sends {"content": "x"}, not {"role": null, ...}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: Text
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion, and (object "text_completion" too) each streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatscale"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: either a `prompt`, or chat `messages` rendered with the template (the
    handler refuses both, neither, or either given as null)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: Text | None = None
    prompt: Text | SkipJsonSchema[None] = None
    messages: list[ChatMessage] | SkipJsonSchema[None] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "draining", "failed"]
    error: str | None = None
