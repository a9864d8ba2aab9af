"""Tokenizer fingerprints: equal fingerprints mean two tokenizers turn text into the same ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any

_SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "pad_token", "unk_token")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 (hex) over the vocabulary, merges, pre-tokenization rules and special tokens.

    A fast tokenizer is hashed through its full serialised state; a slow one through its
    vocabulary. Either way the special tokens are included, since they decide where a
    sequence ends.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state: dict[str, Any] = (
        json.loads(backend.to_str()) if backend is not None else {"vocab": tokenizer.get_vocab()}
    )
    state["special_tokens"] = {name: getattr(tokenizer, name, None) for name in _SPECIAL_TOKEN_ATTRIBUTES}
    canonical = json.dumps(state, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
