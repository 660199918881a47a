"""Renders OpenAI-style chat messages into a Falcon prompt; the default stop strings for chat."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..engine import InvalidRequest

# Falcon-7B-Instruct goes on writing the next dialogue turn itself; chat requests stop there by default.
DEFAULT_CHAT_STOP: list[str] = ["\nUser:"]
# what starts a tool call in a reply (and in the history); see api/tool_calls.py
TOOL_CALL_MARKER = "<tool_call>"

ROLES = ("system", "user", "assistant", "tool")
_SPEAKERS = {"user": "User", "assistant": "Assistant", "tool": "Tool result"}


class ChatTemplateError(InvalidRequest):
    """The messages cannot be rendered: an unknown role or a content part that is not text."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages")


def message_text(content: str | Sequence[Mapping[str, Any]] | None) -> str:
    """The text of a message's content: a string, or text parts joined with "\\n" (None is "")."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text":
            raise ChatTemplateError(
                f"content part {i} has type {kind!r}; only 'text' parts are supported by this model"
            )
        texts.append(part.get("text") or "")
    return "\n".join(texts)


def written_call(name: str, arguments: str) -> str:
    """A tool call as a reply writes it: the marker, then `{"name":...,"arguments":...}` (arguments as given)."""
    return f'{TOOL_CALL_MARKER}{{"name":{json.dumps(name)},"arguments":{arguments}}}'


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages with a checked role and their content as plain text."""
    if not messages:
        raise ChatTemplateError("messages must contain at least one message")
    plain = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(
                f"messages[{i}] has unknown role {role!r}; allowed roles are {', '.join(ROLES)}"
            )
        text = message_text(message.get("content"))
        calls = message.get("tool_calls") or []
        if calls:  # an assistant's earlier tool calls, as the model would have written them
            written = "".join(written_call(c["function"]["name"], c["function"].get("arguments") or "{}")
                              for c in calls)
            text = "\n".join([text, written]).strip()
        plain.append({**message, "content": text})
    return plain


def render(messages: Sequence[Mapping[str, Any]], template: Callable[[list[dict[str, Any]]], str] | None = None,
           system: str | None = None) -> str:
    """The whole conversation as one prompt ending where the assistant's reply begins; `system` is more
    system text (what tools there are).

    Uses the model's chat template if it has one (`EngineClient.chat_template`), otherwise Falcon's plain
    format: system text first, then `User: ...` / `Assistant: ...` (and `Tool result: ...`) lines, ending
    with `Assistant:`.
    """
    plain = _plain_messages(messages)
    if system:
        plain = [{"role": "system", "content": system}, *plain]
    if template is not None:
        return template(plain)
    lines = [m["content"] for m in plain if m["role"] == "system"]
    lines += [f"{_SPEAKERS[m['role']]}: {m['content']}" for m in plain if m["role"] != "system"]
    lines.append("Assistant:")
    return "\n".join(lines)
