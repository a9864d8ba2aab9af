"""What every registered backend must do, whatever computes it: one suite over `BACKENDS`.

Each backend is loaded by name with the tiny model and called through the protocol only
(`score` / `generate` coroutines, per-item settings); its numbers are checked against a direct
transformers forward of the same model.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from teacher_service.backends import BACKENDS, load_backend
from teacher_service.backends.base import BackendConfig, GenerateItem, SamplingParams, ScoreItem
from teacher_service.errors import InvalidRequest

ATOL = 1e-4


def run(coroutine):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


# Backends that score at temperature 1 only (their engine's prompt log-probs are raw) and refuse others.
TEMPERATURE_ONE_SCORING = {"vllm"}


def _skip_unless_runnable(name: str) -> None:
    if name == "vllm":  # a CUDA engine: on a GPU machine with the `vllm` extra installed
        pytest.importorskip("vllm")
        if not torch.cuda.is_available():
            pytest.skip("the vllm backend needs a CUDA device")


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request, tiny_model_dir):
    _skip_unless_runnable(request.param)
    backend = load_backend(request.param, BackendConfig(model=tiny_model_dir))
    yield backend
    backend.close()


def test_describes_its_model(backend, tokenizer):
    description = backend.description
    assert description.vocab_size == len(tokenizer) and description.eos_token_id == tokenizer.eos_token_id
    assert description.max_model_len > 0 and description.tokenizer_fingerprint
    assert backend.encode_continuation("12+7") == tokenizer("12+7", add_special_tokens=False)["input_ids"]
    assert backend.decode(backend.encode_continuation("12+7")) == "12+7"


def test_scores_each_item_under_its_own_k_and_temperature(backend, reference_logprobs):
    items = [ScoreItem([5, 6, 7], [8, 9, 10], 4, 1.0), ScoreItem([40, 41], [42, 43, 44, 45], 0, 0.5),
             ScoreItem([300], [3], 9, 2.0)]
    if backend.name in TEMPERATURE_ONE_SCORING:
        for item in items[1:]:
            with pytest.raises(InvalidRequest) as refused:
                run(backend.score([item]))
            assert refused.value.field == "temperature"
        items = items[:1]
    for item, result in zip(items, run(backend.score(items))):
        reference = reference_logprobs(item.prompt_ids, item.completion_ids, item.temperature)
        length = len(item.completion_ids)
        assert result.prompt_tokens == len(item.prompt_ids)
        assert result.token_ids.tolist() == item.completion_ids
        assert result.top_ids.shape == result.top_logprobs.shape == (length, item.top_logprobs)
        np.testing.assert_allclose(result.token_logprobs, reference[np.arange(length), item.completion_ids], atol=ATOL, rtol=0)
        expected_ids = np.argsort(-reference, axis=-1, kind="stable")[:, : item.top_logprobs]
        np.testing.assert_array_equal(result.top_ids, expected_ids)
        np.testing.assert_allclose(result.top_logprobs, np.take_along_axis(reference, expected_ids, -1), atol=ATOL, rtol=0)


def test_generates_n_samples_per_item_within_its_settings(backend, tokenizer):
    sampled = SamplingParams(n=3, max_tokens=5, temperature=0.8, top_p=0.9, seed=4, top_logprobs=2)
    greedy = SamplingParams(n=2, max_tokens=7, temperature=0.0, top_p=1.0, seed=None, top_logprobs=3)
    items = [GenerateItem([10, 20, 30], sampled), GenerateItem([7, 8], greedy)]
    results = run(backend.generate(items))
    for item, result in zip(items, results):
        assert result.prompt_tokens == len(item.prompt_ids) and len(result.samples) == item.params.n
        for sample in result.samples:
            length = len(sample.token_ids)
            assert 1 <= length <= item.params.max_tokens
            assert sample.top_ids.shape == sample.top_logprobs.shape == (length, item.params.top_logprobs)
            assert np.all(np.diff(sample.top_logprobs, axis=-1) <= 0) and np.all(sample.token_logprobs <= 0)
            ended = int(sample.token_ids[-1]) == tokenizer.eos_token_id
            assert sample.finish_reason == ("stop" if ended else "length")
            assert ended or length == item.params.max_tokens
            assert sample.text == backend.decode(sample.token_ids.tolist())
    first, second = results[1].samples
    assert first.token_ids.tolist() == second.token_ids.tolist(), "greedy decoding has one answer, given n times"
    assert [row[0] for row in first.top_ids.tolist()] == first.token_ids.tolist()


def test_seeded_samples_repeat_alone_or_in_company(backend):
    params = SamplingParams(n=2, max_tokens=6, temperature=1.0, top_p=1.0, seed=11, top_logprobs=1)
    alone = run(backend.generate([GenerateItem([50, 51, 52], params)]))[0]

    async def in_company():
        other = SamplingParams(n=4, max_tokens=3, temperature=0.7, top_p=0.8, seed=None, top_logprobs=0)
        answers = await asyncio.gather(backend.generate([GenerateItem([9] * 12, other)]),
                                       backend.generate([GenerateItem([50, 51, 52], params)]))
        return answers[1][0]

    crowded = run(in_company())
    assert [s.token_ids.tolist() for s in crowded.samples] == [s.token_ids.tolist() for s in alone.samples]
    assert alone.samples[0].token_ids.tolist() != alone.samples[1].token_ids.tolist()
