"""The engine's one door: everything the API layer and the service may ask of generation.

In the spirit of vLLM's `EngineClient`: submit a request and iterate its stream, abort it, the counts
of the moment, the model's limits, its tokenizer (encode, decode, the chat template), grammars compiled
off the event loop and the engine's thread, and whether the engine still makes progress. Callers reach
nothing else of the engine, so its core (the step loop, the model, the KV cache) can move behind this
interface into a process of its own without their code changing: then `submit` and `abort` become
messages, and the tokenizer stays on this side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import Engine
from .grammar import Grammar
from .grammar_source import GrammarSpec
from .options import EngineOptions
from .request import EngineObserver, GenerationRequest
from .stream import RequestStream

if TYPE_CHECKING:
    from .process import EngineProcess

ChatTemplate = Callable[[list[dict[str, Any]]], str]  # messages -> the prompt, up to the reply's start


class EngineClient:
    """What callers hold of a running engine (`EngineClient.start` loads one)."""

    def __init__(self, engine: Engine | EngineProcess) -> None:
        self._engine = engine
        self._tokenizer = engine.tokenizer
        self._token_chars: int | None = None

    @classmethod
    def start(cls, path: str | Path, options: EngineOptions, observer: EngineObserver | None = None) -> EngineClient:
        """Check, load and start the engine over the checkpoint at `path` (minutes for Falcon-7B: call it off
        the event loop); raises saying why it cannot (memory, device)."""
        if options.engine_process:
            from .process import EngineProcess

            return cls(EngineProcess.start(path, options, observer))
        from .loader import load_engine

        return cls(load_engine(path, options, observer=observer))

    # ---- requests ----

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its events come through the returned stream. Raises `QueueFullError` when the queue
        is full and `InvalidRequest` for what the engine cannot serve (the prompt's length, `n`)."""
        return self._engine.submit(request)

    def abort(self, stream: RequestStream) -> None:
        """Stop a request's generation: its sequences leave the batch at the next step."""
        stream.abort()

    def stats(self) -> dict[str, int]:
        """Requests waiting, sequences running, KV-cache tokens held and kept as prefixes, now."""
        return self._engine.stats()

    def alive(self, stall_seconds: float) -> tuple[bool, str]:
        """Whether the engine still makes progress, and why not (`Engine.alive`)."""
        return self._engine.alive(stall_seconds)

    def shutdown(self) -> None:
        """Stop the engine: every request it holds ends with an error."""
        self._engine.shutdown()

    # ---- the model's limits ----

    @property
    def max_model_len(self) -> int:
        """The context length: prompt and output tokens together."""
        return self._engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._engine.vocab_size

    @property
    def max_batch_tokens(self) -> int:
        """The KV cache's budget in tokens."""
        return self._engine.limits.max_batch_tokens

    @property
    def max_token_chars(self) -> int:
        """The longest token's length in characters: a text longer than `max_model_len` times this cannot fit."""
        if self._token_chars is None:
            self._token_chars = max((len(t) for t in self._tokenizer.get_vocab()), default=1)
        return self._token_chars

    # ---- text (CPU work on the caller's side: a long text takes a while, so call it off the event loop) ----

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`, without special tokens (a prompt's own)."""
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The model's own chat template as a function of the messages; None when its tokenizer has none."""
        if not getattr(self._tokenizer, "chat_template", None):
            return None
        return partial(self._tokenizer.apply_chat_template, tokenize=False, add_generation_prompt=True)

    # ---- grammars ----

    async def compile_grammar(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar of `spec` (cached; compiled off the event loop, bounded in a sandbox first).
        Raises `UnsupportedGrammar` naming what the grammar engine cannot do or the limit it passed."""
        return await self._engine.grammars.compile_async(spec)

