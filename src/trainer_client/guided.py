"""Guidance on demand (`--method guided`), after AMPO (Yuan et al. 2025, "More Than One Teacher:
Adaptive Multi-Guidance Policy Optimization").

Per prompt, the student samples `student_samples` answers with its current weights (rollout)
and the verifier checks them against the row's `answer`:
- if any is right, the student learns from its own verified answers (weight 1 each) and no
  teacher is asked for that prompt;
- if all fail, the teachers (as `--route` picks them) are asked for `samples_per_prompt`
  solutions; of those the verifier accepts, the one the student finds most likely (highest
  mean token log-prob under the student) is the target: guidance closest to what the student
  can already produce.

This keeps AMPO's gating rule (teachers only where the student's own rollouts all fail) and its
preference for the student-likely teacher solution; the update is the weighted likelihood of the
selected sequences (binary reward, positive samples only), not AMPO's group-relative policy
gradient. Logged: `guided/teacher_calls_saved` (share of prompts that asked no teacher) and
`guided/student_solved`.
"""

from __future__ import annotations

from trainer_client.data import Row
from trainer_client.methods import Method, step_seed
from trainer_client.on_policy import student_rollouts
from trainer_client.samples import STUDENT, Example, PromptGroup
from trainer_client.student import StudentView


class Guided(Method):
    uses_student = True

    def rollout(self, student: StudentView, rows: list[Row], step: int) -> list[PromptGroup]:
        config = self.config
        return student_rollouts(student, self.tokens, rows, config.student_samples, config.max_new_tokens,
                                config.student_temperature, step_seed(config, step))

    async def annotate(self, rows: list[Row], rollout: list[PromptGroup], step: int) -> list[PromptGroup]:
        verify = self.selector.verify
        for group in rollout:
            for candidate in group.candidates:
                candidate.weight = float(verify(candidate.text, group.row.answer))
        failed = [group for group in rollout if not any(c.weight > 0 for c in group.candidates)]
        if failed:
            guidance = await self.router.sample([group.row for group in failed], step_seed(self.config, step))
            for group, guided in zip(failed, guidance):
                group.candidates += guided.candidates
        return rollout

    def select(self, groups: list[PromptGroup], student: StudentView) -> list[Example]:
        for group in groups:
            solved = any(c.weight > 0 for c in group.candidates if c.author == STUDENT)
            self.stats.add("guided/student_solved", float(solved))
            self.stats.add("guided/teacher_calls_saved", float(solved))
            if not solved:
                self._keep_most_likely_verified(group, student)
        return [example for group in groups for example in group.examples(self.tokens)]

    def _keep_most_likely_verified(self, group: PromptGroup, student: StudentView) -> None:
        """Weight 1 on the verified teacher solution the student finds most likely, 0 elsewhere."""
        solutions = [c for c in group.candidates if c.author != STUDENT]
        for candidate in solutions:
            candidate.weight = float(self.selector.verify(candidate.text, group.row.answer))
        verified = [c for c in solutions if c.weight > 0]
        for candidate in solutions:
            self.stats.add(f"select/accepted/{candidate.author}", candidate.weight)
        if len(verified) > 1:
            likelihoods = student.mean_logprobs([Example(group.prompt_ids, c.target_ids, media=group.media) for c in verified])
            best = max(range(len(verified)), key=likelihoods.__getitem__)
            for index, candidate in enumerate(verified):
                candidate.weight = float(index == best)
