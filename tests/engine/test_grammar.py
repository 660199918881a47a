"""Constrained decoding in the engine: the random-weight model, sampling freely, can only produce what the
grammar allows; unconstrained rows beside it are untouched; bad grammars are refused saying why."""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading

import jsonschema
import pytest
import torch

from falcon_service.engine.engine import Engine, EngineError, FinishReason, GenerationRequest, SamplingParams
from falcon_service.engine.grammar import GrammarCompiler, GrammarSpec, UnsupportedGrammar, allowed_tokens
from falcon_service.engine.options import IDLE_PREFILL_TOKENS, default_prefill_tokens
from falcon_service.engine.scheduler import BatchLimits

# the defaults users run on a CPU: 128 prompt tokens a step (512 while nothing decodes)
PREFILL = default_prefill_tokens("cpu")
LIMITS = BatchLimits(max_batch_size=16, max_batch_tokens=32 * 2048, max_prefill_tokens=PREFILL, max_queue_size=64,
                     idle_prefill_tokens=IDLE_PREFILL_TOKENS)
TIMEOUT = 60.0
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                    "required": ["city"], "additionalProperties": False},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["name", "age", "role", "active", "score", "tags", "zip", "note", "address", "level"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tiny_tokenizer)


async def generate(engine: Engine, prompt: list[int], params: SamplingParams, n: int = 1) -> dict[int, tuple[str, str]]:
    out: dict[int, list[str]] = {}
    stream = engine.submit(GenerationRequest(tuple(prompt), params, n))
    async with asyncio.timeout(TIMEOUT):
        async for event in stream:
            out.setdefault(event.index, []).append(event.text)
    return {i: ("".join(texts), stream.finish_reasons[i]) for i, texts in out.items()}


CALL = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
         "minimum": 1, "maximum": 9}}, "required": ["city", "days"], "additionalProperties": False}


def prompt_of(length: int, seed: int) -> list[int]:
    """`length` token ids of no meaning (and never EOS)."""
    rnd = random.Random(seed)
    return [rnd.randrange(3, 500) for _ in range(length)]


async def drive(engine: Engine, prompt: list[int], params: SamplingParams, n: int = 1
                ) -> tuple[dict[int, tuple[str, str]], int]:
    """`generate`, and the prompt tokens the prefix cache held."""
    out: dict[int, list[str]] = {}
    stream = engine.submit(GenerationRequest(tuple(prompt), params, n))
    async with asyncio.timeout(TIMEOUT):
        async for event in stream:
            out.setdefault(event.index, []).append(event.text)
    return {i: ("".join(texts), stream.finish_reasons[i]) for i, texts in out.items()}, stream.cached_tokens


# every way a constrained row starts, at the default prefill budget: (prompt tokens, what runs beside it,
# prompt tokens cached before it). A prompt over the budget goes in chunks; while rows decode its chunks
# are the budget, while none does they are longer.
START_PATHS = {
    "whole": (40, None, 0),
    "chunked-idle": (IDLE_PREFILL_TOKENS + 200, None, 0),
    "chunked-beside-decoding": (PREFILL * 2 + 50, "decoding", 0),
    "admitted-beside-decoding": (40, "decoding", 0),
    "after-cached-prefix-whole": (PREFILL * 2 + 30, None, PREFILL * 2),
    "after-cached-prefix-chunked": (PREFILL * 4, "decoding", PREFILL),
}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("path", list(START_PATHS))
async def test_a_constrained_reply_is_valid_however_its_prompt_is_prefilled(tiny_model, tiny_tokenizer, compiler,
                                                                            path, overlap):
    """Whole, in chunks, after a cached prefix, admitted beside decoding rows, n > 1: every reply validates.
    (A prompt prefilled in chunks used to give `{{` with `stop`: its first token was sampled after the last
    chunk, then the batch it joined decoded it again before the grammar had seen that token.)"""
    length, beside, cached = START_PATHS[path]
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(CALL)))
    engine = Engine(tiny_model, tiny_tokenizer, LIMITS, overlap=overlap, prefix_caching=True)
    prompt = prompt_of(length, seed=length)
    try:
        if cached:  # an earlier request leaves the prefix behind
            await drive(engine, prompt[:cached] + prompt_of(20, seed=1), SamplingParams(max_tokens=2, temperature=0.0))
        free = None
        if beside == "decoding":
            free = asyncio.create_task(drive(engine, prompt_of(30, seed=2), SamplingParams(
                max_tokens=400, temperature=0.0, ignore_eos=True)))
            while engine.stats()["running"] == 0:
                await asyncio.sleep(0.005)
        replies, reused = await drive(engine, prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=3,
                                                                     grammar=grammar), n=2)
        if free is not None:
            assert not free.done(), "the unconstrained stream should still be decoding beside it"
            await free
    finally:
        engine.shutdown()
    assert reused == cached
    assert len(replies) == 2
    for text, reason in replies.values():
        assert reason == FinishReason.STOP, (reason, text)
        jsonschema.validate(json.loads(text), CALL)


class BrokenSampler:
    """Fault injection: the sampler hands a constrained row a token its grammar refuses (what a mask that
    disagrees with the matcher would do). A correct engine never does this; its failure must show."""

    def __init__(self, token: int) -> None:
        from falcon_service.engine import engine as engine_module

        self.token, self.real = token, engine_module.sample

    def __call__(self, logits, states, io=None):
        sampled = self.real(logits, states, io)
        for row, state in enumerate(states):
            if state.matcher is not None:
                sampled.tokens[row] = self.token
        return sampled


async def test_a_token_the_grammar_rejects_fails_the_request_never_a_stop(tiny_model, tiny_tokenizer, compiler,
                                                                          monkeypatch):
    from falcon_service.engine import engine as engine_module

    rejected = tiny_tokenizer.encode("z", add_special_tokens=False)[0]  # a reply of `{...}` never starts with z
    monkeypatch.setattr(engine_module, "sample", BrokenSampler(rejected))
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(CALL)))

    class Counter:
        rejections = 0

        def on_step(self, *_: int) -> None: ...
        def on_rejected(self) -> None: ...
        def on_request_done(self, record) -> None:
            self.reason = record.finish_reason

        def on_grammar_rejection(self) -> None:
            self.rejections += 1

    counter = Counter()
    engine = Engine(tiny_model, tiny_tokenizer, LIMITS, observer=counter)
    try:
        stream = engine.submit(GenerationRequest((5, 6, 7), SamplingParams(max_tokens=20, seed=1, grammar=grammar), 2))
        texts: list[str] = []
        with pytest.raises(EngineError, match="grammar"):
            async with asyncio.timeout(TIMEOUT):
                async for event in stream:
                    texts.append(event.text)
        assert "".join(texts) == ""  # the rejected token's text never reaches the client
        assert counter.rejections == 1 and counter.reason == FinishReason.ERROR
        # the engine serves on, and a free request beside it was never touched
        monkeypatch.undo()
        replies, _ = await drive(engine, [5, 6, 7], SamplingParams(max_tokens=40, seed=1, grammar=grammar))
        jsonschema.validate(json.loads(replies[0][0]), CALL)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
async def test_every_sampled_reply_validates_against_its_schema(tiny_model, tiny_tokenizer, compiler, overlap):
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(PERSON)))
    engine = Engine(tiny_model, tiny_tokenizer, LIMITS, overlap=overlap)
    try:
        prompt = tiny_tokenizer.encode("Describe a falcon as JSON:")
        runs = [generate(engine, prompt, SamplingParams(max_tokens=300, temperature=1.0, seed=s, grammar=grammar),
                         n=2) for s in range(6)]
        results = await asyncio.gather(*runs)
    finally:
        engine.shutdown()
    replies = [reply for result in results for reply in result.values()]
    assert len(replies) == 12
    assert len({text for text, _ in replies}) > 6, "seeded replies should differ"
    for text, reason in replies:
        assert reason == FinishReason.STOP, (reason, text)
        jsonschema.validate(json.loads(text), PERSON)


async def test_regex_choice_and_lark(tiny_model, tiny_tokenizer, compiler):
    engine = Engine(tiny_model, tiny_tokenizer, LIMITS)
    prompt = tiny_tokenizer.encode("Answer:")
    specs = {
        "regex": (GrammarSpec("regex", r"[A-Z]{2}-[0-9]{3}( ok)?"),
                  lambda t: re.fullmatch(r"[A-Z]{2}-[0-9]{3}( ok)?", t)),
        "choice": (GrammarSpec("choice", json.dumps(["yes", "no", "mai\"be"])), lambda t: t in ("yes", "no", 'mai"be')),
        "lark": (GrammarSpec("lark", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'),
                 lambda t: re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", t)),
    }
    try:
        for spec, valid in specs.values():
            grammar = compiler.compile(spec)
            for seed in range(5):
                text, reason = (await generate(engine, prompt, SamplingParams(
                    max_tokens=40, temperature=1.0, seed=seed, grammar=grammar)))[0]
                assert valid(text) and reason == FinishReason.STOP, (spec, text, reason)
    finally:
        engine.shutdown()


async def test_unconstrained_rows_beside_constrained_ones_are_untouched(tiny_model, tiny_tokenizer, compiler):
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(PERSON)))
    engine = Engine(tiny_model, tiny_tokenizer, LIMITS)
    try:
        prompt = tiny_tokenizer.encode("The falcon is a bird of prey.")
        free = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        alone = await generate(engine, prompt, free)
        together = await asyncio.gather(generate(engine, prompt, free), *(generate(
            engine, prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=s, grammar=grammar))
            for s in range(4)))
    finally:
        engine.shutdown()
    assert together[0] == alone
    assert all(json.loads(r[0][0]) for r in together[1:])


async def test_a_reply_cut_by_max_tokens_says_length(tiny_model, tiny_tokenizer, compiler):
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(PERSON)))
    engine = Engine(tiny_model, tiny_tokenizer, LIMITS)
    try:
        text, reason = (await generate(engine, [5, 6, 7], SamplingParams(max_tokens=5, temperature=1.0, seed=1,
                                                                           grammar=grammar)))[0]
    finally:
        engine.shutdown()
    assert reason == FinishReason.LENGTH and text.startswith("{")


@pytest.mark.parametrize("spec,mentions", [
    (GrammarSpec("json_schema", json.dumps({"type": "object", "if": {"required": ["a"]}, "then": {}})), "if"),
    (GrammarSpec("regex", "a(?=b)"), "look"),
    (GrammarSpec("json_schema", "{not json"), ""),
    (GrammarSpec("lark", "start: missing_rule"), "missing_rule"),
])
def test_an_unsupported_grammar_is_refused_saying_what(compiler, spec, mentions):
    with pytest.raises(UnsupportedGrammar) as err:
        compiler.compile(spec)
    assert mentions.lower() in str(err.value).lower() and str(err.value)


def test_compiled_grammars_are_cached_and_compiled_by_the_caller(compiler):
    spec = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    threads = []
    first = compiler.compile(spec)
    worker = threading.Thread(target=lambda: threads.append(compiler.compile(spec) is first))
    worker.start()
    worker.join()
    assert threads == [True]


def test_the_bitmask_unpacks_to_the_allowed_tokens():
    bits = torch.zeros(2, 2, dtype=torch.int32)
    bits[0, 0] = (1 << 3) | 1  # tokens 0 and 3
    bits[1, 1] = -(2**31)  # bit 31 of the second word: token 63
    allowed = allowed_tokens(bits, 50)
    assert allowed.shape == (2, 50)
    assert allowed[0].nonzero().flatten().tolist() == [0, 3]
    assert allowed[1].nonzero().flatten().tolist() == []  # token 63 is past the vocabulary
    assert allowed_tokens(bits, 64)[1].nonzero().flatten().tolist() == [63]


def test_masks_of_several_rows_in_one_call_equal_each_alone_and_load_no_compiler(tiny_checkpoint):
    """The sampler fills all constrained rows at once; and filling a mask must not import
    `llguidance.torch`, whose import runs `torch.compile` (inductor: seconds on the engine thread)."""
    script = f"""
import sys, torch
from transformers import AutoTokenizer
from falcon_service.engine.grammar import GrammarCompiler, GrammarSpec, fill_masks
compiler = GrammarCompiler(AutoTokenizer.from_pretrained({str(tiny_checkpoint)!r}))
words = (compiler.vocab_size + 31) // 32
specs = [GrammarSpec("json_object"), GrammarSpec("regex", "[0-9]{{3}}"), GrammarSpec("choice", '["yes", "no"]')]
matchers = [compiler.compile(s).matcher() for s in specs]
matchers[0].accept(compiler.compile(specs[0]).matcher()._matcher.compute_ff_tokens()[0])  # past the "{{"
import falcon_service.engine.grammar as grammar
before = set(sys.modules)  # (a platform's torch or transformers may load inductor at import: not ours)
together = torch.zeros(len(matchers), words, dtype=torch.int32)
fill_masks(matchers, together)  # one at a time on a small machine
grammar.PARALLEL_MIN_CORES = 1
in_parallel = torch.zeros(len(matchers), words, dtype=torch.int32)
fill_masks(matchers, in_parallel)  # in llguidance's thread pool
assert torch.equal(together, in_parallel)
for i, m in enumerate(matchers):
    alone = torch.zeros(3, words, dtype=torch.int32)
    fill_masks([m], alone[1:2])  # a row of a larger mask: nothing outside it is written
    assert torch.equal(alone[1], together[i]) and not alone[0].any() and not alone[2].any(), i
assert len({{tuple(row.tolist()) for row in together}}) == 3  # three different grammars, three masks
assert "llguidance.torch" not in sys.modules
loaded = sorted(set(sys.modules) - before)
assert not any(m.startswith("torch._inductor") for m in loaded), loaded
print("ok")
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
