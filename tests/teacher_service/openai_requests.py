"""OpenAI-compatible requests covering what a vLLM client sends, with the response type each answer
must validate as: the `openai` package's types here, vLLM's own pydantic models in tests/vllm."""

from __future__ import annotations

import json

import httpx

MESSAGES = [{"role": "system", "content": "answer with digits"}, {"role": "user", "content": "what is 1+1?"}]
PARTS = [
    {"role": "developer", "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "use digits"}]},
    {"role": "user", "content": "what is 2+2?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "4"},
]
SAMPLING = {"top_k": 5, "min_p": 0.01, "presence_penalty": 0.3, "frequency_penalty": 0.2, "repetition_penalty": 1.1,
            "stop": ["\n\n"], "stop_token_ids": [9], "ignore_eos": True, "skip_special_tokens": False}

# (name, path, body); kinds: "completion", "chat", and their streamed forms.
REQUESTS = [
    ("completion", "/v1/completions", {"prompt": "hello", "max_tokens": 4, "logprobs": 2, "seed": 1}),
    ("completion", "/v1/completions", {"prompt": ["hello", "the teacher"], "n": 2, "max_tokens": 3, "seed": 2, **SAMPLING}),
    ("completion", "/v1/completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "echo": True, "logprobs": 3,
                                        "prompt_logprobs": 2, "return_token_ids": True}),
    ("completion", "/v1/completions", {"prompt": "the sum", "max_tokens": 0, "echo": True, "logprobs": 1}),
    ("completion", "/v1/completions", {"prompt": "hello", "temperature": None, "top_p": None, "n": None, "stop": None,
                                        "max_tokens": None, "logprobs": None, "seed": None}),
    ("chat", "/v1/chat/completions", {"messages": MESSAGES, "n": 2, "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "seed": 3}),
    ("chat", "/v1/chat/completions", {"messages": PARTS, "max_tokens": 3, "seed": 4, **SAMPLING}),
    ("chat", "/v1/chat/completions", {"messages": [*MESSAGES, {"role": "assistant", "content": "it is"}], "max_tokens": 3,
                                      "add_generation_prompt": False, "continue_final_message": True, "echo": True,
                                      "prompt_logprobs": 1, "seed": 5}),
    ("completion-stream", "/v1/completions", {"prompt": "hello", "n": 2, "max_tokens": 4, "logprobs": 1, "seed": 6, "stream": True,
                                               "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("chat-stream", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 1,
                                             "seed": 7, "stream": True, "stream_options": {"include_usage": True}}),
]


def send(http: httpx.Client, path: str, body: dict) -> dict | list[dict]:
    """The JSON answer, or the list of a stream's events (without the final [DONE], which it checks)."""
    answer = http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    if not body.get("stream"):
        return answer.json()
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in answer.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]
