"""Tokenizer fingerprints: equal fingerprints mean two tokenizers turn text into the same ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any

_SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "pad_token", "unk_token")
_MEDIA_TOKEN_ATTRIBUTES = ("image_token", "video_token")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 (hex) over the vocabulary, merges, pre-tokenization rules and special tokens.

    A fast tokenizer is hashed through its full serialised state; a slow one through its
    vocabulary. Either way the special tokens are included, since they decide where a
    sequence ends. Given a vision model's processor, its tokenizer is hashed together with the
    processor's image and video placeholder tokens and their ids (the tokens a picture becomes);
    a text-only tokenizer's fingerprint is unchanged by this.
    """
    processor, tokenizer = (tokenizer, tokenizer.tokenizer) if hasattr(tokenizer, "image_processor") else (None, tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state: dict[str, Any] = (
        json.loads(backend.to_str()) if backend is not None else {"vocab": tokenizer.get_vocab()}
    )
    # Padding and truncation settings are call state (a padded call leaves them set), not how text is tokenised.
    state.update({key: None for key in ("padding", "truncation") if key in state})
    state["special_tokens"] = {name: getattr(tokenizer, name, None) for name in _SPECIAL_TOKEN_ATTRIBUTES}
    if processor is not None:
        tokens = [getattr(processor, name, None) for name in _MEDIA_TOKEN_ATTRIBUTES]
        state["media_tokens"] = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens if token}
    canonical = json.dumps(state, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
