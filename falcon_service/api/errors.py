"""One place that maps failures to OpenAI error objects and HTTP status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import EngineError, InvalidRequest, QueueFullError
from .protocol import ErrorDetail, ErrorResponse, new_id

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error with its OpenAI shape: status, message, type, param, code."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def not_ready() -> APIError:
    return APIError(503, "The model is still loading; retry shortly.", type="service_unavailable",
                    code="model_not_ready", headers={"Retry-After": "5"})


def load_failed(reason: str) -> APIError:
    """The model could not be loaded: this server will not serve until it is restarted with a fix."""
    return APIError(503, f"Loading the model failed, so this server cannot serve: {reason}", type="server_error",
                    code="model_load_failed")


def to_api_error(exc: BaseException) -> APIError:
    """Map any failure to the error the client gets. Only the client's errors (`APIError`, validation,
    `InvalidRequest`) are 4xx; anything else is the server's: a 500 with an error id that the log line
    carries too, and no internal text (an exception's message is not the client's business)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, QueueFullError):
        return APIError(429, f"The server is at capacity ({exc}); retry shortly.", type="rate_limit_error",
                        code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, InvalidRequest):
        return bad_request(str(exc), param=exc.param, code=exc.code)
    error_id = new_id("err")
    if isinstance(exc, EngineError):  # its message is written for the client; the engine logged the cause
        log.error("request failed in the engine: %s (error id %s)", exc, error_id)
        return APIError(500, f"The server failed to generate the reply: {exc} (error id {error_id}).",
                        type="server_error", code="internal_error")
    log.error("unexpected error (error id %s)", error_id, exc_info=exc)
    return APIError(500, f"The server failed on this request (error id {error_id}); its log has the details.",
                    type="server_error", code="internal_error")


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> APIError:
    """The 400 for a request that failed validation (pydantic's error list), naming the first bad field."""
    # a union field reports each alternative's failure; a check of ours (value_error) says the most
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    if first.get("type") == "json_invalid":
        return bad_request("The request body is not valid JSON.")
    param = _param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return bad_request(f"Invalid value for `{param}`: {msg}" if param else msg, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app returns an OpenAI error object (422 becomes 400)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    # Each failure class gets its own handler. Anything else is caught by `CatchAll`, not by a handler
    # for `Exception`: Starlette answers that one from its outermost middleware and then re-raises,
    # which drops the client's keep-alive connection with no `Connection: close`.
    for cls in (QueueFullError, EngineError, InvalidRequest):
        app.add_exception_handler(cls, _mapped)
    app.add_middleware(CatchAll)


class CatchAll:
    """Turns an unexpected failure into a 500 error object, like any other error: the connection stays
    usable. (Once a response has begun, as a stream has, nothing can be sent instead: then it re-raises.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = to_api_error(exc).response()
            await response(scope, receive, send)
