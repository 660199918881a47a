"""Incremental, UTF-8-safe detokenization and stop-string matching for streamed generation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded along with the output, so that its first tokens decode as they would in context.
PROMPT_CONTEXT_TOKENS = 5
# Window growth past which a window that already holds an undecodable byte is restarted (see `add`).
MAX_PENDING_TOKENS = 32


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, decoding only a small window of recent tokens.

    vLLM's prefix/read offsets: tokens before `read` are emitted; `decode(ids[prefix:])` minus
    `decode(ids[prefix:read])` is the new text. A trailing U+FFFD (an incomplete UTF-8 character)
    is held back until the next token; anything before it goes out at once.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] | None = None) -> None:
        self._tokenizer = tokenizer
        # A fast tokenizer's own decoder (Rust), called directly: transformers' `decode` around it converts and
        # checks the ids in Python, twice a token, on the step loop's thread; without it the step loop's host time
        # fell from 3.33 to 2.17 ms a step at 256 streams (benchmarks/host_overhead.py, CPU time, the same run).
        # With no space clean-up it is the same text.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = backend.decode if backend is not None else None
        self._special_ids = frozenset(tokenizer.all_special_ids)
        context = [i for i in (prompt_ids or ()) if i not in self._special_ids][-PROMPT_CONTEXT_TOKENS:]
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: its text would not be a stable prefix.
            context, context_text = [], ""
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)
        self._prefix_len = len(context_text)  # len(decode(ids[prefix:read]))
        self._sent = 0  # characters past prefix_len already emitted while the tail is incomplete

    def _decode(self, ids: Sequence[int]) -> str:
        # No space clean-up: it is not prefix-stable, so windows would disagree with each other.
        if self._backend_decode is not None:
            return self._backend_decode(list(ids), skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one generated token and return only the text it completes (may be "")."""
        if token_id in self._special_ids:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix :])
        complete = not text.endswith(REPLACEMENT_CHAR)
        ready_end = len(text) if complete else len(text) - 1
        start = self._prefix_len + self._sent
        delta = text[start:ready_end] if ready_end > start else ""
        if complete:
            self._advance(len(self._ids))
        elif delta:
            self._sent += len(delta)
        if (
            not complete
            and len(self._ids) - self._read > MAX_PENDING_TOKENS
            and REPLACEMENT_CHAR in text[self._prefix_len : ready_end]
        ):
            # Undecodable bytes can keep a window from ever ending on a whole character; the output
            # has U+FFFD in it already, so emit the held tail too and start a fresh window.
            delta += text[ready_end:]
            self._prefix = self._read = len(self._ids)
            self._prefix_len = self._sent = 0
        return delta

    def _advance(self, read: int) -> None:
        """Move the window so that it starts at the last emitted chunk, which gives decoding context."""
        self._prefix, self._read = self._read, read
        self._prefix_len = len(self._decode(self._ids[self._prefix : self._read]))
        self._sent = 0

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character as U+FFFD); call when generation ends."""
        text = self._decode(self._ids[self._prefix :])
        delta = text[self._prefix_len + self._sent :]
        self._advance(len(self._ids))
        return delta


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back only a tail that may begin one."""

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self._stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop was hit); the stop and all after it are dropped."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        pending = self._held + text
        # The held tail is a proper prefix of a stop, so any match ends inside `text`: this scan is short.
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return pending[: min(hits)], True
        keep = self._partial_stop_len(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """Release held text when generation ends for another reason (length, eos)."""
        held, self._held = self._held, ""
        return held
