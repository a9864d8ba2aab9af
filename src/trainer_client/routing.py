"""Which teachers a row asks, and which teacher's samples a row keeps (`--route`).

| route        | asked (annotate)                                  | kept (select)                                  |
|--------------|---------------------------------------------------|------------------------------------------------|
| `mixture`    | one teacher per row, drawn by the teachers' weights (logit-kd: every teacher, mixed by weight) | all |
| `tags`       | every teacher tagged with the row's `task` or one of its `tags` (all teachers if none is) | all |
| `verified`   | every teacher                                     | the teacher with the most verified samples (ties: the more confident) |
| `confidence` | every teacher                                     | the teacher whose samples have the highest mean token log-prob |
| `lowest-ce`  | every teacher; each also scores the row's reference completion | the teacher with the lowest cross-entropy on it |
| `gate`       | every teacher                                     | the teacher a learned router picks from the student's prompt representation (router.py) |

Judges (endpoints tagged `judge`, see judges.py) are never routed to: the method leaves them out. Each decision is counted
per teacher (`route/<teacher>`: the share of prompts routed to it).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np

from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.router import Gate
from trainer_client.samples import PromptGroup, StudentTokens
from trainer_client.source import TeacherInfo, TeacherSource
from trainer_client.verifiers import get_verifier

ONE_TEACHER_ROUTES = ("verified", "confidence", "lowest-ce", "gate")


def spread_by_weight(count: int, weights: list[float], seed: int) -> list[int]:
    """A teacher index per item, in proportion to the weights, reproducibly."""
    generator = np.random.default_rng(seed)
    probabilities = np.asarray(weights, dtype=float) / sum(weights)
    return generator.choice(len(weights), size=count, p=probabilities).tolist()


def tagged_teachers(row: Row, teachers: list[TeacherInfo]) -> list[str]:
    """The teachers tagged with the row's task or one of its tags; every teacher when none is."""
    labels = row.labels()
    matching = [t.name for t in teachers if labels & set(t.tags)]
    return matching or [t.name for t in teachers]


class Router:
    def __init__(self, config: TrainConfig, tokens: StudentTokens, source: TeacherSource, teachers: list[TeacherInfo]):
        self.config, self.tokens, self.source, self.teachers = config, tokens, source, teachers
        self.route = config.route
        self.verify = get_verifier(config.verifier) if config.verifier else None
        self.gate = Gate(config, [t.name for t in teachers]) if self.route == "gate" else None

    # --- annotate: who is asked ---

    def asked(self, rows: list[Row], seed: int) -> list[list[str]]:
        """The teachers each row asks for samples."""
        names = [t.name for t in self.teachers]
        if self.route == "mixture":
            return [[names[i]] for i in spread_by_weight(len(rows), [t.weight for t in self.teachers], seed)]
        if self.route == "tags":
            return [tagged_teachers(row, self.teachers) for row in rows]
        return [names for _ in rows]

    async def sample(self, rows: list[Row], seed: int) -> list[PromptGroup]:
        """Each row's prompt group, with `samples_per_prompt` samples from every teacher it asks."""
        groups = [self.tokens.group(row) for row in rows]
        by_teacher: dict[str, list[int]] = defaultdict(list)
        for index, names in enumerate(self.asked(rows, seed)):
            for name in names:
                by_teacher[name].append(index)
        names = list(by_teacher)
        responses = await asyncio.gather(*(
            self.source.generate(name, self._generate_request([groups[i].teacher_prompt() for i in by_teacher[name]], seed))
            for name in names
        ))
        for name, response in zip(names, responses):
            same_tokenizer = self.source.group(name).info.tokenizer_fingerprint == self.tokens.fingerprint
            for index, result in zip(by_teacher[name], response.results):
                groups[index].candidates += [self.tokens.teacher_candidate(s, name, same_tokenizer) for s in result.samples]
        if self.route == "lowest-ce":
            await self.reference_ce(groups)
        return groups

    def _generate_request(self, prompts: list, seed: int) -> dict:
        return {
            "prompts": prompts,
            "n": self.config.samples_per_prompt,
            "max_tokens": self.config.max_new_tokens,
            "temperature": self.config.sample_temperature,
            "seed": seed,
            "top_logprobs": 0,
        }

    async def reference_ce(self, groups: list[PromptGroup]) -> None:
        """For route lowest-ce: every teacher's cross-entropy (mean -log p per token) on each row's reference."""
        if self.route != "lowest-ce":
            return
        missing = [g.row.prompt for g in groups if g.row.completion is None]
        if missing:
            raise ValueError(f"--route lowest-ce needs a 'completion' in every row; missing for {missing[0]!r}")
        request = {"sequences": [{"prompt": g.row.chat_turns() or g.row.prompt, "completion": g.row.completion} for g in groups],
                   "top_logprobs": 0}
        responses = await asyncio.gather(*(self.source.score(t.name, request) for t in self.teachers))
        for teacher, response in zip(self.teachers, responses):
            for group, result in zip(groups, response.results):
                group.teacher_ce[teacher.name] = -float(np.mean(result.token_logprobs))

    def teachers_for_scoring(self, groups: list[PromptGroup]) -> list[list[str]]:
        """White-box: the teachers whose distributions each group learns (mixed when several)."""
        if self.route == "mixture":
            return [[t.name for t in self.teachers] for _ in groups]
        if self.route == "tags":
            return [tagged_teachers(g.row, self.teachers) for g in groups]
        return [[min(g.teacher_ce, key=g.teacher_ce.get)] for g in groups]

    # --- select: whose samples are kept ---

    def keep_routed(self, groups: list[PromptGroup], student, stats) -> None:
        """Route each prompt to one teacher (for the one-teacher routes): the other teachers'
        candidates get weight 0. Counts, per teacher, the share of prompts that keep its samples."""
        chosen = self._choose(groups, student) if self.route in ONE_TEACHER_ROUTES else [None] * len(groups)
        for group, name in zip(groups, chosen):
            authors = group.by_author()
            for teacher in self.teachers:
                kept = teacher.name in authors and name in (None, teacher.name)
                stats.add(f"route/{teacher.name}", float(kept))
                if teacher.name in authors and not kept:
                    for candidate in authors[teacher.name]:
                        candidate.weight = 0.0

    def _choose(self, groups: list[PromptGroup], student) -> list[str | None]:
        if self.route == "gate":
            return self.gate.choose(groups, student)
        return [self._best(group) for group in groups]

    def _best(self, group: PromptGroup) -> str | None:
        """The one teacher a prompt keeps under `verified`, `confidence` or `lowest-ce`."""
        if self.route == "lowest-ce":
            return min(group.teacher_ce, key=group.teacher_ce.get)
        names = {t.name for t in self.teachers}
        authors = {a: c for a, c in group.by_author().items() if a in names}
        if not authors:
            return None

        def confidence(name: str) -> float:
            return float(np.mean([c.mean_logprob if c.mean_logprob is not None else -np.inf for c in authors[name]]))

        if self.route == "verified":
            def verified(name: str) -> int:
                return sum(self.verify(c.text, group.row.answer) for c in authors[name])

            return max(authors, key=lambda name: (verified(name), confidence(name)))
        return max(authors, key=confidence)
