"""A served vision teacher (a tiny Qwen2-VL): image and video prompts over HTTP JSON, HTTP protobuf,
gRPC and the OpenAI routes, with numbers equal to a direct forward pass of the model on the
processor's inputs, and the media limits refused by field on every transport."""

from __future__ import annotations

import base64
import copy
import io
import json

import grpc
import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from potstill.fingerprint import tokenizer_fingerprint
from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from potstill.toy.vlm import build_tiny_vlm
from potstill.vision import load_processor
from teacher_service import wire
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from tests.teacher_service.conftest import grpc_target
from tests.teacher_service.test_media import gif, png, png_declaring
from tests.teacher_service.test_transports import assert_same_distributions, post_protobuf

ATOL = 1e-5


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def video_part(frames: list[bytes]) -> dict:
    return {"type": "video_url", "video_url": {"frames": [data_url(f) for f in frames]}}


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))
MOVING = [png((0, 90, 0), square_at=x) for x in (0, 10, 20)]  # a square moving right, three frames
IMAGE_CHAT = [{"role": "user", "content": [image_part(RED), {"type": "text", "text": "how many?"}]}]
VIDEO_CHAT = [{"role": "user", "content": [{"type": "text", "text": "which way?"}, video_part(MOVING)]}]
BOTH_CHAT = [{"role": "system", "content": "look"}, {"role": "user", "content": [video_part(MOVING[:2]), image_part(BLUE)]}]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> str:
    return str(build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm"))


@pytest.fixture(scope="module")
def vision_teacher(vlm_dir):
    options = ServeOptions(model=vlm_dir, http_port=0, grpc_port=0, max_images=3, max_videos=2, max_video_frames=4,
                           max_image_pixels=64 * 64)
    with BackgroundTeacher(options) as running:
        yield running


@pytest.fixture(scope="module")
def vhttp(vision_teacher):
    with httpx.Client(base_url=vision_teacher.http_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def vstub(vision_teacher):
    with grpc.insecure_channel(grpc_target(vision_teacher)) as channel:
        yield teacher_pb2_grpc.TeacherStub(channel)


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return load_processor(vlm_dir)


def direct_reference(model_dir: str, processor):
    """log_softmax of a direct forward of the model on the processor's inputs, at the completion positions: [L, V]."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logprobs(chat: list[dict], completion_ids: list[int]) -> np.ndarray:
        inputs = processor_inputs(processor, chat)
        prompt_length = inputs["input_ids"].shape[1]
        tail = torch.tensor([completion_ids])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], tail], 1)
        if "mm_token_type_ids" in inputs:  # Qwen2-VL's: completion tokens are text
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail)], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        logits = model(**inputs).logits[0].double()
        return torch.log_softmax(logits[prompt_length - 1 : -1], dim=-1).numpy()

    return logprobs


@pytest.fixture(scope="module")
def reference(vlm_dir, processor):
    return direct_reference(vlm_dir, processor)


def assert_scores_match(results: list[dict], chats: list, completions: list[list[int]], reference, k: int) -> None:
    for chat, completion, result in zip(chats, completions, results, strict=True):
        expected = reference(chat, completion)
        np.testing.assert_allclose(result["token_logprobs"], expected[np.arange(len(completion)), completion], rtol=0, atol=ATOL)
        np.testing.assert_array_equal(result["top_ids"], np.argsort(-expected, axis=-1, kind="stable")[:, :k])
        np.testing.assert_allclose(result["top_logprobs"], -np.sort(-expected, axis=-1)[:, :k], rtol=0, atol=ATOL)


def processor_inputs(processor, chat: list[dict]) -> dict:
    """What the processor makes of a chat given as JSON content parts."""
    images, videos, messages = [], [], []
    for message in chat:
        content = message["content"]
        if isinstance(content, list):
            content = [as_template_part(part, images, videos) for part in content]
        messages.append({"role": message["role"], "content": content})
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=images or None, videos=videos or None, return_tensors="pt"))


def as_template_part(part: dict, images: list, videos: list) -> dict:
    def picture(url: str) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")

    if part["type"] == "image_url":
        images.append(picture(part["image_url"]["url"]))
        return {"type": "image"}
    if part["type"] == "video_url":
        videos.append([picture(url) for url in part["video_url"]["frames"]])
        return {"type": "video"}
    return part


def score(client, sequences, k=5) -> list[dict]:
    response = client.post("/v1/score", json={"sequences": sequences, "top_logprobs": k})
    assert response.status_code == 200, response.text
    return response.json()["results"]


# --- the processor ---


def test_frames_pair_into_temporal_patches(processor):
    frames = [Image.open(io.BytesIO(f)).convert("RGB") for f in MOVING]  # three frames: padded to four with the last
    video = processor(text=["<|video_pad|>"], videos=[frames], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == [[2, 2, 2]]
    patches = video["pixel_values_videos"].reshape(2, 4, 3, 2, 14, 14)  # [t, h*w, C, frame in pair, p, p]
    singles = [processor(text=["<|image_pad|>"], images=[f], return_tensors="pt")["pixel_values"].reshape(4, 3, 2, 14, 14)[:, :, 0]
               for f in frames]
    for t, pair in enumerate([(0, 1), (2, 2)]):
        for slot, index in enumerate(pair):
            torch.testing.assert_close(patches[t, :, :, slot], singles[index], rtol=0, atol=1e-5)


def test_a_qwen2_vl_checkpoint_loads_without_torchvision(tmp_path):
    """A checkpoint naming transformers' own Qwen2VLProcessor (whose video side needs torchvision)."""
    path = build_tiny_vlm(tmp_path / "vlm", hidden_size=32, heads=2, vision_width=32, vision_depth=1)
    for name in ("processor_config.json", "tokenizer_config.json"):
        (path / name).write_text((path / name).read_text().replace("ToyQwen2VLProcessor", "Qwen2VLProcessor"))
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    processor = load_processor(path)
    frame = Image.open(io.BytesIO(MOVING[0])).convert("RGB")
    assert processor(text=["<|video_pad|>"], videos=[[frame]], return_tensors="pt")["video_grid_thw"].tolist() == [[1, 2, 2]]


def test_the_fingerprint_covers_the_media_tokens(processor, vision_teacher, vhttp):
    info = vhttp.get("/v1/model").json()
    assert info["accepts_media"] is info["accepts_video"] is True
    limits = {"max_images": 3, "max_videos": 2, "max_video_frames": 4, "max_image_pixels": 64 * 64}
    assert {key: info[key] for key in limits} == limits
    over_grpc = wire.model_info(pb.ModelInfo.FromString(vhttp.get("/v1/model", headers={"Accept": "application/x-protobuf"}).content))
    assert over_grpc.accepts_media and over_grpc.max_images == 3 and over_grpc.max_image_pixels == 64 * 64
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(processor) != tokenizer_fingerprint(processor.tokenizer)
    renamed = copy.copy(processor)
    renamed.image_token = "<|vision_end|>"
    assert tokenizer_fingerprint(renamed) != tokenizer_fingerprint(processor)


# --- numbers equal a direct forward ---


def test_image_and_video_scores_equal_a_direct_forward(vhttp, reference):
    """One request mixing an image, a video, both, and no picture: batched together, each exact."""
    chats = [IMAGE_CHAT, VIDEO_CHAT, BOTH_CHAT, [{"role": "user", "content": "no picture"}]]
    completions = [[21, 22, 23], [30], [40, 41], [50, 51]]
    results = score(vhttp, [{"prompt": c, "completion": ids} for c, ids in zip(chats, completions)], k=4)
    assert_scores_match(results, chats, completions, reference, k=4)


def test_the_picture_reaches_the_model(vhttp):
    blue_chat = [{"role": "user", "content": [image_part(BLUE), {"type": "text", "text": "how many?"}]}]
    red, blue = score(vhttp, [{"prompt": c, "completion": [21, 22]} for c in (IMAGE_CHAT, blue_chat)])
    assert red["prompt_tokens"] == blue["prompt_tokens"]
    assert np.abs(np.subtract(red["token_logprobs"], blue["token_logprobs"])).max() > 1e-3


def test_greedy_generation_with_a_video_follows_the_direct_forward(vhttp, reference):
    sample = vhttp.post("/v1/generate", json={"prompts": [VIDEO_CHAT], "max_tokens": 4, "temperature": 0, "top_logprobs": 1}).json()
    tokens = sample["results"][0]["samples"][0]["token_ids"]
    expected = reference(VIDEO_CHAT, tokens)  # the distributions along the answer it gave
    assert tokens == expected.argmax(-1).tolist()
    np.testing.assert_allclose(sample["results"][0]["samples"][0]["token_logprobs"], expected.max(-1), rtol=0, atol=ATOL)


# --- every transport ---


def test_media_prompts_are_the_same_over_every_transport(vhttp, vstub):
    request = {"sequences": [{"prompt": IMAGE_CHAT, "completion": [21, 22]}, {"prompt": VIDEO_CHAT, "completion": "12"}], "top_logprobs": 3}
    as_json = vhttp.post("/v1/score", json=request).json()["results"]
    message = wire.score_request_pb(request)
    assert message.sequences[0].prompt.chat.messages[0].parts[0].image.data == RED  # bytes, not base64 text
    over_http = wire.score_response(pb.ScoreResponse.FromString(post_protobuf(vhttp, "/v1/score", message))).results
    over_grpc = wire.score_response(vstub.Score(message)).results
    for json_result, http_result, grpc_result in zip(as_json, over_http, over_grpc, strict=True):
        assert json_result["prompt_tokens"] == http_result.prompt_tokens == grpc_result.prompt_tokens
        assert_same_distributions(json_result, http_result)
        assert_same_distributions(json_result, grpc_result)


def test_generate_with_media_is_the_same_over_http_and_grpc(vhttp, vstub):
    request = {"prompts": [IMAGE_CHAT, BOTH_CHAT], "n": 2, "max_tokens": 3, "seed": 4, "top_logprobs": 2}
    as_json = vhttp.post("/v1/generate", json=request).json()["results"]
    over_grpc = wire.generate_response(vstub.Generate(wire.generate_request_pb(request))).results
    for json_result, grpc_result in zip(as_json, over_grpc, strict=True):
        for json_sample, sample in zip(json_result["samples"], grpc_result.samples, strict=True):
            assert json_sample["text"] == sample.text
            assert_same_distributions(json_sample, sample)


def test_an_animated_image_is_a_video(vhttp):
    frames = [Image.open(io.BytesIO(f)).convert("RGB") for f in MOVING]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    animated = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:image/gif;base64," + base64.b64encode(out.getvalue()).decode()}}]}]
    as_frames = [{"role": "user", "content": [{"type": "video_url", "video_url": {"frames": [data_url(f) for f in MOVING]}}]}]
    from_gif, from_frames = score(vhttp, [{"prompt": c, "completion": [30]} for c in (animated, as_frames)])
    assert from_gif["prompt_tokens"] == from_frames["prompt_tokens"]  # same frame count and size; GIF palettes change pixels a little


def test_openai_chat_with_an_image_and_a_video_equals_generate(vision_teacher, vhttp):
    client = openai.OpenAI(base_url=vision_teacher.http_url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": [image_part(RED), video_part(MOVING), {"type": "text", "text": "?"}]}]
    chat = client.chat.completions.create(model="vlm", messages=messages, max_tokens=3, n=2, seed=3, logprobs=True, top_logprobs=2)
    native = vhttp.post("/v1/generate", json={"prompts": [messages], "n": 2, "max_tokens": 3, "seed": 3, "top_logprobs": 2}).json()["results"][0]
    assert chat.usage.prompt_tokens == native["prompt_tokens"]
    for choice, sample in zip(chat.choices, native["samples"], strict=True):
        assert choice.message.content == sample["text"]
        np.testing.assert_allclose([e.logprob for e in choice.logprobs.content], sample["token_logprobs"], rtol=0, atol=1e-6)


# --- limits, refused by field on every transport ---


def refusal(vhttp, vstub, chat: list[dict]) -> tuple[dict, str]:
    """The HTTP error body and the gRPC details of a score request with `chat` as its prompt."""
    request = {"sequences": [{"prompt": chat, "completion": [21]}]}
    response = vhttp.post("/v1/score", json=request)
    assert response.status_code == 400, response.text
    with pytest.raises(grpc.RpcError) as error:
        vstub.Score(wire.score_request_pb(request))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return response.json()["error"], error.value.details()


@pytest.mark.parametrize("content, field, words", [
    ([image_part(RED)] * 4, "sequences.0.prompt.0.content.3", "more than 3 images"),
    ([video_part(MOVING[:1])] * 3, "sequences.0.prompt.0.content.2", "more than 2 videos"),
    ([video_part(MOVING * 2)], "sequences.0.prompt.0.content.0.video_url.frames", "6 frames exceed the limit of 4"),
    ([image_part(png_declaring(65, 64))], "sequences.0.prompt.0.content.0.image_url.url", "65x64 pixels exceed"),
    ([image_part(b"GIF89a but not really")], "sequences.0.prompt.0.content.0.image_url.url", "not a PNG, JPEG"),
    ([image_part(RED[:60])], "sequences.0.prompt.0.content.0.image_url.url", "corrupt or truncated"),
    ([video_part([MOVING[0], png((0, 0, 0), size=(30, 30))])], "sequences.0.prompt.0.content.0.video_url.frames.1", "frame of 30x30"),
])
def test_media_beyond_the_limits_is_refused_by_field(vhttp, vstub, content, field, words):
    body, details = refusal(vhttp, vstub, [{"role": "user", "content": content}])
    assert body["field"] == field and words in body["message"]
    assert details.startswith(f"{field}: ") and words in details


def test_an_animation_with_too_many_frames_is_refused(vhttp, vstub):
    video = {"type": "video_url", "video_url": {"url": "data:image/gif;base64," + base64.b64encode(gif(5)).decode()}}
    body, _ = refusal(vhttp, vstub, [{"role": "user", "content": [video]}])
    assert body["field"] == "sequences.0.prompt.0.content.0.video_url.url" and "5 frames exceed" in body["message"]


def test_images_are_counted_over_the_whole_request(vhttp):
    prompt = [{"role": "user", "content": [image_part(RED), image_part(BLUE)]}]
    response = vhttp.post("/v1/generate", json={"prompts": [prompt, prompt], "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["field"] == "prompts.1.0.content.1"


def test_a_text_teacher_refuses_pictures(http):
    response = http.post("/v1/score", json={"sequences": [{"prompt": IMAGE_CHAT, "completion": [5]}]})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "sequences.0.prompt"
    assert "takes no images" in response.json()["error"]["message"]


# --- potstill query ---


def test_query_sends_images_and_videos(vision_teacher, vhttp, tmp_path, capsys):
    from potstill.cli import main

    (tmp_path / "red.png").write_bytes(RED)
    frames = tmp_path / "clip"
    frames.mkdir()
    for index, frame in enumerate(MOVING):
        (frames / f"{index:03d}.png").write_bytes(frame)
    chat = [{"role": "user", "content": [image_part(RED), video_part(MOVING), {"type": "text", "text": "how many?"}]}]
    [expected] = score(vhttp, [{"prompt": chat, "completion": "12"}], k=3)
    for url in (vision_teacher.grpc_url, vision_teacher.http_url):
        main(["query", url, "score", "--prompt", "how many?", "--completion", "12", "-k", "3", "--json",
              "--image", str(tmp_path / "red.png"), "--video", str(frames)])
        [scored] = json.loads(capsys.readouterr().out)["results"]
        assert scored["prompt_tokens"] == expected["prompt_tokens"] and scored["top_ids"] == expected["top_ids"]
        np.testing.assert_allclose(scored["token_logprobs"], expected["token_logprobs"], rtol=0, atol=1e-6)
    with pytest.raises(SystemExit):
        main(["query", f"openai+{vision_teacher.http_url}/v1", "score", "--prompt", "?", "--completion", "1", "--image", str(tmp_path / "red.png")])
    assert "sends text only" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        main(["query", vision_teacher.grpc_url, "generate", "--prompt", "?", "--image", str(tmp_path / "missing.png")])
    assert "missing.png" in capsys.readouterr().err


# --- media shared by a request's prompts ---


def test_shared_media_travel_once_and_count_once(vhttp, vstub):
    """Five sequences naming one shared image and one shared video: the limits are 3 images and 2 videos."""
    shared_chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "media:0"}},
                                                {"type": "video_url", "video_url": {"frames": ["media:1", "media:2", "media:3"]}}]}]
    inline_chat = [{"role": "user", "content": [image_part(RED), video_part(MOVING)]}]
    completions = [[21], [22], [23, 24], [25], [26]]
    shared = {"sequences": [{"prompt": shared_chat, "completion": c} for c in completions], "top_logprobs": 2,
              "media": [data_url(RED), *map(data_url, MOVING)]}
    inline = score(vhttp, [{"prompt": inline_chat, "completion": c} for c in completions[:2]], k=2)
    over_http = vhttp.post("/v1/score", json=shared).json()["results"]
    message = wire.score_request_pb(shared)
    over_grpc = wire.score_response(vstub.Score(message)).results
    assert message.ByteSize() < len(RED) + sum(map(len, MOVING)) + 500  # each picture once
    for json_result, grpc_result in zip(over_http, over_grpc, strict=True):
        assert_same_distributions(json_result, grpc_result)
    for expected, result in zip(inline, over_http):
        assert expected["prompt_tokens"] == result["prompt_tokens"]
        np.testing.assert_allclose(result["token_logprobs"], expected["token_logprobs"], rtol=0, atol=ATOL)


def test_shared_media_errors_name_the_entry_or_the_reference(vhttp):
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "media:1"}}]}]
    request = {"sequences": [{"prompt": chat, "completion": [21]}], "media": [data_url(RED), data_url(b"not an image")]}
    error = vhttp.post("/v1/score", json=request).json()["error"]
    assert error["field"] == "media.1" and "not a PNG" in error["message"]
    request["media"] = request["media"][:1]
    error = vhttp.post("/v1/score", json=request).json()["error"]
    assert error["field"] == "sequences.0.prompt.0.content.0.image_url.url" and "entry 1 of a media list of 1" in error["message"]


def test_the_openai_compatible_client_refuses_pictures_rather_than_drop_them(vision_teacher, processor):
    import asyncio

    from trainer_client.teachers import TeacherRequestError, connect_client

    async def ask():
        client = connect_client(f"openai+{vision_teacher.http_url}/v1", tokenizer=processor.tokenizer)
        try:
            await client.score({"sequences": [{"prompt": IMAGE_CHAT, "completion": [21]}], "top_logprobs": 1})
        finally:
            await client.close()

    with pytest.raises(TeacherRequestError) as refused:
        asyncio.run(ask())
    assert "images and videos need a grpc:// or http(s):// teacher URL" in str(refused.value)


# --- a LLaVA-style model: images only, pixel_values stacked per image ---


def build_tiny_llava(path) -> str:
    """A tiny untrained LLaVA (CLIP vision tower, Llama decoder) with its processor (PIL image processor)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from potstill.toy.tokenizer import build_tokenizer
    from potstill.toy.vlm import VLM_CHAT_TEMPLATE

    tokenizer = build_tokenizer(extra_special_tokens=("<image>",))
    template = VLM_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_a_llava_style_teacher_scores_images_exactly_and_refuses_videos(tmp_path):
    path = build_tiny_llava(tmp_path / "llava")
    llava_processor = load_processor(path)
    llava_reference = direct_reference(path, llava_processor)
    chats = [IMAGE_CHAT, [{"role": "user", "content": "no picture"}], [{"role": "user", "content": [image_part(BLUE), image_part(RED)]}]]
    completions = [[21, 22], [30], [40, 41, 42]]
    with BackgroundTeacher(ServeOptions(model=path, http_port=0, grpc_port=0)) as teacher, httpx.Client(base_url=teacher.http_url, timeout=60) as client:
        info = client.get("/v1/model").json()
        assert (info["accepts_media"], info["accepts_video"]) == (True, False)
        results = score(client, [{"prompt": c, "completion": ids} for c, ids in zip(chats, completions)], k=3)
        assert [r["prompt_tokens"] for r in results] == [processor_inputs(llava_processor, c)["input_ids"].shape[1] for c in chats]
        assert (processor_inputs(llava_processor, chats[2])["input_ids"] == llava_processor.image_token_id).sum() == 8  # 4 per image
        assert_scores_match(results, chats, completions, llava_reference, k=3)
        samples = client.post("/v1/generate", json={"prompts": [IMAGE_CHAT], "n": 2, "max_tokens": 3, "seed": 0}).json()
        assert len(samples["results"][0]["samples"]) == 2
        refused = client.post("/v1/score", json={"sequences": [{"prompt": VIDEO_CHAT, "completion": [21]}]})
        assert refused.status_code == 400
        assert refused.json()["error"]["field"] == "sequences.0.prompt" and "no videos" in refused.json()["error"]["message"]


# --- one pass holding several prompts' pictures ---


def test_a_generate_pass_with_pictures_gives_each_prompt_what_it_gets_alone(vlm_dir):
    from teacher_service.backends.base import BackendConfig, GenerateItem, SamplingParams
    from teacher_service.backends.hf import HFBackend
    from teacher_service.media import PromptMedia

    backend = HFBackend.load(BackendConfig(model=vlm_dir))
    try:
        def picture(data: bytes) -> Image.Image:
            return Image.open(io.BytesIO(data)).convert("RGB")

        image = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]}
        video = {"role": "user", "content": [{"type": "text", "text": "which way?"}, {"type": "video"}]}
        prompts = [backend.encode_chat_media([image], PromptMedia(images=(picture(RED),))),
                   backend.encode_chat_media([video], PromptMedia(videos=(tuple(map(picture, MOVING)),))),
                   (backend.encode_chat([{"role": "user", "content": "no picture here"}]), None)]
        settings = [SamplingParams(n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=7, top_logprobs=2),
                    SamplingParams(n=1, max_tokens=3, temperature=0.0, top_p=1.0, seed=None, top_logprobs=2),
                    SamplingParams(n=1, max_tokens=4, temperature=0.7, top_p=0.9, seed=3, top_logprobs=2)]
        items = [GenerateItem(ids, params, media) for (ids, media), params in zip(prompts, settings)]
        together = backend.generate_now(items)  # one pass, left-padded rows of different lengths
        for item, shared in zip(items, together, strict=True):
            [alone] = backend.generate_now([item])
            assert shared.prompt_tokens == alone.prompt_tokens == len(item.prompt_ids)
            for one, other in zip(alone.samples, shared.samples, strict=True):
                assert one.token_ids.tolist() == other.token_ids.tolist()
                np.testing.assert_allclose(one.token_logprobs, other.token_logprobs, rtol=0, atol=ATOL)
                np.testing.assert_allclose(one.top_logprobs, other.top_logprobs, rtol=0, atol=ATOL)
    finally:
        backend.close()
