"""A small byte-level BPE tokenizer trained on the spot.

Digits are always split one per token, so arithmetic stays learnable by tiny models, and the
byte-level alphabet means any text encodes without an unknown token. The training corpus and
settings are fixed, so every call builds the same tokenizer: a teacher and a student built
separately share one vocabulary (and one fingerprint).
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|user|>", "<|assistant|>"]

# One turn per message, the assistant's turn closed by EOS; the generation prompt opens it.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|eos|>"
    "{% else %}<|user|>{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a teacher student model learns from samples tokens network service score generate "
    "distill answer question what is plus minus equals sum difference number result because "
    "so then first second we add subtract carry borrow digit hello world tiny potstill"
).split()


def _corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        a, b = rng.randrange(10_000), rng.randrange(10_000)
        op = rng.choice("+-")
        corpus.append(f"{a}{op}{b}={a + b if op == '+' else a - b}")
        corpus.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 12))) + ".")
    return corpus


def build_tokenizer(vocab_size: int = 384, extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Train the tokenizer and wrap it for transformers (with EOS, PAD and a chat template).

    `extra_special_tokens` (a vision model's image and video placeholders) are added after
    training, at the end of the vocabulary: every other token keeps the id it has without them.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(extra_special_tokens))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(extra_special_tokens),
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
