"""What a reply may be constrained to (`GrammarSpec`), the bounds a spec must keep, and its llguidance grammar.

No torch here: the compile sandbox (`grammar_sandbox.py`), a process of its own, imports this module alone.

Bounds, because a request must not make the server compile without limit (measured with llguidance 1.6 on
a 2-core machine): a Lark chain of 3,000 rules overflows the compiler's stack (a segfault), a JSON schema's
`minItems: 1e9` or `maxItems: 1e8` grows the compiler by gigabytes, an `allOf` of 20 `.*x.*` patterns takes
26 s and 2.5 GB, and 50,000 choices take 26 s on Falcon's 65,024-token vocabulary. The cheap checks below
refuse the obvious cases by name before any work; the sandbox (a separate process with a memory cap and a
deadline) catches whatever they let through, so a compile can neither crash nor starve the server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["json_schema", "json_object", "regex", "choice", "lark"]
# compact JSON: no whitespace between tokens, so a reply cannot spend its tokens on spaces
JSON_OPTIONS = {"whitespace_flexible": False}
ERROR_CHARS = 600  # an error message from the grammar engine is cut to this many characters


class UnsupportedGrammar(ValueError):
    """The grammar (a schema, a regex...) is invalid, too large, or uses what the grammar engine cannot do;
    the message says which (and names the limit). (The API layer names the request field it came from.)"""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain a reply to: `source` is the schema's JSON, the regex, the choices as a JSON list
    of strings, or the Lark grammar (llguidance's Lark, which may embed JSON schemas with `%json`)."""

    kind: Kind
    source: str = ""


@dataclass(frozen=True)
class GrammarLimits:
    """How much one grammar may ask of the server."""

    max_source_chars: int = 100_000  # the schema, regex or grammar as sent
    max_choices: int = 1_000  # strings of a `choice` (OpenAI bounds a schema's enum values at 1,000)
    max_count: int = 10_000  # minItems, maxItems, minProperties, maxProperties, minContains, maxContains
    compile_seconds: float = 3.0  # one compile, in the sandbox
    memory_bytes: int = 1 << 30  # what one compile may allocate, in the sandbox
    lexer_states: int = 50_000  # llguidance's own bound on its lexer (its default, 250,000, is 250-500 MB)


_COUNT = re.compile(r'"((?:min|max)(?:Items|Properties|Contains))"\s*:\s*(-?[0-9][0-9.eE+]*)')


def check_bounds(spec: GrammarSpec, limits: GrammarLimits) -> None:
    """Refuse, naming the limit, a spec over the cheap bounds (before any compile work)."""
    if len(spec.source) > limits.max_source_chars:
        raise UnsupportedGrammar(f"it is {len(spec.source):,} characters long; the limit is "
                                 f"{limits.max_source_chars:,}")
    if spec.kind == "choice":
        count = len(json.loads(spec.source))
        if count > limits.max_choices:
            raise UnsupportedGrammar(f"it has {count:,} choices; the limit is {limits.max_choices:,}")
    if spec.kind in ("json_schema", "lark"):  # (a Lark grammar may embed schemas)
        for keyword, value in _COUNT.findall(spec.source):
            try:
                number = float(value)
            except ValueError:
                continue
            if number > limits.max_count:
                raise UnsupportedGrammar(f"`{keyword}` is {value}; this server compiles counts up to "
                                         f"{limits.max_count:,}")


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar of a spec (not yet checked); raises `ValueError` for a malformed one."""
    from llguidance import LLMatcher

    if spec.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        # each choice a Lark string literal (JSON string escaping is Lark's)
        choices = json.loads(spec.source)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    return LLMatcher.grammar_from_lark(spec.source)


def parser_limits(limits: GrammarLimits):
    """llguidance's own limits: the lexer's states bounded, and errors that do not dump the parser's state."""
    from llguidance import LLParserLimits

    return LLParserLimits(max_lexer_states=limits.lexer_states, verbose_errors=False)


def short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= ERROR_CHARS else message[:ERROR_CHARS] + "..."


def build_matcher(spec: GrammarSpec, tokenizer, limits: GrammarLimits):
    """The llguidance matcher of `spec` in its start state, checked: a grammar that is invalid, breaks a limit
    or that no reply can satisfy raises `UnsupportedGrammar` saying why. Deterministic: the sandbox runs it to
    prove a spec safe, then the server runs it again for the matcher it keeps."""
    from llguidance import LLMatcher

    try:
        text = grammar_text(spec)
    except ValueError as exc:
        raise UnsupportedGrammar(short(str(exc))) from None
    llg_limits = parser_limits(limits)
    error = LLMatcher.validate_grammar(text, tokenizer, limits=llg_limits)
    if error:
        raise UnsupportedGrammar(short(error))
    matcher = LLMatcher(tokenizer, text, log_level=0, limits=llg_limits)
    if matcher.is_error():
        raise UnsupportedGrammar(short(matcher.get_error()))
    probe = matcher.deep_copy()
    allowed = any(probe.compute_bitmask())
    if probe.is_error() or not (allowed or probe.is_accepting()):
        # e.g. a `$ref` that only refers to itself: a grammar of no text at all
        raise UnsupportedGrammar("no reply can satisfy it (it matches no text)")
    return matcher
