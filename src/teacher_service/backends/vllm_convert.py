"""Between the backend protocol and vLLM's own types (written against vLLM 0.32.0's source).

Pure functions, testable on a CPU machine with vLLM's Python classes installed (`pip install
--no-deps vllm` and its light dependencies; see `.ci/vllm-conversion`); the engine itself is in
`backends/vllm.py`.

How vLLM 0.32.0 reports log-probs (`vllm/logprobs.py`): per position, a mapping token id ->
`Logprob(logprob, rank, decoded_token)` (or the same flattened in a `FlatLogprobs`) holding the
actual token (the prompt token, or the sampled one) with its true rank in the whole vocabulary,
then the top k with ranks 1..k. The actual token may appear twice when it is in the top k, and
the mapping's order is not the rank order, so entries are always sorted by rank here.
`prompt_logprobs` starts with `None` for the first prompt token (nothing predicts it).

Scoring: the sequence (prompt + completion) is sent as the prompt with `prompt_logprobs=k` and
`max_tokens=1`; the completion's positions are read from the prompt log-probs. vLLM's prompt
log-probs are always the raw model distribution (`ModelConfig.logprobs_mode`: "for
prompt_logprobs, processed_* and raw_* yield identical results"), so a temperature other than 1
cannot be applied to them from a top k. The one exact route in 0.32.0 is full-vocabulary prompt
log-probs (`prompt_logprobs=-1`, V values per position through vLLM's output processor), which
this backend does not take; it refuses such a request, naming `temperature`.

Images and videos (`vllm/inputs/llm.py`, `vllm/multimodal/parse.py`): a prompt's pictures travel
as the `TokensPrompt`'s `multi_modal_data`, `{"image": [PIL images], "video": [uint8 arrays
[frames, height, width, 3]]}`, beside token ids holding ONE placeholder per picture (the chat
template's `<|image_pad|>`): vLLM's multi-modal processor replaces each placeholder by one token
per visual token (`PromptReplacement` in `vllm/model_executor/models/qwen2_vl.py`). So vLLM's
prompt is longer than the ids sent, and a score's completion is read from the end of the prompt
log-probs; `prompt_tokens` counts the prompt as vLLM ran it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from teacher_service.backends.base import GenerateItem, LogprobsMode, SamplingParams, ScoreItem
from teacher_service.errors import BackendUnavailable, InvalidRequest
from teacher_service.media import PromptMedia
from teacher_service.protocol import GenerateResult, Sample, ScoredSequence

# Our `--logprobs-mode` names and vLLM's engine setting of the same meaning.
VLLM_LOGPROBS_MODES: dict[LogprobsMode, str] = {"raw": "raw_logprobs", "processed": "processed_logprobs"}


# --- requests ---


def score_sampling_kwargs(item: ScoreItem) -> dict[str, Any]:
    """`vllm.SamplingParams(**...)` scoring `item`'s whole sequence as a prompt."""
    if item.temperature != 1.0:
        raise InvalidRequest(
            "the vllm backend scores at temperature 1 only: vLLM's prompt log-probs are the raw model "
            "distribution, and a top-k cannot be re-tempered exactly (use the hf backend)",
            field="temperature",
        )
    return {"max_tokens": 1, "prompt_logprobs": item.top_logprobs, "detokenize": False, "flat_logprobs": True}


def generate_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """`vllm.SamplingParams(**...)` for one prompt's samples. A greedy request asks for one sample
    (the n would be equal) and `generate_result` repeats it."""
    greedy = params.temperature == 0
    return {
        "n": 1 if greedy else params.n,
        "temperature": params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": max(params.top_k, 0),  # 0 and -1 both mean all tokens; 0.32.0 spells it 0
        "min_p": params.min_p,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": params.skip_special_tokens,
        "seed": params.seed,  # vLLM seeds sample j of the request with seed + j
        "max_tokens": params.max_tokens,
        "logprobs": params.top_logprobs,
        "flat_logprobs": True,
    }


def token_prompt(ids: list[int], media: PromptMedia | None = None) -> dict[str, Any]:
    """A `vllm.inputs.TokensPrompt` (a TypedDict) of token ids and, where the prompt has pictures,
    their `multi_modal_data` (videos as [frames, height, width, 3] uint8 arrays)."""
    prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
    if media is not None:
        data = {"image": list(media.images), "video": [np.stack([np.asarray(f) for f in video]) for video in media.videos]}
        prompt["multi_modal_data"] = {modality: items for modality, items in data.items() if items}
    return prompt


# --- results ---


def distributions(
    positions: Iterable[Mapping[int, Any] | None], tokens: list[int], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(token log-probs [L], token ranks [L], top ids [L, k], top log-probs [L, k]) of `tokens` from
    vLLM's per-position mappings: each token's own entry, and the k entries of ranks 1..k in rank order."""
    token_logprobs = np.empty(len(tokens), dtype=np.float32)
    token_ranks = np.empty(len(tokens), dtype=np.int32)
    top_ids = np.empty((len(tokens), k), dtype=np.int32)
    top_logprobs = np.empty((len(tokens), k), dtype=np.float32)
    for row, (position, token) in enumerate(zip(positions, tokens, strict=True)):
        if position is None or token not in position:
            raise BackendUnavailable(f"vLLM returned no log-prob for token {token} at position {row}")
        token_logprobs[row], token_ranks[row] = position[token].logprob, position[token].rank
        ranked = sorted((entry.rank, token_id, entry.logprob) for token_id, entry in position.items()
                        if entry.rank is not None and entry.rank <= k)
        if len(ranked) < k:
            raise BackendUnavailable(f"vLLM returned {len(ranked)} ranked log-probs at position {row}, not {k}")
        for column, (_, token_id, logprob) in enumerate(ranked):
            top_ids[row, column], top_logprobs[row, column] = token_id, logprob
    return token_logprobs, token_ranks, top_ids, top_logprobs


def scored_sequence(output: Any, item: ScoreItem, model_version: int) -> ScoredSequence:
    """A `vllm.RequestOutput` of `score_sampling_kwargs(item)` as the protocol's result."""
    prompt_logprobs = output.prompt_logprobs
    if prompt_logprobs is None:
        raise BackendUnavailable("vLLM returned no prompt log-probs")
    # Position p holds the distribution that predicted token p; the completion ends vLLM's prompt
    # (longer than prompt_ids where vLLM expanded picture placeholders).
    start = len(prompt_logprobs) - len(item.completion_ids)
    completion = [prompt_logprobs[p] for p in range(start, start + len(item.completion_ids))]
    token_logprobs, token_ranks, top_ids, top_logprobs = distributions(completion, item.completion_ids, item.top_logprobs)
    return ScoredSequence(
        token_ids=np.asarray(item.completion_ids, dtype=np.int32), token_logprobs=token_logprobs, token_ranks=token_ranks,
        top_ids=top_ids, top_logprobs=top_logprobs, prompt_tokens=start, model_version=model_version,
    )


def generate_result(output: Any, item: GenerateItem, model_version: int) -> GenerateResult:
    """A `vllm.RequestOutput` of `generate_sampling_kwargs(item.params)` as the protocol's result."""
    params = item.params
    samples = [_sample(completion, params.top_logprobs) for completion in sorted(output.outputs, key=lambda c: c.index)]
    if params.temperature == 0:
        samples = samples[:1] * params.n
    prompt_tokens = len(output.prompt_token_ids) if output.prompt_token_ids is not None else len(item.prompt_ids)
    return GenerateResult(samples=samples, prompt_tokens=prompt_tokens, model_version=model_version)


def _sample(completion: Any, k: int) -> Sample:
    if completion.finish_reason not in ("stop", "length"):  # "abort", "error", "repetition" or unfinished
        raise BackendUnavailable(f"vLLM ended a sample with finish reason {completion.finish_reason!r}")
    tokens = list(completion.token_ids)
    token_logprobs, _, top_ids, top_logprobs = distributions(completion.logprobs or [None] * len(tokens), tokens, k)
    return Sample(
        token_ids=np.asarray(tokens, dtype=np.int32), token_logprobs=token_logprobs, top_ids=top_ids,
        top_logprobs=top_logprobs, text=completion.text, finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )
