"""Properties of the top-k distillation losses, checked against full-vocabulary references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer_client.losses import (
    DIVERGENCES,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    mix_teachers,
    reverse_kl,
    sampled_reverse_kl,
    topk_log_distributions,
    total_variation,
)

TAILS = ["bucket", "renormalize"]
# Every divergence as (name, kwargs) the way the config picks it; jsd at both ends and inside.
DIVERGENCE_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("tv", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
]
CASE_IDS = [name + "".join(f"-{v}" for v in kw.values()) for name, kw in DIVERGENCE_CASES]


def make_case(seed: int, b: int = 2, l: int = 3, v: int = 11, k: int = 4, tau: float = 1.0):
    """Random student logits [b, l, v] and a teacher's top-k at temperature tau, in float64."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(b, l, v, generator=gen, dtype=torch.float64) * 2
    teacher_logits = torch.randn(b, l, v, generator=gen, dtype=torch.float64) * 2
    teacher_full = F.log_softmax(teacher_logits / tau, -1)
    logprobs, ids = teacher_full.topk(k, dim=-1)  # sorted by log-prob, descending
    return student, ids, logprobs, teacher_full


def divergence(name: str, kwargs: dict, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return DIVERGENCES[name](t, s, **kwargs)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCE_CASES, ids=CASE_IDS)
def test_identical_distributions_give_zero(name, kwargs, tail):
    student, ids, _, _ = make_case(0)
    logprobs = F.log_softmax(student, -1).gather(-1, ids)  # the teacher is the student
    t, s = topk_log_distributions(student, ids, logprobs, tail=tail)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    torch.testing.assert_close(divergence(name, kwargs, t, s), zeros)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCE_CASES, ids=CASE_IDS)
def test_non_negative_on_random_inputs(name, kwargs, tail):
    for seed in range(20):
        t, s = topk_log_distributions(*make_case(seed)[:3], tail=tail)
        value = divergence(name, kwargs, t, s)
        assert (value >= -1e-12).all(), (seed, value.min())
        assert (value > 1e-6).any()  # a different teacher is not at divergence 0


def test_jsd_limits_and_symmetry():
    t, s = topk_log_distributions(*make_case(1)[:3])
    torch.testing.assert_close(generalized_jsd(t, s, beta=0.0), forward_kl(t, s))
    torch.testing.assert_close(generalized_jsd(t, s, beta=1.0), reverse_kl(t, s))
    torch.testing.assert_close(generalized_jsd(t, s, beta=0.5), generalized_jsd(s, t, beta=0.5))
    assert not torch.allclose(generalized_jsd(t, s, beta=0.3), generalized_jsd(s, t, beta=0.3))


def full_vocab_case(seed: int):
    """k == V: the teacher's top-k is its whole distribution, sorted by log-prob."""
    student, ids, logprobs, teacher_full = make_case(seed, v=7, k=7)
    return student, ids, logprobs, teacher_full, F.log_softmax(student, -1)


@pytest.mark.parametrize("tail", TAILS)
def test_full_vocab_kl_and_tv_match_references(tail):
    student, ids, logprobs, p_full, q_full = full_vocab_case(2)
    t, s = topk_log_distributions(student, ids, logprobs, tail=tail)
    # F.kl_div(input, target) is KL(target || input).
    expected_forward = F.kl_div(q_full, p_full, reduction="none", log_target=True).sum(-1)
    expected_reverse = F.kl_div(p_full, q_full, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(forward_kl(t, s), expected_forward, atol=1e-5, rtol=0)
    torch.testing.assert_close(reverse_kl(t, s), expected_reverse, atol=1e-5, rtol=0)
    expected_tv = 0.5 * (p_full.exp() - q_full.exp()).abs().sum(-1)
    torch.testing.assert_close(total_variation(t, s), expected_tv, atol=1e-5, rtol=0)


def trl_generalized_jsd(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float):
    """Independent reference of TRL's generalized_jsd_loss formula, summed over the vocabulary."""
    beta_t = torch.tensor(beta, dtype=teacher_logp.dtype)
    mixture = torch.logsumexp(
        torch.stack([student_logp + torch.log(1 - beta_t), teacher_logp + torch.log(beta_t)]), dim=0
    )
    kl_teacher = (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
    kl_student = (student_logp.exp() * (student_logp - mixture)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_full_vocab_jsd_matches_trl_formula(beta, tail):
    student, ids, logprobs, p_full, q_full = full_vocab_case(3)
    t, s = topk_log_distributions(student, ids, logprobs, tail=tail)
    expected = trl_generalized_jsd(p_full, q_full, beta)
    torch.testing.assert_close(generalized_jsd(t, s, beta), expected, atol=1e-5, rtol=0)


def test_temperature_scales_by_tau_squared():
    tau = 2.5
    student, ids, logprobs, p_full = make_case(4, v=7, k=7, tau=tau)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss = distillation_loss(student, ids, logprobs, mask, temperature=tau)
    q_full = F.log_softmax(student / tau, -1)
    expected = tau**2 * F.kl_div(q_full, p_full, reduction="none", log_target=True).sum(-1).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_bucket_equals_kl_of_coarsened_distributions():
    student, ids, logprobs, p_full = make_case(5, v=11, k=3)
    q_full = F.log_softmax(student, -1)
    # By hand: {top-3 ids, everything else} as a 4-way distribution on each side.
    p_top, q_top = p_full.exp().gather(-1, ids), q_full.exp().gather(-1, ids)
    p4 = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q4 = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    t, s = topk_log_distributions(student, ids, logprobs, tail="bucket")
    torch.testing.assert_close(forward_kl(t, s), (p4 * (p4 / q4).log()).sum(-1))
    torch.testing.assert_close(reverse_kl(t, s), (q4 * (q4 / p4).log()).sum(-1))


@pytest.mark.parametrize(("tail", "slots"), [("bucket", 5), ("renormalize", 4)])
def test_both_sides_are_distributions(tail, slots):
    t, s = topk_log_distributions(*make_case(6, k=4)[:3], tail=tail)
    assert t.shape == s.shape == (2, 3, slots)
    ones = torch.ones(2, 3, dtype=torch.float64)
    torch.testing.assert_close(t.exp().sum(-1), ones)
    torch.testing.assert_close(s.exp().sum(-1), ones)


def test_low_precision_logits_are_computed_in_float32():
    student, ids, logprobs, _ = make_case(7)
    t, s = topk_log_distributions(student.bfloat16(), ids, logprobs.float())
    assert t.dtype == s.dtype == torch.float32


def with_neg_inf(seed: int):
    """A case with an underflowed slot, a mixture-style duplicate slot and an all -inf row."""
    student, ids, logprobs, _ = make_case(seed, k=4)
    ids, logprobs = ids.clone(), logprobs.clone()
    logprobs[0, 0, 3] = float("-inf")  # underflow
    ids[0, 1, 3] = ids[0, 1, 0]  # duplicate of slot 0, carrying no mass
    logprobs[0, 1, 3] = float("-inf")
    logprobs[1, 2, :] = float("-inf")  # a position with no support at all
    return student.requires_grad_(), ids, logprobs


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCE_CASES, ids=CASE_IDS)
def test_neg_inf_teacher_logprobs_give_finite_loss_and_grads(name, kwargs, tail):
    student, ids, logprobs = with_neg_inf(8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss = distillation_loss(student, ids, logprobs, mask, name, tail=tail, **kwargs)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("tail", TAILS)
def test_neg_inf_duplicate_slot_is_the_same_as_no_slot(tail):
    student, ids, logprobs = with_neg_inf(9)
    t, s = topk_log_distributions(student, ids, logprobs, tail=tail)
    # Position 1 without its duplicate slot 3.
    t3, s3 = topk_log_distributions(
        student[:, 1:2], ids[:, 1:2, :3], logprobs[:, 1:2, :3], tail=tail
    )
    # The student's mass on the repeated id is counted once, not twice.
    torch.testing.assert_close(forward_kl(t, s)[0, 1], forward_kl(t3, s3)[0, 0])
    torch.testing.assert_close(reverse_kl(t, s)[0, 1], reverse_kl(t3, s3)[0, 0])


def dense(ids: torch.Tensor, logprobs: torch.Tensor, v: int) -> torch.Tensor:
    """Scatter top-k probabilities into [B, L, v] (tests only); -inf slots add nothing."""
    zeros = torch.zeros(*ids.shape[:-1], v, dtype=logprobs.dtype)
    return zeros.scatter_add(-1, ids, logprobs.exp())


def test_mix_teachers_sums_mass_on_shared_ids():
    ids1, p1 = torch.tensor([[[3, 5, 7]]]), torch.tensor([[[0.5, 0.2, 0.1]]], dtype=torch.float64)
    ids2, p2 = torch.tensor([[[5, 2, 3]]]), torch.tensor([[[0.6, 0.3, 0.05]]], dtype=torch.float64)
    ids, logprobs = mix_teachers([ids1, ids2], [p1.log(), p2.log()], weights=[1.0, 3.0])
    assert ids.shape == logprobs.shape == (1, 1, 6)
    live = ids[torch.isfinite(logprobs)]
    assert sorted(live.tolist()) == [2, 3, 5, 7]  # each id once
    mass = dense(ids, logprobs, 8)[0, 0]
    w1, w2 = 0.25, 0.75
    expected = {2: w2 * 0.3, 3: w1 * 0.5 + w2 * 0.05, 5: w1 * 0.2 + w2 * 0.6, 7: w1 * 0.1}
    for token, value in expected.items():
        assert mass[token].item() == pytest.approx(value)
    assert mass.sum().item() == pytest.approx(w1 * 0.8 + w2 * 0.95)  # the rest is the tail


def test_mix_teachers_matches_dense_mixture_on_random_batches():
    v, weights = 9, [0.2, 0.5, 0.3]
    cases = [make_case(seed, v=v, k=k) for seed, k in zip(range(10, 13), (3, 5, 2))]
    ids, logprobs = mix_teachers([c[1] for c in cases], [c[2] for c in cases], weights)
    assert ids.shape == (2, 3, 10)
    expected = sum(w * dense(c[1], c[2], v) for w, c in zip(weights, cases))
    torch.testing.assert_close(dense(ids, logprobs, v), expected)
    live_ids = torch.where(torch.isfinite(logprobs), ids, -1).sort(-1).values
    assert not ((live_ids[..., 1:] == live_ids[..., :-1]) & (live_ids[..., 1:] >= 0)).any()


def test_mix_of_one_teacher_is_that_teacher():
    _, ids, logprobs, _ = make_case(13)
    mixed_ids, mixed_logprobs = mix_teachers([ids], [logprobs], weights=[1.0])
    order = ids.argsort(-1)
    torch.testing.assert_close(mixed_ids, ids.gather(-1, order))
    torch.testing.assert_close(mixed_logprobs, logprobs.gather(-1, order))


def test_mixture_feeds_the_loss():
    student, ids1, lp1, _ = make_case(14)
    _, ids2, lp2, _ = make_case(15)
    ids, logprobs = mix_teachers([ids1, ids2], [lp1, lp2], weights=[0.5, 0.5])
    student.requires_grad_()
    loss = distillation_loss(student, ids, logprobs, torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_mask_selects_positions():
    student, ids, logprobs, _ = make_case(16)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    loss = distillation_loss(student, ids, logprobs, mask)
    per_position = forward_kl(*topk_log_distributions(student, ids, logprobs))
    torch.testing.assert_close(loss, per_position[mask].mean())
    changed = student.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 5
    torch.testing.assert_close(distillation_loss(changed, ids, logprobs, mask), loss)
    assert not torch.allclose(distillation_loss(changed, ids, logprobs, ~mask), loss)


def test_empty_mask_gives_zero_with_grad():
    student, ids, logprobs, _ = make_case(17)
    student.requires_grad_()
    loss = distillation_loss(student, ids, logprobs, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sgd_on_student_logits_reduces_forward_kl():
    student, ids, logprobs, _ = make_case(18)
    student.requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    optimizer = torch.optim.SGD([student], lr=5.0)
    before = distillation_loss(student, ids, logprobs, mask).item()
    for _ in range(30):
        optimizer.zero_grad()
        distillation_loss(student, ids, logprobs, mask).backward()
        optimizer.step()
    assert distillation_loss(student, ids, logprobs, mask).item() < 0.1 * before


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCE_CASES, ids=CASE_IDS)
def test_gradients_match_finite_differences(name, kwargs, tail):
    student, ids, logprobs = with_neg_inf(22)
    mask = torch.ones(2, 3, dtype=torch.bool)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return distillation_loss(logits, ids, logprobs, mask, name, 1.5, tail, **kwargs)

    assert torch.autograd.gradcheck(loss, (student,), fast_mode=True)


def test_sampled_reverse_kl_averages_to_reverse_kl():
    student, ids, logprobs, p_full = make_case(19, v=7, k=7)
    q_full = F.log_softmax(student, -1)
    per_token = sampled_reverse_kl(q_full, p_full)  # every token y, as if sampled
    t, s = topk_log_distributions(student, ids, logprobs)
    expectation = (q_full.exp() * per_token).sum(-1)
    torch.testing.assert_close(expectation, reverse_kl(t, s), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"divergence": "kl"},
        {"tail": "drop"},
        {"temperature": 0.0},
        {"divergence": "jsd", "beta": 1.5},
    ],
)
def test_bad_settings_raise_value_error(kwargs):
    student, ids, logprobs, _ = make_case(20)
    with pytest.raises(ValueError):
        distillation_loss(student, ids, logprobs, torch.ones(2, 3, dtype=torch.bool), **kwargs)


def test_mix_teachers_rejects_bad_weights():
    _, ids, logprobs, _ = make_case(21)
    with pytest.raises(ValueError):
        mix_teachers([ids, ids], [logprobs, logprobs], weights=[1.0])
    with pytest.raises(ValueError):
        mix_teachers([ids], [logprobs], weights=[0.0])
