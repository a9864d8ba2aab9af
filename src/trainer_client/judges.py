"""Judges: any teacher endpoint scores candidates against rubrics through `/v1/score`.

For each rubric dimension (a template with `{prompt}` and `{completion}`), the judge is asked
for the log-probability of two fixed continuations of the rendered rubric, `judge_yes` and
`judge_no`, and the dimension's score is their normalised probability

    score = P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) - log P(no))     in [0, 1]

where log P(·) sums the continuation's token log-probs. Every dimension of every candidate
goes in one scoring request (2 sequences each), and no generated text is parsed.

`rule_scores` judges without a model, from the verifier and the row's reference answer (the
dimensions VISD's feedback names; each in [0, 1]):
- correctness: 1 if the verifier accepts the completion, else 0;
- consistency: 1 if the completion states an answer the verifier's extractor can read, else 0;
- grounding: the characters the stated answer (the stripped completion) matches in place in the
  reference, over the longer of the two: "083" against "082" is 2/3, "0822" 3/4.
"""

from __future__ import annotations

import math

from trainer_client.config import TrainConfig
from trainer_client.samples import PromptGroup
from trainer_client.source import TeacherSource

JUDGE_TAG = "judge"  # pool endpoints with this tag are judges, not teachers


def yes_probability(logp_yes: float, logp_no: float) -> float:
    """sigmoid(logp_yes - logp_no), computed without overflow."""
    difference = logp_yes - logp_no
    if difference >= 0:
        return 1.0 / (1.0 + math.exp(-difference))
    return math.exp(difference) / (1.0 + math.exp(difference))


RULE_DIMENSIONS = ("correctness", "consistency", "grounding")


def rule_scores(completion: str, answer: str, verify, extract) -> dict[str, float]:
    """The rule-based judge's scores of `completion` against the reference `answer` (see above)."""
    stated, reference = completion.strip(), answer.strip()
    matched = sum(a == b for a, b in zip(stated, reference))
    return {
        "correctness": float(verify(completion, answer)),
        "consistency": float(extract(completion) is not None),
        "grounding": matched / max(len(reference), len(stated), 1),
    }


class Judge:
    def __init__(self, config: TrainConfig, source: TeacherSource):
        judges = source.groups(JUDGE_TAG)
        if not judges:
            raise ValueError("--select judge needs a judge endpoint: --judge URL")
        self.name = judges[0].name
        self.rubrics = config.judge_rubrics
        self.yes, self.no = config.judge_yes, config.judge_no
        self.source = source

    async def score(self, groups: list[PromptGroup]) -> None:
        """Fill `candidate.scores[dimension]` for every candidate of every group."""
        asked = [(c, dimension, rubric.format(prompt=g.row.prompt_text, completion=c.text))
                 for g in groups for c in g.candidates for dimension, rubric in self.rubrics.items()]
        if not asked:
            return
        sequences = [{"prompt": text, "completion": answer} for _, _, text in asked for answer in (self.yes, self.no)]
        response = await self.source.score(self.name, {"sequences": sequences, "top_logprobs": 0})
        for index, (candidate, dimension, _) in enumerate(asked):
            yes, no = response.results[2 * index], response.results[2 * index + 1]
            candidate.scores[dimension] = yes_probability(float(yes.token_logprobs.sum()), float(no.token_logprobs.sum()))
