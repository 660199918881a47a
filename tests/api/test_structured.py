"""Structured outputs through the API, in process, with the official `openai` client: JSON mode, JSON
schemas, vLLM's structured_outputs, and tool calls (streamed and not). The model has random weights: a
reply that parses is the grammar's doing alone."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

MODEL_NAME = "falcon-7b-instruct"
HELLO = [{"role": "user", "content": "Tell me about a falcon."}]
BIRD = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "wingspan_cm": {"type": "integer", "minimum": 50,
                                                                                  "maximum": 130},
                   "diet": {"type": "array", "items": {"enum": ["birds", "bats", "insects"]}, "maxItems": 2},
                   "endangered": {"type": "boolean"}},
    "required": ["name", "wingspan_cm", "diet", "endangered"], "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}


@pytest.fixture
async def client(api):
    transport = httpx.ASGITransport(app=api.app)
    async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                                  http_client=httpx.AsyncClient(transport=transport, base_url="http://test")) as c:
        yield c


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "bird", "schema": schema, "strict": True}}


async def test_json_schema_replies_validate_streamed_and_not(client):
    for seed in range(3):
        reply = await client.chat.completions.create(
            model=MODEL_NAME, messages=HELLO, max_tokens=200, seed=seed, n=2,
            response_format=json_schema_format(BIRD))
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), BIRD)
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=HELLO, max_tokens=200, seed=seed, stream=True,
            response_format=json_schema_format(BIRD))
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == reply.choices[0].message.content  # the same seed: the same reply, streamed


async def test_json_object_mode_gives_an_object(client):
    """Any object is allowed, so a random model may write one for ever; this seed's closes (deterministic on a CPU:
    each request draws from its own generator), with a key that holds a "}" (inside a string: not the end)."""
    reply = await client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=400, seed=2,
                                                 response_format={"type": "json_object"})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content)
    assert isinstance(value, dict) and len(value) == 1 and "}" in next(iter(value))


@pytest.mark.parametrize("extra,check", [
    ({"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}}, lambda t: re.fullmatch("[a-z]{3}-[0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["peregrine", "merlin", "kestrel"]}},
     lambda t: t in ("peregrine", "merlin", "kestrel")),
    ({"structured_outputs": {"json": BIRD}}, lambda t: jsonschema.validate(json.loads(t), BIRD) is None),
    ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ({"structured_outputs": {"grammar": 'start: "a" "b"+'}}, lambda t: re.fullmatch("ab+", t)),
])
async def test_vllm_structured_outputs(client, extra, check):
    for seed in range(3):
        reply = await client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=120, seed=seed,
                                                     extra_body=extra)
        assert check(reply.choices[0].message.content), reply.choices[0].message.content


async def test_completions_take_a_response_format_too(client):
    for stream in (False, True):
        kwargs = {"model": MODEL_NAME, "prompt": "A bird:", "max_tokens": 200, "seed": 4,
                  "extra_body": {"response_format": json_schema_format(BIRD)}}
        if stream:
            text = "".join([c.choices[0].text async for c in await client.completions.create(stream=True, **kwargs)
                            if c.choices])
        else:
            text = (await client.completions.create(**kwargs)).choices[0].text
        jsonschema.validate(json.loads(text), BIRD)


async def test_a_required_tool_call_among_several(client):
    for seed in range(4):
        reply = await client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=150, seed=seed,
                                                     tools=[WEATHER, TIME], tool_choice="required",
                                                     parallel_tool_calls=False)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def streamed_message(client, **kwargs) -> tuple[str | None, list[dict], str | None]:
    """A streamed chat reply put together as a client does: content, the calls (from their deltas by index:
    id, name, arguments), the finish reason."""
    stream = await client.chat.completions.create(stream=True, **kwargs)
    content, calls, finish = None, {}, None
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                content = (content or "") + choice.delta.content
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"], call["name"] = delta.id, delta.function.name
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def whole_message(reply) -> tuple[str | None, list[dict], str | None]:
    choice = reply.choices[0]
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
             for c in choice.message.tool_calls or []]
    return choice.message.content, calls, choice.finish_reason


def same_message(streamed, whole) -> bool:
    """Equal but for the calls' ids (each response makes its own)."""
    def strip(m):
        return m[0], [(c["name"], c["arguments"]) for c in m[1]], m[2]
    return strip(streamed) == strip(whole)


NAMED = {"type": "function", "function": {"name": "get_weather"}}


# (tool_choice, max_tokens): whole calls; calls cut in their arguments (a required call's head, the marker
# and `{"name":...,"arguments":`, takes about 20 of the tiny model's tokens); cut at the first token
@pytest.mark.parametrize("tool_choice,max_tokens", [
    ("required", 150), (NAMED, 150), ("required", 48), (NAMED, 12), ("required", 1), (NAMED, 1),
], ids=["required", "named", "required-cut", "named-cut", "required-one-token", "named-one-token"])
async def test_a_tool_call_is_the_same_streamed_and_not(client, tool_choice, max_tokens):
    """Complete, or cut by max_tokens: the same message either way. A cut call is the partial call (its
    arguments so far) with finish_reason "length", as OpenAI gives it; never the reply's raw text."""
    for seed in range(3):
        kwargs = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": max_tokens, "seed": seed,
                  "tools": [WEATHER, TIME], "tool_choice": tool_choice}
        whole = whole_message(await client.chat.completions.create(**kwargs))
        streamed = await streamed_message(client, **kwargs)
        assert same_message(streamed, whole), (streamed, whole)
        content, calls, finish = whole
        assert content is None
        if max_tokens == 150:
            assert finish == "tool_calls" and calls
            for call in calls:
                assert call["id"].startswith("call_")
                jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        else:
            assert finish == "length"
            if max_tokens > 1 or tool_choice == NAMED:  # the call began: its name, its arguments so far
                (call,) = calls
                assert call["name"] in SCHEMAS and call["arguments"].startswith("{")
                assert "arguments" not in call["arguments"]  # no wrapper of ours
                with pytest.raises(json.JSONDecodeError):
                    json.loads(call["arguments"])
            else:  # one token of the marker: no call began
                assert calls == []


def token_bias(tokenizer, text: str, value: int) -> dict[str, int]:
    return {str(t): value for t in tokenizer.encode(text, add_special_tokens=False)}


async def test_tool_choice_auto_is_the_default_and_answers_in_text(client, tiny_tokenizer):
    """Tools without tool_choice (what the OpenAI SDKs, LangChain and the Agents SDK send): "auto". Kept from
    the marker's first token, the model answers in plain text, streamed as content, never a call."""
    kwargs = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 20, "seed": 1, "tools": [WEATHER, TIME],
              "logit_bias": token_bias(tiny_tokenizer, "<", -100)}
    whole = whole_message(await client.chat.completions.create(**kwargs))
    streamed = await streamed_message(client, **kwargs)
    assert same_message(streamed, whole)
    content, calls, finish = whole
    assert calls == [] and finish == "length" and content and not content.startswith("<")
    stopped = await client.chat.completions.create(**{**kwargs, "stop": [content[3:6]]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.tool_calls is None


async def test_tool_choice_auto_makes_calls_when_the_model_starts_one(client, tiny_tokenizer):
    """Pushed towards the marker's first token: the reply is calls, parsed into tool_calls with finish
    "tool_calls"; the stream shows no markup as content."""
    for parallel in (False, True):
        kwargs = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 120, "seed": 2, "tools": [WEATHER, TIME],
                  "tool_choice": "auto", "parallel_tool_calls": parallel,
                  "logit_bias": token_bias(tiny_tokenizer, "<", 100)}
        whole = whole_message(await client.chat.completions.create(**kwargs))
        streamed = await streamed_message(client, **kwargs)
        assert same_message(streamed, whole), (streamed, whole)
        content, calls, finish = whole
        assert content is None and calls
        if not parallel:  # one call, and the reply ends with it
            assert len(calls) == 1 and finish == "tool_calls"
        for call in calls[:-1] if finish == "length" else calls:
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


async def test_tool_choice_none_is_plain_text(client):
    reply = await client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=5, seed=1,
                                                 tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("length", "stop")


async def test_a_tool_result_continues_the_conversation(client, tiny_tokenizer):
    """The follow-up turn: the call and its result in the history, tools still offered (auto)."""
    history = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city":"Paris","unit":"C"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    reply = await client.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=5, seed=1,
                                                 tools=[WEATHER, TIME],
                                                 logit_bias=token_bias(tiny_tokenizer, "<", -100))
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.choices[0].message.content


@pytest.mark.parametrize("extra,param,mentions", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "Only one"),
    ({"response_format": json_schema_format({"type": "object", "if": {}, "then": {}})}, "response_format", "if"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
])
async def test_what_cannot_be_done_is_a_400_that_says_why(api, extra, param, mentions):
    response = await api.client.post("/v1/chat/completions",
                                     json={"model": MODEL_NAME, "messages": HELLO, "max_tokens": 4, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and mentions in error["message"], error
