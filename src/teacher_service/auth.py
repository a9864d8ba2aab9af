"""The API key check both transports share: `Authorization: Bearer <key>`, the scheme in any case.

A teacher may accept several keys (one per trainer or team, rotated one at a time); no keys
means no authentication. Admin calls (weight pushes) take admin keys only, never API keys, and
a teacher without admin keys refuses them all. A key file holds one key per line (blank lines and `#` comments are
skipped); the environment variable `POTSTILL_API_KEYS` holds them separated by commas.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

from teacher_service.errors import Forbidden, Unauthenticated


def parse_keys(text: str) -> tuple[str, ...]:
    """The keys in a key file's text or a comma-separated list, in order, blanks and comments skipped."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return tuple(key for line in lines for key in re.split(r"[,\s]+", line) if key)


def require_usable_keys(api_keys: Sequence[str]) -> None:
    """Refuse a key that would let anyone in: an empty or blank one."""
    if any(not key.strip() for key in api_keys):
        raise ValueError("an API key is empty: refusing to serve without authentication")


def bearer_matches(header: str, api_keys: Sequence[str]) -> bool:
    """Whether an Authorization header carries one of `api_keys` as its bearer token (RFC 7235:
    the scheme is case-insensitive). Every key is compared, each in constant time, so the time
    taken tells nothing about which key nearly matched."""
    scheme, _, token = header.strip().partition(" ")
    sent = token.strip().encode()
    matches = [secrets.compare_digest(sent, key.encode()) for key in api_keys]
    return scheme.lower() == "bearer" and any(matches)


def require_admin_key(header: str, admin_keys: Sequence[str]) -> None:
    """Raise `Forbidden` when the teacher has no admin key, `Unauthenticated` when `header` carries none of them."""
    if not admin_keys:
        raise Forbidden("weight pushes are disabled: start the teacher with --admin-key-file or POTSTILL_ADMIN_KEYS")
    if not bearer_matches(header, admin_keys):
        raise Unauthenticated("missing or wrong admin key: send 'Authorization: Bearer <admin key>' (API keys do not count)")
