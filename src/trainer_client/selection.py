"""Which samples of a prompt count, and how much (`--select`), with a per-prompt fallback.

Each rule sets the weights of a prompt group's candidates (those routing left at weight > 0):

| select       | weight of a candidate                                                          |
|--------------|--------------------------------------------------------------------------------|
| `all`        | 1                                                                              |
| `verifier`   | 1 if the verifier accepts it against the row's `answer`, else 0                |
| `majority`   | 1 if it states the answer most candidates of the prompt state, else 0 (answers read by the verifier's extractor; no reference needed) |
| `confidence` | exp(its author's mean token log-prob): the geometric-mean probability per token |
| `judge`      | the mean over the judge's rubric dimensions of P(yes) (judges.py)               |

When no candidate of a prompt keeps a positive weight, `select_fallback` decides: `drop` the
prompt, keep `all` its candidates at weight 1, or train on the row's `reference` completion.
Logged (`select/...`): acceptance per author, majority agreement, judge scores, fallback rate.
"""

from __future__ import annotations

import math
from collections import Counter

from trainer_client.config import TrainConfig
from trainer_client.judges import Judge
from trainer_client.samples import Candidate, PromptGroup, StudentTokens
from trainer_client.source import TeacherSource
from trainer_client.verifiers import ANSWER_EXTRACTORS, get_verifier


def weight_by_verifier(group: PromptGroup, verify) -> None:
    for candidate in _live(group):
        candidate.weight = float(verify(candidate.text, group.row.answer))


def weight_by_majority(group: PromptGroup, extract) -> float | None:
    """Keep the candidates stating the most common answer; returns the share that state it
    (None when no candidate states an answer, and then every weight is 0). Ties go to the
    answer stated first."""
    live = _live(group)
    answers = [extract(c.text) for c in live]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        for candidate in live:
            candidate.weight = 0.0
        return None
    majority, votes = counts.most_common(1)[0]
    for candidate, answer in zip(live, answers):
        candidate.weight = float(answer == majority)
    return votes / len(live)


def weight_by_confidence(group: PromptGroup) -> None:
    for candidate in _live(group):
        candidate.weight = math.exp(candidate.mean_logprob) if candidate.mean_logprob is not None else 0.0


def weight_by_judge(group: PromptGroup) -> None:
    for candidate in _live(group):
        candidate.weight = sum(candidate.scores.values()) / len(candidate.scores) if candidate.scores else 0.0


def _live(group: PromptGroup) -> list[Candidate]:
    return [c for c in group.candidates if c.weight > 0]


class Selector:
    def __init__(self, config: TrainConfig, tokens: StudentTokens, source: TeacherSource | None, stats):
        self.config, self.tokens, self.stats = config, tokens, stats
        self.verify = get_verifier(config.verifier) if config.verifier else None
        self.extract = ANSWER_EXTRACTORS[config.verifier] if config.verifier else None
        self.judge = Judge(config, source) if config.select == "judge" else None

    async def annotate(self, groups: list[PromptGroup]) -> None:
        """What selection needs from teachers (the judge's scores), fetched on the teachers' loop."""
        if self.judge:
            await self.judge.score(groups)

    def __call__(self, groups: list[PromptGroup]) -> None:
        for group in groups:
            before = {id(c): c.weight > 0 for c in group.candidates}
            self._weigh(group)
            for candidate in group.candidates:
                if before[id(candidate)]:
                    self.stats.add(f"select/accepted/{candidate.author}", float(candidate.weight > 0))
            survived = any(c.weight > 0 for c in group.candidates)
            self.stats.add("select/fallback_rate", float(not survived))
            if not survived:
                self._fall_back(group)

    def _weigh(self, group: PromptGroup) -> None:
        rule = self.config.select
        if rule == "verifier":
            weight_by_verifier(group, self.verify)
        elif rule == "majority":
            agreement = weight_by_majority(group, self.extract)
            self.stats.add("select/majority_agreement", agreement or 0.0)
        elif rule == "confidence":
            weight_by_confidence(group)
        elif rule == "judge":
            weight_by_judge(group)
            for candidate in _live(group):
                for dimension, score in candidate.scores.items():
                    self.stats.add(f"judge/{dimension}", score)

    def _fall_back(self, group: PromptGroup) -> None:
        fallback = self.config.select_fallback
        if fallback == "all":
            for candidate in group.candidates:
                candidate.weight = 1.0
        elif fallback == "reference" and group.row.completion is not None:
            target = self.tokens.target(group.row.completion)
            group.candidates.append(Candidate(target, group.row.completion, "reference"))
