"""The front door against a real `bentoml serve`, tried as a hostile or careless client would."""

from __future__ import annotations

import json
import random
import socket
import string
import time
from urllib.parse import urlparse

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "hello"}]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def series(url: str) -> int:
    return sum(1 for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
               if line and not line.startswith("#"))


def test_random_paths_do_not_grow_metrics(server):
    paths = ["/" + "".join(random.choices(string.ascii_lowercase, k=12)) for _ in range(60)]
    paths += [f"/v1/{p}" for p in paths[:20]]
    httpx.get(f"{server.url}/nope-warm-up", timeout=30)
    before = series(server.url)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in paths:
            assert_openai_error(c.get(path), 404)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert series(server.url) == before, "unknown paths added metric series"
    assert not any(p in text for p in paths)


def test_a_body_over_the_limit_is_a_413_before_it_is_read(edge_server):
    headers = {"Authorization": f"Bearer {edge_server.api_key}"}
    big = {"model": edge_server.model, "messages": [{"role": "user", "content": "x" * 100_000}]}
    error = assert_openai_error(httpx.post(f"{edge_server.url}/v1/chat/completions", json=big, headers=headers,
                                           timeout=30), 413)
    assert error["code"] == "request_too_large"
    # a streamed body with no Content-Length: counted as it arrives
    chunks = (json.dumps(big).encode()[i:i + 8192] for i in range(0, len(json.dumps(big)), 8192))
    streamed = httpx.post(f"{edge_server.url}/chat", content=chunks, timeout=30,
                          headers={**headers, "content-type": "application/json"})
    assert_openai_error(streamed, 413)
    # for the native APIs too, and before the key is even looked at? No: the key comes first
    assert_openai_error(httpx.post(f"{edge_server.url}/generate", json={"prompt": "x" * 100_000}, timeout=30), 401)


def test_the_key_comes_first_and_guards_docs_and_metrics_when_asked(edge_server):
    url = edge_server.url
    bad_body_no_key = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30,
                                 headers={"content-type": "application/json"})
    assert_openai_error(bad_body_no_key, 401)
    for path in ("/metrics", "/docs.json", "/schema.json", "/", "/v1/openapi.json", "/docs", "/redoc", "/openapi.json",
                 "/v1/models", "/no/such/path"):
        assert_openai_error(httpx.get(f"{url}{path}", timeout=30), 401)
    for probe in ("/livez", "/readyz", "/health"):  # orchestrators need no key
        assert httpx.get(f"{url}{probe}", timeout=30).status_code == 200
    keyed = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {edge_server.api_key}"}, timeout=30)
    assert keyed.status_code == 200 and "falcon_requests_running" in keyed.text


def test_docs_do_not_advertise_the_server_software(server):
    text = httpx.get(f"{server.url}/docs.json", timeout=30).text
    assert bentoml.__version__ not in text and "BentoML" not in text
    assert "/generate" in text  # still the API's document


def raw_connection(url: str) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=30)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closed the connection (or answered and closed) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_slowloris_head_is_cut_off(edge_server):
    sock = raw_connection(edge_server.url)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    for _ in range(3):  # a header line a second: each byte would restart a keep-alive timer
        time.sleep(1)
        try:
            sock.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break
    assert closed_within(sock, 10), "a connection without a whole request head stayed open"
    assert time.monotonic() - started < 15


def test_a_stalled_body_is_a_408(edge_server):
    sock = raw_connection(edge_server.url)
    key = edge_server.api_key.encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key + b"\r\nContent-Length: 500\r\n\r\n{\"model\":")
    sock.settimeout(15)
    reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert closed_within(sock, 10)


@pytest.fixture(scope="module")
def bento(server):
    with bentoml.SyncHTTPClient(server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"prompt": "The falcon", "n": 10000}, "n"),
    ("/generate", {"prompt": "The falcon", "temperature": 5}, "temperature"),
    ("/generate", {"prompt": "The falcon", "max_tokens": True}, "max_tokens"),
    ("/chat", {"messages": HELLO, "max_tokens": 4, "bogus": 1}, "bogus"),
    ("/chat", {"messages": [{"role": "robot", "content": "hi"}]}, None),
])
def test_native_api_errors_have_the_openai_shape(server, path, body, param):
    error = assert_openai_error(httpx.post(f"{server.url}{path}", json=body, timeout=30), 400)
    if param is not None:
        assert error["param"] == param
    assert error["message"]


def test_a_native_api_refuses_multipart_with_a_415(server):
    response = httpx.post(f"{server.url}/chat", files={"messages": ("m.json", b"[]")}, timeout=30)
    assert_openai_error(response, 415)


def test_the_bentoml_client_sees_the_message(bento):
    with pytest.raises(BentoMLException, match="temperature"):
        list(bento.generate(prompt="The falcon", temperature=5))


def test_a_lone_surrogate_is_a_400_and_the_connection_serves_the_next_request(server):
    # json.dumps writes the lone surrogate as the escape \\ud800, as a client's JSON would carry it
    raw = json.dumps({"model": server.model, "messages": [{"role": "user", "content": "hi \ud800"}],
                      "max_tokens": 2}).encode()
    assert b"\\ud800" in raw
    with httpx.Client(base_url=server.url, timeout=30) as c:
        error = assert_openai_error(c.post("/v1/chat/completions", content=raw,
                                           headers={"content-type": "application/json"}), 400)
        assert "surrogate" in error["message"]
        again = c.post("/v1/chat/completions", json={"model": server.model, "messages": HELLO, "max_tokens": 2})
        assert again.status_code == 200


DOCS = {"/": 200, "/docs.json": 200, "/schema.json": 200, "/v1/openapi.json": 200,
        "/docs": 307, "/redoc": 307, "/openapi.json": 307}


def test_every_docs_path_answers_alike_without_the_key(guarded_server):
    """With a key that guards the API (scope "api"), every docs path is open, the usual names included
    (they redirect to the docs); the API and unknown paths still need the key."""
    with httpx.Client(base_url=guarded_server.url, timeout=30) as c:
        for path, status in DOCS.items():
            response = c.get(path)
            assert response.status_code == status, (path, response.text[:200])
            if status == 307:
                assert c.get(path, follow_redirects=True).status_code == 200
        assert c.get("/openapi.json", follow_redirects=True).json()["paths"].keys() >= {
            "/v1/chat/completions", "/v1/completions", "/generate", "/chat"}
        for path in ("/v1/models", "/no/such/docs"):
            assert_openai_error(c.get(path), 401)
