"""The hand-written text-delta SSE lines are byte for byte what the pydantic chunk models give."""

from __future__ import annotations

import json

import pytest

from falcon_service.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from falcon_service.api.serving import TextChunks, chunk_exclude, sse

TEXTS = ["hello", " world", 'quote " and \\ backslash', "line\nbreak\ttab", "naïve 日本語 🦅", "\x01ctl", "</s>",
         "next\x85line\u2028sep\u2029para\x1cfile"]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_chat_text_chunk_matches_the_model(text: str, include_usage: bool) -> None:
    fast = TextChunks(True, "chatcmpl-1", 1700000000, 'falcon-"x"', include_usage)(3, text)
    model = ChatCompletionChunk(id="chatcmpl-1", created=1700000000, model='falcon-"x"',
                                choices=[ChatChunkChoice(index=3, delta=DeltaMessage(content=text))])
    slow = sse(model, chunk_exclude(include_usage))
    assert json.loads(fast.removeprefix("data: ")) == json.loads(slow.removeprefix("data: "))
    assert fast == slow


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_completion_text_chunk_matches_the_model(text: str, include_usage: bool) -> None:
    fast = TextChunks(False, "cmpl-1", 1700000000, "falcon", include_usage)(0, text)
    model = CompletionResponse(id="cmpl-1", created=1700000000, model="falcon",
                               choices=[CompletionChoice(index=0, text=text)])
    slow = sse(model, chunk_exclude(include_usage))
    assert json.loads(fast.removeprefix("data: ")) == json.loads(slow.removeprefix("data: "))
    assert fast == slow


@pytest.mark.parametrize("chat", [True, False])
def test_every_event_stays_one_line_for_every_line_reader(chat: bool) -> None:
    """Text with NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR (a random model's output, or any text): each event is
    one line for Python's `splitlines` (and httpx's `aiter_lines`), and decodes to the same text."""
    text = "a\x85b\u2028c\u2029d\x0be\x1cf"
    fast = TextChunks(chat, "id-1", 1700000000, "falcon", False)(0, text)
    model: ChatCompletionChunk | CompletionResponse
    if chat:
        model = ChatCompletionChunk(id="id-1", created=1700000000, model="falcon",
                                    choices=[ChatChunkChoice(index=0, delta=DeltaMessage(content=text))])
    else:
        model = CompletionResponse(id="id-1", created=1700000000, model="falcon",
                                   choices=[CompletionChoice(index=0, text=text)])
    for line in (fast, sse(model, chunk_exclude(False))):
        assert line.endswith("\n\n") and len(line[:-2].splitlines()) == 1, repr(line)
        choice = json.loads(line.removeprefix("data: "))["choices"][0]
        assert (choice["delta"]["content"] if chat else choice["text"]) == text
