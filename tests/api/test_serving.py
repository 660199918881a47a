"""What `OpenAIServing` hands the engine: default chat stop, default max_tokens, logprobs."""

from __future__ import annotations

import math

from falcon_service.api.chat import DEFAULT_CHAT_STOP
from falcon_service.api.protocol import ChatCompletionRequest
from falcon_service.engine.engine import Engine

MODEL_NAME = "falcon-7b-instruct"  # as in tests/api/conftest.py

HELLO = [{"role": "user", "content": "Hello there"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=MODEL_NAME, messages=HELLO, **fields)


async def test_default_chat_stop_is_added_and_can_be_turned_off(api) -> None:
    stop = (await api.serving._prepare_chat(chat(stop="END"), None)).requests[0].params.stop
    assert list(stop) == ["END", *DEFAULT_CHAT_STOP]
    off = (await api.serving._prepare_chat(chat(stop="END", default_stop=False), None)).requests[0].params.stop
    assert list(off) == ["END"]
    api.serving.default_chat_stop = False  # FALCON_DEFAULT_CHAT_STOP=false
    assert (await api.serving._prepare_chat(chat(), None)).requests[0].params.stop == ()


async def test_max_tokens_defaults_to_what_the_context_leaves(api) -> None:
    engine: Engine = api.engine
    request = (await api.serving._prepare_chat(chat(), None)).requests[0]
    assert request.params.max_tokens == engine.max_model_len - len(request.prompt_ids)
    assert (await api.serving._prepare_chat(chat(max_completion_tokens=7), None)).requests[0].params.max_tokens == 7


async def test_chat_logprobs_have_one_entry_per_token_with_sorted_alternatives(api) -> None:
    body = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 3}
    r = await api.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"] == 5
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert math.isclose(entry["logprob"], tops[0], abs_tol=1e-5)
        assert entry["bytes"] == list(entry["token"].encode())
    without = (await api.client.post("/v1/chat/completions", json={**body, "logprobs": False,
                                                                    "top_logprobs": None})).json()
    assert without["choices"][0]["logprobs"] is None


async def test_a_stream_closed_after_its_role_chunk_aborts_the_request(api) -> None:
    """The client that hangs up right after the first chunk, before any token was read: still aborted."""
    import asyncio

    from falcon_service.api.protocol import CompletionRequest

    engine: Engine = api.engine
    records = []

    class Recorder:
        def on_step(self, *_: int) -> None: ...
        def on_rejected(self) -> None: ...
        def on_request_done(self, record) -> None:
            records.append(record)

    engine.observer = Recorder()
    streams = [
        await api.serving.chat_stream(chat(max_tokens=1500, ignore_eos=True, stream=True)),
        await api.serving.completion_stream(CompletionRequest(model=MODEL_NAME, prompt="Hi", max_tokens=1500,
                                                        ignore_eos=True, stream=True, echo=True)),
    ]
    for sse in streams:
        first = await anext(sse)
        assert first.startswith("data: ")
        await sse.aclose()
    for _ in range(1000):
        if len(records) == 2:
            break
        await asyncio.sleep(0.01)
    assert [r.finish_reason for r in records] == ["abort", "abort"]
    assert all(r.completion_tokens < 1500 for r in records)
    assert engine.stats() == {"waiting": 0, "running": 0, "cache_tokens": 0, "prefix_tokens": 0}
