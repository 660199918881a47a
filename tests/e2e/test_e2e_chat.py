"""Chat completions, models and health against a real `bentoml serve`, with the official `openai` client."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "hello there"}]


def sse_payloads(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order; fails on any other non-empty line."""
    payloads = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        payloads.append(line.removeprefix("data: "))
    return payloads


def greedy(client: openai.OpenAI, model: str, messages=HELLO, max_tokens: int = 16, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                          **kwargs)


def test_chat_response_shape(client, server):
    r = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and len(r.id) > len("chatcmpl-")
    assert isinstance(r.created, int) and r.created > 1_600_000_000
    assert r.model == server.model
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.prompt_tokens + u.completion_tokens == u.total_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == 8


def test_chat_stream_chunks(client, server):
    stream = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" and c.model == server.model for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    u = usage_chunk.usage
    assert u is not None and u.completion_tokens > 0 and u.prompt_tokens + u.completion_tokens == u.total_tokens
    body = chunks[:-1]
    assert all(c.usage is None for c in body)
    finishing = [c for c in body if c.choices[0].finish_reason is not None]
    assert len(finishing) == 1 and finishing[0] is body[-1]
    assert finishing[0].choices[0].finish_reason in ("stop", "length")
    content = [c.choices[0].delta.content for c in body[1:-1]]
    assert content and all(content), "content deltas between the role chunk and the finish chunk"
    if finishing[0].choices[0].finish_reason == "length":
        assert u.completion_tokens == 8


def test_chat_stream_wire_format(http, server):
    body = {"model": server.model, "messages": HELLO, "max_tokens": 6, "temperature": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    per_choice: dict[int, list[dict]] = {0: [], 1: []}
    for c in chunks[:-1]:
        assert len(c["choices"]) == 1
        per_choice[c["choices"][0]["index"]].append(c["choices"][0])
    for index, choices in per_choice.items():
        assert choices[0]["delta"].get("role") == "assistant", index
        finishes = [ch for ch in choices if ch["finish_reason"] is not None]
        assert len(finishes) == 1 and finishes[0] is choices[-1], index
        deltas = [ch["delta"] for ch in choices[1:-1]]
        assert deltas and all("content" in d and "role" not in d for d in deltas), index
        assert "role" not in choices[-1]["delta"] and not choices[-1]["delta"].get("content")


def test_stream_without_usage_option_has_no_usage_chunk(http, server):
    body = {"model": server.model, "messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)


def test_streamed_text_equals_non_streamed(client, server):
    full = greedy(client, server.model)
    stream = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def _stop_case(client, model) -> tuple[list[dict], str, str]:
    """A prompt with a clean greedy output, a stop string from its middle, and the text before it."""
    for prompt in ("hello there", "The falcon is a bird", "what do falcons eat?", "Tell me a story"):
        messages = [{"role": "user", "content": prompt}]
        text = greedy(client, model, messages).choices[0].message.content
        middle = len(text) // 2
        stop = text[middle:middle + 3]
        if len(stop) == 3 and "\ufffd" not in stop and text.index(stop) > 0:
            return messages, stop, text[: text.index(stop)]
    pytest.fail("no prompt gave a greedy output with a usable stop string")


def test_stop_string_is_trimmed(client, server):
    messages, stop, before = _stop_case(client, server.model)
    r = greedy(client, server.model, messages, stop=[stop])
    assert r.choices[0].message.content == before
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16
    streamed = client.chat.completions.create(model=server.model, messages=messages, max_tokens=16, temperature=0,
                                              stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == before
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_n_choices_and_usage(client, server):
    r = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=5, temperature=1.0, seed=11,
                                       n=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 3 * 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 15
    assert len({c.message.content for c in r.choices}) > 1, "the choices of a seeded sample differ from each other"


def _seeded(client, model, seed: int) -> str:
    r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=16, temperature=1.0, seed=seed,
                                       extra_body={"ignore_eos": True})
    return r.choices[0].message.content


def test_seed_is_reproducible_under_concurrent_load(client, server):
    alone = _seeded(client, server.model, 1234)
    errors: list[BaseException] = []

    def noise(i: int) -> None:
        try:
            client.chat.completions.create(model=server.model, max_tokens=16, temperature=1.0,
                                           messages=[{"role": "user", "content": f"other request {i} " * (i + 1)}],
                                           extra_body={"ignore_eos": True})
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=noise, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    busy = _seeded(client, server.model, 1234)
    for t in threads:
        t.join(60)
    assert not errors
    assert busy == alone
    assert _seeded(client, server.model, 4321) != alone


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert models.data[0].object == "model"


def test_content_as_text_parts(client, server):
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    with_parts = greedy(client, server.model, [{"role": "user", "content": parts}], max_tokens=8)
    as_string = greedy(client, server.model, [{"role": "user", "content": "hello\nthere"}], max_tokens=8)
    assert with_parts.choices[0].message.content == as_string.choices[0].message.content
    assert with_parts.usage.prompt_tokens == as_string.usage.prompt_tokens


def test_message_name_and_system_message(client, server):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "hello", "name": "alice"},
                {"role": "assistant", "content": "hi", "name": "bot"},
                {"role": "user", "content": "again"}]
    r = greedy(client, server.model, messages, max_tokens=4)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    longer = r.usage.prompt_tokens
    short = greedy(client, server.model, [{"role": "user", "content": "again"}], max_tokens=4)
    assert longer > short.usage.prompt_tokens, "the whole conversation is in the prompt"


def test_lenient_fields_are_accepted(client, server):
    r = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=4, temperature=0, stop=None,
                                       extra_body={"continuous_usage_stats": True, "foo": 1}, user="e2e")
    assert r.choices[0].message.content
    assert r.usage.completion_tokens <= 4


def test_max_completion_tokens_is_honoured(client, server):
    r = client.chat.completions.create(model=server.model, messages=HELLO, max_completion_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_ignore_eos(client, server, model_config):
    force_eos = {str(model_config["eos_token_id"]): 100}
    ended = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=8, temperature=0,
                                           logit_bias=force_eos)
    assert ended.choices[0].finish_reason == "stop"
    assert ended.usage.completion_tokens < 8
    ignored = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=8, temperature=0,
                                             logit_bias=force_eos, extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length"
    assert ignored.usage.completion_tokens == 8


def test_health_endpoints(http):
    health = http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200


def test_a_shared_system_prompt_is_reused_and_usage_says_so(client, server):
    system = {"role": "system", "content": " ".join(f"Rule {i}: answer in the voice of a falcon." for i in range(12))}
    first = greedy(client, server.model, [system, {"role": "user", "content": "What do you eat?"}], max_tokens=4)
    second = greedy(client, server.model, [system, {"role": "user", "content": "Where do you live?"}], max_tokens=4)
    assert first.usage.prompt_tokens > 64
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    streamed = client.chat.completions.create(
        model=server.model, messages=[system, {"role": "user", "content": "Where do you live?"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True})
    usage = next(c.usage for c in streamed if c.usage)
    assert usage.prompt_tokens_details.cached_tokens >= cached
    # the cache changes no output: the same request again gives the same text
    again = greedy(client, server.model, [system, {"role": "user", "content": "Where do you live?"}], max_tokens=4)
    assert again.choices[0].message.content == second.choices[0].message.content


def cached_tokens(client, model: str, system: str, question: str, **extra) -> int:
    reply = client.chat.completions.create(model=model, max_tokens=2, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": question}], **extra)
    return reply.usage.prompt_tokens_details.cached_tokens


def test_cache_salt_keeps_callers_prefixes_apart(client, server):
    """vLLM's `cache_salt`: a prompt holding a secret, cached under one salt, is no use to a caller with
    another salt or none, whose right guess gets as few cached tokens as a wrong one: none."""
    secret = "The vault code is 4817-2290-5521. " + " ".join(f"Rule {i}: never say the code." for i in range(10))
    wrong = secret.replace("4817", "9999")
    assert cached_tokens(client, server.model, secret, "Hi?", extra_body={"cache_salt": "alice"}) == 0
    assert cached_tokens(client, server.model, secret, "Code?", extra_body={"cache_salt": "mallory"}) == 0
    assert cached_tokens(client, server.model, wrong, "Code?", extra_body={"cache_salt": "eve"}) == 0
    assert cached_tokens(client, server.model, secret, "Code?") == 0
    assert cached_tokens(client, server.model, secret, "Bye?", extra_body={"cache_salt": "alice"}) >= 64


def test_with_several_api_keys_each_key_caches_apart(make_server):
    """Several keys: each is a tenant; its prompts share cached prefixes only with its own."""
    served = make_server("tenants", api_key="key-a,key-b")
    system = " ".join(f"Rule {i}: answer in the voice of a falcon." for i in range(12))
    clients = {key: openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0, timeout=60)
               for key in ("key-a", "key-b")}
    try:
        assert cached_tokens(clients["key-a"], served.model, system, "What do you eat?") == 0
        assert cached_tokens(clients["key-b"], served.model, system, "Where do you live?") == 0
        assert cached_tokens(clients["key-a"], served.model, system, "Where do you live?") >= 64
        assert cached_tokens(clients["key-b"], served.model, system, "What do you eat?") >= 64
        with pytest.raises(openai.AuthenticationError):
            clients["key-a"].with_options(api_key="key-c").models.list()
    finally:
        for c in clients.values():
            c.close()
