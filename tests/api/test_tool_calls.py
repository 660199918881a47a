"""The tool-call format read back: a reply's text in any pieces gives the same content and calls as whole,
calls end where their JSON ends (braces in strings and escapes too), and the grammar of each mode accepts
that format and nothing else."""

from __future__ import annotations

import json
import random

import pytest

from falcon_service.api.chat import written_call
from falcon_service.api.protocol import FunctionDefinition, Tool
from falcon_service.api.tool_calls import ToolCallParser, ToolMode, tool_grammar
from falcon_service.engine.grammar import GrammarCompiler

WEATHER = Tool(function=FunctionDefinition(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "tags": {"type": "array",
                                     "items": {"type": "object", "properties": {"t": {"type": "string"}}}}},
    "required": ["city"], "additionalProperties": False}))
TIME = Tool(function=FunctionDefinition(name="get_time"))
AUTO = ToolMode("auto", ("get_weather", "get_time"))
TRICKY = '{"city":"a}b{\\"c\\\\","tags":[{"t":"]}"}]}'  # braces and quotes inside strings, an escaped backslash


def parse(mode: ToolMode, text: str, pieces: int, seed: int = 0) -> tuple[str, list[tuple[str, str, bool]], list]:
    """Feed `text` in `pieces` random pieces; return content, calls (name, arguments, complete), and the pieces
    emitted."""
    parser = ToolCallParser(mode)
    rnd = random.Random(seed)
    cuts = sorted(rnd.sample(range(1, len(text)), min(pieces - 1, len(text) - 1))) if len(text) > 1 else []
    emitted = []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        emitted += parser.feed(text[start:end])
    emitted += parser.finish()
    return parser.content, [(c.name, c.arguments, c.complete) for c in parser.calls], emitted


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_calls_in_any_pieces_give_the_same_calls(pieces):
    text = written_call("get_weather", TRICKY) + written_call("get_time", "{}")
    content, calls, emitted = parse(AUTO, text, pieces)
    assert content == "" and calls == [("get_weather", TRICKY, True), ("get_time", "{}", True)]
    # the pieces say the same: each call's start once (id and name), then its arguments
    starts = [(p.call, p.name) for p in emitted if p.name is not None]
    assert starts == [(0, "get_weather"), (1, "get_time")]
    for i, (_, arguments, _) in enumerate(calls):
        assert "".join(p.arguments for p in emitted if p.call == i) == arguments
    assert not any(p.content for p in emitted)


@pytest.mark.parametrize("pieces", [1, 4, 1000])
def test_plain_text_is_content_from_its_first_character(pieces):
    text = " Falcons dive at 300 km/h; <tool_call> in the middle is text."
    content, calls, emitted = parse(AUTO, text, pieces)
    assert content == text and calls == [] and "".join(p.content for p in emitted) == text


def test_a_cut_call_keeps_its_name_and_the_arguments_so_far():
    text = written_call("get_weather", TRICKY)[:-9]
    _, calls, _ = parse(AUTO, text, 5)
    assert calls == [("get_weather", TRICKY[:-8], False)]
    _, calls, _ = parse(AUTO, '<tool_call>{"name":"get_wea', 3)  # no name yet: no call
    assert calls == []


def test_a_named_call_is_all_arguments():
    mode = ToolMode("named", ("get_weather",), named="get_weather")
    parser = ToolCallParser(mode)
    assert parser.opening is not None and parser.opening.name == "get_weather"
    parser.feed(TRICKY[:7])
    parser.feed(TRICKY[7:])
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", TRICKY)]


def test_a_held_back_marker_start_that_ends_the_reply_is_content():
    content, calls, emitted = parse(AUTO, "<tool", 2)
    assert content == "<tool" and calls == [] and "".join(p.content for p in emitted) == "<tool"


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer, workers=1)
    yield compiler
    compiler.close()


def accepts(compiler: GrammarCompiler, mode: ToolMode, text: str, tokenizer) -> bool:
    matcher = compiler.compile(tool_grammar(mode, [WEATHER, TIME])).matcher()._matcher
    return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) and (
        matcher.is_accepting())


@pytest.mark.parametrize("mode,text,ok", [
    (AUTO, " Plain text.", True),
    (AUTO, written_call("get_weather", '{"city":"Rome"}'), True),
    (AUTO, written_call("get_weather", '{"city":"Rome"}') + written_call("get_time", "{}"), True),
    (ToolMode("auto", ("get_weather", "get_time"), parallel=False),
     written_call("get_weather", '{"city":"Rome"}') + written_call("get_time", "{}"), False),
    (AUTO, "<b>bold</b>", False),  # text never starts with the marker's first character
    (AUTO, written_call("get_weather", '{"town":"Rome"}'), False),  # arguments keep the schema
    (AUTO, written_call("nope", "{}"), False),
    (AUTO, '<tool_call>{"name": "get_time", "arguments": {}}', False),  # compact JSON only
    (ToolMode("required", ("get_weather", "get_time")), " Plain text.", False),
    (ToolMode("required", ("get_weather", "get_time")), written_call("get_time", "{}"), True),
])
def test_each_mode_grammar_keeps_the_format(compiler, tiny_tokenizer, mode, text, ok):
    assert accepts(compiler, mode, text, tiny_tokenizer) is ok
    if ok:
        json.dumps(parse(mode, text, 3)[1])  # and it reads back
