"""The API key: one check for the OpenAI routes and the native BentoML APIs.

The setting holds one key or several, separated by commas. With several, each key is a tenant: its
callers' prompts share cached prefixes only with prompts sent with the same key (the prefix cache is
salted by the key), so no caller can learn from `cached_tokens` what another's prompts held.
"""

from __future__ import annotations

import hmac

from ..api.errors import APIError


def api_keys(setting: str | None) -> tuple[str, ...]:
    """The keys of the setting (comma-separated; blanks ignored)."""
    return tuple(k.strip() for k in (setting or "").split(",") if k.strip())


def check_api_key(authorization: str | None, setting: str | None) -> str | None:
    """Raise a 401 `APIError` unless the `Authorization` header is `Bearer <key>` for one of the keys (or no
    key is set). Returns the caller's tenant: which key it sent, when there are several; else None."""
    keys = api_keys(setting)
    if not keys:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    sent = token.strip().encode()
    matched = [hmac.compare_digest(sent, key.encode()) for key in keys]  # every key compared: no timing hint
    if scheme.lower() != "bearer" or not any(matched):
        raise APIError(401, "Invalid or missing API key (send `Authorization: Bearer <key>`).",
                       type="authentication_error", code="invalid_api_key")
    return f"key{matched.index(True)}" if len(keys) > 1 else None
