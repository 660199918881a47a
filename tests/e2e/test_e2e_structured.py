"""Structured outputs and tool calls against a real `bentoml serve` at its default settings, with the
official `openai` client: valid on every prefill path, and hostile grammars refused while the server serves on."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.e2e

CALL = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}


def hostile_requests(model: str) -> dict[str, tuple[dict, str]]:
    """name -> (a chat request that would crash, exhaust or stall an unguarded server, what its 400 says)."""
    chain = "start: r0\n" + "\n".join(f'r{i}: "t{i}" r{i + 1} | "u{i}"' for i in range(20_000)) + '\nr20000: "e"'
    array = {"type": "array", "items": {"type": "integer"}}
    base = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

    def schema(s: dict) -> dict:
        return {**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}}

    return {
        "lark chain of 20,000 rules": ({**base, "structured_outputs": {"grammar": chain}}, "the limit is 100,000"),
        "minItems 1e9": (schema({**array, "minItems": 1_000_000_000}), "`minItems` is 1000000000"),
        "maxItems 1e8": (schema({**array, "maxItems": 100_000_000}), "`maxItems` is 100000000"),
        "allOf of 200 patterns": (schema({"type": "string", "allOf": [{"pattern": f".*{chr(97 + i % 26)}{i}.*"}
                                                                      for i in range(200)]}), "longer than 3 s"),
        "50,000 choices": ({**base, "structured_outputs": {"choice": [f"c{i}" for i in range(50_000)]}},
                           "the limit is"),
        "self-referencing $ref": (schema({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}),
                                  "no reply can satisfy it"),
    }


def test_hostile_grammars_are_400s_while_a_concurrent_stream_flows(server):
    gaps: list[float] = []
    streams = 0
    stop = threading.Event()
    failure: list[BaseException] = []

    def stream_on() -> None:
        nonlocal streams
        body = {"model": server.model, "prompt": "Falcons", "max_tokens": 400, "ignore_eos": True, "stream": True}
        try:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    last = time.monotonic()
                    with c.stream("POST", "/v1/completions", json=body) as response:
                        assert response.status_code == 200
                        for line in response.iter_lines():
                            now = time.monotonic()
                            if line.startswith("data:"):
                                gaps.append(now - last)
                                last = now
                    streams += 1
        except BaseException as exc:
            failure.append(exc)

    runner = threading.Thread(target=stream_on)
    runner.start()
    try:
        time.sleep(0.5)
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for name, (body, mentions) in hostile_requests(server.model).items():
                response = c.post("/v1/chat/completions", json=body)
                assert response.status_code == 400, (name, response.text[:500])
                error = response.json()["error"]
                assert mentions in error["message"] and error["code"] == "unsupported_grammar", (name, error)
            ok = c.post("/v1/chat/completions", json={
                "model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "seed": 1,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": CALL}}})
            assert ok.status_code == 200
            jsonschema.validate(json.loads(ok.json()["choices"][0]["message"]["content"]), CALL)
    finally:
        stop.set()
        runner.join(60)
    assert not failure, failure
    assert streams >= 1 and len(gaps) > 100
    assert max(gaps) < 0.5, f"the stream stalled {max(gaps):.2f} s while the grammars were refused"


def long_prompt(words: int, seed: int) -> str:
    """A fresh prompt (nothing of it cached) of about `words` tokens and more: over the CPU's 128-token
    prefill budget, so that it is prefilled in chunks."""
    rnd = random.Random(seed)
    vocabulary = ["falcon", "wing", "sky", "prey", "dive", "nest", "feather", "hunt", "cliff", "wind"]
    return " ".join(f"{rnd.choice(vocabulary)}{rnd.randrange(100)}" for _ in range(words))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_constrained_replies_to_long_fresh_prompts_are_valid(client, server, stream):
    """The first request with a long prompt (prefilled in chunks at the default budget) used to get `{{`."""
    schema = {"type": "json_schema", "json_schema": {"name": "call", "schema": CALL}}
    for seed in range(2):
        kwargs = {"model": server.model, "max_tokens": 40, "seed": seed, "stream": stream}
        messages = [{"role": "user", "content": long_prompt(200, seed * 2 + stream)}]
        chat = client.chat.completions.create(messages=messages, response_format=schema, **kwargs)
        completion = client.completions.create(prompt=long_prompt(200, 100 + seed * 2 + stream),
                                               extra_body={"response_format": schema}, **kwargs)
        if stream:
            chat_text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
            completion_text = "".join(c.choices[0].text for c in completion if c.choices)
        else:
            assert chat.usage.prompt_tokens > 128 and chat.usage.prompt_tokens_details.cached_tokens == 0
            chat_text, completion_text = chat.choices[0].message.content, completion.choices[0].text
        for text in (chat_text, completion_text):
            jsonschema.validate(json.loads(text), CALL)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def lt_token(bentoml_home, model_tag) -> str:
    """The id of the token "<", the first of a tool call's marker."""
    from transformers import AutoTokenizer

    from import_model import get_model

    tokenizer = AutoTokenizer.from_pretrained(get_model(model_tag, bentoml_home=bentoml_home).path)
    (token,) = tokenizer.encode("<", add_special_tokens=False)
    return str(token)


def message(client, stream: bool, **kwargs) -> tuple[str | None, list[tuple[str, str]], str]:
    """Content, calls (name, arguments) and finish reason of a chat reply, streamed (put together from its
    deltas) or not."""
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = None, {}, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.delta.content:
                content = (content or "") + choice.delta.content
            for delta in choice.delta.tool_calls or []:
                name, arguments = calls.get(delta.index, ("", ""))
                calls[delta.index] = (delta.function.name or name, arguments + (delta.function.arguments or ""))
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_tools_without_tool_choice_answer_in_text_or_calls(client, server, lt_token):
    """"auto", the default: pushed away from the marker, plain text; pushed to it, a call; the same streamed
    and not; then the follow-up turn with the tool's result."""
    base = {"model": server.model, "messages": [{"role": "user", "content": "Weather in Rome?"}], "seed": 3,
            "tools": [WEATHER]}
    text = [message(client, stream, max_tokens=12, logit_bias={lt_token: -100}, **base) for stream in (False, True)]
    assert text[0] == text[1]
    content, calls, finish = text[0]
    assert content and calls == [] and finish == "length"
    called = [message(client, stream, max_tokens=120, logit_bias={lt_token: 100}, parallel_tool_calls=False, **base)
              for stream in (False, True)]
    assert called[0] == called[1]
    content, calls, finish = called[0]
    assert content is None and finish == "tool_calls" and calls and calls[0][0] == "get_weather"
    jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])
    history = [*base["messages"], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": calls[0][0], "arguments": calls[0][1]}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C, clear"}]
    follow_up = message(client, False, **{**base, "messages": history}, max_tokens=8, logit_bias={lt_token: -100})
    assert follow_up[0] and follow_up[2] in ("length", "stop")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_tool_call_cut_by_max_tokens_is_the_same_partial_call_streamed_and_not(client, server, tool_choice):
    base = {"model": server.model, "messages": [{"role": "user", "content": "Weather?"}], "seed": 1,
            "tools": [WEATHER], "tool_choice": tool_choice, "max_tokens": 48 if tool_choice == "required" else 10}
    whole, streamed = message(client, False, **base), message(client, True, **base)
    assert whole == streamed
    content, calls, finish = whole
    assert content is None and finish == "length"
    ((name, arguments),) = calls
    assert name == "get_weather" and arguments.startswith("{") and "arguments" not in arguments
