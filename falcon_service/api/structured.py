"""Structured outputs: what a request asks its reply to be, as a grammar for the engine.

Sources (at most one per request): `response_format` (`json_object`, `json_schema`); vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older `guided_json`,
`guided_regex`, `guided_choice`; `tools` with `tool_choice` `"auto"` (the default when tools are sent),
`"required"` or a named function (`tool_calls.py`: the format, the grammar, the reply read back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..engine import GrammarSpec
from .errors import bad_request
from .protocol import ChatCompletionRequest, CompletionRequest, Tool
from .tool_calls import ToolMode, tool_grammar


@dataclass(frozen=True)
class Constraint:
    spec: GrammarSpec
    param: str  # the request field it came from (named in errors)
    tool: ToolMode | None = None
    tools: tuple[Tool, ...] = ()  # (with `tool`) what the model is told of


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
    names = tuple(t.function.name for t in tools)
    if len(set(names)) != len(names):
        raise bad_request("tool names must be distinct", param="tools")
    parallel = body.parallel_tool_calls is not False
    if choice in ("auto", "required"):
        mode = ToolMode(choice, names, parallel=parallel)  # type: ignore[arg-type]
    else:
        name = choice.function.name  # type: ignore[union-attr]
        if name not in names:
            raise bad_request(f"tool_choice names `{name}`, which is not among the tools", param="tool_choice")
        mode = ToolMode("named", names, named=name, parallel=False)
    return Constraint(tool_grammar(mode, tools), "tools", mode, tuple(tools))
