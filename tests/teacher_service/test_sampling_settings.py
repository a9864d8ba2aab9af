"""vLLM's sampling settings act as vLLM defines them: penalties against their formula on a direct
forward pass, restrictions on what is drawn, and where samples end (stop strings, stop tokens,
EOS ignored), through the real HTTP server and the HF backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_service.backends.base import BackendConfig, GenerateItem, SamplingParams
from teacher_service.backends.hf import HFBackend
from teacher_service.backends.hf_sampling import Penalties, cut_sample, min_p_mask, top_k_mask


def params(**settings) -> SamplingParams:
    base = dict(n=1, max_tokens=6, temperature=0.0, top_p=1.0, seed=0, top_logprobs=0)
    return SamplingParams(**{**base, **settings})


def generate(http, **body) -> list[dict]:
    answer = http.post("/v1/generate", json={"prompts": ["the teacher"], "max_tokens": 8, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["samples"]


# --- the restrictions and penalties, against their definitions ---


def test_top_k_and_min_p_masks_keep_what_they_define():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.9]])
    assert top_k_mask(logits, torch.tensor([2, 0])).tolist() == [[False, True, False, True], [False] * 4]
    probs = logits.softmax(-1)
    expected = probs < 0.3 * probs.max(-1, keepdim=True).values
    assert torch.equal(min_p_mask(logits, torch.tensor([0.3, 0.3])), expected)


def test_penalties_follow_vllms_formula():
    # Row 0: prompt [1, 2], sampled [2, 2, 3]; row 1: no penalties.
    rows = [params(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0), params()]
    prompts = torch.tensor([[1, 2], [0, 1]])
    penalties = Penalties(rows, prompts, torch.tensor([[1, 1], [0, 1]]), vocab_size=5)
    logits = torch.tensor([[1.0, -1.0, 2.0, -3.0, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]])
    input_ids = torch.tensor([[1, 2, 2, 2, 3], [0, 1, 4, 4, 4]])
    out = penalties(logits, input_ids)
    # token 1: in the prompt only (negative: x2); 2: prompt and 2 samples (positive: /2, -0.25x2 - 0.5);
    # 3: sampled once (negative: x2, -0.25 - 0.5); 0 and 4: unseen.
    assert out[0].tolist() == pytest.approx([1.0, -2.0, 1.0 - 0.5 - 0.5, -6.0 - 0.25 - 0.5, 0.5])
    assert out[1].tolist() == logits[1].tolist()


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    loaded = HFBackend.load(BackendConfig(model=tiny_model_dir, logprobs_mode="processed"))
    yield loaded
    loaded.close()


def test_penalised_greedy_decoding_matches_a_direct_forward_pass(backend, reference_model, tokenizer):
    prompt = tokenizer("the teacher said the")["input_ids"]
    setting = params(max_tokens=5, top_logprobs=3, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.8)
    sample = backend.generate_now([GenerateItem(prompt, setting)])[0].samples[0]
    sequence, expected_ids, expected_logprobs = list(prompt), [], []
    for _ in range(5):
        with torch.no_grad():
            logits = reference_model(torch.tensor([sequence])).logits[0, -1].float()
        sampled = sequence[len(prompt):]
        counts = torch.bincount(torch.tensor(sampled, dtype=torch.long), minlength=logits.shape[0]).float()
        seen = counts > 0
        seen[prompt] = True
        penalised = torch.where(seen, torch.where(logits > 0, logits / 1.8, logits * 1.8), logits)
        penalised = penalised - 0.4 * counts - 0.7 * (counts > 0).float()
        logprobs = penalised.log_softmax(-1)
        token = int(penalised.argmax())
        expected_ids.append(token)
        expected_logprobs.append(float(logprobs[token]))
        sequence.append(token)
    assert sample.token_ids.tolist() == expected_ids[: len(sample.token_ids)]
    np.testing.assert_allclose(sample.token_logprobs, expected_logprobs[: len(sample.token_ids)], atol=1e-4)
    plain = backend.generate_now([GenerateItem(prompt, params(max_tokens=5))])[0].samples[0]
    assert plain.token_ids.tolist() != sample.token_ids.tolist()  # the penalties changed the greedy path


# --- restrictions on what is drawn, served ---


def test_top_k_one_and_min_p_one_decode_greedily(http):
    greedy = generate(http, temperature=0)[0]["token_ids"]
    for restriction in ({"top_k": 1}, {"min_p": 1.0}):
        samples = generate(http, temperature=1.0, n=4, seed=3, **restriction)
        assert all(sample["token_ids"] == greedy for sample in samples), restriction


def test_top_k_draws_only_among_the_k_most_likely(http):
    unrestricted = generate(http, n=8, seed=1, max_tokens=1, top_logprobs=3)
    restricted = generate(http, n=8, seed=1, max_tokens=1, top_logprobs=3, top_k=3)
    top3 = restricted[0]["top_ids"][0]
    assert all(sample["token_ids"][0] in top3 for sample in restricted)
    assert any(sample["token_ids"][0] not in top3 for sample in unrestricted)  # the tiny model's spread is wide


# --- where samples end ---


def test_a_stop_string_cuts_the_text_before_it(http):
    full = generate(http, temperature=0, max_tokens=12, skip_special_tokens=False)[0]
    stop = full["text"][4:6]
    start = full["text"].index(stop)
    stopped = generate(http, temperature=0, max_tokens=12, skip_special_tokens=False, stop=stop)[0]
    assert stopped["text"] == full["text"][:start]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == stop
    assert stopped["token_ids"] == full["token_ids"][: len(stopped["token_ids"])]
    assert len(stopped["token_ids"]) < len(full["token_ids"])


def test_a_stop_token_ends_the_sample_and_is_kept(http, tokenizer):
    full = generate(http, temperature=0, max_tokens=10)[0]
    token = full["token_ids"][3]
    stopped = generate(http, temperature=0, max_tokens=10, stop_token_ids=[token])[0]
    end = full["token_ids"].index(token) + 1
    assert stopped["token_ids"] == full["token_ids"][:end]
    assert (stopped["finish_reason"], stopped["stop_reason"]) == ("stop", token)
    assert stopped["text"] == tokenizer.decode(full["token_ids"][: end - 1], skip_special_tokens=True)


def test_cut_sample_ends_at_eos_unless_ignored():
    decode = lambda ids, skip_special_tokens=True: "".join(chr(97 + i) for i in ids if not (skip_special_tokens and i == 2))  # noqa: E731
    tokens = [0, 1, 2, 3, 4]
    at_eos = cut_sample(tokens, params(max_tokens=5), eos_ids=[2], decode=decode)
    assert (at_eos.length, at_eos.text, at_eos.finish_reason, at_eos.stop_reason) == (3, "ab", "stop", None)
    ignored = cut_sample(tokens, params(max_tokens=5, ignore_eos=True), eos_ids=[2], decode=decode)
    assert (ignored.length, ignored.text, ignored.finish_reason) == (5, "abde", "length")
    shown = cut_sample(tokens, params(max_tokens=5, ignore_eos=True, skip_special_tokens=False), eos_ids=[2], decode=decode)
    assert shown.text == "abcde"
    by_string = cut_sample(tokens, params(max_tokens=5, stop=("bc", "zz"), skip_special_tokens=False), eos_ids=[], decode=decode)
    assert (by_string.length, by_string.text, by_string.stop_reason) == (3, "a", "bc")


def test_native_generate_takes_the_settings_over_grpc_too(http, stub):
    from potstill.v1 import teacher_pb2 as pb
    from teacher_service import wire

    body = {"prompts": ["the teacher"], "max_tokens": 8, "temperature": 0.9, "seed": 4, "top_k": 5, "min_p": 0.01,
            "repetition_penalty": 1.3, "stop_token_ids": [9], "stop": ["xyz"], "ignore_eos": True}
    over_http = http.post("/v1/generate", json=body).json()["results"][0]["samples"][0]
    over_grpc = wire.generate_response(stub.Generate(wire.generate_request_pb(body))).results[0].samples[0]
    assert over_grpc.token_ids.tolist() == over_http["token_ids"] and over_grpc.stop_reason == over_http["stop_reason"]
    assert isinstance(stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(text="hi")], stop=["a"])), pb.GenerateResponse)
