"""What goes into the engine and what comes out of it: requests, events, finish reasons, records."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from .sampling import SamplingParams, TokenLogprob


class FinishReason(StrEnum):
    """Why a choice ended; the values are OpenAI's `finish_reason` strings (plus our abort and error)."""

    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away
    ERROR = "error"  # generation failed inside the engine
    TOOL_CALLS = "tool_calls"  # the reply is a tool call (set by the API layer, never by the engine)


class EngineError(RuntimeError):
    """Generation failed inside the engine (the request gets a 500). Its message is for the client: what
    failed, never internal detail (that goes to the log)."""


class InvalidRequest(ValueError):
    """A request that cannot be served as it is: the client's to fix (a 400 naming `param`). Only this type
    (and the API's own errors) become 400s; any other exception is the server's fault, a 500."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class GenerationRequest:
    """One request: a tokenised prompt, `n` choices, and how to sample them."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    n: int = 1
    request_id: str = ""
    cache_salt: str | None = None  # prompts share cached prefixes only with prompts of the same salt


@dataclass
class ChoiceEvent:
    """New output of one choice: text delta, the tokens behind it, and the finish reason once done."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class RequestRecord:
    """What one finished request cost and how it went, for metrics and logs."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None  # seconds from submit to the first token
    time_per_output_token: float | None  # seconds per token after the first (longest choice)
    finish_reason: FinishReason
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache


class EngineObserver(Protocol):
    """Receives the engine's measurements (metrics); called on the engine thread, so it must be quick."""

    def on_step(self, waiting: int, running: int, cache_tokens: int, prefix_tokens: int) -> None: ...

    def on_request_done(self, record: RequestRecord) -> None: ...

    def on_rejected(self) -> None: ...

    def on_grammar_rejection(self) -> None:
        """A sampled token broke its reply's grammar (an engine fault: the request failed)."""
