"""OpenAI-compatible completions and chat completions on top of `TeacherService`.

Shapes only: sampling and scoring go through the service's own `generate` and `score`, so the
limits, the queue and the metrics are the same as for the native endpoints. Supported: n,
logprobs / top_logprobs, echo (with prompt log-probs, the `max_tokens=0` scoring trick
included), seed, and vLLM's `prompt_logprobs` extension in vLLM's format.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from teacher_service.errors import InvalidRequest
from teacher_service.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    Sample,
    ScoredSequence,
    ScoreRequest,
    TokenDistributions,
)
from teacher_service.service import TeacherService


class OpenAICompat:
    def __init__(self, service: TeacherService):
        self.service = service

    async def completions(self, request: CompletionRequest) -> dict[str, Any]:
        prompt_ids = await self.service.prompt_ids(request.prompt)
        self._check_fits(prompt_ids, request.max_tokens, "prompt")
        k = request.logprobs
        prompt_view = await self._prompt_view(prompt_ids, request, k)
        samples = await self._samples(prompt_ids, request, k or 0)
        prompt_text = ""
        if request.echo:  # the prompt as sent; token ids as their text, special tokens included
            prompt_text = request.prompt if isinstance(request.prompt, str) else self.service.decode(prompt_ids, skip_special_tokens=False)
        choices = []
        for index, sample in enumerate(samples):
            choice = {
                "index": index,
                "text": prompt_text + (sample.text if sample else ""),
                "logprobs": self._legacy_logprobs(prompt_ids, prompt_view, sample, request.echo, k, request.return_tokens_as_token_ids)
                if k is not None
                else None,
                "finish_reason": sample.finish_reason if sample else "length",
            }
            if request.return_token_ids:
                choice["token_ids"] = sample.token_ids.tolist() if sample else []
                choice["prompt_token_ids"] = list(prompt_ids)
            if request.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._vllm_prompt_logprobs(prompt_ids, prompt_view, request.prompt_logprobs)
            choices.append(choice)
        completion_tokens = sum(len(s.token_ids) for s in samples if s)
        return _envelope("cmpl", "text_completion", self.service.settings.model, choices, len(prompt_ids), completion_tokens)

    async def chat_completions(self, request: ChatCompletionRequest) -> dict[str, Any]:
        prompt = await self.service.prompt_input(request.messages, "messages")  # images and videos included
        prompt_ids = prompt.ids
        max_tokens = request.max_completion_tokens or request.max_tokens or 16
        self._check_fits(prompt_ids, max_tokens, "messages")
        generate = self.service.parse(
            GenerateRequest,
            {
                "prompts": [prompt_ids],
                "n": request.n,
                "max_tokens": max_tokens,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "seed": request.seed,
                "top_logprobs": request.top_logprobs or 0,
            },
        )
        samples = (await self.service.generate(generate, [prompt])).results[0].samples
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": sample.text},
                "logprobs": {"content": self._chat_logprobs(sample)} if request.logprobs else None,
                "finish_reason": sample.finish_reason,
            }
            for index, sample in enumerate(samples)
        ]
        completion_tokens = sum(len(s.token_ids) for s in samples)
        return _envelope("chatcmpl", "chat.completion", self.service.settings.model, choices, len(prompt_ids), completion_tokens)

    def _check_fits(self, prompt_ids: list[int], new_tokens: int, field: str) -> None:
        """Refuse a prompt that leaves no room for `new_tokens`, naming the caller's field (not the internal request's)."""
        limit = self.service.limits.max_model_len
        if len(prompt_ids) + new_tokens > limit:
            raise InvalidRequest(
                f"{len(prompt_ids)} prompt tokens + {new_tokens} new tokens exceed the teacher's context of {limit}", field=field
            )

    # --- service calls ---

    async def _prompt_view(self, prompt_ids: list[int], request: CompletionRequest, k: int | None) -> ScoredSequence | None:
        """The teacher's distribution along the prompt (from its second token), when asked for."""
        wants_echo_logprobs = request.echo and k is not None
        if not (wants_echo_logprobs or request.prompt_logprobs is not None) or len(prompt_ids) < 2:
            return None
        top_k = max(k or 0, request.prompt_logprobs or 0)
        score = self.service.parse(
            ScoreRequest, {"sequences": [{"prompt": prompt_ids[:1], "completion": prompt_ids[1:]}], "top_logprobs": top_k}
        )
        return (await self.service.score(score)).results[0]

    async def _samples(self, prompt_ids: list[int], request: CompletionRequest, k: int) -> list[Sample | None]:
        if request.max_tokens == 0:  # scoring only: the prompt is echoed, nothing is generated
            return [None] * request.n
        generate = self.service.parse(
            GenerateRequest,
            {
                "prompts": [prompt_ids],
                "n": request.n,
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "seed": request.seed,
                "top_logprobs": k,
            },
        )
        return (await self.service.generate(generate)).results[0].samples

    # --- shaping ---

    def _token_text(self, token_id: int) -> str:
        # Special tokens keep their text ("<|eos|>"), as OpenAI and vLLM show them; "" would hide which one it was.
        return self.service.decode([int(token_id)], skip_special_tokens=False)

    def _legacy_logprobs(
        self, prompt_ids: list[int], prompt_view: ScoredSequence | None, sample: Sample | None, echo: bool, k: int,
        as_ids: bool = False,
    ) -> dict[str, Any]:
        """OpenAI's legacy `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset.

        as_ids (vLLM's `return_tokens_as_token_ids`): tokens and top_logprobs keys are "token_id:N",
        so ids that decode alike stay apart.
        """
        name = (lambda token_id: f"token_id:{int(token_id)}") if as_ids else self._token_text
        tokens, token_logprobs, top_logprobs = [], [], []
        parts: list[tuple[list[int], TokenDistributions | None]] = []
        if echo:
            # The first prompt token has no context, hence no log-prob (None, as OpenAI returns).
            parts.append((prompt_ids[:1], None))
            if prompt_view is not None:
                parts.append((prompt_ids[1:], prompt_view))
        if sample is not None:
            parts.append((sample.token_ids.tolist(), sample))
        for ids, view in parts:
            tokens += [name(t) for t in ids]
            if view is None:
                token_logprobs += [None] * len(ids)
                top_logprobs += [None] * len(ids)
                continue
            token_logprobs += view.token_logprobs.tolist()
            # The prompt view may hold more than k (prompt_logprobs asked for more); keep each list to its own k.
            # Ids that decode alike share a key: the most likely of them (listed first) keeps it.
            top_logprobs += [
                _first_per_key((name(i), float(lp)) for i, lp in zip(row_ids[:k], row_lps[:k]))
                for row_ids, row_lps in zip(view.top_ids, view.top_logprobs)
            ]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}

    def _vllm_prompt_logprobs(self, prompt_ids: list[int], view: ScoredSequence | None, k: int) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: None for the first token, then {id: {logprob, rank, decoded_token}}."""
        entries: list[dict | None] = [None]
        if view is None:
            return entries + [None] * (len(prompt_ids) - 1)
        for token_id, token_lp, row_ids, row_lps in zip(view.token_ids, view.token_logprobs, view.top_ids, view.top_logprobs):
            entry = {
                str(int(i)): {"logprob": float(lp), "rank": rank, "decoded_token": self._token_text(i)}
                for rank, (i, lp) in enumerate(zip(row_ids[:k], row_lps[:k]), start=1)
            }
            # The actual token is always listed, also outside the top-k (its rank is then unknown here).
            entry.setdefault(
                str(int(token_id)),
                {"logprob": float(token_lp), "rank": None, "decoded_token": self._token_text(token_id)},
            )
            entries.append(entry)
        return entries

    def _chat_logprobs(self, sample: Sample) -> list[dict[str, Any]]:
        content = []
        for token_id, token_lp, row_ids, row_lps in zip(sample.token_ids, sample.token_logprobs, sample.top_ids, sample.top_logprobs):
            text = self._token_text(token_id)
            content.append(
                {
                    "token": text,
                    "logprob": float(token_lp),
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {"token": self._token_text(i), "logprob": float(lp), "bytes": list(self._token_text(i).encode())}
                        for i, lp in zip(row_ids, row_lps)
                    ],
                }
            )
        return content


def _first_per_key(pairs) -> dict[str, float]:
    top: dict[str, float] = {}
    for key, value in pairs:
        top.setdefault(key, value)
    return top


def _envelope(prefix: str, kind: str, model: str, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
