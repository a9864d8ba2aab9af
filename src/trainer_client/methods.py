"""Distillation methods: each turns data rows into student examples, asking teachers as it needs.

A method only decides *what the student learns from*; the loss is the same everywhere
(`example_loss`): cross-entropy on the target tokens, plus, where an example carries the
teachers' top-k, a divergence to it. Requests are seeded by the step, so a step prepared
again after `--resume` is the same step.

- sft: targets are the rows' reference completions (no teacher).
- seq-kd (black-box, Kim & Rush 2016): targets are teacher samples, re-tokenized by the student.
- logit-kd (white-box, Hinton et al. 2015): targets are the reference completions or teacher
  samples, and every teacher scores them; several teachers are mixed by weight.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from potstill.fingerprint import tokenizer_fingerprint
from teacher_service.protocol import GenerateResult, Sample
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.losses import distillation_loss, mix_teachers
from trainer_client.pool import TeacherPool


@dataclass
class Example:
    """One student sequence: the loss is on `target_ids`, given `prompt_ids`."""

    prompt_ids: list[int]
    target_ids: list[int]
    teacher_ids: np.ndarray | None = None  # int [len(target_ids), K]
    teacher_logprobs: np.ndarray | None = None  # float [len(target_ids), K]


class StudentTokens:
    """How the student turns rows and teacher samples into token ids."""

    def __init__(self, tokenizer, max_seq_len: int):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.eos_id = tokenizer.eos_token_id
        self.fingerprint = tokenizer_fingerprint(tokenizer)

    def prompt(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def target(self, text: str, ends: bool = True) -> list[int]:
        """A completion's ids, closed by EOS when the text is complete (so the student learns to stop)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.eos_id] if ends and self.eos_id is not None else ids

    def fit(self, prompt_ids: list[int], target_ids: list[int]) -> tuple[list[int], list[int]]:
        """Cut to `max_seq_len`: the target's end first, then the prompt's start (never below 1 token each)."""
        target_ids = target_ids[: max(1, self.max_seq_len - 1)]
        prompt_ids = prompt_ids[-max(1, self.max_seq_len - len(target_ids)) :]
        return prompt_ids, target_ids


def _seed(config: TrainConfig, step: int) -> int:
    return (config.seed * 1_000_003 + step) % 2**62


class Method:
    """Base: the shared helpers. Subclasses implement `prepare`."""

    def __init__(self, config: TrainConfig, tokens: StudentTokens, pool: TeacherPool | None):
        self.config = config
        self.tokens = tokens
        self.pool = pool

    async def prepare(self, rows: list[Row], step: int) -> list[Example]:
        raise NotImplementedError

    def _reference_examples(self, rows: list[Row]) -> list[Example]:
        missing = [row.prompt for row in rows if row.completion is None]
        if missing:
            raise ValueError(f"{self.config.method} on data completions needs a 'completion' in every row; missing for {missing[0]!r}")
        return [Example(*self.tokens.fit(self.tokens.prompt(r.prompt), self.tokens.target(r.completion))) for r in rows]

    async def _teacher_samples(self, rows: list[Row], step: int) -> list[tuple[Row, Sample, bool]]:
        """`samples_per_prompt` samples per row, each with whether its teacher shares the student's
        tokenizer; rows are spread over the teachers by weight."""
        groups = self.pool.groups()
        assignment = _spread_by_weight(len(rows), [g.weight for g in groups], _seed(self.config, step))
        requests = []
        for group_index, group in enumerate(groups):
            mine = [i for i, g in enumerate(assignment) if g == group_index]
            if mine:
                requests.append(((mine, group), self.pool.generate(group.name, self._generate_request([rows[i] for i in mine], step))))
        responses = await asyncio.gather(*(request for _, request in requests))
        paired: list[tuple[Row, GenerateResult, bool] | None] = [None] * len(rows)
        for ((indices, group), _), response in zip(requests, responses):
            same_tokenizer = group.info.tokenizer_fingerprint == self.tokens.fingerprint
            for index, result in zip(indices, response.results):
                paired[index] = (rows[index], result, same_tokenizer)
        return [(row, sample, same) for row, result, same in paired for sample in result.samples]

    def _generate_request(self, rows: list[Row], step: int) -> dict:
        return {
            "prompts": [self.tokens.prompt(r.prompt) for r in rows],
            "n": self.config.samples_per_prompt,
            "max_tokens": self.config.max_new_tokens,
            "temperature": self.config.sample_temperature,
            "seed": _seed(self.config, step),
            "top_logprobs": 0,
        }


def _spread_by_weight(count: int, weights: list[float], seed: int) -> list[int]:
    """A teacher index per item, in proportion to the weights, reproducibly."""
    generator = np.random.default_rng(seed)
    probabilities = np.asarray(weights, dtype=float) / sum(weights)
    return generator.choice(len(weights), size=count, p=probabilities).tolist()


class SFT(Method):
    async def prepare(self, rows: list[Row], step: int) -> list[Example]:
        return self._reference_examples(rows)


class SequenceKD(Method):
    async def prepare(self, rows: list[Row], step: int) -> list[Example]:
        examples = []
        for row, sample, same_tokenizer in await self._teacher_samples(rows, step):
            # A teacher with another tokenizer hands over text; one with the student's hands over
            # its token ids, exactly (decoding partial byte tokens to text would lose them).
            if same_tokenizer:
                target = sample.token_ids.tolist()
            else:
                target = self.tokens.target(sample.text, ends=sample.finish_reason == "stop")
            if target:
                examples.append(Example(*self.tokens.fit(self.tokens.prompt(row.prompt), target)))
        return examples


class LogitKD(Method):
    async def prepare(self, rows: list[Row], step: int) -> list[Example]:
        if self.config.kd_targets == "data":
            examples = self._reference_examples(rows)
        else:
            # Same tokenizer (checked at start), so the teacher's sample ids are the student's.
            samples = await self._teacher_samples(rows, step)
            examples = [
                Example(*self.tokens.fit(self.tokens.prompt(row.prompt), sample.token_ids.tolist()))
                for row, sample, _ in samples
                if len(sample.token_ids)
            ]
        await attach_teacher_distributions(self.pool, examples, self.config.top_k, self.config.temperature)
        return examples


async def attach_teacher_distributions(pool: TeacherPool, examples: list[Example], top_k: int, temperature: float) -> None:
    """Every teacher scores every example's targets; with several teachers, their weighted mixture is kept."""
    groups = pool.groups()
    request = {
        "sequences": [{"prompt": e.prompt_ids, "completion": e.target_ids} for e in examples],
        "top_logprobs": top_k,
        "temperature": temperature,
    }
    responses = await asyncio.gather(*(pool.score(g.name, request) for g in groups))
    for index, example in enumerate(examples):
        ids = [torch.from_numpy(r.results[index].top_ids.astype(np.int64)) for r in responses]
        logprobs = [torch.from_numpy(r.results[index].top_logprobs) for r in responses]
        if len(groups) > 1:
            mixed_ids, mixed_logprobs = mix_teachers(ids, logprobs, [g.weight for g in groups])
            ids, logprobs = [mixed_ids], [mixed_logprobs]
        example.teacher_ids, example.teacher_logprobs = ids[0].numpy(), logprobs[0].numpy()


METHODS: dict[str, type[Method]] = {"sft": SFT, "seq-kd": SequenceKD, "logit-kd": LogitKD}


# --- batches and the loss ---


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T - 1]: the token each position predicts
    target_mask: torch.Tensor  # [B, T - 1]: True where the loss applies
    teacher_ids: torch.Tensor | None  # [B, T - 1, K]
    teacher_logprobs: torch.Tensor | None  # [B, T - 1, K]

    def to(self, device: torch.device) -> Batch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Batch(**moved)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded tensors; position t of `labels` holds token t + 1 of the sequence."""
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    has_teacher = examples[0].teacher_ids is not None
    k = max(e.teacher_ids.shape[1] for e in examples) if has_teacher else 0
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    target_mask = torch.zeros((len(examples), width - 1), dtype=torch.bool)
    teacher_ids = torch.zeros((len(examples), width - 1, k), dtype=torch.long)
    teacher_logprobs = torch.full((len(examples), width - 1, k), float("-inf"))
    for row, example in enumerate(examples):
        sequence = example.prompt_ids + example.target_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        span = slice(len(example.prompt_ids) - 1, len(sequence) - 1)  # positions predicting the targets
        target_mask[row, span] = True
        if has_teacher:
            width_k = example.teacher_ids.shape[1]
            teacher_ids[row, span, :width_k] = torch.from_numpy(example.teacher_ids.astype(np.int64))
            teacher_logprobs[row, span, :width_k] = torch.from_numpy(example.teacher_logprobs.astype(np.float32))
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=input_ids[:, 1:].clone(),
        target_mask=target_mask,
        teacher_ids=teacher_ids if has_teacher else None,
        teacher_logprobs=teacher_logprobs if has_teacher else None,
    )


def example_loss(logits: torch.Tensor, batch: Batch, config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """CE on the targets, or (with teachers' top-k) the divergence plus `ce_weight` x CE.

    logits [B, T, V] from the student on `batch.input_ids`.
    """
    logits = logits[:, :-1].float()  # [B, T - 1, V], aligned with labels
    ce = F.cross_entropy(logits[batch.target_mask], batch.labels[batch.target_mask])
    if batch.teacher_ids is None:
        return ce, {"ce": ce.item()}
    kd = distillation_loss(
        logits, batch.teacher_ids, batch.teacher_logprobs, batch.target_mask,
        divergence=config.loss, temperature=config.temperature, tail=config.tail, beta=config.beta,
    )
    return kd + config.ce_weight * ce, {"kd": kd.item(), "ce": ce.item()}
