"""Drop-in compatibility of the OpenAI-compatible routes with vLLM's server: what they accept
(settings, batches, nulls, content parts, roles, streaming, unknown fields) and how they shape the
answer, checked against the native endpoints and validated with the `openai` package's types."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from teacher_service.http_server import IGNORED_FIELDS_HEADER
from tests.teacher_service.openai_requests import MESSAGES, PARTS, REQUESTS, send

OPENAI_TYPES = {"completion": Completion, "chat": ChatCompletion, "completion-stream": Completion, "chat-stream": ChatCompletionChunk}


def within_openai_types(kind: str, item: dict) -> dict:
    """`item` less two things OpenAI's legacy API and vLLM send that the `openai` package's types do
    not admit (its client builds them unvalidated): the null log-prob of an echoed first token, and
    the null finish_reason of a streamed completion's unfinished events."""
    if not kind.startswith("completion"):
        return item
    choices = []
    for choice in item["choices"]:
        logprobs = choice["logprobs"]
        if logprobs and logprobs["token_logprobs"] and logprobs["token_logprobs"][0] is None:
            logprobs = {**logprobs, **{key: logprobs[key][1:] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}}
        choices.append({**choice, "logprobs": logprobs, "finish_reason": choice["finish_reason"] or "length"})
    return {**item, "choices": choices}


@pytest.mark.parametrize(("kind", "path", "body"), REQUESTS, ids=[f"{i}-{kind}" for i, (kind, _, _) in enumerate(REQUESTS)])
def test_every_answer_validates_as_the_openai_types(http, kind, path, body):
    answer = send(http, path, body)
    for item in answer if isinstance(answer, list) else [answer]:
        OPENAI_TYPES[kind].model_validate(within_openai_types(kind, item))


def native_samples(http, prompt, **body) -> list[dict]:
    answer = http.post("/v1/generate", json={"prompts": [prompt], **body})
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["samples"]


def test_a_batch_of_prompts_gets_n_choices_each_in_prompt_order(http):
    prompts = ["hello", "the teacher", "what is"]
    answer = send(http, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 3, "seed": 8, "return_token_ids": True})
    assert [c["index"] for c in answer["choices"]] == list(range(6))
    for number, prompt in enumerate(prompts):
        samples = native_samples(http, prompt, n=2, max_tokens=3, seed=8)
        choices = answer["choices"][2 * number : 2 * number + 2]
        assert [c["token_ids"] for c in choices] == [s["token_ids"] for s in samples]
    assert answer["usage"]["prompt_tokens"] == sum(len(answer["choices"][2 * i]["prompt_token_ids"]) for i in range(3))


def test_null_stands_for_the_default(http):
    with_nulls = send(http, "/v1/completions", {"prompt": "hello", "seed": 5, "temperature": None, "top_p": None, "n": None,
                                               "stop": None, "max_tokens": None, "logprobs": None, "top_k": None})
    plain = send(http, "/v1/completions", {"prompt": "hello", "seed": 5})
    assert [c["text"] for c in with_nulls["choices"]] == [c["text"] for c in plain["choices"]]
    assert with_nulls["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_content_parts_and_every_role_render_as_their_text(http):
    chat = send(http, "/v1/chat/completions", {"messages": PARTS, "max_tokens": 4, "seed": 2})
    joined = [{**PARTS[0], "content": "be brief\nuse digits"}, *PARTS[1:]]
    native = native_samples(http, joined, max_tokens=4, seed=2)
    assert chat["choices"][0]["message"]["content"] == native[0]["text"]
    assert chat["usage"]["completion_tokens"] == len(native[0]["token_ids"])


def test_sampling_settings_reach_the_sampler(http):
    settings = {"temperature": 0.9, "seed": 3, "top_k": 2, "repetition_penalty": 1.4, "stop_token_ids": [9], "max_tokens": 6}
    chat = send(http, "/v1/chat/completions", {"messages": MESSAGES, **settings})
    native = native_samples(http, MESSAGES, **settings)
    assert (chat["choices"][0]["message"]["content"], chat["choices"][0]["stop_reason"]) == (native[0]["text"], native[0]["stop_reason"])
    unrestricted = native_samples(http, MESSAGES, temperature=0.9, seed=3, max_tokens=6)
    assert unrestricted[0]["token_ids"] != native[0]["token_ids"]


def test_chat_echo_continues_the_last_turn_and_prompt_logprobs_cover_the_prompt(http):
    messages = [*MESSAGES, {"role": "assistant", "content": "it is"}]
    chat = send(http, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "seed": 1, "echo": True, "prompt_logprobs": 2,
                                               "add_generation_prompt": False, "continue_final_message": True})
    assert chat["choices"][0]["message"]["content"].startswith("it is")
    entries = chat["prompt_logprobs"]
    assert len(entries) == chat["usage"]["prompt_tokens"] and entries[0] is None
    assert all(2 <= len(entry) <= 3 and all(e["rank"] >= 1 for e in entry.values()) for entry in entries[1:])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_carries_the_same_answer_token_by_token(http, path):
    body = {"max_tokens": 6, "n": 2, "seed": 4, "logprobs": 2 if "chat" not in path else True}
    body.update({"prompt": "the teacher"} if "chat" not in path else {"messages": MESSAGES, "top_logprobs": 2})
    whole = send(http, path, body)
    events = send(http, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    for choice in whole["choices"]:
        own = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == choice["index"]]
        assert [c["finish_reason"] for c in own] == [None] * (len(own) - 1) + [choice["finish_reason"]]
        if "chat" in path:
            assert own[0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(c["delta"]["content"] for c in own) == choice["message"]["content"]
            assert [t for c in own[1:] for t in c["logprobs"]["content"]] == choice["logprobs"]["content"]
            assert len(own) == len(choice["logprobs"]["content"]) + 1  # the role, then one event per token
        else:
            assert "".join(c["text"] for c in own) == choice["text"]
            assert [t for c in own for t in c["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
            assert len(own) == len(choice["logprobs"]["tokens"])


def test_the_openai_client_reads_a_streamed_chat(teacher):
    client = openai.OpenAI(base_url=teacher.http_url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, seed=9, stream=True))
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, seed=9)
    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content


def test_unknown_fields_are_ignored_and_named_in_a_header(http):
    answer = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "frobnicate": 1, "zeta": {"a": 1}})
    assert answer.status_code == 200 and answer.headers[IGNORED_FIELDS_HEADER] == '["frobnicate", "zeta"]'
    assert IGNORED_FIELDS_HEADER not in http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).headers
    # The native routes keep refusing them, by name.
    refused = http.post("/v1/generate", json={"prompts": ["hi"], "frobnicate": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "frobnicate"


def test_model_list_validates_as_openai_models(http, teacher):
    listed = http.get("/v1/models").json()
    card = Model.model_validate(listed["data"][0])
    info = http.get("/v1/model").json()
    assert card.id == info["model"] and card.created > 1_700_000_000
    assert listed["data"][0]["max_model_len"] == info["max_model_len"]


@pytest.fixture(scope="module")
def bos_teacher(start_teacher, tiny_model_dir, tmp_path_factory):
    """The tiny teacher with a tokenizer that puts <|bos|> before every text, as Llama's does."""
    directory = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(directory)
    with start_teacher(model=str(directory)) as running:
        yield running, tokenizer


def test_add_special_tokens_decides_the_bos(bos_teacher):
    running, tokenizer = bos_teacher
    bos = tokenizer.bos_token_id
    with httpx.Client(base_url=running.http_url, timeout=60) as http:
        def chat_answer(path: str, **body) -> dict:
            return send(http, path, {"max_tokens": 1, **body})
        with_bos = send(http, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "return_token_ids": True})
        without = send(http, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "return_token_ids": True, "add_special_tokens": False})
        assert with_bos["choices"][0]["prompt_token_ids"][0] == bos
        assert without["choices"][0]["prompt_token_ids"] == with_bos["choices"][0]["prompt_token_ids"][1:]
        # Chat: the template's tokens only, unless asked (vLLM's default for chat is false).
        chat = chat_answer("/v1/chat/completions", messages=MESSAGES)
        chat_bos = chat_answer("/v1/chat/completions", messages=MESSAGES, add_special_tokens=True)
        assert chat_bos["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"] + 1
