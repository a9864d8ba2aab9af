"""Per-row sampling inside Hugging Face's decoding loop: each row keeps its own settings and generator.

`RowSampler` is a logits processor that picks every row's next token itself (greedy, or a draw
from its own `torch.Generator`) and hands the loop a score with only that token finite, so the
loop's greedy step takes it. Its steps follow vLLM's sampler: penalties on the logits, then
temperature, then top-k, min-p and top-p restrict the draw; greedy takes the penalised argmax.
While it runs it keeps the chosen token's log-prob and the top-k of each step, [rows, k] per
step, never [rows, steps, vocabulary]. `RowStops` ends each row at its own `max_tokens`, end
tokens or stop strings, and `cut_sample` cuts a finished row where vLLM would.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria
from collections.abc import Callable
from dataclasses import dataclass

from teacher_service.backends.base import LogprobsMode, SamplingParams


def sample_seed(seed: int | None, sample_index: int) -> int:
    """The generator seed of sample `sample_index` of a prompt: fixed by (seed, index) alone, so a
    prompt's samples do not depend on what else shares its batch or request; random without a seed."""
    if seed is None:
        return secrets.randbits(63)
    return int(np.random.SeedSequence([seed, sample_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def top_p_mask(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True where a token lies outside its row's nucleus: [R, V] logits, [R] top_p -> [R, V] bool.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p; the
    most likely token always stays.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p[:, None]
    return torch.zeros_like(outside_sorted).scatter(-1, order, outside_sorted)


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """True where a token is not among its row's k most likely: [R, V] logits, [R] k (<= 0: keep all)."""
    k = top_k.clamp(min=0).where(top_k > 0, logits.shape[-1]).clamp(max=logits.shape[-1])
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
    return logits < kth


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """True where a token is less likely than min_p times its row's most likely one: [R, V], [R]."""
    probs = logits.softmax(dim=-1)
    return probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values


class Penalties:
    """vLLM's presence, frequency and repetition penalties, per row, on [R, V] logits.

    With c the token's count in the sample so far and `seen` its presence in the prompt or the
    sample: a seen token's logit is divided by the repetition penalty r when positive and
    multiplied by r otherwise; then `logit - frequency x c - presence x [c > 0]`.
    """

    def __init__(self, rows: list[SamplingParams], prompts: torch.Tensor, prompt_mask: torch.Tensor, vocab_size: int):
        device = prompts.device
        self.presence = torch.tensor([row.presence_penalty for row in rows], device=device)[:, None]
        self.frequency = torch.tensor([row.frequency_penalty for row in rows], device=device)[:, None]
        self.repetition = torch.tensor([row.repetition_penalty for row in rows], device=device)[:, None]
        in_prompt = torch.zeros(len(rows), vocab_size, device=device).scatter_add_(1, prompts, prompt_mask.float())
        self.in_prompt = in_prompt > 0
        self.prompt_width = prompts.shape[1]

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        sampled = input_ids[:, self.prompt_width :]
        counts = torch.zeros_like(logits).scatter_add_(1, sampled, torch.ones_like(sampled, dtype=logits.dtype))
        seen = self.in_prompt | (counts > 0)
        repeated = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
        logits = torch.where(seen, repeated, logits)
        return logits - self.frequency * counts - self.presence * (counts > 0)


class RowSampler(LogitsProcessor):
    def __init__(
        self, rows: list[SamplingParams], seeds: list[int], k: int, mode: LogprobsMode, penalties: Penalties | None,
        device: torch.device,
    ):
        self.greedy = torch.tensor([row.temperature == 0 for row in rows], device=device)
        # Greedy rows divide by 1: their processed distribution is the penalised one.
        self.temperature = torch.tensor([row.temperature or 1.0 for row in rows], device=device)[:, None]
        self.top_p = torch.tensor([row.top_p for row in rows], device=device)
        self.top_k = torch.tensor([row.top_k for row in rows], device=device)
        self.min_p = torch.tensor([row.min_p for row in rows], device=device)
        self.penalties = penalties
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.k = k
        self.mode = mode
        self.token_logprobs: list[torch.Tensor] = []  # per step: [R]
        self.top_values: list[torch.Tensor] = []  # per step: [R, k]
        self.top_ids: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raw = torch.log_softmax(scores.float(), dim=-1)
        logits = scores.float() if self.penalties is None else self.penalties(scores.float(), input_ids)
        scaled = torch.log_softmax(logits / self.temperature, dim=-1)
        chosen = logits.argmax(dim=-1)
        sampled_rows = torch.nonzero(~self.greedy).flatten().tolist()
        if sampled_rows:
            draw = self._restricted(scaled)
            for row in sampled_rows:
                chosen[row] = torch.multinomial(draw[row], 1, generator=self.generators[row])[0]
        # Processed values are after penalties and temperature; the restrictions' cuts are not
        # applied to them (no -inf on the wire).
        reported = raw if self.mode == "raw" else scaled
        self.token_logprobs.append(reported.gather(1, chosen[:, None])[:, 0])
        values, ids = reported.topk(self.k, dim=-1, sorted=True)
        self.top_values.append(values)
        self.top_ids.append(ids)
        only_chosen = torch.full_like(scores, float("-inf"))
        return only_chosen.scatter(1, chosen[:, None], 0.0)

    def _restricted(self, scaled: torch.Tensor) -> torch.Tensor:
        """The probabilities drawn from: top-k, then min-p, then top-p, each only where a row asks."""
        if bool((self.top_k > 0).any()):
            scaled = scaled.masked_fill(top_k_mask(scaled, self.top_k), float("-inf"))
        if bool((self.min_p > 0).any()):
            scaled = scaled.masked_fill(min_p_mask(scaled, self.min_p), float("-inf"))
        if bool((self.top_p < 1).any()):  # the sort over the vocabulary only where a row asks for it
            scaled = scaled.masked_fill(top_p_mask(scaled, self.top_p), float("-inf"))
        return scaled.softmax(dim=-1)

    def recorded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What was kept: token log-probs [R, S], top log-probs [R, S, k], top ids [R, S, k]."""
        return (
            torch.stack(self.token_logprobs, dim=1).cpu().numpy().astype(np.float32),
            torch.stack(self.top_values, dim=1).cpu().numpy().astype(np.float32),
            torch.stack(self.top_ids, dim=1).cpu().numpy().astype(np.int32),
        )


def end_token_ids(params: SamplingParams, eos_ids: list[int]) -> set[int]:
    """The tokens that end a row: its stop_token_ids, and the model's end tokens unless ignore_eos."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))


class RowStops(StoppingCriteria):
    """Done once a row has `max_tokens` new tokens, an end token, or a stop string in its text: [R] bool per step."""

    def __init__(self, prompt_width: int, rows: list[SamplingParams], eos_ids: list[int], decode: Callable, device: torch.device):
        self.prompt_width = prompt_width
        self.rows = rows
        self.max_tokens = torch.tensor([row.max_tokens for row in rows], device=device)
        ends = [sorted(end_token_ids(row, eos_ids)) or [-1] for row in rows]
        width = max(len(e) for e in ends)
        self.end_ids = torch.tensor([e + [-1] * (width - len(e)) for e in ends], device=device)  # [R, E], -1: none
        self.decode = decode
        # Rows that ended stay ended (as the loop keeps them): their text is not decoded again each step.
        self.ended = torch.zeros(len(rows), dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :]
        done = self.ended | (new.shape[1] >= self.max_tokens)
        done |= (new[:, -1:] == self.end_ids).any(dim=-1)
        for row, params in enumerate(self.rows):
            if params.stop and not done[row]:
                text = self.decode(new[row].tolist(), skip_special_tokens=params.skip_special_tokens)
                done[row] = any(stop in text for stop in params.stop)
        self.ended = done
        return done


@dataclass(frozen=True)
class Cut:
    length: int  # tokens kept
    text: str
    finish_reason: str
    stop_reason: int | str | None


def cut_sample(tokens: list[int], params: SamplingParams, eos_ids: list[int], decode: Callable) -> Cut:
    """Where a row's sample ends, as vLLM ends it: at the first end token (kept among the tokens,
    left out of the text) or at the step whose text first holds a stop string (the text cut before
    it), else after `max_tokens` tokens. `stop_reason` names a stop_token_ids entry or a stop
    string; it is None for the model's own end token and for "length"."""
    tokens = tokens[: params.max_tokens]
    ends = end_token_ids(params, eos_ids)
    first_end = next((i for i, token in enumerate(tokens) if token in ends), None)
    text_of = lambda ids: decode(ids, skip_special_tokens=params.skip_special_tokens)  # noqa: E731
    for step in range(len(tokens) if first_end is None else first_end):
        if not params.stop:
            break
        text = text_of(tokens[: step + 1])
        found = [(text.find(stop), stop) for stop in params.stop if stop in text]
        if found:
            index, stop = min(found)
            return Cut(step + 1, text[:index], "stop", stop)
    if first_end is None:
        return Cut(len(tokens), text_of(tokens), "length", None)
    token = tokens[first_end]
    stop_reason = token if token in params.stop_token_ids else None
    return Cut(first_end + 1, text_of(tokens[:first_end]), "stop", stop_reason)
