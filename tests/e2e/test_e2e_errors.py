"""Errors as OpenAI error objects, over the wire of a real `bentoml serve`."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import bentoml
import httpx
import openai
import pytest
from bentoml.exceptions import BentoMLException

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "hello"}]


# Function-scoped clients: some error paths make the server close the keep-alive connection (see
# test_client_error_keeps_connection_alive), which must not turn into connection errors in other tests.
@pytest.fixture
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        yield c


def _read_response(sock: socket.socket) -> tuple[int, bytes] | None:
    """One HTTP/1.1 response with a content-length from `sock`; None when the server closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return int(lines[0].split()[1]), rest[:length]


def keep_alive_pair(url: str, first: tuple[str, str, dict | None], second: tuple[str, str, dict | None],
                    headers: dict[str, str] | None = None) -> tuple[int | None, int | None]:
    """Send two requests over one keep-alive connection; the statuses (None where none came back)."""
    host, port = url.removeprefix("http://").split(":")
    statuses: list[int | None] = []
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for method, path, body in (first, second):
            payload = json.dumps(body).encode() if body is not None else b""
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            request = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n{extra}\r\n").encode() + payload
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                statuses.append(None)
                continue
            response = _read_response(sock)
            statuses.append(response[0] if response else None)
    return statuses[0], statuses[1]


def assert_error_object(body: dict, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """`body` is exactly `{"error": {"message", "type", "param", "code"}}` with the given values."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_
    assert error["param"] == param
    assert error["code"] == code
    return error


CHAT_400 = [
    pytest.param({"temperature": 5}, "temperature", None, "temperature", id="temperature-5"),
    pytest.param({"n": 0}, "n", None, "n", id="n-0"),
    pytest.param({"stop": ["a", "b", "c", "d", "e"]}, "stop", None, "stop", id="five-stops"),
    pytest.param({"messages": [{"role": "robot", "content": "hi"}]}, "messages", None, "robot", id="unknown-role"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
        "messages", None, "image_url", id="image-part"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                  "tool_choice": {"type": "function", "function": {"name": "g"}}},
                 "tool_choice", None, "`g`", id="tool-choice-not-among-tools"),
    pytest.param({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions",
                 "unsupported_parameter", "functions", id="legacy-functions"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "if": {}, "then": {}}}}}, "response_format", "unsupported_grammar", "if",
                 id="unsupported-schema"),
    pytest.param({"max_tokens": 5000}, "max_tokens", "context_length_exceeded", "context length",
                 id="beyond-context"),
]


@pytest.mark.parametrize(("fields", "param", "code", "mentions"), CHAT_400)
def test_chat_400(client, http, server, fields, param, code, mentions):
    body = {"model": server.model, "messages": HELLO, "max_tokens": 4, **fields}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = assert_error_object(r.json(), "invalid_request_error", param, code)
    assert mentions in error["message"]

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == 400
    assert info.value.param == param and info.value.code == code


def test_400_before_any_stream_byte(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=[{"role": "robot", "content": "x"}],
                                       max_tokens=4, stream=True)
    assert info.value.param == "messages"


def test_completions_400(client, http, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="hi", max_tokens=4, temperature=5)
    assert info.value.param == "temperature"
    r = http.post("/v1/completions", json={"model": server.model, "prompt": "hi", "max_tokens": 4000})
    assert r.status_code == 400
    assert_error_object(r.json(), "invalid_request_error", "max_tokens", "context_length_exceeded")


def test_malformed_json_is_400(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


def test_malformed_json_error_has_no_param(http):
    r = http.post("/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert_error_object(r.json(), "invalid_request_error", None, None)


def test_missing_messages_is_400_not_422(http, server):
    r = http.post("/v1/chat/completions", json={"model": server.model})
    assert r.status_code == 400
    error = assert_error_object(r.json(), "invalid_request_error", "messages")
    assert "messages" in error["message"]
    r = http.post("/v1/completions", json={"model": server.model})
    assert r.status_code == 400
    assert_error_object(r.json(), "invalid_request_error", "prompt")


def test_unknown_model_is_404(client, http, server):
    r = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO})
    assert r.status_code == 404
    error = assert_error_object(r.json(), "invalid_request_error", "model", "model_not_found")
    assert "gpt-4o" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2, stream=True)


def test_unknown_v1_path_is_openai_error(http):
    r = http.get("/v1/no-such-endpoint")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_api_error_keeps_connection_alive(server):
    ok = ("POST", "/v1/chat/completions", {"model": server.model, "messages": HELLO, "max_tokens": 2})
    bad = ("POST", "/v1/chat/completions", {"model": server.model, "messages": HELLO, "n": 0})
    assert keep_alive_pair(server.url, bad, ok) == (400, 200)
    unknown = ("POST", "/v1/chat/completions", {"model": "nope", "messages": HELLO})
    assert keep_alive_pair(server.url, unknown, ok) == (404, 200)


def test_client_error_keeps_connection_alive(server):
    ok = ("POST", "/v1/chat/completions", {"model": server.model, "messages": HELLO, "max_tokens": 2})
    bad = ("POST", "/v1/chat/completions", {"model": server.model, "messages": [{"role": "robot", "content": "x"}]})
    assert keep_alive_pair(server.url, bad, ok) == (400, 200)


def test_queue_full_keeps_connection_alive(guarded_server):
    auth = {"Authorization": f"Bearer {guarded_server.api_key}"}
    full = ("POST", "/v1/chat/completions", {"model": guarded_server.model, "messages": HELLO, "max_tokens": 2})
    models = ("GET", "/v1/models", None)
    assert keep_alive_pair(guarded_server.url, full, models, auth) == (429, 200)


# ---------- the server with an API key and max_queue_size=0 ----------


def test_api_key_required(guarded_server):
    v1, key = f"{guarded_server.url}/v1", guarded_server.api_key
    for wrong in ("wrong-key", key + "x", key[:-1]):
        with openai.OpenAI(base_url=v1, api_key=wrong, max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                bad.models.list()
            assert info.value.status_code == 401
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model=guarded_server.model, messages=HELLO, max_tokens=2)
    for headers in ({}, {"Authorization": "Basic " + key}, {"Authorization": key}):
        r = httpx.get(f"{v1}/models", headers=headers)
        assert r.status_code == 401, headers
        assert_error_object(r.json(), "authentication_error", None, "invalid_api_key")
    with openai.OpenAI(base_url=v1, api_key=key, max_retries=0) as good:
        assert [m.id for m in good.models.list().data] == [guarded_server.model]
    assert httpx.get(f"{guarded_server.url}/health").status_code == 200, "health needs no key"


def test_queue_full_is_429_with_retry_after(guarded_server):
    v1 = f"{guarded_server.url}/v1"
    auth = {"Authorization": f"Bearer {guarded_server.api_key}"}
    for path, body in [
        ("/chat/completions", {"model": guarded_server.model, "messages": HELLO, "max_tokens": 2}),
        ("/chat/completions", {"model": guarded_server.model, "messages": HELLO, "max_tokens": 2, "stream": True}),
        ("/completions", {"model": guarded_server.model, "prompt": "hi", "max_tokens": 2}),
    ]:
        r = httpx.post(v1 + path, json=body, headers=auth, timeout=30)
        assert r.status_code == 429, (path, body, r.text)
        assert int(r.headers["retry-after"]) >= 1
        assert_error_object(r.json(), "rate_limit_error", None, "rate_limit_exceeded")
    with openai.OpenAI(base_url=v1, api_key=guarded_server.api_key, max_retries=0) as c, \
            pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model=guarded_server.model, messages=HELLO, max_tokens=2)
    assert info.value.status_code == 429
    assert info.value.response.headers.get("retry-after")


def test_native_apis_take_the_same_api_key(guarded_server):
    with bentoml.SyncHTTPClient(guarded_server.url, server_ready_timeout=30) as anonymous:
        with pytest.raises(BentoMLException) as info:
            anonymous.chat(messages=HELLO, max_tokens=2)
        assert int(info.value.error_code) == 401
    with bentoml.SyncHTTPClient(guarded_server.url, token=guarded_server.api_key, server_ready_timeout=30) as c:
        # authorised: the request gets through to the (full) queue instead of being refused at the door
        with pytest.raises(BentoMLException) as info:
            c.chat(messages=HELLO, max_tokens=2)
        assert int(info.value.error_code) == 429
