"""The API key check both transports share: `Authorization: Bearer <key>`, the scheme in any case."""

from __future__ import annotations

import secrets


def require_usable_key(api_key: str | None) -> None:
    """Refuse a key that would let anyone in: empty or blank (None means no authentication)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: refusing to serve without authentication")


def bearer_matches(header: str, api_key: str) -> bool:
    """Whether an Authorization header carries `api_key` as its bearer token (RFC 7235: the
    scheme is case-insensitive), compared in constant time."""
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())
