"""The engine core in a child process (`EngineProcess`, FALCON_ENGINE_PROCESS) behind the same door as in
process: the same tokens, aborts that reach the child, 429 at once, metrics, grammars, and a child that dies or
cannot load failing loudly, never leaving a request hanging. Each test starts real engine processes (seconds
each), so these are in the e2e tier, beside the same through `bentoml serve` (test_e2e_engine_process.py)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from falcon_service.engine.client import EngineClient
from falcon_service.engine.engine import Engine
from falcon_service.engine.grammar_source import GrammarSpec
from falcon_service.engine.options import EngineOptions
from falcon_service.engine.process import EngineProcess, EngineStartError
from falcon_service.engine.request import EngineError, FinishReason, GenerationRequest
from falcon_service.engine.sampling import SamplingParams
from falcon_service.engine.scheduler import BatchLimits, QueueFullError

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0  # a bound on waiting, never a speed assertion
OPTIONS = EngineOptions(device="cpu", dtype="float32", max_batch_size=4, max_batch_tokens=4 * 2048,
                        max_queue_size=8, torch_threads=1, engine_process=True)


class Recorder:
    def __init__(self) -> None:
        self.steps, self.records, self.rejected = 0, [], 0

    def on_step(self, waiting, running, cache_tokens, prefix_tokens) -> None:
        self.steps += 1

    def on_request_done(self, record) -> None:
        self.records.append(record)

    def on_rejected(self) -> None:
        self.rejected += 1

    def on_grammar_rejection(self) -> None:
        pass


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def process_engine(tiny_checkpoint, recorder):
    engine = EngineClient.start(tiny_checkpoint, OPTIONS, observer=recorder)
    yield engine
    engine.shutdown()


async def collect(stream) -> dict[int, dict]:
    choices: dict[int, dict] = {}
    async for event in stream:
        c = choices.setdefault(event.index, {"tokens": [], "text": "", "logprobs": [], "finish": None})
        c["tokens"] += event.token_ids
        c["text"] += event.text
        c["logprobs"] += [lp.logprob for lp in event.logprobs]
        c["finish"] = event.finish_reason
    return choices


def requests(tokenizer) -> list[GenerationRequest]:
    texts = ["Hello falcon", "The quick brown fox jumps over the lazy dog", "x", "日本語のテキスト and more"]
    made = [GenerationRequest(tuple(tokenizer.encode(t)), SamplingParams(max_tokens=12, temperature=0.0, logprobs=0))
            for t in texts]
    made.append(GenerationRequest(tuple(tokenizer.encode("Two choices")), SamplingParams(
        max_tokens=8, temperature=1.0, seed=7, stop=("e",)), n=2))
    return made


async def test_the_child_generates_what_the_engine_in_process_generates(process_engine, tiny_model, tiny_tokenizer,
                                                                          recorder):
    assert isinstance(process_engine._engine, EngineProcess)
    local = Engine(tiny_model, tiny_tokenizer, BatchLimits(4, 4 * 2048, 512, 8))
    try:
        want = [await collect(local.submit(r)) for r in requests(tiny_tokenizer)]
    finally:
        local.shutdown()
    streams = [process_engine.submit(r) for r in requests(tiny_tokenizer)]
    got = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), TIMEOUT)
    assert [{i: (c["tokens"], c["text"], c["finish"]) for i, c in g.items()} for g in got] == \
        [{i: (c["tokens"], c["text"], c["finish"]) for i, c in w.items()} for w in want]
    for g, w in zip(got, want, strict=True):
        for i in w:
            assert g[i]["logprobs"] == pytest.approx(w[i]["logprobs"], abs=1e-4)
    assert any(c["finish"] is FinishReason.STOP for c in got[-1].values()), "the stop string ended a choice"
    assert streams[0].completion_tokens == 12
    assert streams[0].prompt_tokens == len(requests(tiny_tokenizer)[0].prompt_ids)
    # the server's side keeps each request's accounting and the metrics; the child's steps reach them too
    assert len(recorder.records) >= len(streams) and recorder.steps > 0
    await settled(process_engine)


async def settled(engine: EngineClient) -> None:
    """The child's counts come with its steps and its heartbeat (twice a second): nothing runs once they arrive."""
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert engine.stats()["running"] == 0


async def test_an_abort_reaches_the_child(process_engine, tiny_tokenizer):
    stream = process_engine.submit(GenerationRequest(tuple(tiny_tokenizer.encode("Go on")), SamplingParams(
        max_tokens=1500, ignore_eos=True)))
    seen = 0
    async with asyncio.timeout(TIMEOUT):
        async for event in stream:
            seen += len(event.token_ids)
            if seen >= 3 and not stream.aborted:
                process_engine.abort(stream)
    assert stream.finish_reasons == {0: FinishReason.ABORT} and seen < 1500
    await settled(process_engine)


async def test_a_full_queue_is_refused_at_submit(tiny_checkpoint, tiny_tokenizer):
    options = EngineOptions(device="cpu", dtype="float32", max_batch_size=1, max_batch_tokens=2048,
                            max_queue_size=1, torch_threads=1, prefix_caching=False, engine_process=True)
    recorder = Recorder()
    engine = EngineClient.start(tiny_checkpoint, options, observer=recorder)
    try:
        def long() -> GenerationRequest:
            return GenerationRequest(tuple(tiny_tokenizer.encode("Go on")), SamplingParams(max_tokens=1000,
                                                                                          ignore_eos=True))
        running = engine.submit(long())
        events = running.__aiter__()
        await asyncio.wait_for(events.__anext__(), TIMEOUT)  # it holds the one row
        waiting = engine.submit(long())
        with pytest.raises(QueueFullError):
            engine.submit(long())
        assert recorder.rejected == 1
        for stream in (running, waiting):
            engine.abort(stream)
    finally:
        engine.shutdown()


async def test_a_constrained_reply_from_the_child_is_valid(process_engine, tiny_tokenizer):
    from dataclasses import replace

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    grammar = await process_engine.compile_grammar(GrammarSpec("json_schema", json.dumps(schema)))
    prompt = tuple(tiny_tokenizer.encode("A number please: " * 40))  # several prefill chunks
    request = GenerationRequest(prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=3))
    request = replace(request, params=replace(request.params, grammar=grammar))
    got = await asyncio.wait_for(collect(process_engine.submit(request)), TIMEOUT)
    assert got[0]["finish"] is FinishReason.STOP
    assert isinstance(json.loads(got[0]["text"])["a"], int)


async def test_a_dead_child_fails_its_requests_and_liveness_at_once(tiny_checkpoint, tiny_tokenizer):
    engine = EngineClient.start(tiny_checkpoint, OPTIONS)
    core = engine._engine
    assert isinstance(core, EngineProcess) and engine.alive(60) == (True, "ok")
    stream = engine.submit(GenerationRequest(tuple(tiny_tokenizer.encode("Go on")), SamplingParams(
        max_tokens=1500, ignore_eos=True)))
    events = stream.__aiter__()
    await asyncio.wait_for(events.__anext__(), TIMEOUT)
    core._proc.kill()  # a crash, the OOM killer
    with pytest.raises(EngineError, match="engine process has ended"):
        async with asyncio.timeout(10):
            async for _ in events:
                pass
    alive, why = engine.alive(60)
    assert not alive and "engine process has ended" in why
    with pytest.raises(EngineError):
        engine.submit(GenerationRequest((1, 2), SamplingParams(max_tokens=2)))
    engine.shutdown()


def test_the_child_leaves_when_the_server_goes(tiny_checkpoint):
    core = EngineProcess.start(tiny_checkpoint, OPTIONS)
    core._conn.close()  # what the child sees when the server's process dies
    assert core._proc.wait(30) == 0
    core.shutdown()


def test_a_model_that_cannot_load_is_an_error_saying_why(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(EngineStartError) as caught:
        EngineProcess.start(tmp_path, OPTIONS)
    assert str(caught.value)
