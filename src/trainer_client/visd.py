"""Learning from the student's own samples by a verifier reward: `--method grpo` and `--method visd`.

Both sample G = `student_samples` rollouts y_1..y_G per prompt x from the current student π_θ
(training thread), reward each by the verifier, r_i ∈ {0, 1}, and take the group-relative
advantage (GRPO, Shao et al. 2024, without the division by the group's standard deviation):

    A_i = r_i − (1/G) Σ_j r_j

grpo (no teacher) maximises  J(θ) = (1/N) Σ_i Σ_t A_i · log π_θ(y_i,t | x, y_i,<t)
over the N tokens of the rollouts whose group disagrees (A_i ≠ 0); a group whose rollouts all
pass or all fail carries no signal and is dropped. One update per batch of rollouts, so the
importance ratio of PPO-style clipping is 1 and is left out; no KL term to a reference model.

visd (structured self-distillation with direction–magnitude decoupling, after VISD and RLSD,
Yang et al. 2026, "Self-Distilled RLVR", arXiv 2604.03128) keeps the direction of every rollout's update from A_i
and takes each token's magnitude from a teacher shown privileged feedback f_i: a judge scores
the rollout on quality dimensions (correctness, consistency, grounding: `visd_judge`), and the
teacher (the student's EMA, `--teacher ema`, or any teacher with its tokenizer) scores the
rollout's tokens under `visd_teacher_prompt`, which carries those scores. With

    Δ_i,t = sg[log π_T(y_i,t | x ⊕ f_i, y_i,<t) − log π_θ(y_i,t | x, y_i,<t)]   (teacher − student gap)
    ḡ     = mean of |Δ_i,t| over the tokens of the micro-batch's rollouts with A_i ≠ 0 (normalisation)
    m_i,t = clip(exp(sign(A_i) · Δ_i,t / ḡ), 1 − ε, 1 + ε)                          (ε = `visd_clip`)
    J(θ)  = (1/N) Σ_i Σ_t A_i · m_i,t · log π_θ(y_i,t | x, y_i,<t)

so a token the privileged teacher finds likelier than the student (Δ > 0) weighs more in a
rewarded rollout, and a token it finds less likely (Δ < 0, where the feedback says the rollout
went wrong) weighs more in a penalised one; the sign of every token's update is the sign of A_i,
so the teacher never turns a rewarded token into a penalised one (no leakage of the privileged
context into what is learned, only into how much). ε = 0 is grpo. The loss is −J, computed by
`student_loss` from per-token advantages Â_i,t = A_i · m_i,t.

`curriculum pass-rate` draws `curriculum_pool` prompts per trained prompt and keeps those the
student passes most often (from its earlier rollouts of each prompt) without having mastered them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trainer_client.checkpoints import CheckpointPart
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.judges import JUDGE_TAG, Judge, rule_scores
from trainer_client.methods import Method, fitted_teacher_prompt, step_seed
from trainer_client.on_policy import privileged_prompt, privileged_teacher_prompt, student_rollouts
from trainer_client.samples import Candidate, Example, PromptGroup, StudentTokens
from trainer_client.source import TeacherSource
from trainer_client.student import StudentView
from trainer_client.verifiers import ANSWER_EXTRACTORS, get_verifier

UNSEEN_PASS_RATE = 0.5  # what the curriculum assumes of a prompt the student has not tried


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i − mean_j r_j over one prompt's rollouts: rewards [G] -> advantages [G]."""
    return rewards - rewards.mean()


def decoupled_advantages(advantages: torch.Tensor, gaps: torch.Tensor, mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token advantages Â = A · clip(exp(sign(A) · Δ / ḡ), 1 − clip, 1 + clip), 0 off the mask.

    advantages [N]: A_i per rollout; gaps [N, L]: Δ_i,t = teacher − student log-prob of each token;
    mask [N, L] bool: real tokens. ḡ is the mean |Δ| over the masked tokens (1 when all are 0),
    so the magnitudes do not depend on the gaps' overall scale. Returns [N, L].
    """
    scale = gaps.abs()[mask].mean() if mask.any() else gaps.new_ones(())
    oriented = torch.sign(advantages)[:, None] * gaps / scale.clamp(min=1e-8)  # [N, L]
    magnitude = torch.exp(oriented).clamp(1 - clip, 1 + clip)
    return torch.where(mask, advantages[:, None] * magnitude, torch.zeros_like(gaps))


class PassRates:
    """The student's passes and tries per prompt, from its rollouts; a checkpoint part (JSON)."""

    FILE = "pass_rates.json"

    def __init__(self):
        self.counts: dict[str, list[int]] = {}

    @staticmethod
    def key(row: Row) -> str:
        return row.prompt if isinstance(row.prompt, str) else json.dumps(row.chat_turns())

    def record(self, row: Row, passes: int, tries: int) -> None:
        counts = self.counts.setdefault(self.key(row), [0, 0])
        counts[0] += passes
        counts[1] += tries

    def rate(self, row: Row) -> float:
        passes, tries = self.counts.get(self.key(row), (0, 0))
        return passes / tries if tries else UNSEEN_PASS_RATE

    def easiest(self, rows: list[Row], n: int) -> list[Row]:
        """The `n` rows with the highest pass rate below 1 (mastered ones last; ties in draw order)."""
        rates = [self.rate(row) for row in rows]
        order = sorted(range(len(rows)), key=lambda i: (rates[i] >= 1.0, -rates[i]))
        return [rows[i] for i in order[:n]]

    def save(self, directory: Path) -> None:
        (directory / self.FILE).write_text(json.dumps(self.counts))

    def load(self, directory: Path) -> None:
        path = directory / self.FILE
        self.counts = json.loads(path.read_text()) if path.is_file() else {}


class GRPO(Method):
    """Policy gradient on the student's rollouts with group-relative verifier advantages (no teacher)."""

    uses_student = True

    def __init__(self, config: TrainConfig, tokens: StudentTokens, source: TeacherSource | None):
        super().__init__(config, tokens, source)
        self.verify = get_verifier(config.verifier)
        self.pass_rates = PassRates() if config.curriculum == "pass-rate" else None
        self.draw_factor = config.curriculum_pool if self.pass_rates else 1  # rows drawn per trained row

    def checkpoint_parts(self) -> list[CheckpointPart]:
        return super().checkpoint_parts() + ([self.pass_rates] if self.pass_rates else [])

    def rollout(self, student: StudentView, rows: list[Row], step: int) -> list[PromptGroup]:
        if self.pass_rates:
            rows = self.pass_rates.easiest(rows, self.config.batch_size)
        config = self.config
        return student_rollouts(student, self.tokens, rows, config.student_samples, config.max_new_tokens, config.student_temperature,
                                step_seed(config, step))

    async def annotate(self, rows: list[Row], rollout: list[PromptGroup], step: int) -> list[PromptGroup]:
        """The verifier's reward r_i of every rollout (`candidate.reward`)."""
        for group in rollout:
            if group.row.answer is None:
                raise ValueError(f"method {self.config.method} rewards by the verifier: every row needs an 'answer'; "
                                 f"missing for {group.row.prompt_text!r}")
            for candidate in group.candidates:
                candidate.reward = float(self.verify(candidate.text, group.row.answer))
        return rollout

    def select(self, groups: list[PromptGroup], student: StudentView) -> list[Example]:
        """Each rollout's advantage A_i on all its tokens; groups without signal get weight 0."""
        advantages = self.rollout_advantages(groups)
        for group in groups:
            for candidate in group.candidates:
                advantage = advantages[id(candidate)]
                candidate.advantages = np.full(len(self._fitted(group, candidate)), advantage, dtype=np.float32)
                candidate.weight = float(advantage != 0)
        return [example for group in groups for example in group.examples(self.tokens)]

    def rollout_advantages(self, groups: list[PromptGroup]) -> dict[int, float]:
        """A_i per candidate (by id), with the rewards, pass rates and signal share recorded."""
        advantages: dict[int, float] = {}
        for group in groups:
            rewards = torch.tensor([c.reward for c in group.candidates])
            for candidate, advantage in zip(group.candidates, group_advantages(rewards).tolist()):
                advantages[id(candidate)] = advantage
            self.stats.add("rl/reward", float(rewards.sum()), len(rewards))
            self.stats.add("rl/groups_with_signal", float(rewards.min() != rewards.max()))
            if self.pass_rates:
                self.pass_rates.record(group.row, int(rewards.sum()), len(rewards))
        return advantages

    def _fitted(self, group: PromptGroup, candidate: Candidate) -> list[int]:
        return self.tokens.fit(group.prompt_ids, candidate.target_ids)[1]


class VISD(GRPO):
    """GRPO whose token magnitudes come from a teacher scoring each rollout under judge feedback (module docstring)."""

    def __init__(self, config: TrainConfig, tokens: StudentTokens, source: TeacherSource | None):
        super().__init__(config, tokens, source)
        self.teacher = next(group.name for group in source.groups() if JUDGE_TAG not in group.tags)
        self.judge = Judge(config, source) if config.visd_judge == "model" else None
        self.extract = ANSWER_EXTRACTORS[config.verifier]

    def rollout(self, student: StudentView, rows: list[Row], step: int) -> list[PromptGroup]:
        """The rollouts, with the student's own log-prob of each of their tokens (for the gap Δ)."""
        groups = super().rollout(student, rows, step)
        pairs = [(group, candidate) for group in groups for candidate in group.candidates]
        logprobs = student.token_logprobs([Example(*g.fit(self.tokens, c.target_ids), media=g.media) for g, c in pairs])
        for (_, candidate), own in zip(pairs, logprobs):
            candidate.student_token_logprobs = own
        return groups

    async def annotate(self, rows: list[Row], rollout: list[PromptGroup], step: int) -> list[PromptGroup]:
        """Reward and judge every rollout, then have the teacher score its tokens under the feedback prompt."""
        await super().annotate(rows, rollout, step)
        if self.judge:
            await self.judge.score(rollout)
        else:
            for group in rollout:
                for candidate in group.candidates:
                    candidate.scores = rule_scores(candidate.text, group.row.answer, self.verify, self.extract)
        pairs = [(group, candidate) for group in rollout for candidate in group.candidates]
        sequences = [{"prompt": fitted_teacher_prompt(self.tokens, self.teacher_prompt(g, c), self._fitted(g, c)), "completion": self._fitted(g, c)}
                     for g, c in pairs]
        response = await self.source.score(self.teacher, {"sequences": sequences, "top_logprobs": 0, "temperature": 1.0})
        for (_, candidate), result in zip(pairs, response.results):
            candidate.teacher_token_logprobs = np.asarray(result.token_logprobs, dtype=np.float32)
        return rollout

    def teacher_prompt(self, group: PromptGroup, candidate: Candidate) -> list[int] | list[dict]:
        """`visd_teacher_prompt` filled for `candidate` (`on_policy.privileged_prompt`: the judge's scores
        as {feedback}), as the teacher receives it (`on_policy.privileged_teacher_prompt`)."""
        text = privileged_prompt(self.config.visd_teacher_prompt, group.row, candidate, bool(candidate.reward))
        return privileged_teacher_prompt(self.tokens, group.row, text)

    def select(self, groups: list[PromptGroup], student: StudentView) -> list[Example]:
        """Per-token advantages A_i · m_i,t over the micro-batch's rollouts (`decoupled_advantages`)."""
        advantages = self.rollout_advantages(groups)
        candidates = [c for group in groups for c in group.candidates if advantages[id(c)] != 0 and len(c.student_token_logprobs)]
        for group in groups:
            for candidate in group.candidates:
                candidate.weight = 0.0
                for dimension, score in candidate.scores.items():
                    self.stats.add(f"judge/{dimension}", score)
        if not candidates:
            return []
        width = max(len(c.student_token_logprobs) for c in candidates)
        gaps, mask = torch.zeros(len(candidates), width), torch.zeros(len(candidates), width, dtype=torch.bool)
        for row, candidate in enumerate(candidates):
            length = len(candidate.student_token_logprobs)
            gaps[row, :length] = torch.from_numpy(candidate.teacher_token_logprobs - candidate.student_token_logprobs)
            mask[row, :length] = True
        rollout_advantages = torch.tensor([advantages[id(c)] for c in candidates])
        token_advantages = decoupled_advantages(rollout_advantages, gaps, mask, self.config.visd_clip)
        self.stats.add("visd/gap_abs", float(gaps.abs()[mask].sum()), float(mask.sum()))
        self.stats.add("visd/magnitude", float((token_advantages / rollout_advantages[:, None]).abs()[mask].sum()), float(mask.sum()))
        for row, candidate in enumerate(candidates):
            candidate.advantages = token_advantages[row, : len(candidate.student_token_logprobs)].numpy()
            candidate.weight = 1.0
        return [example for group in groups for example in group.examples(self.tokens)]
