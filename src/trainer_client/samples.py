"""What flows between a method's stages: candidate completions grouped per prompt, and examples.

`annotate` turns rows into `PromptGroup`s: each row's prompt with every candidate completion
proposed for it (by which teacher, or by the student itself), so a selection rule sees a
prompt's whole group (majority voting needs it) and can tell teachers apart. `select` turns
groups into weighted `Example`s; an example's weight reaches the loss as a float mask.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from potstill.fingerprint import tokenizer_fingerprint
from teacher_service.protocol import Sample
from trainer_client.data import ChatTurn, Row
from trainer_client.media import MediaInputs, encode_with_media, teacher_messages

STUDENT = "student"  # the `author` of a candidate the student sampled itself


@dataclass
class Example:
    """One student sequence: the loss is on `target_ids`, given `prompt_ids`, scaled by `weight` >= 0."""

    prompt_ids: list[int]
    target_ids: list[int]
    weight: float = 1.0
    teacher_ids: np.ndarray | None = None  # int [len(target_ids), K]
    teacher_logprobs: np.ndarray | None = None  # float [len(target_ids), K]
    own: bool = False  # the student's own sample: seen by the adversarial discriminator, never a target
    teacher_token_logprobs: np.ndarray | None = None  # float [len(target_ids)]: the teachers' log-prob of each target token
    reward: float = 0.0  # a sequence reward (the verifier's), spread over its tokens by the policy-gradient update
    # Policy-gradient methods: each target token's advantage; the loss is then -advantage x its log-prob.
    advantages: np.ndarray | None = None  # float [len(target_ids)]
    media: MediaInputs | None = None  # the prompt's pixels, for the placeholders in `prompt_ids`


@dataclass
class Candidate:
    """A completion proposed for a prompt, in the student's token ids, and what is known of it."""

    target_ids: list[int]
    text: str
    author: str  # the teacher's (group) name, or STUDENT
    mean_logprob: float | None = None  # the author's mean log-prob per token of its own sample
    weight: float = 1.0  # set by selection: 0 drops the candidate
    scores: dict[str, float] = field(default_factory=dict)  # judge dimensions, in [0, 1]
    # The teachers' top-k at each (fitted) target position, for white-box losses.
    teacher_ids: np.ndarray | None = None  # int [len(fitted target), K]
    teacher_logprobs: np.ndarray | None = None  # float [len(fitted target), K]
    teacher_token_logprobs: np.ndarray | None = None  # float [len(fitted target)]: of the candidate's own tokens
    reward: float = 0.0
    # What teachers score it after, when not the group's prompt (privileged context): student ids,
    # or for a row with pictures chat turns carrying them (`on_policy.privileged_teacher_prompt`).
    teacher_prompt: list[int] | list[dict] | None = None
    student_token_logprobs: np.ndarray | None = None  # float [len(fitted target)]: the student's own, when it sampled it
    advantages: np.ndarray | None = None  # float [len(fitted target)], set by a policy-gradient method's select


@dataclass
class PromptGroup:
    """A row, its prompt ids, and every candidate completion proposed for it."""

    row: Row
    prompt_ids: list[int]
    candidates: list[Candidate] = field(default_factory=list)
    teacher_ce: dict[str, float] = field(default_factory=dict)  # per teacher, on the row's reference (route lowest-ce)
    own_examples: list[Example] = field(default_factory=list)  # the student's own samples (adversarial term)
    media: MediaInputs | None = None  # the prompt's pixels (the row's images / video), for every example

    def by_author(self) -> dict[str, list[Candidate]]:
        grouped: dict[str, list[Candidate]] = defaultdict(list)
        for candidate in self.candidates:
            grouped[candidate.author].append(candidate)
        return dict(grouped)

    def examples(self, tokens: StudentTokens) -> list[Example]:
        """The candidates with a positive weight, as weighted examples."""
        return [
            Example(*self.fit(tokens, c.target_ids), c.weight, c.teacher_ids, c.teacher_logprobs,
                    teacher_token_logprobs=c.teacher_token_logprobs, reward=c.reward, advantages=c.advantages, media=self.media)
            for c in self.candidates
            if c.weight > 0 and c.target_ids
        ]

    def teacher_prompt(self) -> list[int] | list[dict]:
        """What a teacher is asked to continue: a row with images or video as chat turns carrying
        them as parts, chat turns as turns (each teacher renders them with its own template and
        processor), a text prompt as the student's ids."""
        if self.row.has_media:
            return teacher_messages(self.row)
        return self.row.chat_turns() or self.prompt_ids

    def fit(self, tokens: StudentTokens, target_ids: list[int]) -> tuple[list[int], list[int]]:
        """The prompt and a target cut to the student's `max_seq_len` (a prompt with media is kept whole)."""
        return tokens.fit(self.prompt_ids, target_ids, whole_prompt=self.media is not None)


def encode_prompt(tokenizer, prompt: str | list[ChatTurn]) -> list[int]:
    """A text prompt's ids (with the tokenizer's special tokens), or chat turns rendered with its
    chat template up to the opening of the assistant's turn."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise ValueError("chat ('messages') rows need a student tokenizer with a chat template; this one has none")
    turns = [turn.model_dump() for turn in prompt]
    return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))


class StudentTokens:
    """How the student turns rows and teacher samples into token ids."""

    def __init__(self, tokenizer, max_seq_len: int, processor=None, see_media: bool = True):
        """processor: a vision-language student's (media.py), for rows with images or video;
        see_media False: the student's prompts leave rows' media out (teachers still get them)."""
        self.tokenizer = tokenizer
        self.processor = processor
        self.see_media = see_media
        self.max_seq_len = max_seq_len
        self.eos_id = tokenizer.eos_token_id
        self.fingerprint = tokenizer_fingerprint(processor if processor is not None else tokenizer)  # a processor's covers its media tokens

    def prompt(self, prompt: str | list[ChatTurn]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def row_prompt(self, row: Row) -> tuple[list[int], MediaInputs | None]:
        """The row's prompt ids and, for a row with images or video, its pixels (placeholders expanded in the ids)."""
        if not row.has_media or not self.see_media:
            return self.prompt(row.prompt), None
        if self.processor is None:
            raise ValueError("a row has images or video, but the student is a text-only model (it has no image processor); "
                             "--student-media none trains it on the rows' text alone")
        return encode_with_media(self.processor, row)

    def group(self, row: Row, candidates: list[Candidate] | None = None) -> PromptGroup:
        """A prompt group for the row, with its prompt encoded (and its media, if any)."""
        prompt_ids, media = self.row_prompt(row)
        return PromptGroup(row, prompt_ids, candidates or [], media=media)

    def target(self, text: str, ends: bool = True) -> list[int]:
        """A completion's ids, closed by EOS when the text is complete (so the student learns to stop)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.eos_id] if ends and self.eos_id is not None else ids

    def text(self, target_ids: list[int]) -> str:
        return self.tokenizer.decode(target_ids, skip_special_tokens=True)

    def fit(self, prompt_ids: list[int], target_ids: list[int], whole_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Cut to `max_seq_len`: the target's end first, then the prompt's start (never below 1 token each).

        whole_prompt: the prompt may not be cut (its media placeholders must all stay), only the target.
        """
        if whole_prompt:
            if len(prompt_ids) >= self.max_seq_len:
                raise ValueError(f"a prompt with images or video is {len(prompt_ids)} tokens, which leaves no room for "
                                 f"a completion within max_seq_len {self.max_seq_len}; raise --max-seq-len")
            return prompt_ids, target_ids[: self.max_seq_len - len(prompt_ids)]
        target_ids = target_ids[: max(1, self.max_seq_len - 1)]
        prompt_ids = prompt_ids[-max(1, self.max_seq_len - len(target_ids)) :]
        return prompt_ids, target_ids

    def teacher_candidate(self, sample: Sample, author: str, same_tokenizer: bool) -> Candidate:
        """A teacher sample in the student's ids. A teacher with another tokenizer hands over text;
        one with the student's hands over its token ids, exactly (decoding partial byte tokens to
        text and back would lose them)."""
        if same_tokenizer:
            target = sample.token_ids.tolist()
        else:
            target = self.target(sample.text, ends=sample.finish_reason == "stop")
        logprobs = sample.token_logprobs
        mean = float(np.mean(logprobs)) if logprobs is not None and len(logprobs) else None
        return Candidate(target_ids=target, text=sample.text, author=author, mean_logprob=mean)
