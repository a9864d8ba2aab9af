"""The numbers the teacher serves equal those of a direct transformers forward of the same model.

Score: log_softmax(logits / T) at every completion position, its top-k and the actual token's
log-prob. Generate: samples with their top-k under the raw (temperature 1) distribution, EOS and
length stops, seeds, and greedy decoding equal to Hugging Face's own.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from teacher_service.backends.base import BackendConfig, ScoreItem
from teacher_service.backends.hf import HFBackend

ATOL = 1e-4  # fp32 through two different code paths


def score(http, sequences, top_logprobs=5, temperature=None) -> list[dict]:
    body = {"sequences": sequences, "top_logprobs": top_logprobs}
    if temperature is not None:
        body["temperature"] = temperature
    response = http.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def generate(http, **body) -> list[dict]:
    response = http.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def assert_matches_reference(result: dict, reference: np.ndarray, completion_ids: list[int], k: int) -> None:
    """`result` (one scored sequence or sample, as JSON) against reference log-probs [L, V]."""
    top_ids = np.asarray(result["top_ids"])
    top_logprobs = np.asarray(result["top_logprobs"])
    assert result["token_ids"] == list(completion_ids)
    assert top_ids.shape == top_logprobs.shape == (len(completion_ids), k)
    expected_ids = np.argsort(-reference, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top_ids, expected_ids)
    np.testing.assert_allclose(top_logprobs, np.take_along_axis(reference, expected_ids, -1), atol=ATOL, rtol=0)
    actual = reference[np.arange(len(completion_ids)), completion_ids]
    np.testing.assert_allclose(result["token_logprobs"], actual, atol=ATOL, rtol=0)
    assert np.all(np.diff(top_logprobs, axis=-1) <= 0), "top_logprobs must be sorted, most likely first"


# --- score ---


def test_score_equals_direct_forward(http, reference_logprobs):
    # Several lengths in one request, so the server pads and batches them.
    sequences = [
        ([5, 17, 42], [8, 9, 10, 11]),
        ([100, 101, 102, 103, 104, 105, 106, 107], [200, 201]),
        ([7], [300, 3, 2, 250, 99, 98]),
    ]
    results = score(http, [{"prompt": p, "completion": c} for p, c in sequences], top_logprobs=7)
    assert len(results) == len(sequences)
    for result, (prompt, completion) in zip(results, sequences):
        assert result["prompt_tokens"] == len(prompt)
        assert_matches_reference(result, reference_logprobs(prompt, completion), completion, k=7)


def test_actual_token_logprob_is_given_outside_the_top_k(http, reference_logprobs):
    prompt, completion = [11, 22, 33], []
    for _ in range(4):  # the least likely token at each step: never in any top-k
        reference = reference_logprobs(prompt + completion, [0])
        completion.append(int(reference[0].argmin()))
    result = score(http, [{"prompt": prompt, "completion": completion}], top_logprobs=3)[0]
    assert not any(token in row for token, row in zip(completion, result["top_ids"]))
    assert_matches_reference(result, reference_logprobs(prompt, completion), completion, k=3)


def test_top_logprobs_zero_returns_only_the_tokens(http, reference_logprobs):
    result = score(http, [{"prompt": [1, 2, 3], "completion": [4, 5]}], top_logprobs=0)[0]
    assert result["top_ids"] == [[], []] and result["top_logprobs"] == [[], []]
    reference = reference_logprobs([1, 2, 3], [4, 5])
    np.testing.assert_allclose(result["token_logprobs"], reference[[0, 1], [4, 5]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_score_applies_the_temperature(http, reference_logprobs, temperature):
    prompt, completion = [40, 41, 42, 43], [50, 51, 52]
    result = score(http, [{"prompt": prompt, "completion": completion}], top_logprobs=5, temperature=temperature)[0]
    assert_matches_reference(result, reference_logprobs(prompt, completion, temperature), completion, k=5)


def test_text_prompts_equal_their_token_ids(http, tokenizer, reference_logprobs):
    prompt_text, completion_text = "the teacher learns", " 12+7=19"
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    as_text, as_ids = score(
        http,
        [{"prompt": prompt_text, "completion": completion_text}, {"prompt": prompt_ids, "completion": completion_ids}],
    )
    assert as_text["token_ids"] == completion_ids and as_text["prompt_tokens"] == len(prompt_ids)
    for result in (as_text, as_ids):
        assert_matches_reference(result, reference_logprobs(prompt_ids, completion_ids), completion_ids, k=5)


def test_chat_prompts_use_the_chat_template(http, tokenizer, reference_logprobs):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|assistant|>")
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    completion = tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    result = score(http, [{"prompt": messages, "completion": completion}])[0]
    assert result["prompt_tokens"] == len(prompt_ids)
    assert_matches_reference(result, reference_logprobs(prompt_ids, completion), completion, k=5)


def test_chunked_scoring_equals_unchunked(tiny_model_dir, reference_logprobs):
    rng = np.random.default_rng(0)
    long = ScoreItem(rng.integers(5, 384, 30).tolist(), rng.integers(5, 384, 200).tolist(), 10)
    short = ScoreItem([9, 8, 7], [6, 5, 4, 3], 10)
    middle = ScoreItem(rng.integers(5, 384, 12).tolist(), rng.integers(5, 384, 40).tolist(), 10)
    items = [short, long, middle]
    whole = HFBackend.load(BackendConfig(model=tiny_model_dir))
    # 7 positions per log-softmax chunk, and every sequence in a forward pass of its own.
    chunked = HFBackend.load(BackendConfig(model=tiny_model_dir, max_batch_tokens=16, max_logits_elements=7 * 384))
    expected, got = whole.score_now(items), chunked.score_now(items)
    for item, one, other in zip(items, expected, got):
        np.testing.assert_array_equal(one.token_ids, other.token_ids)
        np.testing.assert_array_equal(one.top_ids, other.top_ids)
        np.testing.assert_allclose(one.top_logprobs, other.top_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(one.token_logprobs, other.token_logprobs, atol=1e-5, rtol=0)
        as_json = {key: value.tolist() for key, value in vars(other).items() if isinstance(value, np.ndarray)}
        reference = reference_logprobs(item.prompt_ids, item.completion_ids)
        assert_matches_reference(as_json, reference, item.completion_ids, k=10)


# --- generate ---


def test_samples_carry_the_raw_distribution_of_each_step(http, tokenizer, reference_logprobs):
    prompts = [[10, 20, 30, 40, 50, 60], "hello"]  # different lengths: left padding in one batch
    results = generate(http, prompts=prompts, n=3, max_tokens=12, temperature=0.8, seed=7, top_logprobs=5)
    assert len(results) == 2
    for prompt, result in zip(prompts, results):
        prompt_ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
        assert result["prompt_tokens"] == len(prompt_ids)
        assert len(result["samples"]) == 3
        for sample in result["samples"]:
            ids = sample["token_ids"]
            assert 1 <= len(ids) <= 12
            assert sample["text"] == tokenizer.decode(ids, skip_special_tokens=True)
            # Reported log-probs are the model's own distribution (temperature 1), not the sampling one.
            assert_matches_reference(sample, reference_logprobs(prompt_ids, ids), ids, k=5)


def test_samples_stop_at_eos_or_at_max_tokens(http, eos_id):
    max_tokens = 64
    results = generate(http, prompts=["a", "the teacher", "1+2=", "hello"], n=8, max_tokens=max_tokens, seed=1)
    reasons = set()
    for sample in (s for r in results for s in r["samples"]):
        ids, reason = sample["token_ids"], sample["finish_reason"]
        reasons.add(reason)
        if reason == "stop":
            assert ids[-1] == eos_id and eos_id not in ids[:-1] and len(ids) <= max_tokens
        else:
            assert reason == "length" and len(ids) == max_tokens and eos_id not in ids
    # About one sample in seven of this near-uniform model meets EOS within 64 tokens.
    assert reasons == {"stop", "length"}


def test_seed_makes_samples_reproducible(http):
    request = {"prompts": ["hello", [3, 4, 5]], "n": 4, "max_tokens": 10, "top_logprobs": 2}
    first = generate(http, **request, seed=123)
    again = generate(http, **request, seed=123)
    other = generate(http, **request, seed=124)
    assert first == again

    def token_ids(results):
        return [s["token_ids"] for r in results for s in r["samples"]]

    assert token_ids(first) != token_ids(other)
    # A prompt's n samples differ (4 samples of 10 tokens over a ~uniform 384-token vocabulary).
    for result in first:
        assert len({tuple(s["token_ids"]) for s in result["samples"]}) == 4


def test_a_prompt_samples_the_same_whatever_shares_its_request(http):
    """A generator per (seed, sample index): neighbours in the request or the pass change nothing."""
    settings = {"n": 3, "max_tokens": 8, "top_logprobs": 2, "seed": 77, "temperature": 0.9, "top_p": 0.95}
    alone = generate(http, prompts=["hello"], **settings)[0]
    crowded = generate(http, prompts=[[9, 9, 9, 9, 9, 9, 9], "hello", "1+2="], **settings)[1]
    assert [s["token_ids"] for s in crowded["samples"]] == [s["token_ids"] for s in alone["samples"]]
    for one, other in zip(alone["samples"], crowded["samples"]):
        np.testing.assert_allclose(one["top_logprobs"], other["top_logprobs"], atol=ATOL, rtol=0)


def test_greedy_equals_hugging_face_greedy_decoding(http, reference_model, eos_id):
    prompts = [[10, 20, 30], [7, 7, 8, 9, 100, 200, 300], [250]]
    results = generate(http, prompts=prompts, n=2, max_tokens=16, temperature=0, top_logprobs=1)
    for prompt, result in zip(prompts, results):
        with torch.inference_mode():
            output = reference_model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=eos_id, pad_token_id=0
            )
        expected = output[0, len(prompt) :].tolist()
        if eos_id in expected:
            expected = expected[: expected.index(eos_id) + 1]
        first, second = result["samples"]
        assert first == second, "greedy decoding has one answer, repeated n times"
        assert first["token_ids"] == expected
        # The greedy token is the top-1 token at each step.
        assert [row[0] for row in first["top_ids"]] == expected


def test_processed_logprobs_mode_reports_the_tempered_distribution(start_teacher, tokenizer, reference_logprobs):
    with start_teacher(logprobs_mode="processed") as teacher, httpx.Client(base_url=teacher.http_url, timeout=120) as http:
        results = generate(http, prompts=[[10, 20, 30]], n=2, max_tokens=6, temperature=0.5, seed=3, top_logprobs=4)
    for sample in results[0]["samples"]:
        ids = sample["token_ids"]
        assert_matches_reference(sample, reference_logprobs([10, 20, 30], ids, 0.5), ids, k=4)
