"""The API key: one check for the OpenAI routes and the native BentoML APIs."""

from __future__ import annotations

import hmac

from .errors import APIError


def check_api_key(authorization: str | None, key: str | None) -> None:
    """Raise a 401 `APIError` unless the `Authorization` header is `Bearer <key>` (or no key is set)."""
    if not key:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Invalid or missing API key (send `Authorization: Bearer <key>`).",
                       type="authentication_error", code="invalid_api_key")
