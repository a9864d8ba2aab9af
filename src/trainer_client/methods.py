"""Distillation methods, each a sequence of stages over a micro-batch of data rows.

    rollout   (training thread, current student)  -> what the student itself proposes, if anything
    annotate  (teachers' event loop, async)        -> one PromptGroup per row: its candidates, grouped
                                                      per prompt and per author (teacher or student)
    select    (training thread)                    -> weighted Examples (a weight of 0 drops one)
    loss                                           -> Σ weight · per-token loss (student_loss.py)

Teacher outputs come from a `TeacherSource` (the live pool, or a cache), never from the pool
class itself. Requests are seeded by the micro-batch number, so a step prepared again after
`--resume` is the same step. Methods without a rollout are prepared ahead (`prefetch`); a
method with one prepares each step's micro-batches when the step starts, with the weights the
student has then.

- sft: targets are the rows' reference completions (no teacher).
- seq-kd (black-box, Kim & Rush 2016): targets are teacher samples, re-tokenized by the student.
- multi-sample (R-MSD): `samples_per_prompt` samples from each teacher the row's task routes
  to, kept or weighted by `select` (verifier, majority, confidence, judge).
- logit-kd (white-box, Hinton et al. 2015): targets are the reference completions or teacher
  samples, and every routed teacher scores them; several teachers are mixed by weight.
- guided (AMPO-style guidance on demand): see guided.py.
- on-policy (GKD, MiniLLM) and self-distill (privileged context): the student's own samples,
  scored by the teachers; see on_policy.py.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np
import torch

from trainer_client.adversarial import AdversarialTerm
from trainer_client.checkpoints import CheckpointPart
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.losses import mix_teachers, mix_token_logprobs
from trainer_client.judges import JUDGE_TAG
from trainer_client.routing import Router
from trainer_client.samples import Candidate, Example, PromptGroup, StudentTokens
from trainer_client.selection import Selector
from trainer_client.source import TeacherSource
from trainer_client.student import StudentView
from trainer_client.student_loss import Batch, final_hidden_states, weighted_loss_sum, weighted_loss_sum_from_hidden

REFERENCE = "reference"  # the `author` of a row's own completion


def step_seed(config: TrainConfig, step: int) -> int:
    return (config.seed * 1_000_003 + step) % 2**62


class MethodStats:
    """Ratios a method reports (acceptance per teacher, agreement, calls saved...), summed over
    the micro-batches since the last log line: `add(name, part, whole)`, then `drain()`."""

    def __init__(self):
        self._sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, name: str, part: float, whole: float = 1.0) -> None:
        self._sums[name][0] += part
        self._sums[name][1] += whole

    def drain(self) -> dict[str, float]:
        ratios = {name: part / whole for name, (part, whole) in sorted(self._sums.items()) if whole}
        self._sums.clear()
        return ratios


class Method:
    """The stages; subclasses override `annotate` (and any other stage they need)."""

    uses_student = False  # True: `rollout` needs the current student, so batches are not prepared ahead
    draw_factor = 1  # rows drawn per micro-batch, in batch sizes (a curriculum draws more and picks)

    def __init__(self, config: TrainConfig, tokens: StudentTokens, source: TeacherSource | None):
        self.config = config
        self.tokens = tokens
        self.source = source
        self.stats = MethodStats()
        teachers = [g for g in source.groups() if JUDGE_TAG not in g.tags] if source else []
        self.router = Router(config, tokens, source, teachers) if teachers else None
        self.selector = Selector(config, tokens, source, self.stats)

    def checkpoint_parts(self) -> list[CheckpointPart]:
        """The models (and other state) this method keeps beside the student, which checkpoints keep."""
        return [self.router.gate.model] if self.router and self.router.gate else []

    def rollout(self, student: StudentView, rows: list[Row], step: int) -> object:
        """What the student proposes for `rows` (training thread); nothing by default."""
        return None

    async def annotate(self, rows: list[Row], rollout: object, step: int) -> list[PromptGroup]:
        raise NotImplementedError

    def select(self, groups: list[PromptGroup], student: StudentView) -> list[Example]:
        """Route (keep one teacher per prompt where the route says so), then weight by `select`."""
        if self.router:
            self.router.keep_routed(groups, student, self.stats)
        self.selector(groups)
        return [example for group in groups for example in group.examples(self.tokens)]

    def loss(self, model, unwrapped, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ weight · per-token loss over the batch, and its parts (summed the same way)."""
        return weighted_loss_sum(model, unwrapped, batch, self.config)

    def reference_groups(self, rows: list[Row]) -> list[PromptGroup]:
        missing = [row.prompt for row in rows if row.completion is None]
        if missing:
            raise ValueError(f"{self.config.method} on data completions needs a 'completion' in every row; missing for {missing[0]!r}")
        return [reference_group(row, self.tokens) for row in rows]


def reference_group(row: Row, tokens: StudentTokens) -> PromptGroup:
    """A row with its reference completion as the one candidate."""
    return tokens.group(row, [Candidate(tokens.target(row.completion), row.completion, REFERENCE)])


class SFT(Method):
    async def annotate(self, rows: list[Row], rollout: object, step: int) -> list[PromptGroup]:
        return self.reference_groups(rows)


class SampledTargets(Method):
    """seq-kd and multi-sample: teacher samples are the targets; routing and selection decide
    which count and how much (seq-kd defaults to one teacher per row, multi-sample to all the
    teachers the row's task routes to). With `adversarial_weight`, the student also samples one
    answer per prompt for the adversarial term (adversarial.py)."""

    def __init__(self, config: TrainConfig, tokens: StudentTokens, source: TeacherSource | None):
        super().__init__(config, tokens, source)
        self.adversarial = AdversarialTerm(self.stats) if config.adversarial_weight > 0 else None
        self.uses_student = self.adversarial is not None

    def checkpoint_parts(self) -> list[CheckpointPart]:
        return super().checkpoint_parts() + ([self.adversarial.model] if self.adversarial else [])

    def rollout(self, student: StudentView, rows: list[Row], step: int) -> object:
        if not self.adversarial:
            return None
        groups = [self.tokens.group(row) for row in rows]
        samples = student.sample(groups, 1, self.config.max_new_tokens, self.config.student_temperature, step_seed(self.config, step))
        return [[Example(*g.fit(self.tokens, c.target_ids), weight=0.0, own=True, media=g.media) for c in own if c.target_ids]
                for g, own in zip(groups, samples)]

    async def annotate(self, rows: list[Row], rollout: object, step: int) -> list[PromptGroup]:
        groups = await self.router.sample(rows, step_seed(self.config, step))
        await self.selector.annotate(groups)
        for group, own in zip(groups, rollout or []):
            group.own_examples = own
        return groups

    def select(self, groups: list[PromptGroup], student: StudentView) -> list[Example]:
        return super().select(groups, student) + [example for group in groups for example in group.own_examples]

    def loss(self, model, unwrapped, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.adversarial:
            return super().loss(model, unwrapped, batch)
        hidden = final_hidden_states(model, unwrapped, batch)
        loss_sum, parts = weighted_loss_sum_from_hidden(hidden, unwrapped, batch, self.config)
        term = self.adversarial(hidden, batch)
        # As a mean over this micro-batch, scaled to its share of the step's weight like the rest.
        batch_weight = batch.weights.sum()
        parts["adversarial"] = term.item() * batch_weight.item()
        return loss_sum + self.config.adversarial_weight * term * batch_weight, parts


class LogitKD(Method):
    async def annotate(self, rows: list[Row], rollout: object, step: int) -> list[PromptGroup]:
        if self.config.kd_targets == "data":
            groups = self.reference_groups(rows)
            await self.router.reference_ce(groups)
        else:
            groups = await self.router.sample(rows, step_seed(self.config, step))
        await attach_teacher_distributions(self.source, self.router.teachers_for_scoring(groups), self.tokens, groups, self.config)
        return groups


async def attach_teacher_distributions(
    source: TeacherSource, teachers_per_group: list[list[str]], tokens: StudentTokens, groups: list[PromptGroup], config: TrainConfig,
    temperature: float | None = None,
) -> None:
    """Each group's teachers score its candidates (as the student fits them), after a candidate's
    `teacher_prompt` where it has one (privileged context), else after the group's prompt. Each
    candidate keeps the top-k at every target position and the log-prob of its own tokens; with
    several teachers, their mixtures by weight."""
    temperature = config.temperature if temperature is None else temperature
    wanted: dict[str, list[tuple[Candidate, list[int], list[int]]]] = defaultdict(list)
    for group, names in zip(groups, teachers_per_group):
        for candidate in _scorable(group):
            prompt, target = group.fit(tokens, candidate.target_ids)
            if candidate.teacher_prompt is not None:
                prompt = fitted_teacher_prompt(tokens, candidate.teacher_prompt, target)
            elif group.row.has_media:  # the media travel as parts of the chat turns, which the teacher renders (whatever the student sees)
                prompt = group.teacher_prompt()
            for name in names:
                wanted[name].append((candidate, prompt, target))
    names = list(wanted)
    responses = await asyncio.gather(*(
        source.score(name, {"sequences": [{"prompt": p, "completion": t} for _, p, t in wanted[name]],
                            "top_logprobs": config.top_k, "temperature": temperature})
        for name in names
    ))
    per_candidate: dict[int, list[tuple[str, object]]] = defaultdict(list)
    for name, response in zip(names, responses):
        for (candidate, _, _), result in zip(wanted[name], response.results):
            per_candidate[id(candidate)].append((name, result))
    for group in groups:
        for candidate in _scorable(group):
            scored = per_candidate[id(candidate)]
            ids = [torch.from_numpy(r.top_ids.astype(np.int64)) for _, r in scored]
            logprobs = [torch.from_numpy(r.top_logprobs) for _, r in scored]
            token_logprobs = [torch.from_numpy(r.token_logprobs) for _, r in scored]
            if len(scored) > 1:
                weights = [source.group(name).weight for name, _ in scored]
                mixed_ids, mixed_logprobs = mix_teachers(ids, logprobs, weights)
                ids, logprobs, token_logprobs = [mixed_ids], [mixed_logprobs], [mix_token_logprobs(token_logprobs, weights)]
            candidate.teacher_ids, candidate.teacher_logprobs = ids[0].numpy(), logprobs[0].numpy()
            candidate.teacher_token_logprobs = token_logprobs[0].numpy()


def fitted_teacher_prompt(tokens: StudentTokens, prompt: list[int] | list[dict], target: list[int]) -> list[int] | list[dict]:
    """A candidate's own teacher prompt before its (already fitted) target: ids cut so that only the
    prompt's start goes; chat turns carrying pictures whole, as a group's prompt with media is kept."""
    return prompt if prompt and isinstance(prompt[0], dict) else tokens.fit(prompt, target)[0]


def _scorable(group: PromptGroup) -> list[Candidate]:
    """The candidates with at least one token (a student sample of padding only has none, and is never an example)."""
    return [candidate for candidate in group.candidates if candidate.target_ids]
