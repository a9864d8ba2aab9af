"""Divergences between a student's full distribution and a teacher's top-k, and teacher mixtures.

The teacher service sends, per position, its top-k token ids and their log-probs, computed at the
trainer's temperature over the teacher's FULL vocabulary (so their probabilities sum to <= 1).
The student has full logits. Every divergence here compares the two on the teacher's support.

Notation: p is the teacher, q the student; t = log p and s = log q at the same slots.
Shapes: B batch, L positions, V student vocabulary, k teacher top-k, K = k or k + 1 slots.
A slot whose log-prob is -inf carries no mass: 0 · log 0 = 0, and values and gradients stay
finite there (only reverse KL on a slot where the student has mass and the teacher none is
+inf, as it truly is; `topk_log_distributions` never produces such a slot).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

TailMode = Literal["bucket", "renormalize"]

# Floor of a tail bucket's mass. When the top-k already holds (numerically) all the mass,
# 1 - sum is 0 or slightly negative; flooring it keeps log() finite and its gradient bounded.
MIN_TAIL_MASS = 1e-8


def _with_tail(logp: Tensor) -> Tensor:
    """[..., k] -> [..., k + 1] log-probs; the last is log(1 - sum exp(logp)), floored."""
    # Summing probabilities (not logsumexp) stays NaN-free when every slot is -inf.
    tail_mass = (1 - logp.exp().sum(-1, keepdim=True)).clamp(min=MIN_TAIL_MASS)
    return torch.cat([logp, tail_mass.log()], dim=-1)


def _renormalized(logp: Tensor) -> Tensor:
    """[..., k] log-probs -> [..., k] log-probs that sum to 1 over the last dim."""
    # logsumexp of an all -inf row has NaN gradients; such a row (no support) is left all -inf.
    empty = torch.isneginf(logp).all(-1, keepdim=True)
    return logp - torch.logsumexp(torch.where(empty, 0.0, logp), dim=-1, keepdim=True)


def topk_log_distributions(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    temperature: float = 1.0,
    tail: TailMode = "bucket",
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-distributions on the teacher's top-k support.

    student_logits [B, L, V] float; teacher_ids [B, L, k] long (each < V); teacher_logprobs
    [B, L, k] float, already at `temperature`. The student side is
    s = log_softmax(student_logits / temperature)[teacher_ids], computed in at least float32.
    A slot where the teacher's log-prob is -inf (a duplicate slot from `mix_teachers`, or an
    underflow) is outside the support on both sides: the student's mass there is left out of the
    top-k (so a repeated id is never counted twice) and, with tail="bucket", lands in the tail.

    tail="bucket" (top-k plus "everything else" as one k+1-way distribution): each side gets a
    (k+1)-th slot log(1 - sum exp(.)), its mass floored at MIN_TAIL_MASS = 1e-8 -> [B, L, k+1].
    tail="renormalize": each side's top-k renormalised to sum to 1 -> [B, L, k].
    Returns (teacher_logp, student_logp), same shape and dtype.
    """
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape [B, L, k]"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # bf16/fp16 logits lose too much in log_softmax; float64 stays float64 for exact tests.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_all = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [B, L, V]
    t = teacher_logprobs.to(dtype)
    s = torch.where(torch.isneginf(t), float("-inf"), student_all.gather(-1, teacher_ids))
    if tail == "bucket":
        return _with_tail(t), _with_tail(s)
    if tail == "renormalize":
        return _renormalized(t), _renormalized(s)
    raise ValueError(f"tail must be 'bucket' or 'renormalize', got {tail!r}")


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a || b) = sum a (log a - log b) over the last dim, with 0 · log 0 = 0."""
    # Mask the difference, not the product: 0 · inf in the product would make NaN gradients.
    diff = torch.where(torch.isneginf(logp_a), 0.0, logp_a - logp_b)
    return (logp_a.exp() * diff).sum(-1)


def forward_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """Forward KL(p || q) = sum_i p_i (t_i - s_i): mode covering, the classic KD loss.

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network". Inputs [B, L, K] from
    `topk_log_distributions` (the tail, if any, is the last slot and counts like any other);
    output [B, L].
    """
    return _kl(teacher_logp, student_logp)


def reverse_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """Reverse KL(q || p) = sum_i q_i (s_i - t_i) on the support: mode seeking.

    Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models". Inputs
    [B, L, K] from `topk_log_distributions` (tail slot included as a slot); output [B, L].
    A slot where the student has mass and the teacher none is +inf, as the divergence is;
    `topk_log_distributions` never makes one (it drops teacher -inf slots on both sides).
    """
    return _kl(student_logp, teacher_logp)


def generalized_jsd(teacher_logp: Tensor, student_logp: Tensor, beta: float) -> Tensor:
    """Generalised JSD = beta · KL(p || M) + (1 - beta) · KL(q || M), M = beta·p + (1 - beta)·q.

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), with the convention of TRL's `generalized_jsd_loss`:
    beta = 0 is forward KL and beta = 1 reverse KL, special-cased (the formula itself tends to 0
    at both ends). Inputs [B, L, K] from `topk_log_distributions` (tail slot included as a slot);
    output [B, L].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(teacher_logp, student_logp)
    if beta == 1.0:
        return reverse_kl(teacher_logp, student_logp)
    # Where both sides are -inf, logaddexp has NaN gradients; M is unused there (0 · log 0).
    empty = torch.isneginf(teacher_logp) & torch.isneginf(student_logp)
    t, s = (torch.where(empty, 0.0, x) for x in (teacher_logp, student_logp))
    log_m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    return beta * _kl(teacher_logp, log_m) + (1 - beta) * _kl(student_logp, log_m)


def total_variation(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """Total variation 0.5 · sum_i |p_i - q_i|, bounded in [0, 1].

    Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation".
    Inputs [B, L, K] from `topk_log_distributions` (tail slot included as a slot); output [B, L].
    """
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


KLEstimator = Literal["k1", "k3"]


def sampled_reverse_kl(student_token_logprobs: Tensor, teacher_token_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of the reverse KL(q || p) from tokens y sampled from the student q.

    With s = log q(y) and t = log p(y) at the sampled token (inputs [B, L], output [B, L]):
      k1 = s - t                      unbiased, can be negative, high variance;
      k3 = exp(t - s) - 1 - (t - s)   unbiased (E_q[p/q] = 1), always >= 0, lower variance
    (Schulman 2020, "Approximating KL Divergence"). Used on-policy (MiniLLM, Gu et al. 2024;
    GKD, Agarwal et al. 2024), where the teacher scores the student's own samples; no top-k and
    hence no tail is involved. As a loss at fixed samples, the gradient of k1 is grad s, zero in
    expectation over y ~ q; that of k3 is (1 - p/q) grad s, whose expectation is the gradient of
    the forward KL(p || q). The reverse KL's own gradient needs the score function:
    `policy_gradient_loss` with -k1 as the advantage.
    """
    log_ratio = teacher_token_logprobs - student_token_logprobs  # log p(y) / q(y)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")


def distillation_advantage(
    student_token_logprobs: Tensor, teacher_token_logprobs: Tensor, estimator: KLEstimator = "k1", clip: float = 5.0,
    reward: Tensor | None = None,
) -> Tensor:
    """Dense per-token advantage A = clamp(-k(y), -clip, clip) + reward, detached.

    k is `sampled_reverse_kl` (k1 or k3) at each sampled token: a token the teacher finds likelier
    than the student does gets A > 0. Inputs [B, L] (log-probs of the sampled tokens); `reward`
    [B, L] (e.g. a verifier's sequence reward spread over its tokens) or None; output [B, L],
    without gradient. The on-policy distillation recipes' "negative reverse KL as reward", with a
    discount of 0 (each token is credited its own term only).
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    advantage = (-sampled_reverse_kl(student_token_logprobs, teacher_token_logprobs, estimator)).clamp(-clip, clip)
    return (advantage if reward is None else advantage + reward).detach()


def policy_gradient_loss(student_token_logprobs: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE per token: -A · log q(y), where A [B, L] is detached and log q(y) [B, L] carries
    the gradient; output [B, L]. With A = -k1 = log p(y) - log q(y), the expected gradient over
    y ~ q is -E_q[(log p - log q) grad log q] = grad KL(q || p), per position (Williams 1992;
    MiniLLM's single-step term, Gu et al. 2024)."""
    return -advantages.detach() * student_token_logprobs


# Picked by name from the config; "jsd" takes `beta` as a keyword.
DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tv": total_variation,
}


def mix_teachers(
    teacher_ids: list[Tensor], teacher_logprobs: list[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Weighted mixture sum_j w_j · p_j of several teachers' top-k distributions.

    Inputs: lists of [B, L, k_j] ids and log-probs, one entry per teacher; weights >= 0 are
    normalised to sum to 1. Output ids [B, L, K] and log-probs [B, L, K], K = sum_j k_j, slots
    ordered by token id. An id in several teachers' lists appears once with its summed mass;
    its other slots repeat the id with log-prob -inf (which `topk_log_distributions` drops).
    A teacher's mass on an id outside its own top-k counts as 0: its leftover mass stays in
    the mixture's tail, 1 - sum_j w_j · sum_i p_j,i. Works by sorting ids, never on [B, L, V].
    """
    if not teacher_ids or len({len(teacher_ids), len(teacher_logprobs), len(weights)}) != 1:
        raise ValueError("need one ids tensor, one logprobs tensor and one weight per teacher")
    total = float(sum(weights))
    if min(weights) < 0 or total <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    ids = torch.cat(teacher_ids, dim=-1)  # [B, L, K]
    mass = torch.cat([lp.exp() * (w / total) for lp, w in zip(teacher_logprobs, weights)], -1)
    ids, order = ids.sort(dim=-1)
    first = torch.ones_like(ids, dtype=torch.bool)  # first slot of each run of equal ids
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    run = first.long().cumsum(-1) - 1  # [B, L, K]: index of the run each slot belongs to
    run_mass = torch.zeros_like(mass).scatter_add(-1, run, mass.gather(-1, order))
    return ids, torch.where(first, run_mass.gather(-1, run).log(), float("-inf"))


def mix_token_logprobs(token_logprobs: list[Tensor], weights: Sequence[float]) -> Tensor:
    """log sum_j w_j · p_j(y): the weighted mixture's log-prob of given tokens, from each teacher's
    [...] log-probs of them (weights >= 0, normalised to sum to 1) -> [...]. The exact token-level
    counterpart of `mix_teachers` (no top-k involved)."""
    total = float(sum(weights))
    if len(token_logprobs) != len(weights) or min(weights) < 0 or total <= 0:
        raise ValueError(f"need one log-prob tensor per weight, weights >= 0 with a positive sum; got {list(weights)}")
    log_weights = torch.tensor([math.log(w / total) if w > 0 else float("-inf") for w in weights], dtype=token_logprobs[0].dtype)
    stacked = torch.stack(token_logprobs) + log_weights.reshape(-1, *[1] * token_logprobs[0].dim())
    return torch.logsumexp(stacked, dim=0)


def distillation_per_position(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    tail: TailMode = "bucket",
    beta: float = 0.5,
) -> Tensor:
    """tau^2 · D(p || q) at every position: logits [..., V], teacher top-k [..., k] -> [...].

    D is DIVERGENCES[divergence] on `topk_log_distributions(...)` (shapes and tail handling
    there); beta is used by "jsd" only. The factor tau^2 (tau = temperature) is the one of
    Hinton et al. 2015: softening by tau scales the gradients by 1 / tau^2, so multiplying back
    keeps their size independent of the temperature.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}")
    t, s = topk_log_distributions(student_logits, teacher_ids, teacher_logprobs, temperature, tail)
    kwargs = {"beta": beta} if divergence == "jsd" else {}
    return DIVERGENCES[divergence](t, s, **kwargs) * temperature**2


def distillation_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    tail: TailMode = "bucket",
    beta: float = 0.5,
) -> Tensor:
    """Scalar loss: the mean over positions where mask [B, L] is True of `distillation_per_position`
    (student_logits [B, L, V], teacher top-k [B, L, k]). An empty mask gives 0.0, still in the graph."""
    per_position = distillation_per_position(student_logits, teacher_ids, teacher_logprobs, divergence, temperature, tail, beta)
    mask = mask.bool()
    # where, not a product with the mask: an inf at a masked-out position would give inf · 0 = NaN.
    total = torch.where(mask, per_position, 0.0).sum()
    return total / mask.sum().clamp(min=1)
