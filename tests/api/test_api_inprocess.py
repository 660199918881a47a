"""The OpenAI app in process around a real engine on the tiny model: status codes, error objects, SSE framing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from falcon_service.engine.scheduler import BatchLimits

# the fixtures of tests/api/conftest.py (`make_api`, `api`) serve this model name
MODEL_NAME = "falcon-7b-instruct"
MESSAGES = [{"role": "user", "content": "What do falcons eat?"}]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **extra}


def assert_error(response: httpx.Response, status: int, type_: str, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    """The response is `status` with exactly an OpenAI error object; returns the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def sse_events(response: httpx.Response) -> list[str]:
    """The payloads of a text/event-stream body, checking each event is exactly `data: ...` + blank line."""
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    for block in blocks:
        assert block.startswith("data: ") and "\n" not in block, repr(block)
    return [block[len("data: "):] for block in blocks]


# ---------- readiness ----------


async def test_not_ready_until_the_engine_is_attached(make_api):
    api = await make_api(attach=False)
    assert api.serving.model_name == MODEL_NAME
    health = await api.client.get("/health")
    assert_error(health, 503, "service_unavailable")
    response = await api.client.post("/v1/chat/completions", json=chat_body())
    assert_error(response, 503, "service_unavailable", code="model_not_ready")
    assert response.headers.get("retry-after")
    stream = await api.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert_error(stream, 503, "service_unavailable", code="model_not_ready")

    api.attach()
    health = await api.client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    response = await api.client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


# ---------- 404 and 400 ----------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_unknown_model_is_404(api, path: str):
    body = {"model": "gpt-4o", "messages": MESSAGES, "prompt": "Hi", "max_tokens": 2}
    response = await api.client.post(path, json=body)
    error = assert_error(response, 404, "invalid_request_error", param="model", code="model_not_found")
    assert "gpt-4o" in error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),  # more than a context can hold
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
    ],
)
async def test_out_of_range_values_are_400_naming_the_param(api, extra: dict[str, Any], param: str):
    response = await api.client.post("/v1/chat/completions", json=chat_body(**extra))
    assert_error(response, 400, "invalid_request_error", param=param)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ],
)
async def test_unsupported_features_are_400(api, extra: dict[str, Any], param: str):
    response = await api.client.post("/v1/chat/completions", json=chat_body(**extra))
    assert_error(response, 400, "invalid_request_error", param=param, code="unsupported_parameter")


async def test_unknown_extra_fields_are_tolerated(api):
    body = chat_body(ignore_eos=True, continuous_usage_stats=True, some_vendor_field={"x": 1})
    response = await api.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 4


async def test_missing_field_is_400_not_422(api):
    response = await api.client.post("/v1/chat/completions", json={"model": MODEL_NAME})
    assert_error(response, 400, "invalid_request_error", param="messages")
    response = await api.client.post("/v1/completions", json={"model": MODEL_NAME})
    assert_error(response, 400, "invalid_request_error", param="prompt")


async def test_malformed_json_is_400(api):
    response = await api.client.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                                     headers={"content-type": "application/json"})
    error = assert_error(response, 400, "invalid_request_error", param=None)
    assert "JSON" in error["message"]


async def test_unknown_role_is_400_on_messages(api):
    body = chat_body(messages=[{"role": "robot", "content": "x"}])
    for stream in (False, True):
        response = await api.client.post("/v1/chat/completions", json={**body, "stream": stream})
        error = assert_error(response, 400, "invalid_request_error", param="messages")
        assert "robot" in error["message"]


async def test_too_long_request_is_400_context_length(api):
    response = await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=5000))
    assert_error(response, 400, "invalid_request_error", param="max_tokens", code="context_length_exceeded")


# ---------- 429 and 500 ----------

FULL_QUEUE = BatchLimits(max_batch_size=16, max_batch_tokens=16 * 2048, max_prefill_tokens=4096, max_queue_size=0)


@pytest.mark.parametrize("stream", [False, True])
async def test_full_queue_is_429_with_retry_after(make_api, stream: bool):
    api = await make_api(limits=FULL_QUEUE)
    response = await api.client.post("/v1/chat/completions", json=chat_body(stream=stream))
    assert_error(response, 429, "rate_limit_error", code="rate_limit_exceeded")
    assert int(response.headers["retry-after"]) >= 1


async def test_generation_failure_is_500_with_an_error_object(make_api, controlled_model):
    # the default ASGITransport re-raises what escapes the app: these errors must be answered, not escape
    api = await make_api(model=controlled_model)
    controlled_model.fail = True
    response = await api.client.post("/v1/chat/completions", json=chat_body())
    assert_error(response, 500, "server_error", code="internal_error")
    controlled_model.fail = False  # the engine keeps serving
    response = await api.client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200, response.text


async def test_generation_failure_in_a_stream_ends_with_an_error_event(make_api, controlled_model):
    api = await make_api(model=controlled_model)
    controlled_model.fail = True
    response = await api.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    error = json.loads(events[-2])
    assert set(error) == {"error"}
    assert error["error"]["type"] == "server_error" and error["error"]["code"] == "internal_error"
    assert all("finish_reason" not in e or json.loads(e)["choices"][0]["finish_reason"] is None
               for e in events[:-2])


# ---------- success and SSE framing ----------


async def test_chat_stream_framing_matches_the_non_stream_answer(api):
    body = chat_body(temperature=0, max_tokens=6, ignore_eos=True)
    plain = await api.client.post("/v1/chat/completions", json=body)
    assert plain.status_code == 200
    answer = plain.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 6

    response = await api.client.post("/v1/chat/completions",
                                     json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-cache"
    events = sse_events(response)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL_NAME for c in chunks)
    assert len({c["id"] for c in chunks}) == 1

    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == answer["usage"]
    finish = chunks[-2]["choices"]
    assert finish == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    middle = chunks[1:-2]
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None and c.get("usage") is None for c in middle)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == answer["choices"][0]["message"]["content"]


async def test_chat_stream_without_usage_sends_no_usage(api):
    response = await api.client.post("/v1/chat/completions", json=chat_body(stream=True, n=2, temperature=1, seed=3))
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role") == "assistant"]
    assert roles == [0, 1] and chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert sorted(finishes) == [0, 1]


async def test_completion_stream_framing(api):
    body = {"model": MODEL_NAME, "prompt": "The falcon", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    plain = await api.client.post("/v1/completions", json=body)
    assert plain.status_code == 200
    answer = plain.json()
    response = await api.client.post("/v1/completions", json={**body, "stream": True})
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer["choices"][0]["text"]
