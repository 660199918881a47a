"""The server's front door in process, around the OpenAI app as the service serves it: the API key (and the
tenant it names), unknown paths, body limits, draining. (tests/e2e checks the same through `bentoml serve`.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from falcon_service.api.errors import RETRY_AFTER_SECONDS
from falcon_service.api.routes import create_app, served_paths
from falcon_service.api.serving import OpenAIServing
from falcon_service.engine import EngineClient
from falcon_service.engine.engine import Engine
from falcon_service.engine.scheduler import BatchLimits
from falcon_service.server.gateway import Drain, Gateway, GatewayRules

MODEL_NAME = "falcon-7b-instruct"
LIMITS = BatchLimits(max_batch_size=4, max_batch_tokens=8 * 2048, max_prefill_tokens=512, max_queue_size=8)


def chat_body(content: str = "What do falcons eat?", **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": {"message": response.json()["error"]["message"], "type": type_,
                                         "param": None, "code": code}}


@pytest.fixture
async def gated(tiny_model, tiny_tokenizer) -> AsyncIterator:
    """`gated(**rules)`: a client of the OpenAI app (a ready engine with prefix caching) behind the gateway."""
    engines: list[Engine] = []
    clients: list[httpx.AsyncClient] = []

    def make(drain: Drain | None = None, **rules) -> httpx.AsyncClient:
        serving = OpenAIServing(MODEL_NAME)
        engines.append(Engine(tiny_model, tiny_tokenizer, LIMITS, prefix_caching=True))
        serving.attach(EngineClient(engines[-1]))
        app = create_app(serving)
        gateway = Gateway(app, GatewayRules(routes=frozenset(served_paths(app)), **rules), drain)
        clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://test"))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()
    for engine in engines:
        engine.shutdown()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer ", "Basic k", "k", "Bearer kk"])
async def test_api_key_is_required(gated, authorization: str | None):
    client = gated(api_key="k")
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert_error(response, 401, "authentication_error", "invalid_api_key")
    models = await client.get("/v1/models", headers=headers)
    assert_error(models, 401, "authentication_error", "invalid_api_key")


async def test_right_api_key_is_accepted(gated):
    client = gated(api_key="k")
    headers = {"Authorization": "Bearer k"}
    models = await client.get("/v1/models", headers=headers)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL_NAME
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert response.status_code == 200, response.text


async def test_each_key_is_a_tenant_whose_prompts_share_cached_prefixes_only_with_its_own(gated):
    """The gateway names the caller's tenant; the routes salt its prompts' cached prefixes with it."""
    client = gated(api_key="key-a,key-b")
    prompt = "A falcon's prompt long enough to fill a few blocks of the prefix cache: " * 3

    async def cached(key: str) -> int:
        response = await client.post("/v1/chat/completions", json=chat_body(prompt),
                                     headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert await cached("key-a") == 0
    assert await cached("key-a") > 0  # the same tenant: its prefix is cached
    assert await cached("key-b") == 0  # another tenant: nothing of key-a's is reused


async def test_unknown_paths_and_large_bodies_are_refused_before_the_app(gated):
    client = gated(max_body_bytes=1024)
    assert_error(await client.get("/v2/models"), 404, "invalid_request_error", "unknown_url")
    too_large = await client.post("/v1/chat/completions", json=chat_body("x" * 2000))
    assert_error(too_large, 413, "invalid_request_error", "request_too_large")


async def test_a_draining_server_turns_new_requests_away_with_retry_after(gated):
    drain = Drain()
    client = gated(drain=drain)
    assert (await client.get("/v1/models")).status_code == 200
    drain.begin()
    response = await client.get("/v1/models")
    assert_error(response, 503, "service_unavailable", "shutting_down")
    assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert (await client.get("/health")).status_code == 200  # probes pass: the orchestrator sees it unready
