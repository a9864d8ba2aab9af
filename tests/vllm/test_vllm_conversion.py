"""The vLLM backend's conversion layer against vLLM's own classes (no GPU needed).

Runs where `pip install --no-deps vllm==0.32.0` and its light dependencies are installed
(`.ci/vllm-conversion` builds that environment); skipped elsewhere. vLLM's outputs are built
with keywords, as its engine builds them, in both of its log-prob layouts (`FlatLogprobs` and a
list of dicts), with mapping orders that are not the rank order.
"""

from __future__ import annotations

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.logprobs import FlatLogprobs, Logprob  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402

from teacher_service.backends.base import GenerateItem, ScoreItem  # noqa: E402
from teacher_service.backends.base import SamplingParams as OurSamplingParams  # noqa: E402
from teacher_service.backends.vllm_convert import (  # noqa: E402
    generate_result,
    generate_sampling_kwargs,
    score_sampling_kwargs,
    scored_sequence,
    token_prompt,
)
from teacher_service.errors import BackendUnavailable, InvalidRequest  # noqa: E402
from teacher_service.media import PromptMedia  # noqa: E402


def position(actual: int, actual_rank: int, top: list[tuple[int, float]], actual_logprob: float | None = None) -> dict[int, Logprob]:
    """One position as vLLM fills it: the actual token first (its true rank), then the top k in an
    order that is NOT the rank order (reversed), each with its rank."""
    entries = {actual: Logprob(logprob=actual_logprob if actual_logprob is not None else dict(top).get(actual, -9.0), rank=actual_rank)}
    ranked = [(token, Logprob(logprob=value, rank=rank)) for rank, (token, value) in enumerate(top, start=1)]
    entries.update(reversed(ranked))
    return entries


def layouts(positions: list[dict[int, Logprob] | None]):
    flat = FlatLogprobs()
    flat.extend(positions)
    return [positions, flat]


# Completion [7, 3] after prompt [1, 2]: token 7 is rank 2 of the top 3; token 3 is outside it (rank 41).
POSITIONS = [
    None,  # nothing predicts the first prompt token
    position(2, 1, [(2, -0.1), (5, -2.5), (6, -3.0)]),
    position(7, 2, [(4, -0.3), (7, -1.5), (9, -2.0)]),
    position(3, 41, [(8, -0.2), (1, -1.9), (0, -2.2)], actual_logprob=-7.25),
]


@pytest.mark.parametrize("layout", [0, 1], ids=["list-of-dicts", "flat"])
def test_prompt_logprobs_become_the_completion_scores_in_rank_order(layout):
    item = ScoreItem(prompt_ids=[1, 2], completion_ids=[7, 3], top_logprobs=3)
    sampling = SamplingParams(**score_sampling_kwargs(item))
    assert sampling.prompt_logprobs == 3 and sampling.max_tokens == 1
    output = RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1, 2, 7, 3],
                           prompt_logprobs=layouts(POSITIONS)[layout], outputs=[], finished=True)
    result = scored_sequence(output, item, model_version=3)
    np.testing.assert_array_equal(result.token_ids, [7, 3])
    np.testing.assert_allclose(result.token_logprobs, [-1.5, -7.25])
    np.testing.assert_array_equal(result.top_ids, [[4, 7, 9], [8, 1, 0]])
    np.testing.assert_allclose(result.top_logprobs, [[-0.3, -1.5, -2.0], [-0.2, -1.9, -2.2]])
    np.testing.assert_array_equal(result.token_ranks, [2, 41])  # the true ranks, also outside the top k
    assert result.prompt_tokens == 2 and result.model_version == 3


def test_scoring_with_k_zero_keeps_only_the_actual_tokens():
    item = ScoreItem(prompt_ids=[1, 2], completion_ids=[7, 3], top_logprobs=0)
    only_actual = [None, {2: Logprob(-0.1, rank=1)}, {7: Logprob(-1.5, rank=2)}, {3: Logprob(-7.25, rank=41)}]
    output = RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1, 2, 7, 3], prompt_logprobs=only_actual,
                           outputs=[], finished=True)
    result = scored_sequence(output, item, model_version=1)
    np.testing.assert_allclose(result.token_logprobs, [-1.5, -7.25])
    assert result.top_ids.shape == result.top_logprobs.shape == (2, 0)


def test_scoring_at_another_temperature_is_refused_by_field():
    with pytest.raises(InvalidRequest) as refused:
        score_sampling_kwargs(ScoreItem([1], [2], 4, temperature=0.5))
    assert refused.value.field == "temperature"


def _completion(index: int, tokens: list[int], finish: str = "length", **overrides) -> CompletionOutput:
    logprobs = [position(t, 1, [(t, -0.5 - i), (t + 100, -1.5 - i)]) for i, t in enumerate(tokens)]
    arguments = dict(index=index, text=f"sample {index}", token_ids=tokens, cumulative_logprob=None,
                     logprobs=layouts(logprobs)[1], finish_reason=finish)
    return CompletionOutput(**{**arguments, **overrides})


def test_samples_come_back_in_index_order_with_their_top_k():
    params = OurSamplingParams(n=2, max_tokens=2, temperature=0.8, top_p=0.9, seed=11, top_logprobs=2)
    sampling = SamplingParams(**generate_sampling_kwargs(params))
    assert (sampling.n, sampling.seed, sampling.logprobs, sampling.temperature) == (2, 11, 2, 0.8)
    output = RequestOutput(request_id="g", prompt=None, prompt_token_ids=[1, 2, 3], prompt_logprobs=None,
                           outputs=[_completion(1, [20, 21], "stop"), _completion(0, [10, 11])], finished=True)
    result = generate_result(output, GenerateItem([1, 2, 3], params), model_version=2)
    assert [s.token_ids.tolist() for s in result.samples] == [[10, 11], [20, 21]]
    assert [s.finish_reason for s in result.samples] == ["length", "stop"]
    np.testing.assert_array_equal(result.samples[0].top_ids, [[10, 110], [11, 111]])
    np.testing.assert_allclose(result.samples[0].token_logprobs, [-0.5, -1.5])
    assert result.prompt_tokens == 3 and result.model_version == 2


def test_greedy_asks_for_one_sample_and_repeats_it():
    params = OurSamplingParams(n=4, max_tokens=2, temperature=0.0, top_p=0.5, seed=None, top_logprobs=1)
    assert SamplingParams(**generate_sampling_kwargs(params)).n == 1
    output = RequestOutput(request_id="g", prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                           outputs=[_completion(0, [10, 11])], finished=True)
    samples = generate_result(output, GenerateItem([1], params), model_version=1).samples
    assert len(samples) == 4 and all(s.token_ids.tolist() == [10, 11] for s in samples)


def test_sampling_settings_reach_vllm_and_stop_reasons_come_back():
    params = OurSamplingParams(
        n=2, max_tokens=4, temperature=0.7, top_p=0.9, seed=3, top_logprobs=1, top_k=-1, min_p=0.05,
        presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.2, stop=("###", "\n\n"),
        stop_token_ids=(13,), ignore_eos=True, skip_special_tokens=False,
    )
    sampling = SamplingParams(**generate_sampling_kwargs(params))
    assert (sampling.top_k, sampling.min_p, sampling.presence_penalty, sampling.frequency_penalty) == (0, 0.05, 0.5, -0.25)
    assert (sampling.repetition_penalty, sampling.stop, sampling.ignore_eos, sampling.skip_special_tokens) == (1.2, ["###", "\n\n"], True, False)
    assert 13 in sampling.stop_token_ids and sampling.top_p == 0.9
    output = RequestOutput(request_id="g", prompt=None, prompt_token_ids=[1], prompt_logprobs=None, finished=True,
                           outputs=[_completion(0, [10, 13], "stop", stop_reason=13), _completion(1, [10], "stop", stop_reason="###")])
    samples = generate_result(output, GenerateItem([1], params), model_version=1).samples
    assert [s.stop_reason for s in samples] == [13, "###"]


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_aborted_or_failed_samples_raise(reason):
    params = OurSamplingParams(n=1, max_tokens=2, temperature=1.0, top_p=1.0, seed=0, top_logprobs=1)
    output = RequestOutput(request_id="g", prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                           outputs=[_completion(0, [10, 11], reason)], finished=True)
    with pytest.raises(BackendUnavailable, match=reason):
        generate_result(output, GenerateItem([1], params), model_version=1)


def test_token_prompts_are_vllm_tokens_prompts():
    prompt: TokensPrompt = token_prompt([5, 6])
    assert prompt == TokensPrompt(prompt_token_ids=[5, 6])


# --- images and videos ---

IMAGE_PAD = 9  # the placeholder token of the examples below


def test_pictures_become_multi_modal_data_that_vllms_parser_reads():
    from PIL import Image
    from vllm.multimodal.parse import MultiModalDataParser

    image = Image.new("RGB", (40, 30), (255, 0, 0))
    frames = tuple(Image.new("RGB", (16, 12), (0, 0, 10 * i)) for i in range(3))
    prompt: TokensPrompt = token_prompt([1, IMAGE_PAD, 2], PromptMedia(images=(image,), videos=(frames, frames[:2])))
    assert prompt["prompt_token_ids"] == [1, IMAGE_PAD, 2]
    items = MultiModalDataParser().parse_mm_data(prompt["multi_modal_data"])
    assert {modality: items[modality].get_count() for modality in items} == {"image": 1, "video": 2}
    assert (items["image"].get(0).size, items["image"].get(0).getpixel((0, 0))) == ((40, 30), (255, 0, 0))
    video = items["video"].get(0)
    assert video.shape == (3, 12, 16, 3) and video.dtype == np.uint8  # [frames, height, width, RGB]
    assert video[2, 0, 0].tolist() == [0, 0, 20]
    assert "video" not in token_prompt([IMAGE_PAD], PromptMedia(images=(image,)))["multi_modal_data"]
    assert "multi_modal_data" not in token_prompt([1, 2])


@pytest.mark.parametrize("layout", [0, 1], ids=["list-of-dicts", "flat"])
def test_a_score_reads_the_completion_from_the_end_of_the_expanded_prompt(layout):
    """vLLM replaced the one placeholder sent by three: its prompt log-probs are two positions longer."""
    item = ScoreItem(prompt_ids=[1, IMAGE_PAD, 2], completion_ids=[7, 3], top_logprobs=3)
    image_positions = [position(IMAGE_PAD, 1, [(IMAGE_PAD, -0.01), (4, -5.0), (5, -6.0)])] * 3
    expanded = [POSITIONS[0], *image_positions, *POSITIONS[1:]]
    output = RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1, IMAGE_PAD, IMAGE_PAD, IMAGE_PAD, 2, 7, 3],
                           prompt_logprobs=layouts(expanded)[layout], outputs=[], finished=True)
    result = scored_sequence(output, item, model_version=1)
    assert result.prompt_tokens == 5
    np.testing.assert_array_equal(result.top_ids, [[4, 7, 9], [8, 1, 0]])
    np.testing.assert_allclose(result.token_logprobs, [-1.5, -7.25])


def test_generate_counts_the_prompt_vllm_ran():
    params = OurSamplingParams(n=1, max_tokens=2, temperature=1.0, top_p=1.0, seed=0, top_logprobs=2)
    output = RequestOutput(request_id="g", prompt=None, prompt_token_ids=[1, IMAGE_PAD, IMAGE_PAD, IMAGE_PAD, 2], prompt_logprobs=None,
                           outputs=[_completion(0, [10, 11])], finished=True)
    assert generate_result(output, GenerateItem([1, IMAGE_PAD, 2], params), model_version=1).prompt_tokens == 5
