"""The student as the method stages see it on the training thread: sample, score, represent.

Rollouts and student-side selection (guided distillation's "which teacher solution does the
student find most likely", a learned router's prompt features) need the student's current
weights, so they run on the training thread, between optimizer steps, without gradients.
Sampling is seeded by the step (on a forked RNG), so a step prepared again after `--resume`
draws the same samples.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainer_client.media import batch_media
from trainer_client.samples import STUDENT, Candidate, Example, PromptGroup, StudentTokens
from trainer_client.student_loss import collate


class StudentView:
    def __init__(self, model, tokens: StudentTokens):
        self.model = model  # the unwrapped model
        self.tokens = tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def sample(self, groups: list[PromptGroup], n: int, max_new_tokens: int, temperature: float, seed: int) -> list[list[Candidate]]:
        """`n` samples per group's prompt (with its media), as candidates authored by the student; temperature 0 is greedy."""
        prompts = [group.prompt_ids for group in groups]
        pad = self.tokens.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # [B, W], left-padded
        attention_mask = (torch.arange(width, device=self.device) >= torch.tensor([width - len(p) for p in prompts], device=self.device)[:, None]).long()
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                **self._media(groups, width),
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
                num_return_sequences=n, pad_token_id=pad, eos_token_id=self.tokens.eos_id,
            )[:, width:]  # [B * n, new]
        self.model.train(was_training)
        samples = [self._candidate(row.tolist()) for row in output]
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _media(self, groups: list[PromptGroup], width: int) -> dict[str, torch.Tensor]:
        """The groups' pixels and token kinds for their prompts left-padded to `width`."""
        inputs = batch_media([g.media for g in groups], [width - len(g.prompt_ids) for g in groups], width)
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}

    def _candidate(self, ids: list[int]) -> Candidate:
        """Cut after the first EOS (kept, so the student learns to stop). `generate` pads a row only
        after its EOS, so a row without one holds sampled tokens only, padding id included: the
        student may sample that id, and a policy gradient must see it to push it down."""
        eos = self.tokens.eos_id
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        return Candidate(target_ids=ids, text=self.tokens.text(ids), author=STUDENT)

    def mean_logprobs(self, examples: list[Example]) -> list[float]:
        """The student's mean log-prob per target token of each example (its prompt's media included)."""
        return [float(logprobs.mean()) if len(logprobs) else 0.0 for logprobs in self.token_logprobs(examples)]

    @torch.no_grad()
    def token_logprobs(self, examples: list[Example]) -> list[np.ndarray]:
        """The student's log-prob of each target token [len(target)] of each example (its prompt's media included)."""
        batch = collate(examples, self.tokens.tokenizer.pad_token_id or 0).to(self.device)
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.media).logits[:, :-1].float()
        token_logprobs = -F.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")  # [B, T - 1]
        return [row[mask].cpu().numpy() for row, mask in zip(token_logprobs, batch.target_mask)]

    @torch.no_grad()
    def prompt_features(self, prompts: list[list[int]]) -> torch.Tensor:
        """Mean-pooled final hidden states of each prompt [B, H] (the router's input)."""
        pad = self.tokens.tokenizer.pad_token_id or 0
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=self.device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=self.device)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, W, H]
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

