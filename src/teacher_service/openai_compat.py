"""OpenAI-compatible completions and chat completions on top of `TeacherService`, shaped as vLLM
shapes them, so a client written against vLLM's server works unchanged.

Shapes only: sampling and scoring go through the service's own `generate` and `score`, so the
limits, the queue and the metrics are the same as for the native endpoints. Served: n, batched
prompts, logprobs / top_logprobs (the chosen token first, as vLLM lists it), echo with prompt
log-probs (the `max_tokens=0` scoring trick included), vLLM's `prompt_logprobs` with true
ranks, the sampling settings of `protocol.SamplingSettings`, and `stream` as server-sent events.

Streaming: the teacher batches whole samples (a trainer's unit), so a streamed answer is cut into
one event per token once its samples are done: the events and their order are vLLM's, their
timing is not incremental.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from teacher_service.backends.base import ChatTemplateOptions, PromptInput
from teacher_service.errors import InvalidRequest
from teacher_service.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    OpenAIRequest,
    Sample,
    ScoredSequence,
    ScoreRequest,
    TokenDistributions,
)
from teacher_service.service import TeacherService

# JSON has no infinity: vLLM (and OpenAI) write an impossible token's log-prob as this.
LOWEST_LOGPROB = -9999.0


@dataclass
class Choice:
    """One answer of a request, before it is shaped: its prompt, its sample and what to show."""

    index: int
    prompt_ids: list[int]
    prompt_view: ScoredSequence | None
    sample: Sample | None
    echo_text: str = ""


class OpenAICompat:
    def __init__(self, service: TeacherService):
        self.service = service

    # --- completions ---

    async def completions(self, request: CompletionRequest) -> dict[str, Any]:
        return self._completion_response(request, await self._completion_choices(request))

    async def _completion_choices(self, request: CompletionRequest) -> list[Choice]:
        """n choices per prompt, in prompt order (vLLM's numbering of a batch)."""
        choices: list[Choice] = []
        template = ChatTemplateOptions(add_special_tokens=request.add_special_tokens)
        for prompt in request.prompts:
            prompt_ids = await self.service.prompt_ids(prompt, template)
            self._check_fits(prompt_ids, request.max_tokens, "prompt")
            prompt_view = await self._prompt_view(prompt_ids, _prompt_k(request, request.logprobs))
            # max_tokens=0 scores only: the prompt is echoed, nothing is generated.
            samples = await self._generate(prompt_ids, request, request.max_tokens, request.logprobs or 0) if request.max_tokens else [None] * request.n
            echo_text = ""
            if request.echo:  # the prompt as sent; token ids as their text, special tokens included
                echo_text = prompt if isinstance(prompt, str) else self.service.decode(prompt_ids, skip_special_tokens=False)
            for sample in samples:
                choices.append(Choice(len(choices), prompt_ids, prompt_view, sample, echo_text))
        return choices

    def _completion_response(self, request: CompletionRequest, choices: list[Choice]) -> dict[str, Any]:
        shaped = []
        for choice in choices:
            sample = choice.sample
            answer = {
                "index": choice.index,
                "text": choice.echo_text + (sample.text if sample else ""),
                "logprobs": self._legacy_logprobs(choice, request.echo, request.logprobs, request.return_tokens_as_token_ids)
                if request.logprobs is not None else None,
                "finish_reason": sample.finish_reason if sample else "length",
                "stop_reason": sample.stop_reason if sample else None,
                "prompt_logprobs": self._vllm_prompt_logprobs(choice.prompt_ids, choice.prompt_view),
            }
            if request.return_token_ids:
                answer["token_ids"] = sample.token_ids.tolist() if sample else []
                answer["prompt_token_ids"] = list(choice.prompt_ids)
            shaped.append(answer)
        return self._envelope("cmpl", "text_completion", shaped, choices)

    # --- chat completions ---

    async def chat_completions(self, request: ChatCompletionRequest) -> dict[str, Any]:
        return (await self._chat(request))[0]

    async def _chat(self, request: ChatCompletionRequest) -> tuple[dict[str, Any], list[Choice]]:
        template = ChatTemplateOptions(request.add_generation_prompt, request.continue_final_message, request.add_special_tokens)
        prompt = await self.service.prompt_input(request.messages, "messages", template=template)  # images and videos included
        prompt_ids = prompt.ids
        max_tokens = request.max_completion_tokens or request.max_tokens or 16
        self._check_fits(prompt_ids, max_tokens, "messages")
        prompt_k = _prompt_k(request, request.top_logprobs)
        if prompt_k is not None and prompt.media is not None:
            raise InvalidRequest("not available for prompts with images or videos", field="prompt_logprobs" if request.prompt_logprobs is not None else "echo")
        prompt_view = await self._prompt_view(prompt_ids, prompt_k)
        samples = await self._generate(prompt_ids, request, max_tokens, request.top_logprobs or 0, prompt)
        last = request.messages[-1]
        # vLLM's echo: the reply carries on the last turn when that turn is the assistant's own.
        echo_text = last.text if request.echo and last.role == "assistant" else ""
        choices = [Choice(index, prompt_ids, prompt_view, sample, echo_text) for index, sample in enumerate(samples)]
        shaped = [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.echo_text + choice.sample.text},
                "logprobs": {"content": self._chat_logprobs(choice.sample, request.top_logprobs or 0)} if request.logprobs else None,
                "finish_reason": choice.sample.finish_reason,
                "stop_reason": choice.sample.stop_reason,
            }
            for choice in choices
        ]
        response = self._envelope("chatcmpl", "chat.completion", shaped, choices)
        response["prompt_logprobs"] = self._vllm_prompt_logprobs(prompt_ids, prompt_view)
        return response, choices

    def _check_fits(self, prompt_ids: list[int], new_tokens: int, field: str) -> None:
        """Refuse a prompt that leaves no room for `new_tokens`, naming the caller's field (not the internal request's)."""
        limit = self.service.limits.max_model_len
        if len(prompt_ids) + new_tokens > limit:
            raise InvalidRequest(
                f"{len(prompt_ids)} prompt tokens + {new_tokens} new tokens exceed the teacher's context of {limit}", field=field
            )

    # --- service calls ---

    async def _prompt_view(self, prompt_ids: list[int], k: int | None) -> ScoredSequence | None:
        """The teacher's distribution along the prompt (from its second token), when asked for."""
        if k is None or len(prompt_ids) < 2:
            return None
        score = self.service.parse(
            ScoreRequest, {"sequences": [{"prompt": prompt_ids[:1], "completion": prompt_ids[1:]}], "top_logprobs": k}
        )
        return (await self.service.score(score)).results[0]

    async def _generate(
        self, prompt_ids: list[int], request: OpenAIRequest, max_tokens: int, k: int, prompt: PromptInput | None = None,
    ) -> list[Sample]:
        """n samples of a prompt; `prompt`: the prompt already resolved, with its media."""
        generate = self.service.parse(
            GenerateRequest,
            {"prompts": [prompt_ids], "n": request.n, "max_tokens": max_tokens, "top_logprobs": k, **request.sampling_fields()},
        )
        return (await self.service.generate(generate, None if prompt is None else [prompt])).results[0].samples

    # --- shaping ---

    def _token_text(self, token_id: int) -> str:
        # Special tokens keep their text ("<|eos|>"), as OpenAI and vLLM show them; "" would hide which one it was.
        return self.service.decode([int(token_id)], skip_special_tokens=False)

    def _legacy_logprobs(self, choice: Choice, echo: bool, k: int, as_ids: bool = False) -> dict[str, Any]:
        """OpenAI's legacy `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset.

        Each `top_logprobs` entry lists the chosen token first, then the top k (k + 1 entries when the
        chosen one is not among them), as vLLM does. as_ids (vLLM's `return_tokens_as_token_ids`):
        tokens and keys are "token_id:N", so ids that decode alike stay apart.
        """
        name = (lambda token_id: f"token_id:{int(token_id)}") if as_ids else self._token_text
        tokens, token_logprobs, top_logprobs = [], [], []
        parts: list[tuple[list[int], TokenDistributions | None]] = []
        if echo:
            # The first prompt token has no context, hence no log-prob (None, as OpenAI returns).
            parts.append((choice.prompt_ids[:1], None))
            if choice.prompt_view is not None:
                parts.append((choice.prompt_ids[1:], choice.prompt_view))
        if choice.sample is not None:
            parts.append((choice.sample.token_ids.tolist(), choice.sample))
        for ids, view in parts:
            tokens += [name(t) for t in ids]
            if view is None:
                token_logprobs += [None] * len(ids)
                top_logprobs += [None] * len(ids)
                continue
            token_logprobs += [max(lp, LOWEST_LOGPROB) for lp in view.token_logprobs.tolist()]
            # The first k + 1 of the listing (the view may hold more than k: prompt_logprobs asked for more).
            top_logprobs += [_keyed(name, entries[: k + 1]) for entries in _chosen_first(view, view.top_ids.shape[1])]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}

    def _vllm_prompt_logprobs(self, prompt_ids: list[int], view: ScoredSequence | None) -> list[dict | None] | None:
        """vLLM's `prompt_logprobs`: None for the first token, then {id: {logprob, rank, decoded_token}},
        the prompt token first with its true rank in the vocabulary, then the top k."""
        if view is None:
            return None
        return [None] + [
            {str(token_id): {"logprob": max(logprob, LOWEST_LOGPROB), "rank": rank, "decoded_token": self._token_text(token_id)}
             for token_id, logprob, rank in row}
            for row in _chosen_first(view, view.top_ids.shape[1])
        ]

    def _chat_logprobs(self, sample: Sample, k: int) -> list[dict[str, Any]]:
        """Chat `logprobs.content`: per token its text, log-prob, bytes and `top_logprobs`: the chosen
        token first, then the most likely others, k entries in all (vLLM's listing)."""
        content = []
        for token_id, token_lp, row in zip(sample.token_ids.tolist(), sample.token_logprobs.tolist(), _chosen_first(sample, k)):
            text = self._token_text(token_id)
            content.append(
                {
                    "token": text,
                    "logprob": max(token_lp, LOWEST_LOGPROB),
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {"token": self._token_text(i), "logprob": max(lp, LOWEST_LOGPROB), "bytes": list(self._token_text(i).encode())}
                        for i, lp, _ in row[:k]
                    ],
                }
            )
        return content

    def _envelope(self, prefix: str, kind: str, choices: list[dict], raw: list[Choice]) -> dict[str, Any]:
        prompt_tokens = sum(len(ids) for ids in {id(c.prompt_ids): c.prompt_ids for c in raw}.values())
        completion_tokens = sum(len(c.sample.token_ids) for c in raw if c.sample is not None)
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.service.settings.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    # --- streaming ---

    async def completions_stream(self, request: CompletionRequest) -> Iterator[str]:
        """The answer as vLLM streams it; bad input is refused before the first event."""
        choices = await self._completion_choices(request)
        body = self._completion_response(request, choices)
        events = []
        for choice, shaped in zip(choices, body["choices"]):
            echoed_tokens = len(choice.prompt_ids) if request.echo else 0
            events += [{"index": choice.index, "text": text, **rest} for text, rest in self._token_events(choice, request, shaped, echoed_tokens)]
        return self._events(request, body, "text_completion", events)

    async def chat_completions_stream(self, request: ChatCompletionRequest) -> Iterator[str]:
        """The answer as vLLM streams it: per choice the role first, then its tokens."""
        body, choices = await self._chat(request)
        events = []
        for choice, shaped in zip(choices, body["choices"]):
            events.append({"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            events += [{"index": choice.index, "delta": {"content": text}, **rest} for text, rest in self._token_events(choice, request, shaped, 0)]
        return self._events(request, body, "chat.completion.chunk", events)

    def _token_events(
        self, choice: Choice, request: OpenAIRequest, shaped: dict[str, Any], echoed_tokens: int,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(text, the rest of the event) per event of one `shaped` choice: the echo with the first
        token, then one event per token; the texts join into the choice's text, the log-prob slices
        into its log-probs, and the last event carries its finish and stop reasons."""
        pieces = self._token_texts(choice.sample, request.skip_special_tokens) if choice.sample is not None else []
        pieces = [choice.echo_text + (pieces[0] if pieces else "")] + pieces[1:]
        bounds = [0, echoed_tokens + (1 if choice.sample is not None else 0)]
        bounds += [bounds[-1] + i for i in range(1, len(pieces))]
        for index, text in enumerate(pieces):
            last = index == len(pieces) - 1
            yield text, {"logprobs": _sliced(shaped["logprobs"], bounds[index], bounds[index + 1]),
                         "finish_reason": shaped["finish_reason"] if last else None,
                         "stop_reason": shaped["stop_reason"] if last else None}

    def _token_texts(self, sample: Sample, skip_special_tokens: bool) -> list[str]:
        """The sample's text cut at its tokens: piece i holds what token i completed (a token that
        ends inside a character waits for the next), and the pieces join into `sample.text` also
        where a stop string cut it."""
        ids = sample.token_ids.tolist()
        ends, end = [], 0
        for count in range(1, len(ids)):
            end = max(end, min(len(self.service.decode(ids[:count], skip_special_tokens)), len(sample.text)))
            ends.append(end)
        ends.append(len(sample.text))
        return [sample.text[start:stop] for start, stop in zip([0] + ends[:-1], ends)]

    def _events(self, request: OpenAIRequest, body: dict[str, Any], kind: str, choices: list[dict[str, Any]]) -> Iterator[str]:
        """Server-sent events: one per choice event, the usage last when `stream_options.include_usage`
        (on every event with `continuous_usage_stats`), then `[DONE]`."""
        header = {"id": body["id"], "object": kind, "created": body["created"], "model": body["model"]}
        options = request.stream_options
        continuous = {"usage": body["usage"]} if options is not None and options.continuous_usage_stats else {}
        for choice in choices:
            yield _event({**header, "choices": [choice], **continuous})
        if options is not None and options.include_usage:
            yield _event({**header, "choices": [], "usage": body["usage"]})
        yield "data: [DONE]\n\n"


def _prompt_k(request: OpenAIRequest, k: int | None) -> int | None:
    """The top-k wanted along the prompt: `prompt_logprobs`, or with `echo` the answer's own k (vLLM
    asks its engine for prompt log-probs then, and fills `prompt_logprobs` with them)."""
    return request.prompt_logprobs if request.prompt_logprobs is not None else (k if request.echo else None)


def _chosen_first(view: TokenDistributions, k: int) -> list[list[tuple[int, float, int | None]]]:
    """Per position: (id, log-prob, rank) of the actual token first, then of the top k in rank order
    without it again — vLLM's order. The actual token's rank is its true one where the view carries
    ranks (scores), else known only inside the top k (samples)."""
    ranks = view.token_ranks.tolist() if isinstance(view, ScoredSequence) and view.token_ranks is not None else None
    rows = []
    for position, (token_id, token_lp, ids, lps) in enumerate(zip(
        view.token_ids.tolist(), view.token_logprobs.tolist(), view.top_ids[:, :k].tolist(), view.top_logprobs[:, :k].tolist()
    )):
        ranked = list(zip(ids, lps, range(1, len(ids) + 1)))
        own_rank = ranks[position] if ranks is not None else next((rank for i, _, rank in ranked if i == token_id), None)
        rows.append([(token_id, token_lp, own_rank)] + [entry for entry in ranked if entry[0] != token_id])
    return rows


def _keyed(name, entries: list[tuple[int, float, int | None]]) -> dict[str, float]:
    """A legacy `top_logprobs` entry; ids that decode alike share a key, the first listed keeps it."""
    top: dict[str, float] = {}
    for token_id, logprob, _ in entries:
        top.setdefault(name(token_id), max(logprob, LOWEST_LOGPROB))
    return top


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _sliced(logprobs: dict[str, Any] | None, start: int, stop: int) -> dict[str, Any] | None:
    """Positions [start, stop) of a choice's `logprobs` (legacy lists or chat `content`)."""
    if logprobs is None:
        return None
    return {key: values[start:stop] for key, values in logprobs.items()}
