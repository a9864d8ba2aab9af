"""The tokenizer half of the backend protocol, for every backend that holds a Hugging Face tokenizer."""

from __future__ import annotations

from typing import Any

from teacher_service.backends.base import ChatTemplateOptions


class TokenizerHelpers:
    tokenizer: Any

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_continuation(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[dict[str, Any]], template: ChatTemplateOptions = ChatTemplateOptions()) -> list[int]:
        # Rendered, then tokenised: the template writes its own special tokens, the tokenizer adds
        # its own only when asked (vLLM's `add_special_tokens`, off by default for chat).
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=template.add_generation_prompt,
            continue_final_message=template.continue_final_message,
        )
        return self.encode(text, add_special_tokens=template.add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
