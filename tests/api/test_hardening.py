"""Careless and hostile clients, in process: long inputs never stall the event loop, an aborted request
is logged once."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest

MODEL_NAME = "falcon-7b-instruct"


def chat_body(content: str, **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


async def test_tokenizing_runs_off_the_event_loop(api, monkeypatch):
    """While a prompt is being tokenized (held here as long as the test likes), /health still answers."""
    tokenizer = api.engine.tokenizer
    started, release = threading.Event(), threading.Event()
    real = tokenizer.encode
    health_done = []

    def held_encode(*args, **kwargs):
        started.set()
        release.wait(5)  # a slow tokenization; on the event loop this would freeze every other request
        health_done.append(bool(answered))
        return real(*args, **kwargs)

    answered: list[int] = []
    monkeypatch.setattr(tokenizer, "encode", held_encode)
    chat = asyncio.create_task(api.client.post("/v1/chat/completions", json=chat_body("Hello falcon")))
    assert await asyncio.to_thread(started.wait, 5)
    health = await asyncio.wait_for(api.client.get("/health"), 10)
    answered.append(health.status_code)
    release.set()
    assert (await chat).status_code == 200
    assert answered == [200] and health_done == [True], "/health waited for the tokenizer"


async def test_an_input_no_context_could_hold_is_refused_before_it_is_tokenized(api, monkeypatch):
    tokenizer = api.engine.tokenizer

    def never(*args, **kwargs):
        raise AssertionError("tokenized an input that could not fit whatever its tokens")

    monkeypatch.setattr(tokenizer, "encode", never)
    longest = max(len(t) for t in tokenizer.get_vocab())
    too_long = "x" * (api.engine.max_model_len * longest + 1)
    for response in (await api.client.post("/v1/chat/completions", json=chat_body(too_long)),
                     await api.client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": too_long})):
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"


async def test_an_aborted_stream_is_logged_once(api, caplog):
    from falcon_service.api.protocol import ChatCompletionRequest

    caplog.set_level(logging.INFO, logger="falcon_service.api.serving")
    body = ChatCompletionRequest(**chat_body("Tell me about falcons.", max_tokens=1500, ignore_eos=True, stream=True))
    sse = await api.serving.chat_stream(body)
    await anext(sse)  # the role chunk
    await anext(sse)  # a content chunk: the stream runs
    await sse.aclose()  # the client hung up
    for _ in range(200):
        if api.engine.stats()["running"] == 0:
            break
        await asyncio.sleep(0.01)
    aborted = [r for r in caplog.records if "request aborted after" in r.getMessage()]
    assert len(aborted) == 1, [r.getMessage() for r in aborted]


@pytest.fixture(autouse=True)
def _quiet_httpx(caplog):
    caplog.set_level(logging.WARNING, logger="httpx")


@pytest.mark.parametrize("body", [
    {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi \ud800 there"}]},
    {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
    {"model": MODEL_NAME, "prompt": "\ud800", "_path": "/v1/completions"},
    {"model": MODEL_NAME, "prompt": ["ok", "\udc00"], "_path": "/v1/completions"},
    {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "stop": ["\ud83d"]},
], ids=["content", "text-part", "prompt", "prompt-list", "stop"])
async def test_a_lone_surrogate_is_a_400_naming_the_field(api, body):
    import json

    path = body.pop("_path", "/v1/chat/completions")
    raw = json.dumps(body)  # JSON carries the lone surrogate as an escape
    assert "\\ud8" in raw or "\\udc" in raw or "\\udf" in raw
    response = await api.client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "unpaired UTF-16 surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", True), ("n", True), ("temperature", True), ("temperature", "1"), ("seed", 1.5),
    ("max_tokens", 5.0), ("stream", 1), ("logprobs", "yes"), ("logit_bias", {"٣": 1.0}), ("logit_bias", {"-1": 1}),
    ("logit_bias", {"3": True}),
])
async def test_loose_types_are_refused_with_a_message_for_people(api, field, value):
    body = chat_body("hi", **{field: value})
    response = await api.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].split(".")[0] == field
    assert "invalid literal" not in error["message"] and "Value error" not in error["message"]


async def test_an_unexpected_failure_is_a_500_object_and_not_a_dropped_connection(api, monkeypatch):
    def broken():
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(api.serving, "models", broken)
    # the in-process transport raises whatever escapes the app: here nothing may
    response = await api.client.get("/v1/models")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert (await api.client.get("/health")).status_code == 200


INTERNAL = 'Expecting property name enclosed in double quotes: line 1 column 2 (char 1)'


@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_side_value_error_is_a_500_without_its_text(api, monkeypatch, stream, caplog):
    """A `ValueError` of the server's own (here the `JSONDecodeError` that a broken tool call once raised) is
    not the client's fault: a 500 with an error id, never a 400 carrying the exception's text."""
    from falcon_service.api import serving as serving_module

    def broken(*_, **__):
        raise json.JSONDecodeError("Expecting property name enclosed in double quotes", "{{", 1)

    target = "ChatChunks.delta" if stream else "OpenAIServing._collect"
    owner, name = target.split(".")
    monkeypatch.setattr(getattr(serving_module, owner), name, broken)
    response = await api.client.post("/v1/chat/completions", json=chat_body("Hi", max_tokens=3, stream=stream))
    if stream:
        assert response.status_code == 200  # the stream had begun: the error is its last event
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
    else:
        assert response.status_code == 500
        error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error" and error["param"] is None
    assert "Expecting" not in error["message"] and "JSONDecodeError" not in error["message"]
    error_id = error["message"].split("error id ")[1].split(")")[0]
    assert any(error_id in r.getMessage() for r in caplog.records), "the log line carries the same id"


async def test_what_the_engine_refuses_is_a_400_naming_the_param(make_api):
    """The engine's own checks raise `InvalidRequest` with the field: a 400 naming it (here more choices
    than the batch has rows)."""
    from falcon_service.engine.scheduler import BatchLimits

    api = await make_api(limits=BatchLimits(max_batch_size=2, max_batch_tokens=2 * 2048, max_prefill_tokens=128,
                                            max_queue_size=4))
    response = await api.client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "n": 4,
                                                              "max_tokens": 3})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "n" and "n=4" in error["message"]
