"""Generation behind one door: `EngineClient`, how to start it (its options and their defaults), the request
and event types, the errors.

These names are all that the API layer and the service take from the engine (tests/test_architecture.py
holds them to it). Each is imported when first used: the grammar sandbox's child process
(`python -m falcon_service.engine.grammar_sandbox`) imports this package too, and must start without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {  # name -> the module that defines it
    "EngineClient": "client", "EngineOptions": "options",
    "DEFAULT_BATCH_SIZE": "options", "DEFAULT_PREFILL_TOKENS": "options", "IDLE_PREFILL_TOKENS": "options",
    "GenerationRequest": "request", "ChoiceEvent": "request", "FinishReason": "request", "RequestRecord": "request",
    "EngineObserver": "request", "RequestStream": "stream", "SamplingParams": "sampling", "TokenLogprob": "sampling",
    "GrammarSpec": "grammar_source", "Grammar": "grammar",
    "EngineError": "request", "InvalidRequest": "request", "QueueFullError": "scheduler",
    "UnsupportedGrammar": "grammar_source",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)

