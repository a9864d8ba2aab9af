"""The chunked, weighted student-side loss against a direct full-logits computation on a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potstill.toy.models import build_tiny_model
from trainer_client.config import TrainConfig
from trainer_client.losses import distillation_per_position
from trainer_client.samples import Example
from trainer_client.student_loss import collate, weighted_loss_sum
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("loss-model") / "m", seed=3, hidden_size=32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)


def _examples(vocab: int, with_teacher: bool, weights=(1.0, 0.5, 2.0)) -> list[Example]:
    generator = np.random.default_rng(0)
    examples = []
    for index, weight in enumerate(weights):
        prompt = generator.integers(5, vocab, size=3 + index).tolist()
        target = generator.integers(5, vocab, size=4 + 2 * index).tolist()
        example = Example(prompt, target, weight)
        if with_teacher:
            logits = torch.from_numpy(generator.normal(size=(len(target), vocab)) * 3)
            values, ids = F.log_softmax(logits, -1).topk(5, dim=-1)
            example.teacher_ids, example.teacher_logprobs = ids.numpy(), values.numpy()
        examples.append(example)
    return examples


def _config(**overrides) -> TrainConfig:
    return TrainConfig(student="s", data="d", method="sft", **overrides)


def _direct(model, batch, config) -> torch.Tensor:
    """Σ weight · loss from the model's full [B, T, V] logits, positions picked by the weights."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    keep = batch.weights > 0
    loss = F.cross_entropy(logits[keep], batch.labels[keep], reduction="none")
    if batch.teacher_ids is not None:
        kd = distillation_per_position(logits[keep], batch.teacher_ids[keep], batch.teacher_logprobs[keep], config.loss,
                                       config.temperature, config.tail, config.beta)
        loss = kd + config.ce_weight * loss
    return (batch.weights[keep] * loss).sum()


@pytest.mark.parametrize("with_teacher", [False, True], ids=["ce", "kd"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_loss_and_gradients_match_the_full_logits_computation(model, with_teacher, chunk):
    config = _config(loss_chunk_size=chunk, loss="jsd", ce_weight=0.3, temperature=1.5)
    batch = collate(_examples(model.config.vocab_size, with_teacher), pad_id=0)
    model.zero_grad()
    expected = _direct(model, batch, config)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    actual, parts = weighted_loss_sum(model, model, batch, config)
    actual.backward()
    torch.testing.assert_close(actual, expected)
    for got, want in zip((p.grad for p in model.parameters()), expected_grads):
        torch.testing.assert_close(got, want)
    assert set(parts) == ({"kd", "ce"} if with_teacher else {"ce"})


def test_weights_act_as_a_float_mask(model):
    """Weight 0 removes an example, weight 2 counts it twice."""
    config = _config()
    one, two, three = _examples(model.config.vocab_size, False)
    one.weight = two.weight = three.weight = 1.0

    def loss(examples):
        return weighted_loss_sum(model, model, collate(examples, 0), config)[0].item()

    dropped = Example(two.prompt_ids, two.target_ids, weight=0.0)
    assert loss([one, dropped, three]) == pytest.approx(loss([one, three]))
    doubled = Example(three.prompt_ids, three.target_ids, weight=2.0)
    assert loss([one, doubled]) == pytest.approx(loss([one, three, three]))


def test_collate_puts_each_weight_on_its_target_positions_only():
    batch = collate([Example([1, 2], [3, 4, 5], 0.5), Example([1], [6], 2.0)], pad_id=0)
    assert batch.weights.tolist() == [[0.0, 0.5, 0.5, 0.5], [2.0, 0.0, 0.0, 0.0]]
    assert batch.target_mask.tolist() == [[False, True, True, True], [True, False, False, False]]
