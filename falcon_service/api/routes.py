"""FastAPI routes: thin glue between HTTP and `OpenAIServing`, plus SSE framing and disconnects.

The API key is the server's edge's (`server/gateway.py`): it checks the key before any route runs and, when
several keys are set, names the caller's tenant in the request's state (`TENANT`), which the routes pass on
as the prefix cache's salt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from .errors import APIError, install_error_handlers, to_api_error
from .protocol import ChatCompletionRequest, CompletionRequest
from .serving import OpenAIServing

T = TypeVar("T")
DISCONNECT_POLL_SECONDS = 0.25
TENANT = "tenant"  # the request state's attribute that names the caller's tenant (set by the server's edge)


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def caller_tenant(request: Request) -> str | None:
    """The caller's tenant (which API key, when several are set): its prompts' prefix-cache salt. The native
    BentoML APIs use it too."""
    return getattr(request.state, TENANT, None)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client hangs up first (its sequences are then aborted).
    The native BentoML APIs use it too."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


Tenant = Annotated[str | None, Depends(caller_tenant)]


def _respond(result: BaseModel | AsyncIterator[str]) -> JSONResponse | StreamingResponse:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _answer(request: Request, stream: bool | None, streamed: Callable[[], Awaitable[AsyncIterator[str]]],
                  whole: Callable[[], Awaitable[BaseModel]]) -> JSONResponse | StreamingResponse:
    """SSE lines when the body asks to stream, else the whole response (cancelled if the client leaves)."""
    if stream:
        return _respond(await streamed())
    return _respond(await until_disconnect(request, whole()))


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse(_serving(request).models().model_dump())

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: Tenant):
        serving = _serving(request)
        return await _answer(request, body.stream, lambda: serving.chat_stream(body, tenant),
                             lambda: serving.chat(body, tenant))

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: Tenant):
        serving = _serving(request)
        return await _answer(request, body.stream, lambda: serving.completion_stream(body, tenant),
                             lambda: serving.completion(body, tenant))

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(path: str) -> JSONResponse:
        raise APIError(404, f"Unknown endpoint /v1/{path}.", code="unknown_url")

    return router


def create_app(serving: OpenAIServing) -> FastAPI:
    """The OpenAI-compatible app: `/v1/...` routes and `/health` (200 when ready, 503 while loading)."""
    app = FastAPI(title="Falcon Service OpenAI API", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")
    app.state.serving = serving
    install_error_handlers(app)
    app.include_router(build_router())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 when the model serves; 503 while it loads, or for good once loading it failed (saying why)."""
        serving = _serving(request)
        if not serving.ready:
            return to_api_error(serving.unavailable()).response()
        return JSONResponse({"status": "ok"})

    return app


def served_paths(app: FastAPI) -> set[str]:
    """The exact paths the app serves (its documented routes and the schema itself); the catch-all that
    answers unknown /v1 paths is not one of them."""
    return set(app.openapi()["paths"]) | ({app.openapi_url} if app.openapi_url else set())
