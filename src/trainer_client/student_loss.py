"""Batches of weighted examples, and the student-side loss computed in chunks of positions.

The loss never holds the full [B, T, V] logits: the student's final hidden states are taken at
the positions that carry weight, and the output layer, log-softmax and divergence run on
`chunk_size` of those positions at a time under activation checkpointing, so the backward pass
recomputes each chunk's logits instead of keeping them (the idea of Liger's fused linear losses
and TRL's chunked distillation loss). Peak memory grows with the chunk, not with the sequence:
`bench/loss_memory.py` measures it.

An example's weight multiplies its tokens' losses; a step's loss is the weighted sum over all
its micro-batches divided by their total weight (the trainer sums the weights first), so every
weighted token counts the same whatever micro-batch it lands in.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer_client.config import ON_POLICY_METHODS, TrainConfig
from trainer_client.losses import distillation_advantage, distillation_per_position, policy_gradient_loss, sampled_reverse_kl
from trainer_client.media import batch_media
from trainer_client.samples import Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T - 1]: the token each position predicts
    target_mask: torch.Tensor  # [B, T - 1] bool: positions predicting a target token
    weights: torch.Tensor  # [B, T - 1] float: the example's weight at its target positions, else 0
    own: torch.Tensor  # [B] bool: the student's own sample (for the adversarial term), not a target
    teacher_ids: torch.Tensor | None  # [B, T - 1, K]
    teacher_logprobs: torch.Tensor | None  # [B, T - 1, K]
    teacher_token_logprobs: torch.Tensor | None = None  # [B, T - 1]: the teachers' log-prob of each label (target positions)
    rewards: torch.Tensor | None = None  # [B, T - 1]: the example's sequence reward at its target positions, else 0
    advantages: torch.Tensor | None = None  # [B, T - 1] float: policy-gradient advantage per target position, else 0
    # The prompts' pixels, concatenated in row order (model keyword arguments); empty without media.
    media: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> Batch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Batch(**{**moved, "media": {k: v.to(device) for k, v in self.media.items()}})


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded tensors; position t of `labels` holds token t + 1 of the sequence. The examples'
    pixels are concatenated in row order, as the model fills its placeholders."""
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    has_teacher = examples[0].teacher_ids is not None
    has_token_logprobs = examples[0].teacher_token_logprobs is not None
    k = max(e.teacher_ids.shape[1] for e in examples) if has_teacher else 0
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    target_mask = torch.zeros((len(examples), width - 1), dtype=torch.bool)
    weights = torch.zeros((len(examples), width - 1))
    teacher_ids = torch.zeros((len(examples), width - 1, k), dtype=torch.long)
    teacher_logprobs = torch.full((len(examples), width - 1, k), float("-inf"))
    teacher_token_logprobs = torch.zeros((len(examples), width - 1))
    rewards = torch.zeros((len(examples), width - 1))
    has_advantages = examples[0].advantages is not None
    advantages = torch.zeros((len(examples), width - 1))
    for row, example in enumerate(examples):
        sequence = example.prompt_ids + example.target_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        span = slice(len(example.prompt_ids) - 1, len(sequence) - 1)  # positions predicting the targets
        target_mask[row, span] = True
        weights[row, span] = example.weight
        rewards[row, span] = example.reward
        if has_token_logprobs:
            teacher_token_logprobs[row, span] = torch.from_numpy(example.teacher_token_logprobs.astype(np.float32))
        if has_advantages:
            advantages[row, span] = torch.from_numpy(example.advantages.astype(np.float32))
        if has_teacher:
            width_k = example.teacher_ids.shape[1]
            teacher_ids[row, span, :width_k] = torch.from_numpy(example.teacher_ids.astype(np.int64))
            teacher_logprobs[row, span, :width_k] = torch.from_numpy(example.teacher_logprobs.astype(np.float32))
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=input_ids[:, 1:].clone(),
        target_mask=target_mask,
        weights=weights,
        own=torch.tensor([e.own for e in examples], dtype=torch.bool),
        teacher_ids=teacher_ids if has_teacher else None,
        teacher_logprobs=teacher_logprobs if has_teacher else None,
        teacher_token_logprobs=teacher_token_logprobs if has_token_logprobs else None,
        rewards=rewards,
        advantages=advantages if has_advantages else None,
        media=batch_media([e.media for e in examples], [0] * len(examples), width),
    )


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None, teacher_logprobs: torch.Tensor | None,
    config: TrainConfig, teacher_token_logprobs: torch.Tensor | None = None, rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-position loss [N] from logits [N, V] and labels [N]: cross-entropy, or, with the
    teachers' top-k [N, K], the divergence plus `ce_weight` x cross-entropy; on-policy methods
    with the teachers' log-probs of the labels [N] (and rewards [N]) as `on_policy_token_losses`
    says. Returns the loss and its parts [N]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits lose too much
    ce = F.cross_entropy(logits, labels, reduction="none")
    if teacher_ids is None:
        return ce, {"ce": ce}
    if config.method in ON_POLICY_METHODS and (config.on_policy_update == "policy-gradient" or config.on_policy_loss == "sampled"):
        return on_policy_token_losses(-ce, teacher_token_logprobs, rewards, config)
    kd = distillation_per_position(
        logits, teacher_ids, teacher_logprobs, config.loss, config.temperature, config.tail, config.beta,
    )
    return kd + config.ce_weight * ce, {"kd": kd, "ce": ce}


def on_policy_token_losses(
    student_token_logprobs: torch.Tensor, teacher_token_logprobs: torch.Tensor, rewards: torch.Tensor, config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-position loss [N] on sampled tokens from s = log q(y) (with gradient), t = log p(y) and
    the sequence rewards [N], and its parts:
    - policy-gradient: -A · s with A = clamp(-k(y), ±advantage_clip) + reward_weight · reward (detached);
    - supervised, on_policy_loss sampled: k(y) itself (k3; see `sampled_reverse_kl` for why not k1);
    k = `kl_estimator`; plus `ce_weight` · (-s) either way. Part "kd" is k(y), the estimate."""
    estimate = sampled_reverse_kl(student_token_logprobs, teacher_token_logprobs, config.kl_estimator)
    if config.on_policy_update == "policy-gradient":
        advantage = distillation_advantage(student_token_logprobs, teacher_token_logprobs, config.kl_estimator,
                                           config.advantage_clip, config.reward_weight * rewards)
        loss, parts = policy_gradient_loss(student_token_logprobs, advantage), {"advantage": advantage}
    else:
        loss, parts = estimate, {}
    ce = -student_token_logprobs
    return loss + config.ce_weight * ce, {"kd": estimate.detach(), "ce": ce, **parts}


@contextlib.contextmanager
def _capture_output(module: torch.nn.Module):
    """Records the output of `module`'s forward (its `last_hidden_state`) while inside."""
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden_states(model, unwrapped, batch: Batch) -> torch.Tensor:
    """The student's final hidden states [B, T, H] (after its last norm), with the output layer run
    on one position only where the model allows it (`logits_to_keep`). The forward goes through
    `model` itself (perhaps a distributed wrapper, whose gradient sync needs it); the hidden states
    are read from the inner base model with a hook."""
    keep_one = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(unwrapped.forward).parameters else {}
    with _capture_output(unwrapped.base_model) as captured:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.media, **keep_one)
    return captured[-1]


def weighted_loss_sum(model, unwrapped, batch: Batch, config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ weight · loss over the batch's weighted positions, and Σ weight · part for each part."""
    return weighted_loss_sum_from_hidden(final_hidden_states(model, unwrapped, batch), unwrapped, batch, config)


def weighted_loss_sum_from_hidden(
    hidden: torch.Tensor, unwrapped, batch: Batch, config: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """`weighted_loss_sum` given the final hidden states [B, T, H].

    With `batch.advantages` (policy-gradient methods) a position's loss is its advantage times its
    cross-entropy, -A_t · log q(y_t), logged as the part `pg` beside the plain `ce`.
    The output layer runs on `config.loss_chunk_size` positions at a time, checkpointed, so the
    largest tensor alive is one chunk's [chunk, V] logits (with its log-softmax), never [B, T, V].
    """
    hidden = hidden[:, :-1]  # [B, T - 1, H], aligned with labels
    keep = batch.weights > 0  # [B, T - 1]
    h, labels, weights = hidden[keep], batch.labels[keep], batch.weights[keep]  # [N, H], [N], [N]
    per_position = (batch.teacher_ids, batch.teacher_logprobs, batch.teacher_token_logprobs, batch.rewards, batch.advantages)
    teacher = [t[keep] if t is not None else None for t in per_position]
    head = unwrapped.get_output_embeddings()
    total = h.new_zeros(())
    parts: dict[str, float] = {}
    for start in range(0, len(labels), config.loss_chunk_size):
        chunk = slice(start, start + config.loss_chunk_size)
        ids, logprobs, token_logprobs, rewards, advantages = (t[chunk] if t is not None else None for t in teacher)

        def chunk_sums(h_chunk, w=weights[chunk], y=labels[chunk], ids=ids, logprobs=logprobs, token_logprobs=token_logprobs,
                       rewards=rewards, advantages=advantages):
            loss, chunk_parts = token_losses(head(h_chunk), y, ids, logprobs, config, token_logprobs, rewards)
            if advantages is not None:  # a policy-gradient method's own per-token advantages (grpo, visd)
                loss = chunk_parts["pg"] = policy_gradient_loss(-chunk_parts["ce"], advantages)
            return (w * loss).sum(), {name: (w * part).sum() for name, part in chunk_parts.items()}

        # No randomness inside, so no RNG state to save and restore (restoring it would also reset
        # the global generator under any other thread sampling at the time).
        loss_sum, part_sums = checkpoint(chunk_sums, h[chunk], use_reentrant=False, preserve_rng_state=False)
        total = total + loss_sum
        for name, value in part_sums.items():
            parts[name] = parts.get(name, 0.0) + value.item()
    return total, parts
