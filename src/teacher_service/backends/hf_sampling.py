"""Per-row sampling inside Hugging Face's decoding loop: each row keeps its own settings and generator.

`RowSampler` is a logits processor that picks every row's next token itself (greedy, or a draw
from its own `torch.Generator` under its temperature and top-p) and hands the loop a score with
only that token finite, so the loop's greedy step takes it. While it runs it keeps the chosen
token's log-prob and the top-k of each step, [rows, k] per step, never [rows, steps, vocabulary].
`RowLengths` stops each row at its own `max_tokens`.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria

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


class RowSampler(LogitsProcessor):
    def __init__(self, rows: list[SamplingParams], seeds: list[int], k: int, mode: LogprobsMode, device: torch.device):
        self.greedy = torch.tensor([row.temperature == 0 for row in rows], device=device)
        # Greedy rows divide by 1: their processed distribution is the raw one.
        self.temperature = torch.tensor([row.temperature or 1.0 for row in rows], device=device)[:, None]
        self.top_p = torch.tensor([row.top_p for row in rows], device=device)
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.k = k
        self.mode = mode
        self.token_logprobs: list[torch.Tensor] = []  # per step: [R]
        self.top_values: list[torch.Tensor] = []  # per step: [R, k]
        self.top_ids: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raw = torch.log_softmax(scores.float(), dim=-1)
        scaled = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        nucleus = scaled.exp()
        if bool((self.top_p < 1).any()):  # the sort over the vocabulary only where a row asks for it
            nucleus = nucleus.masked_fill(top_p_mask(scaled, self.top_p), 0.0)
        chosen = raw.argmax(dim=-1)
        for row in torch.nonzero(~self.greedy).flatten().tolist():
            chosen[row] = torch.multinomial(nucleus[row], 1, generator=self.generators[row])[0]
        # Processed values are after temperature; top-p's cut is not applied to them (no -inf on the wire).
        reported = raw if self.mode == "raw" else scaled
        self.token_logprobs.append(reported.gather(1, chosen[:, None])[:, 0])
        values, ids = reported.topk(self.k, dim=-1, sorted=True)
        self.top_values.append(values)
        self.top_ids.append(ids)
        only_chosen = torch.full_like(scores, float("-inf"))
        return only_chosen.scatter(1, chosen[:, None], 0.0)

    def recorded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What was kept: token log-probs [R, S], top log-probs [R, S, k], top ids [R, S, k]."""
        return (
            torch.stack(self.token_logprobs, dim=1).cpu().numpy().astype(np.float32),
            torch.stack(self.top_values, dim=1).cpu().numpy().astype(np.float32),
            torch.stack(self.top_ids, dim=1).cpu().numpy().astype(np.int32),
        )


class RowLengths(StoppingCriteria):
    """Done once a row has `max_tokens` new tokens: [R] bool per step."""

    def __init__(self, prompt_width: int, max_tokens: list[int], device: torch.device):
        self.prompt_width = prompt_width
        self.max_tokens = torch.tensor(max_tokens, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return input_ids.shape[1] - self.prompt_width >= self.max_tokens
