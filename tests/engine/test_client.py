"""EngineClient, the engine's one door: requests, the model's limits, its tokenizer, grammars, liveness."""

from __future__ import annotations

from importlib import import_module

import pytest

from falcon_service.engine import (
    EngineClient,
    FinishReason,
    GenerationRequest,
    GrammarSpec,
    QueueFullError,
    SamplingParams,
    UnsupportedGrammar,
)
from falcon_service.engine.engine import Engine
from falcon_service.engine.scheduler import BatchLimits

LIMITS = BatchLimits(max_batch_size=2, max_batch_tokens=2 * 2048, max_prefill_tokens=512, max_queue_size=1)
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"


@pytest.fixture
def make_client(tiny_model):
    engines: list[Engine] = []

    def make(tokenizer) -> EngineClient:
        engines.append(Engine(tiny_model, tokenizer, LIMITS))
        return EngineClient(engines[-1])

    yield make
    for engine in engines:
        engine.shutdown()


@pytest.fixture
def client(make_client, tiny_tokenizer) -> EngineClient:
    return make_client(tiny_tokenizer)


def test_the_models_limits(client, tiny_model, tiny_tokenizer):
    assert client.max_model_len == 2048
    assert client.vocab_size == tiny_model.config.vocab_size
    assert client.max_batch_tokens == 2 * 2048
    longest = max(len(t) for t in tiny_tokenizer.get_vocab())
    assert client.max_token_chars == longest > 1


def test_text_goes_through_the_models_tokenizer(client, tiny_tokenizer):
    ids = client.encode("Hello falcon")
    assert ids == tiny_tokenizer.encode("Hello falcon", add_special_tokens=False) and ids
    assert client.decode(ids) == "Hello falcon"


def test_the_chat_template_is_the_tokenizers_own_or_none(make_client, tiny_checkpoint, tiny_tokenizer):
    from transformers import AutoTokenizer

    assert not tiny_tokenizer.chat_template and make_client(tiny_tokenizer).chat_template is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)  # a private copy: the template is set on it
    tokenizer.chat_template = TEMPLATE
    template = make_client(tokenizer).chat_template
    assert template is not None
    assert template([{"role": "user", "content": "Hi"}]) == "<|user|>Hi\n<|assistant|>"


async def test_submit_stats_and_abort(client, tiny_tokenizer):
    prompt = tuple(tiny_tokenizer.encode("Hello falcon"))
    params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    stream = client.submit(GenerationRequest(prompt, params))
    first = await anext(aiter(stream))  # running now
    assert first.token_ids and client.stats()["running"] == 1
    client.abort(stream)
    reasons = [e.finish_reason async for e in stream if e.finish_reason is not None]
    assert reasons == [FinishReason.ABORT] and stream.aborted
    assert client.alive(stall_seconds=60) == (True, "ok")


async def test_a_full_queue_is_refused_at_submit(client, tiny_tokenizer):
    prompt = tuple(tiny_tokenizer.encode("Hello falcon"))
    params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    streams = [client.submit(GenerationRequest(prompt, params, n=2))]  # takes both rows
    await anext(aiter(streams[0]))
    streams.append(client.submit(GenerationRequest(prompt, params)))  # waits: the queue holds one
    with pytest.raises(QueueFullError):
        client.submit(GenerationRequest(prompt, params))
    for stream in streams:
        client.abort(stream)


async def test_grammars_compile_through_the_client(client):
    grammar = await client.compile_grammar(GrammarSpec("regex", "[ab]{2,4}"))
    assert grammar.spec == GrammarSpec("regex", "[ab]{2,4}")
    with pytest.raises(UnsupportedGrammar):
        await client.compile_grammar(GrammarSpec("lark", "start: ("))


def test_shutdown_stops_the_engine(make_client, tiny_tokenizer):
    client = make_client(tiny_tokenizer)
    client.shutdown()
    assert not client._engine._thread.is_alive()


def test_every_name_of_the_door_resolves():
    import falcon_service.engine as door

    for name in door.__all__:
        home = import_module(f"falcon_service.engine.{door._HOMES[name]}")
        assert getattr(door, name) is getattr(home, name)
    with pytest.raises(AttributeError):
        door.Engine  # noqa: B018  (the engine itself stays behind the door)
