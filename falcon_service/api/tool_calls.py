"""Tool calls: what the model is told of the tools, the grammar its reply keeps, and the reply read back
as OpenAI's `tool_calls`, the same way streamed and not (a reply cut by `max_tokens` gives the partial call).

The format of a call is `<tool_call>{"name":"...","arguments":{...}}` (compact JSON, name first), one
marker per call. By `tool_choice`:
- a named function: the reply is its arguments alone (JSON that satisfies its `parameters`);
- `"required"`: one call, or with `parallel_tool_calls` (the default) one or more;
- `"auto"` (OpenAI's default when tools are sent): plain text, or calls as for `"required"`, decided by the
  reply's first character: plain text never starts with the marker's `<` (Falcon's replies start with a
  space), a reply that does is a call. So streamed text never shows a call's markup, and a first token
  decides (a client can push it either way with `logit_bias`).
Earlier calls in the conversation are rendered in the same format (`chat.render`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine import GrammarSpec
from .chat import TOOL_CALL_MARKER, written_call
from .protocol import Tool

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
Choice = Literal["named", "required", "auto"]


@dataclass(frozen=True)
class ToolMode:
    """How a reply relates to the tools: `choice`, the named function (for "named"), the tools' names, and
    whether several calls may come at once."""

    choice: Choice
    tools: tuple[str, ...]
    named: str | None = None
    parallel: bool = True


def parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or NO_ARGUMENTS


def tool_grammar(mode: ToolMode, tools: list[Tool]) -> GrammarSpec:
    """The grammar a reply in `mode` keeps."""
    by_name = {t.function.name: t for t in tools}
    if mode.choice == "named":
        assert mode.named is not None
        return GrammarSpec("json_schema", json.dumps(parameters(by_name[mode.named])))
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    call = json.dumps({"x-guidance": {"whitespace_flexible": False}, "anyOf": calls})
    rules = [
        "%llguidance {}",
        "start: TEXT | calls" if mode.choice == "auto" else "start: calls",
        "calls: call+" if mode.parallel else "calls: call",
        f"call: {json.dumps(TOOL_CALL_MARKER)} json_call",
        f"json_call: %json {call}",
    ]
    if mode.choice == "auto":  # any text that does not start with the marker's first character (or none)
        rules.append(f"TEXT: /([^{re.escape(TOOL_CALL_MARKER[0])}](.|\\n)*)?/")
    return GrammarSpec("lark", "\n".join(rules))


def tools_prompt(mode: ToolMode, tools: list[Tool]) -> str:
    """What the model is told of the tools and of the form its answer takes (the grammar does the rest)."""
    example = written_call("<function name>", "<its arguments as JSON>")
    if mode.choice == "named":
        lines = [f"Answer with the arguments of a call of the function {mode.named}, as JSON."]
    else:
        several = " For several calls, write one after the other." if mode.parallel else ""
        how = f"To call one, answer with {example}.{several}"
        lines = ([f"You can call these functions. {how} Otherwise answer in plain text."] if mode.choice == "auto"
                 else [f"Answer by calling these functions. {how}"])
    for t in tools:
        description = f": {t.function.description}" if t.function.description else ""
        lines.append(f"- {t.function.name}{description}. Parameters: {json.dumps(parameters(t))}")
    return "\n".join(lines)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    """A call read from a reply: its name and the arguments' text so far (partial until `complete`)."""

    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class Piece:
    """What a piece of reply text turned out to be: `content`, or a call's start (`call` with its index,
    id and name) and then pieces of its `arguments`."""

    content: str = ""
    call: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str = ""


_NAME = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"arguments":')


@dataclass
class ToolCallParser:
    """Reads one choice's reply text, as it comes, into content and tool calls (`feed`, then `finish`)."""

    mode: ToolMode
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    _state: str = "undecided"  # undecided | text | head | arguments | after | between
    _buffer: str = ""  # text not yet placed: a possible marker, or a call's head
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def __post_init__(self) -> None:
        if self.mode.choice == "named":
            assert self.mode.named is not None
            self.calls.append(ParsedCall(new_call_id(), self.mode.named))
            self._state = "named"
        elif self.mode.choice == "required":
            self._state = "between"

    @property
    def opening(self) -> Piece | None:
        """A named call's start, known before any text."""
        if self.mode.choice != "named":
            return None
        call = self.calls[0]
        return Piece(call=0, id=call.id, name=call.name)

    def feed(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        for char in text:
            self._step(char, pieces)
        return _merged(pieces)

    def finish(self) -> list[Piece]:
        """The reply has ended: text held back as a possible marker was content after all."""
        if self._state == "undecided" and self._buffer:
            self.content += self._buffer
            piece, self._buffer = Piece(content=self._buffer), ""
            self._state = "text"
            return [piece]
        return []

    def _step(self, char: str, pieces: list[Piece]) -> None:
        state = self._state
        if state == "text":
            self.content += char
            pieces.append(Piece(content=char))
        elif state == "named":
            self.calls[0].arguments += char
            pieces.append(Piece(call=0, arguments=char))
        elif state in ("undecided", "between"):
            self._buffer += char
            if self._buffer == TOOL_CALL_MARKER:
                self._state, self._buffer = "head", ""
            elif not TOOL_CALL_MARKER.startswith(self._buffer):
                if state == "undecided":  # plain text: all of it, from the start
                    self._state = "text"
                    self.content += self._buffer
                    pieces.append(Piece(content=self._buffer))
                self._buffer = ""  # (between calls the grammar allows nothing else)
        elif state == "head":
            self._buffer += char
            found = _NAME.fullmatch(self._buffer)
            if found:
                call = ParsedCall(new_call_id(), json.loads(found.group(1)))
                self.calls.append(call)
                pieces.append(Piece(call=len(self.calls) - 1, id=call.id, name=call.name))
                self._state, self._buffer, self._depth = "arguments", "", 0
        elif state == "arguments":
            self.calls[-1].arguments += char
            pieces.append(Piece(call=len(self.calls) - 1, arguments=char))
            self._track(char)
            if self._depth == 0:
                self._state = "after"
        elif state == "after" and char == "}":  # the end of the call's object
            self.calls[-1].complete = True
            self._state = "between"

    def _track(self, char: str) -> None:
        """Follow the arguments' JSON nesting, to know where they end."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Consecutive pieces of the same content or the same call's arguments, joined."""
    merged: list[Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last is not None and piece.name is None and last.call == piece.call and (
                (piece.call is None and last.name is None) or (piece.call is not None and not piece.content)):
            last.content += piece.content
            last.arguments += piece.arguments
        else:
            merged.append(piece)
    return merged
