"""Grammars that would crash, exhaust or stall the server are refused by name: the cheap bounds before any
work, the sandbox (a child process with a memory cap and a deadline) for what gets past them. The compiler
serves on after each; compiles never wait behind the event loop's default thread pool."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest

from falcon_service.engine.grammar import GrammarCompiler, GrammarLimits, GrammarSpec, UnsupportedGrammar

GOOD = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                              "required": ["a"], "additionalProperties": False}))


def chain(rules: int) -> GrammarSpec:
    """A Lark grammar of `rules` rules, each calling the next: deep recursion in the grammar engine."""
    body = "\n".join(f'r{i}: "t{i}" r{i + 1} | "u{i}"' for i in range(rules))
    return GrammarSpec("lark", f'start: r0\n{body}\nr{rules}: "end"')


def array(**counts: int) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps({"type": "array", "items": {"type": "integer"}, **counts}))


def refused(compiler: GrammarCompiler, spec: GrammarSpec) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(UnsupportedGrammar) as err:
        compiler.compile(spec)
    return str(err.value), time.monotonic() - started


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer)
    yield compiler
    compiler.close()


@pytest.mark.parametrize("spec,mentions", [
    (chain(20_000), "the limit is 100,000"),  # segfaulted the worker
    (array(minItems=1_000_000_000), "`minItems` is 1000000000"),  # 18 GB, then the OOM killer
    (array(maxItems=100_000_000), "`maxItems` is 100000000"),
    (GrammarSpec("choice", json.dumps([f"choice {i}" for i in range(5_000)])), "5,000 choices; the limit is 1,000"),
])
def test_what_is_over_a_bound_is_refused_naming_it_before_any_work(compiler, spec, mentions):
    message, seconds = refused(compiler, spec)
    assert mentions in message, message
    assert seconds < 1.0, "a bound is checked before compiling (a timing bound on a refusal, not a speed goal)"


@pytest.mark.parametrize("spec,mentions", [
    # 200 patterns all of which a string must match: 26 s and 2.5 GB of the server's before
    (GrammarSpec("json_schema", json.dumps({"type": "string", "allOf": [
        {"pattern": f".*{chr(97 + i % 26)}{i}.*"} for i in range(200)]})), "took longer than 3 s"),
    # a `$ref` that only refers to itself: a grammar of no text, which answered 200 with content ""
    (GrammarSpec("json_schema", json.dumps({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}})),
     "no reply can satisfy it"),
])
def test_what_the_bounds_let_through_the_sandbox_refuses(compiler, spec, mentions):
    message, _ = refused(compiler, spec)
    assert mentions in message, message
    assert compiler.compile(GOOD) is not None  # and it compiles on


def test_a_compile_that_crashes_or_outgrows_its_memory_takes_only_the_sandbox(tiny_tokenizer):
    """With the cheap bounds raised out of the way: the chained grammar overflows the grammar engine's
    stack (a segfault) and a huge `maxItems` allocates past the cap, each in the sandbox; this process
    lives on, the sandbox is replaced, and the next grammar compiles."""
    limits = GrammarLimits(max_source_chars=10**7, max_count=10**12, memory_bytes=256 << 20)
    compiler = GrammarCompiler(tiny_tokenizer, limits, workers=1)
    try:
        message, _ = refused(compiler, chain(20_000))
        assert "overflowed the grammar engine" in message, message
        message, _ = refused(compiler, array(maxItems=100_000_000))
        assert "needed more than 256 MiB, the limit" in message, message
        assert compiler.compile(GOOD) is not None
    finally:
        compiler.close()


def test_the_sandbox_is_a_process_of_its_own_that_a_refusal_replaces(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer, GrammarLimits(max_source_chars=10**7), workers=1)
    try:
        compiler.start()
        (box,) = compiler._all_sandboxes
        first = box.pid
        assert first is not None and first != os.getpid()
        refused(compiler, chain(20_000))
        compiler.compile(GOOD)
        assert box.pid not in (None, first)
    finally:
        compiler.close()
    assert box.pid is None


async def test_compiles_do_not_wait_behind_the_default_thread_pool(compiler):
    """Tokenizing runs on the event loop's default pool (`asyncio.to_thread`); with every thread of it busy,
    a grammar still compiles (on the compiler's own threads)."""
    release = threading.Event()
    loop = asyncio.get_running_loop()
    workers = min(32, (os.cpu_count() or 1) + 4)  # the default pool's size
    blockers = [loop.run_in_executor(None, release.wait, 30) for _ in range(workers + 4)]
    try:
        spec = GrammarSpec("regex", "[a-z]{2}-[0-9]{4}")
        grammar = await asyncio.wait_for(compiler.compile_async(spec), 20)
        assert grammar.spec == spec
    finally:
        release.set()
        await asyncio.gather(*blockers)
