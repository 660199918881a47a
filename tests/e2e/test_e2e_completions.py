"""The legacy completions endpoint against a real `bentoml serve`, with the official `openai` client."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e

PROMPT = "The falcon is"


def complete(client, model, prompt=PROMPT, max_tokens: int = 8, **kwargs):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


def test_prompt_string(client, server):
    r = complete(client, server.model)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == server.model
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens + r.usage.completion_tokens == r.usage.total_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 8


def test_prompt_list_keeps_order(client, server):
    prompts = [PROMPT, "hello there"]
    singles = [complete(client, server.model, p, max_tokens=6, extra_body={"ignore_eos": True}) for p in prompts]
    r = complete(client, server.model, prompts, max_tokens=6, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_echo(client, server):
    plain = complete(client, server.model)
    echoed = complete(client, server.model, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_logprobs(client, server):
    r = complete(client, server.model, logprobs=2, max_tokens=6, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    lp = choice.logprobs
    assert lp is not None
    n = r.usage.completion_tokens
    assert n == 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0
        assert 1 <= len(top) <= 2  # two tokens may decode to the same string
        assert all(v <= 0 for v in top.values())
        assert chosen == pytest.approx(max(top.values()), abs=1e-4), "greedy takes the most likely token"
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    if "\ufffd" not in choice.text:
        assert "".join(lp.tokens) == choice.text


def test_no_logprobs_unless_asked(client, server):
    assert complete(client, server.model).choices[0].logprobs is None


def test_stream(client, http, server):
    full = complete(client, server.model)
    chunks = list(complete(client, server.model, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        full.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()

    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(p["choices"] for p in payloads)


def test_stream_echo(client, server):
    full = complete(client, server.model, echo=True)
    chunks = list(complete(client, server.model, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
