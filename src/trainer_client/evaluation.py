"""Held-out evaluation: loss on reference completions, KL to the teachers, verified accuracy.

The teachers' view of the held-out rows is fetched once, so an evaluation costs the student's
time only; where a teacher's weights change during the run (a self-teacher), the results name
the version the KL is measured against (`eval/teacher_version/<teacher>`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer_client.data import Row
from trainer_client.losses import distillation_loss
from trainer_client.media import batch_media
from trainer_client.samples import Example, StudentTokens
from trainer_client.student_loss import collate


@torch.inference_mode()
def greedy_completions(model, tokens: StudentTokens, rows: list[Row], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations of the rows' prompts (encoded as in training, media included), left-padded in batches, cut at EOS."""
    device = next(model.parameters()).device
    tokenizer = tokens.tokenizer
    completions = []
    for start in range(0, len(rows), batch_size):
        prompts = [tokens.row_prompt(row) for row in rows[start : start + batch_size]]
        batch = tokenizer.pad([{"input_ids": ids} for ids, _ in prompts], padding=True, padding_side="left", return_tensors="pt")
        width = batch["input_ids"].shape[1]
        media = batch_media([part for _, part in prompts], [width - len(ids) for ids, _ in prompts], width)
        output = model.generate(
            **{name: tensor.to(device) for name, tensor in {**batch, **media}.items()}, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        completions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return completions


def accuracy(
    model, tokens: StudentTokens, rows: list[Row], verify: Callable[[str, str], bool], max_new_tokens: int, batch_size: int = 64
) -> float:
    """Fraction of rows whose greedy completion the verifier accepts against the row's answer."""
    if not rows:
        raise ValueError("no rows to evaluate")
    completions = greedy_completions(model, tokens, rows, max_new_tokens, batch_size)
    return sum(verify(c, r.answer) for c, r in zip(completions, rows)) / len(rows)


class Evaluator:
    def __init__(
        self,
        rows: list[Row],
        examples: list[Example],
        tokens: StudentTokens,
        verify: Callable[[str, str], bool] | None,
        max_new_tokens: int,
        batch_size: int = 32,
        teacher_versions: dict[str, int] | None = None,
    ):
        """`examples`: the held-out reference completions, with the teachers' top-k attached where
        known; `teacher_versions`: the weights version of each teacher that computed them."""
        self.rows = rows
        self.teacher_versions = teacher_versions or {}
        self.examples = examples
        self.tokens = tokens
        self.verify = verify if verify is not None and all(r.answer is not None for r in rows) else None
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        results = self._losses(model) if self.examples else {}
        if self.verify is not None:
            results["eval/accuracy"] = accuracy(model, self.tokens, self.rows, self.verify, self.max_new_tokens)
        model.train(was_training)
        return results

    def _losses(self, model) -> dict[str, float]:
        """Token-weighted CE and, with teachers, forward KL(teacher || student) at temperature 1, tail as a bucket."""
        device = next(model.parameters()).device
        ce_sum = kl_sum = tokens = 0.0
        for start in range(0, len(self.examples), self.batch_size):
            batch = collate(self.examples[start : start + self.batch_size], self.tokens.tokenizer.pad_token_id or 0).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.media).logits[:, :-1].float()
            count = batch.target_mask.sum().item()
            ce_sum += torch.nn.functional.cross_entropy(logits[batch.target_mask], batch.labels[batch.target_mask], reduction="sum").item()
            if batch.teacher_ids is not None:
                kl_sum += distillation_loss(logits, batch.teacher_ids, batch.teacher_logprobs, batch.target_mask).item() * count
            tokens += count
        results = {"eval/loss": ce_sum / tokens}
        if self.examples[0].teacher_ids is not None:
            results["eval/kl"] = kl_sum / tokens
            results.update({f"eval/teacher_version/{name}": version for name, version in self.teacher_versions.items()})
        return results
