"""Tiny causal language models in Hugging Face format, built from a config (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from potstill.toy.tokenizer import build_tokenizer


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_position_embeddings: int = 256,
    **extra,
) -> LlamaConfig:
    """A small Llama for `tokenizer`; `extra` goes to LlamaConfig (e.g. initializer_range)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **extra,
    )


def build_tiny_model(
    path: str | Path, seed: int = 0, **config_overrides
) -> Path:
    """Save a randomly initialised tiny Llama and its tokenizer under `path`; returns the path.

    Loadable with `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`.
    """
    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **config_overrides))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
