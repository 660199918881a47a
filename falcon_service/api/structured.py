"""Structured outputs: what a request asks its reply to be, as a grammar for the engine, and tool-call
replies turned into OpenAI's `tool_calls`.

Sources (at most one per request): `response_format` (`json_object`, `json_schema`); vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older `guided_json`,
`guided_regex`, `guided_choice`; `tools` with `tool_choice` `"required"` or a named function.
`tool_choice: "auto"` is refused: Falcon-7B-Instruct was not trained to decide by itself whether to
call a tool, so letting it decide would be a coin toss dressed as a feature.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ..engine.grammar import GrammarSpec
from .errors import bad_request
from .protocol import ChatCompletionRequest, CompletionRequest, FunctionCall, Tool, ToolCall

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolMode:
    """A reply that is a tool call: of `named` (its arguments are the reply), or of one of `tools` (the reply
    is `{"name": ..., "arguments": {...}}`)."""

    named: str | None
    tools: tuple[str, ...]


@dataclass(frozen=True)
class Constraint:
    spec: GrammarSpec
    param: str  # the request field it came from (named in errors)
    tool: ToolMode | None = None


def constraint(body: ChatCompletionRequest | CompletionRequest) -> Constraint | None:
    """The one constraint a request asks for, if any; a 400 for two at once or for what is not supported."""
    found: list[Constraint] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(Constraint(GrammarSpec("json_object"), "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None and fmt.json_schema.schema_ is not None
        found.append(Constraint(GrammarSpec("json_schema", json.dumps(fmt.json_schema.schema_)), "response_format"))
    if body.structured_outputs is not None:
        found.append(Constraint(_structured(body.structured_outputs.model_dump(by_alias=True, exclude_none=True)),
                                "structured_outputs"))
    for field, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
        value = getattr(body, field)
        if value is not None:
            found.append(Constraint(_structured({kind: value}), field))
    if isinstance(body, ChatCompletionRequest):
        tool = _tool_constraint(body)
        if tool is not None:
            found.append(tool)
    elif "tools" in (body.model_extra or {}):
        raise bad_request("`tools` are for chat completions.", param="tools", code="unsupported_parameter")
    if len(found) > 1:
        raise bad_request(f"Only one of {', '.join(c.param for c in found)} may constrain a reply.",
                          param=found[1].param)
    return found[0] if found else None


def _structured(fields: dict[str, Any]) -> GrammarSpec:
    if fields.get("json_object"):
        return GrammarSpec("json_object")
    if "json" in fields:
        schema = fields["json"]
        return GrammarSpec("json_schema", schema if isinstance(schema, str) else json.dumps(schema))
    if "regex" in fields:
        return GrammarSpec("regex", fields["regex"])
    if "choice" in fields:
        return GrammarSpec("choice", json.dumps(list(fields["choice"])))
    return GrammarSpec("lark", fields["grammar"])


def _tool_constraint(body: ChatCompletionRequest) -> Constraint | None:
    tools, choice = body.tools or [], body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("`tool_choice` needs `tools`.", param="tool_choice")
        return None
    choice = choice or "auto"  # OpenAI's default when tools are given
    if choice == "none":
        return None
    if choice == "auto":
        raise bad_request(
            "`tool_choice: \"auto\"` is not supported: Falcon-7B-Instruct was not trained to decide by itself "
            "whether to call a tool. Send \"required\" (the reply is a call of one of the tools), name a function "
            "({\"type\": \"function\", \"function\": {\"name\": ...}}), or \"none\".",
            param="tool_choice", code="unsupported_parameter")
    by_name = {t.function.name: t for t in tools}
    if len(by_name) != len(tools):
        raise bad_request("tool names must be distinct", param="tools")
    if choice == "required" and len(tools) > 1:
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                  "arguments": _parameters(t)},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        return Constraint(GrammarSpec("json_schema", json.dumps({"anyOf": calls})), "tools",
                          ToolMode(None, tuple(by_name)))
    name = tools[0].function.name if choice == "required" else choice.function.name  # type: ignore[union-attr]
    if name not in by_name:
        raise bad_request(f"tool_choice names `{name}`, which is not among the tools", param="tool_choice")
    return Constraint(GrammarSpec("json_schema", json.dumps(_parameters(by_name[name]))), "tools",
                      ToolMode(name, tuple(by_name)))


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or NO_ARGUMENTS


def tool_call(mode: ToolMode, text: str) -> ToolCall:
    """The call a complete constrained reply makes."""
    if mode.named is not None:
        name, arguments = mode.named, text
    else:
        call = json.loads(text)
        name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False, separators=(",", ":"))
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tools_prompt(tools: list[Tool]) -> str:
    """What the model is told of the tools (the grammar does the rest)."""
    lines = ["You can call these functions; answer with the arguments of a call as JSON."]
    for t in tools:
        description = f": {t.function.description}" if t.function.description else ""
        lines.append(f"- {t.function.name}{description}. Parameters: {json.dumps(_parameters(t))}")
    return "\n".join(lines)
