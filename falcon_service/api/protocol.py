"""OpenAI request, response, chunk and error schemas (chat and legacy completions).

Requests allow unknown extra fields (load tools send `ignore_eos`, `continuous_usage_stats`, ...);
known fields are range-checked here, and fields that name features this server does not
implement are rejected in `unsupported_fields`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, Strict, field_serializer, field_validator, model_validator

from ..engine import FinishReason

MAX_STOP_SEQUENCES = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20
# A message renders to a token at the least, and Falcon-7B's context holds 2,048: a longer list cannot fit,
# and validating one of 100,000 held the event loop for 2.2 s. Refused before its items are validated.
MAX_MESSAGES = 2048
MAX_TOOLS = 128  # OpenAI's bound
MAX_PROMPTS = 2048  # prompts in one completions request (each is queued as a request of its own)
ChoiceT = TypeVar("ChoiceT")


# JSON's types as they are: `true` is not a number, `1` is not a boolean, `5.0` is not a count
SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict()]
SBool = Annotated[bool, Strict()]


def _unpaired_surrogate(value: Any) -> bool:
    """Whether a string (or a list of them) holds a lone UTF-16 surrogate such as "\\ud800": JSON can
    carry one, but it is no Unicode text (it cannot be encoded, tokenized or echoed)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_unpaired_surrogate(v) for v in value)
    return False


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _valid_text(self) -> OpenAIBaseModel:
        for name in type(self).model_fields:
            if _unpaired_surrogate(getattr(self, name)):
                raise ValueError(f"`{name}` is not valid text: it holds an unpaired UTF-16 surrogate")
        return self


# ---------- requests ----------


class TextPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str = ""


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls, in the history
    tool_call_id: str | None = None  # a tool message answers this call


class StreamOptions(OpenAIBaseModel):
    include_usage: SBool | None = False
    continuous_usage_stats: SBool | None = False


class SamplingFields(OpenAIBaseModel):
    """How to generate: the fields every generation request shares, OpenAI's and the native APIs'."""

    max_tokens: SInt | None = Field(None, ge=1)
    temperature: SFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: SFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: SInt | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    seed: SInt | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: SFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: SFloat | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: SFloat | None = Field(None, gt=0.0, le=10.0)
    logit_bias: dict[str, SFloat] | None = None
    ignore_eos: SBool | None = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            if not re.fullmatch(r"[0-9]{1,10}", key):  # ASCII digits: "٣" is not token 3
                raise ValueError(f"logit_bias keys must be token ids (ASCII digits), got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {value}")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class JsonSchemaFormat(OpenAIBaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: SBool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type json_schema needs json_schema.schema")
        return self


class StructuredOutputs(OpenAIBaseModel):
    """vLLM's extra field: exactly one of these constrains the reply."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None  # Lark
    json_object: SBool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class OpenAIRequest(SamplingFields):
    """What OpenAI's chat and completions requests add to the sampling fields."""

    model: str
    stream: SBool | None = False
    stream_options: StreamOptions | None = None
    n: SInt | None = Field(1, ge=1, le=MAX_N)
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's, extra
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names, extra
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    # vLLM's: prompts share cached prefixes only with prompts of the same salt (privacy between callers)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# (field, allowed value predicate, message); a request naming one with another value is a 400
_UNSUPPORTED: list[tuple[str, Any, str]] = [
    ("functions", lambda v: not v, "the legacy `functions` are not supported: send `tools`"),
    ("function_call", lambda v: v in (None, "none"), "the legacy `function_call` is not supported: send "
     "`tool_choice`"),
    ("audio", lambda v: v is None, "audio output is not supported"),
    ("modalities", lambda v: v in (None, ["text"]), "only the text modality is supported"),
    ("prediction", lambda v: v is None, "predicted outputs are not supported"),
    ("reasoning_effort", lambda v: v is None, "reasoning_effort is not supported by this model"),
    ("web_search_options", lambda v: v is None, "web search is not supported"),
    ("suffix", lambda v: v in (None, ""), "suffix is not supported"),
    ("guided_grammar", lambda v: v is None, "send a Lark grammar as structured_outputs.grammar"),
    ("use_beam_search", lambda v: not v, "beam search is not supported"),
]


def unsupported_field(body: BaseModel) -> tuple[str, str] | None:
    """The first field that asks for an unimplemented feature, with the reason, if any."""
    values = {**(body.model_extra or {}), **{k: getattr(body, k) for k in body.model_fields_set}}
    for name, allowed, message in _UNSUPPORTED:
        if name in values and not allowed(values[name]):
            return name, message
    return None


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none means no arguments
    strict: SBool | None = None


class Tool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: SBool | None = None
    max_completion_tokens: SInt | None = Field(None, ge=1)
    logprobs: SBool | None = False
    top_logprobs: SInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    default_stop: SBool = True  # extra: False drops the server's default chat stop strings for this request

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(OpenAIRequest):
    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[SInt] | Annotated[
        list[list[SInt]], Field(max_length=MAX_PROMPTS)]
    max_tokens: SInt | None = Field(16, ge=1)
    logprobs: SInt | None = Field(None, ge=0, le=5)
    echo: SBool | None = False
    best_of: SInt | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class GenerateRequest(SamplingFields):
    """The native `generate` API (`bentoml.SyncHTTPClient`): a prompt, its completion streamed as text.
    Unknown fields are refused: a typo here would otherwise be silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    max_tokens: SInt | None = Field(256, ge=1)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)


class ChatRequest(SamplingFields):
    """The native `chat` API: a conversation, answered with the reply, its finish reason and usage.
    Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)


# ---------- responses ----------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda calls: calls is None)


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class Envelope(BaseModel, Generic[ChoiceT]):
    """What every response and chunk carries around its choices, in OpenAI's order."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatCompletionResponse(Envelope[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None

    @field_serializer("delta")
    def _delta_without_nulls(self, delta: DeltaMessage) -> dict[str, Any]:
        # OpenAI sends only the fields a delta sets: {"role": ...}, {"content": ...} or {}
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(Envelope[ChatChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(Envelope[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "falcon-service"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatReply(BaseModel):
    """What the native `chat` API returns."""

    reply: str
    finish_reason: FinishReason | None
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
