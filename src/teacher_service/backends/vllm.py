"""The vLLM backend (`--backend vllm`, the `vllm` extra): an in-process `AsyncLLM` engine on GPUs.

vLLM schedules and batches every request itself (continuous batching), so each item is one
engine request and the backend only converts (`vllm_convert`). Scoring asks for prompt
log-probs of the whole sequence; generation for n seeded samples with their top k. The
engine's `max_logprobs` is raised to the service's `--max-top-logprobs`. Tokenisation and the
tokenizer fingerprint come from the model's own transformers tokenizer (and a vision model's
processor), as in the HF backend. A prompt's images and videos go to the engine as its
`multi_modal_data` beside one placeholder token per picture, which vLLM expands itself; so the
service's context-length check counts a picture as one token, and vLLM checks the expanded prompt.
Written against vLLM 0.32.0 (the version the extra pins; 0.33.0 is the same in every API used here,
but its dependencies do not resolve on this project's package index); tested on CPU through the conversion
layer only (`.ci/vllm-conversion`), and on a GPU by `tests/vllm/test_vllm_engine.py`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from transformers import AutoTokenizer

from potstill.fingerprint import tokenizer_fingerprint
from potstill.vision import is_vision_model, load_processor
from teacher_service.backends.base import BackendConfig, ChatTemplateOptions, GenerateItem, ModelDescription, PassObserver, ScoreItem
from teacher_service.backends.vllm_convert import (
    VLLM_LOGPROBS_MODES,
    generate_result,
    generate_sampling_kwargs,
    score_sampling_kwargs,
    scored_sequence,
    token_prompt,
)
from teacher_service.backends.tokenizing import TokenizerHelpers
from teacher_service.errors import Forbidden
from teacher_service.media import PromptMedia
from teacher_service.protocol import GenerateResult, ScoredSequence


class VLLMBackend(TokenizerHelpers):
    name = "vllm"

    def __init__(self, engine: Any, tokenizer: Any, config: BackendConfig, processor: Any = None):
        """processor: a vision model's (`potstill.vision.load_processor`), for its fingerprint."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.model_version = 1
        model_config = engine.model_config
        self.description = ModelDescription(
            vocab_size=model_config.get_vocab_size(),
            max_model_len=model_config.max_model_len,
            eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1,
            tokenizer_fingerprint=tokenizer_fingerprint(processor or tokenizer),
            accepts_media=processor is not None,
            accepts_video=getattr(processor, "video_processor", None) is not None,
        )
        self._request_ids = itertools.count()
        self._in_flight: dict[str, asyncio.Future] = {}
        self._abandoned: dict[str, Exception] = {}  # request id -> why `abandon_waiting` cancelled it

    @classmethod
    def load(cls, config: BackendConfig) -> VLLMBackend:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        arguments = AsyncEngineArgs(
            model=config.model,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_logprobs=config.max_top_logprobs,
            logprobs_mode=VLLM_LOGPROBS_MODES[config.logprobs_mode],
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
        )
        processor = load_processor(config.model) if is_vision_model(config.model) else None
        return cls(AsyncLLM.from_engine_args(arguments), AutoTokenizer.from_pretrained(config.model), config, processor)

    def encode_chat_media(
        self, messages: list[dict[str, Any]], media: PromptMedia, template: ChatTemplateOptions = ChatTemplateOptions(),
    ) -> tuple[list[int], PromptMedia]:
        """One placeholder per picture (the chat template's): vLLM expands them itself (`vllm_convert.token_prompt`)."""
        return self.encode_chat(messages, template), media

    # --- requests: one engine request per item, all in flight together ---

    async def score(self, items: list[ScoreItem]) -> list[ScoredSequence]:
        version = self.model_version
        return await asyncio.gather(*(
            self._request(token_prompt(item.prompt_ids + item.completion_ids, item.media), score_sampling_kwargs(item),
                          lambda output, item=item: scored_sequence(output, item, version))
            for item in items
        ))

    async def generate(self, items: list[GenerateItem]) -> list[GenerateResult]:
        version = self.model_version
        return await asyncio.gather(*(
            self._request(token_prompt(item.prompt_ids, item.media), generate_sampling_kwargs(item.params),
                          lambda output, item=item: generate_result(output, item, version))
            for item in items
        ))

    async def _request(self, prompt: dict[str, Any], sampling: dict[str, Any], convert: Callable[[Any], Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        request_id = f"potstill-{next(self._request_ids)}"
        params = SamplingParams(**sampling, output_kind=RequestOutputKind.FINAL_ONLY)
        task = asyncio.ensure_future(self._final_output(prompt, params, request_id))
        self._in_flight[request_id] = task
        try:
            return convert(await task)
        except asyncio.CancelledError:
            if request_id in self._abandoned:
                raise self._abandoned.pop(request_id) from None
            raise
        finally:
            self._in_flight.pop(request_id, None)

    async def _final_output(self, prompt: dict, params: Any, request_id: str) -> Any:
        final = None
        async for output in self.engine.generate(prompt, params, request_id):
            final = output
        return final

    # --- weights ---

    def check_weights(self, tensors: dict[str, Any]) -> None:
        raise Forbidden("the vllm backend does not take weight pushes; serve a self-teacher with the hf backend")

    async def load_weights(self, tensors: dict[str, Any], model_version: int) -> None:
        self.check_weights(tensors)

    # --- lifecycle ---

    def observe_passes(self, observer: PassObserver) -> None:
        """vLLM batches out of sight (its own metrics report it); no pass is reported here."""

    def abandon_waiting(self, error: Exception) -> None:
        for request_id, task in list(self._in_flight.items()):
            self._abandoned[request_id] = error
            task.cancel()  # AsyncLLM.generate aborts the engine request when cancelled

    def close(self) -> None:
        self.engine.shutdown()
