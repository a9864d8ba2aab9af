"""On-policy distillation (`--method on-policy`) and self-distillation with privileged context
(`--method self-distill`): the loss is on the student's own samples, scored by the teachers.

    rollout   (training thread)  `student_rollouts`: `student_samples` samples per prompt from the
                                 current weights (batched generation with a KV cache); with
                                 probability 1 - lambda the micro-batch is the dataset's completions
                                 instead (GKD's mixing, drawn per micro-batch from the step's seed)
    annotate  (teachers' loop)   the verifier's verdict on each sample (where --verifier is given),
                                 then `attach_teacher_distributions`: the routed teachers score the
                                 sampled tokens (/v1/score) -> top-k at each position and the
                                 log-prob of each sampled token
    loss                         supervised: --loss on the top-k (on_policy_loss topk), or the
                                 per-token estimate k(y) (sampled); policy-gradient: -A · log q(y),
                                 A = clamp(-k(y)) + reward_weight · verdict (student_loss.py, losses.py)

After Agarwal et al. 2024 (GKD: on-policy samples, lambda mixing, JSD(beta)), Gu et al. 2024
(MiniLLM: the reverse KL's policy gradient) and the on-policy distillation recipes that use the
negative per-token reverse KL as a dense reward. Self-distillation (after the privileged-
information / SD-Zero line) asks the teacher, typically the student itself (`--teacher self|ema`),
to score the student's response after a richer prompt (`privileged_prompt`): the reference
answer, the verifier's verdict or a judge's feedback, none of which the student sees.
Logged: `on_policy/student_batches` (share of micro-batches on the student's samples) and, with a
verifier, `on_policy/verified` (share of the student's samples it accepts).
"""

from __future__ import annotations

import random

from trainer_client.data import Row
from trainer_client.judges import Judge
from trainer_client.media import teacher_messages
from trainer_client.methods import REFERENCE, Method, attach_teacher_distributions, step_seed
from trainer_client.samples import Candidate, Example, PromptGroup, StudentTokens
from trainer_client.student import StudentView
from trainer_client.verifiers import get_verifier


def student_rollouts(
    student: StudentView, tokens: StudentTokens, rows: list[Row], samples: int, max_new_tokens: int, temperature: float, seed: int,
) -> list[PromptGroup]:
    """Each row's prompt group holding `samples` completions sampled from the student's current
    weights (candidates authored STUDENT, cut after their first EOS). Token ids and masks for the
    loss come from `group.examples(tokens)` and `student_loss.collate`."""
    groups = [tokens.group(row) for row in rows]
    for group, candidates in zip(groups, student.sample(groups, samples, max_new_tokens, temperature, seed)):
        group.candidates = candidates
    return groups


def privileged_prompt(template: str, row: Row, candidate: Candidate, verdict: bool | None) -> str:
    """The template filled from the row ({prompt}, {reference}, {answer}), the candidate's text
    ({completion}), the verifier's {verdict} ("correct" / "incorrect") and the judge's scores
    ({feedback}: "dimension: score; ..."). A field the row lacks is a ValueError naming it."""
    question = row.prompt if isinstance(row.prompt, str) else row.prompt[-1].content  # a chat row: its last turn
    values = {"prompt": question, "completion": candidate.text,
              "feedback": "; ".join(f"{name}: {score:.2f}" for name, score in sorted(candidate.scores.items()))}
    for name, value in (("reference", row.completion), ("answer", row.answer)):
        if f"{{{name}}}" in template and value is None:
            field = "completion" if name == "reference" else name
            raise ValueError(f"privileged_template uses {{{name}}}: every row needs a '{field}'; missing for {row.prompt!r}")
        values[name] = value
    values["verdict"] = "correct" if verdict else "incorrect"
    return template.format(**values)


def privileged_teacher_prompt(tokens: StudentTokens, row: Row, text: str) -> list[int] | list[dict]:
    """What the teacher scores a sample after under privileged context: `text` (a filled template)
    in place of the row's question (a chat row's last turn), as the student's token ids; for a row
    with images or video, chat turns carrying them (`media.teacher_messages`), so the teacher sees
    the pictures with the privileged text."""
    turns = row.prompt
    prompt = text if isinstance(turns, str) else [*turns[:-1], turns[-1].model_copy(update={"content": text})]
    if row.has_media:
        return teacher_messages(row.model_copy(update={"prompt": prompt}))
    return tokens.prompt(prompt)


class OnPolicy(Method):
    uses_student = True

    def __init__(self, config, tokens, source):
        super().__init__(config, tokens, source)
        self.verify = get_verifier(config.verifier) if config.verifier else None

    def on_student_samples(self, micro: int) -> bool:
        """Whether micro-batch `micro` learns from the student's samples (probability lambda)."""
        return random.Random(step_seed(self.config, micro)).random() < self.config.gkd_lambda

    def rollout(self, student: StudentView, rows: list[Row], step: int) -> list[PromptGroup] | None:
        on_policy = self.on_student_samples(step)
        self.stats.add("on_policy/student_batches", float(on_policy))
        if not on_policy:
            return None
        config = self.config
        return student_rollouts(student, self.tokens, rows, config.student_samples, config.max_new_tokens,
                                config.student_temperature, step_seed(config, step))

    async def annotate(self, rows: list[Row], rollout: list[PromptGroup] | None, step: int) -> list[PromptGroup]:
        groups = rollout if rollout is not None else self.reference_groups(rows)
        if self.verify:
            for group in groups:
                for candidate in group.candidates:
                    candidate.reward = float(self.verify(candidate.text, group.row.answer))
        await self.privilege(groups)
        await self.router.reference_ce(groups)
        await attach_teacher_distributions(self.source, self.router.teachers_for_scoring(groups), self.tokens, groups, self.config)
        return groups

    async def privilege(self, groups: list[PromptGroup]) -> None:
        """Set what the teachers score each candidate after, when not its group's prompt (none here)."""

    def select(self, groups: list[PromptGroup], student: StudentView) -> list[Example]:
        """Every sample counts, weight 1; the verifier's share of accepted student samples is logged."""
        if self.verify:
            for group in groups:
                for candidate in group.candidates:
                    if candidate.author != REFERENCE:
                        self.stats.add("on_policy/verified", candidate.reward)
        return [example for group in groups for example in group.examples(self.tokens)]


class SelfDistill(OnPolicy):
    """On-policy, with the teacher scoring each sample after `privileged_teacher_prompt(...)` (its ids
    in the student's tokenizer, which a white-box teacher shares; chat turns with the pictures for a
    row that has them); a chat row's last turn is replaced by the rendered template, so the teacher
    sees the same chat format."""

    def __init__(self, config, tokens, source):
        super().__init__(config, tokens, source)
        self.judge = Judge(config, source) if "{feedback}" in config.privileged_template else None

    async def privilege(self, groups: list[PromptGroup]) -> None:
        if self.judge:
            await self.judge.score(groups)
        for group in groups:
            for candidate in group.candidates:
                verdict = bool(candidate.reward) if self.verify else None
                text = privileged_prompt(self.config.privileged_template, group.row, candidate, verdict)
                candidate.teacher_prompt = privileged_teacher_prompt(self.tokens, group.row, text)
