"""The native BentoML APIs through `bentoml.SyncHTTPClient`, and a client that hangs up mid-stream."""

from __future__ import annotations

from collections.abc import Iterator
from http import HTTPStatus

import bentoml
import pytest
from bentoml.exceptions import BentoMLException
from server_metrics import delta, metrics, wait_idle

pytestmark = pytest.mark.e2e

PROMPT = "The falcon is"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def bento(server) -> Iterator[bentoml.SyncHTTPClient]:
    with bentoml.SyncHTTPClient(server.url, timeout=60) as c:
        yield c


def test_generate_streams_the_greedy_completion(bento, client, server):
    result = bento.generate(prompt=PROMPT, max_tokens=8, temperature=0)
    assert not isinstance(result, str | bytes), "generate streams: it returns an iterator of text chunks"
    chunks = list(result)
    assert chunks and all(isinstance(c, str) for c in chunks)
    expected = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert "".join(chunks) == expected.choices[0].text != ""


def test_generate_default_sampling(bento):
    text = "".join(bento.generate(prompt=PROMPT, max_tokens=8, seed=5))
    assert text
    assert text == "".join(bento.generate(prompt=PROMPT, max_tokens=8, seed=5))


def test_chat(bento, client, server):
    out = bento.chat(messages=HELLO, max_tokens=8, temperature=0)
    assert set(out) == {"reply", "finish_reason", "usage"}
    expected = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=8, temperature=0)
    assert out["reply"] == expected.choices[0].message.content
    assert out["finish_reason"] == expected.choices[0].finish_reason
    counts = {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert {k: out["usage"][k] for k in counts} == expected.usage.model_dump(include=counts)


@pytest.mark.parametrize(
    ("call", "kwargs", "mentions"),
    [
        ("chat", {"messages": [{"role": "robot", "content": "hi"}], "max_tokens": 4}, "unknown role"),
        ("chat", {"messages": HELLO, "max_tokens": 4, "temperature": 5}, "temperature"),
        ("generate", {"prompt": PROMPT, "max_tokens": 4, "temperature": 5}, "temperature"),
        ("generate", {"prompt": PROMPT, "max_tokens": 5000}, "context length"),
    ],
)
def test_invalid_input_is_400(bento, call, kwargs, mentions):
    with pytest.raises(BentoMLException) as info:
        result = getattr(bento, call)(**kwargs)
        if call == "generate":
            list(result)
    assert info.value.error_code == HTTPStatus.BAD_REQUEST
    assert mentions in str(info.value)


def test_client_disconnect_mid_stream_leaves_server_healthy(http, client, server):
    body = {"model": server.model, "messages": HELLO, "max_tokens": 1500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line)
        assert first.startswith("data: ")
    # the connection is closed here, after one chunk of a long generation
    after = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 6
    streamed = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=6, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == after.choices[0].message.content
    assert http.get("/health").status_code == 200


def test_a_native_chat_client_that_hangs_up_is_aborted(server):
    before = metrics(server.url)
    with bentoml.SyncHTTPClient(server.url, timeout=1) as impatient, pytest.raises(Exception, match=r"(?i)time"):
        impatient.chat(messages=HELLO, max_tokens=1900, ignore_eos=True)
    after = wait_idle(server.url, before, aborts=1)
    assert delta(before, after, "falcon_requests_finished_total:abort") == 1
    assert after["falcon_requests_running"] == 0 and after["falcon_kv_cache_tokens"] == 0


def test_a_native_generate_client_that_hangs_up_is_aborted(server):
    before = metrics(server.url)
    with bentoml.SyncHTTPClient(server.url, timeout=60) as c:
        chunks = iter(c.generate(prompt=PROMPT, max_tokens=1900, ignore_eos=True))
        assert next(chunks)
    after = wait_idle(server.url, before, aborts=1)
    assert delta(before, after, "falcon_requests_finished_total:abort") == 1


def test_a_huge_message_list_is_refused_without_holding_up_the_server(server):
    """100,000 messages (3.5 MB, under the body limit) held the event loop for 2.2 s while /health waited;
    now a 400 that names the bound, refused before the messages are validated one by one."""
    import threading
    import time

    import httpx

    body = {"messages": [{"role": "user", "content": "hi"}] * 100_000, "max_tokens": 2}
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(httpx.post(f"{server.url}/chat", json=body, timeout=60)))
    waits = []
    with httpx.Client(base_url=server.url, timeout=30) as probe:
        probe.get("/health")
        sender.start()
        while sender.is_alive():
            started = time.monotonic()
            assert probe.get("/health").status_code == 200
            waits.append(time.monotonic() - started)
            time.sleep(0.01)
        sender.join()
    (response,) = answer
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert "at most 2048 items" in error["message"] and error["param"] == "messages", error
    assert max(waits) < 0.5, f"/health waited {max(waits):.2f} s behind the request"
