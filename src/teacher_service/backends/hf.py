"""The Hugging Face transformers backend: any `AutoModelForCausalLM`, or a vision-language model
(`AutoModelForImageTextToText` with its processor: Qwen2-VL, LLaVA style), on CPU or CUDA.

Concurrent requests' items are gathered into shared passes (`teacher_service.batching`) that run
on one worker thread, so the model runs one pass at a time. Scoring runs the model body once per
micro-batch (bounded by `max_batch_tokens`), then applies the output layer and the log-softmax
only at completion positions, `max_logits_elements` at a time; generation keeps each step's
top-k only (`hf_sampling`). Memory stays bounded for long sequences and large vocabularies.
A vision model's prompt carries the processor's pixel tensors; a pass concatenates those of its
rows in row order (how Qwen2-VL and LLaVA match pictures to placeholder tokens).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from potstill.fingerprint import tokenizer_fingerprint
from potstill.vision import is_vision_model, load_processor
from teacher_service.backends.base import (
    BackendConfig,
    ChatTemplateOptions,
    GenerateItem,
    ModelDescription,
    PassObserver,
    SamplingParams,
    ScoreItem,
)
from teacher_service.backends.hf_sampling import Penalties, RowSampler, RowStops, cut_sample, sample_seed
from teacher_service.backends.tokenizing import TokenizerHelpers
from teacher_service.batching import Batcher, BatchingSettings
from teacher_service.media import PromptMedia
from teacher_service.protocol import GenerateResult, Sample, ScoredSequence
from teacher_service.weights import check_weights, copy_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _context_length(model_config, cap: int | None) -> int:
    model_config = model_config.get_text_config()  # a vision model's context is its language model's
    own = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    lengths = [length for length in (own, cap) if length]
    if not lengths:
        raise ValueError("the model config states no context length; pass --max-model-len")
    return min(lengths)


def _token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so that (batch size x longest member) stays within `max_tokens`; longest first."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        batch = batches[-1] if batches else None
        # Sorted longest first, so the batch's first member sets its padded length.
        if batch and (len(batch) + 1) * lengths[batch[0]] <= max_tokens:
            batch.append(index)
        else:
            batches.append([index])
    return batches


def _score_cost(item: ScoreItem) -> int:
    return len(item.prompt_ids) + len(item.completion_ids)


def _generate_cost(item: GenerateItem) -> int:
    rows = item.params.n if item.params.temperature > 0 else 1
    return rows * (len(item.prompt_ids) + item.params.max_tokens)


# Processor outputs that describe the token ids rather than the pictures: rebuilt per pass, padded.
TOKEN_TYPES = "mm_token_type_ids"
_TEXT_INPUTS = ("input_ids", "attention_mask", TOKEN_TYPES)


class HFBackend(TokenizerHelpers):
    name = "hf"

    def __init__(self, model, tokenizer, config: BackendConfig, processor=None):
        """processor: a vision model's (`potstill.vision.load_processor`); None for a text model."""
        self.model = model
        self.model_version = 1  # read and changed on the worker thread only, between passes
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self.device = torch.device(config.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.description = ModelDescription(
            vocab_size=model.get_output_embeddings().weight.shape[0],
            max_model_len=_context_length(model.config, config.max_model_len),
            eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1,
            tokenizer_fingerprint=tokenizer_fingerprint(processor or tokenizer),
            accepts_media=processor is not None,
            accepts_video=getattr(processor, "video_processor", None) is not None,
        )
        # A sample ends at any end token the model declares (chat models add end-of-turn ids).
        declared = getattr(model.generation_config, "eos_token_id", None)
        declared = declared if isinstance(declared, list) else [declared]
        self.stop_ids = sorted({i for i in [tokenizer.eos_token_id, *declared] if i is not None})
        # One thread: the model runs one pass at a time; score and generate passes take turns on it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-backend")
        batching = BatchingSettings(config.batch_window_ms / 1000, config.max_batch_tokens)
        self._score_batcher = Batcher(self.score_now, _score_cost, batching, self._executor)
        self._generate_batcher = Batcher(self.generate_now, _generate_cost, batching, self._executor)
        self._pass_observer: PassObserver = lambda kind, sequences, tokens: None

    @classmethod
    def load(cls, config: BackendConfig) -> HFBackend:
        if is_vision_model(config.model):
            processor = load_processor(config.model)
            model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=DTYPES[config.dtype])
            return cls(model.to(config.device).eval(), processor.tokenizer, config, processor)
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=DTYPES[config.dtype])
        return cls(model.to(config.device).eval(), tokenizer, config)

    # --- media prompts ---

    def encode_chat_media(
        self, messages: list[dict], media: PromptMedia, template: ChatTemplateOptions = ChatTemplateOptions(),
    ) -> tuple[list[int], PromptMedia]:
        """The processor's token ids (each placeholder repeated per visual token) and its tensors, kept with the media."""
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=template.add_generation_prompt,
            continue_final_message=template.continue_final_message, tokenize=False,
        )
        encoded = self.processor(
            text=[text], images=list(media.images) or None, videos=[list(v) for v in media.videos] or None,
            add_special_tokens=template.add_special_tokens, return_tensors="pt",
        )
        inputs = {key: value for key, value in encoded.items() if key not in _TEXT_INPUTS}
        if TOKEN_TYPES in encoded:
            inputs[TOKEN_TYPES] = encoded[TOKEN_TYPES][0]
        return encoded["input_ids"][0].tolist(), replace(media, inputs=inputs)

    # --- scheduling ---

    async def score(self, items: list[ScoreItem]) -> list[ScoredSequence]:
        return await self._score_batcher.submit(items)

    async def generate(self, items: list[GenerateItem]) -> list[GenerateResult]:
        return await self._generate_batcher.submit(items)

    def observe_passes(self, observer: PassObserver) -> None:
        self._pass_observer = observer

    def abandon_waiting(self, error: Exception) -> None:
        self._score_batcher.abandon_waiting(error)
        self._generate_batcher.abandon_waiting(error)

    def close(self) -> None:
        # A pass still running after `abandon_waiting` has no one to answer: do not wait for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- weights ---

    def check_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        check_weights(self.model, tensors)

    async def load_weights(self, tensors: dict[str, torch.Tensor], model_version: int) -> None:
        # On the worker thread: after the pass under way, before any later one.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._swap, tensors, model_version)

    def _swap(self, tensors: dict[str, torch.Tensor], model_version: int) -> None:
        copy_weights(self.model, tensors)
        self.model_version = model_version

    # --- scoring ---

    @torch.inference_mode()
    def score_now(self, items: list[ScoreItem]) -> list[ScoredSequence]:
        """`score` on the calling thread, in micro-batches within `max_batch_tokens`."""
        lengths = [len(item.prompt_ids) + len(item.completion_ids) for item in items]
        results: list[ScoredSequence | None] = [None] * len(items)
        for batch in _token_budget_batches(lengths, self.config.max_batch_tokens):
            for index, result in zip(batch, self._score_batch([items[i] for i in batch])):
                results[index] = result
        return results

    def _score_batch(self, items: list[ScoreItem]) -> list[ScoredSequence]:
        sequences = [item.prompt_ids + item.completion_ids for item in items]
        input_ids, attention_mask = self._right_padded(sequences)
        self._pass_observer("score", len(sequences), input_ids.numel())
        media = self._media_inputs([item.media for item in items], attention_mask, left_padded=False)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **media).last_hidden_state
        # The state at position t predicts token t + 1: a completion starting at p is read from p - 1.
        spans = [(len(item.prompt_ids) - 1, len(item.completion_ids)) for item in items]
        rows = torch.cat([hidden[b, start : start + length] for b, (start, length) in enumerate(spans)])
        targets = torch.tensor([t for item in items for t in item.completion_ids], device=self.device)
        temperatures = torch.tensor(
            [item.temperature for item in items for _ in item.completion_ids], device=self.device
        )
        k = max(item.top_logprobs for item in items)
        token_logprobs, token_ranks, top_logprobs, top_ids = self._distributions(rows, targets, k, temperatures)
        results, offset = [], 0
        for item, (_, length) in zip(items, spans):
            window, keep = slice(offset, offset + length), item.top_logprobs
            offset += length
            results.append(
                ScoredSequence(
                    token_ids=np.asarray(item.completion_ids, dtype=np.int32),
                    token_logprobs=token_logprobs[window],
                    token_ranks=token_ranks[window],
                    top_ids=top_ids[window, :keep],  # each row is sorted, so its first k are its top-k
                    top_logprobs=top_logprobs[window, :keep],
                    prompt_tokens=len(item.prompt_ids),
                    model_version=self.model_version,
                )
            )
        return results

    def _media_inputs(self, media: list[PromptMedia | None], attention_mask: torch.Tensor, left_padded: bool) -> dict[str, torch.Tensor]:
        """The pixel tensors of a pass's rows, concatenated in row order, and the rows' token types
        (padded like the ids; completion and padding positions are text)."""
        present = [m.inputs for m in media if m is not None]
        if not present:
            return {}
        inputs = {key: torch.cat([p[key] for p in present if key in p]).to(self.device)
                  for key in {key for p in present for key in p} - {TOKEN_TYPES}}
        for key, value in inputs.items():
            if value.is_floating_point():
                inputs[key] = value.to(self.model.dtype)
        if any(TOKEN_TYPES in p for p in present):
            inputs[TOKEN_TYPES] = self._token_types(media, attention_mask, left_padded)
        return inputs

    def _token_types(self, media: list[PromptMedia | None], attention_mask: torch.Tensor, left_padded: bool) -> torch.Tensor:
        types = torch.zeros_like(attention_mask)
        width = attention_mask.shape[1]
        for row, m in enumerate(media):
            if m is not None and TOKEN_TYPES in m.inputs:
                row_types = m.inputs[TOKEN_TYPES]
                start = width - int(attention_mask[row].sum()) if left_padded else 0
                types[row, start : start + len(row_types)] = row_types.to(types.device)
        return types

    def _right_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        # Models such as Gemma 2 squash their logits; applying the head alone would skip that.
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _distributions(
        self, hidden: torch.Tensor, targets: torch.Tensor, k: int, temperatures: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Log-prob and rank (1: most likely) of each target, and the top-k, under each position's
        temperature [N], chunked over positions: ([N], [N], [N, k], [N, k])."""
        chunk = max(1, self.config.max_logits_elements // self.description.vocab_size)
        token_parts, rank_parts, value_parts, id_parts = [], [], [], []
        for start in range(0, hidden.shape[0], chunk):
            window = slice(start, start + chunk)
            logprobs = torch.log_softmax(self._logits(hidden[window]) / temperatures[window, None], dim=-1)
            token_logprobs = logprobs.gather(1, targets[window, None])
            token_parts.append(token_logprobs[:, 0])
            rank_parts.append((logprobs > token_logprobs).sum(dim=-1) + 1)
            values, ids = logprobs.topk(k, dim=-1, sorted=True)
            value_parts.append(values)
            id_parts.append(ids)
        return (
            torch.cat(token_parts).cpu().numpy().astype(np.float32),
            torch.cat(rank_parts).cpu().numpy().astype(np.int32),
            torch.cat(value_parts).cpu().numpy().astype(np.float32),
            torch.cat(id_parts).cpu().numpy().astype(np.int32),
        )

    # --- generation ---

    @torch.inference_mode()
    def generate_now(self, items: list[GenerateItem]) -> list[GenerateResult]:
        """`generate` on the calling thread: every sample of every item is one row of one decoding loop.

        A sampled row draws from its own generator (`sample_seed`); a greedy item runs one row and
        repeats its answer n times.
        """
        rows = [(index, j) for index, item in enumerate(items) for j in range(self._rows_of(item))]
        params = [items[index].params for index, _ in rows]
        input_ids, attention_mask = self._left_padded([items[index].prompt_ids for index, _ in rows])
        self._pass_observer("generate", len(rows), input_ids.numel())
        media = self._media_inputs([items[index].media for index, _ in rows], attention_mask, left_padded=True)
        penalties = Penalties(params, input_ids, attention_mask, self.description.vocab_size) if any(p.penalised for p in params) else None
        sampler = RowSampler(
            params, [sample_seed(p.seed, j) for p, (_, j) in zip(params, rows)],
            max(p.top_logprobs for p in params), self.config.logprobs_mode, penalties, self.device,
        )
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(max(p.max_tokens for p in params)),
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([RowStops(input_ids.shape[1], params, self.stop_ids, self.decode, self.device)]),
            **media,
        )
        new_tokens = output[:, input_ids.shape[1] :].cpu().numpy()  # [R, S]
        token_logprobs, top_logprobs, top_ids = sampler.recorded()
        samples: list[list[Sample]] = [[] for _ in items]
        for row, ((index, _), p) in enumerate(zip(rows, params)):
            sample = self._sample(new_tokens[row], token_logprobs[row], top_logprobs[row], top_ids[row], p)
            samples[index].extend([sample] * (p.n if p.temperature == 0 else 1))
        return [GenerateResult(samples=s, prompt_tokens=len(item.prompt_ids), model_version=self.model_version)
                for s, item in zip(samples, items)]

    @staticmethod
    def _rows_of(item: GenerateItem) -> int:
        return item.params.n if item.params.temperature > 0 else 1

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        # A fresh config, so defaults shipped with the model (top_k=50, penalties) do not bend the
        # samples; the loop runs greedy over the one-token scores `RowSampler` leaves, and each
        # row's end (its own end tokens and stop strings) is `RowStops`'s to decide.
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _sample(
        self, tokens: np.ndarray, token_logprobs: np.ndarray, top_logprobs: np.ndarray, top_ids: np.ndarray,
        params: SamplingParams,
    ) -> Sample:
        """One row's sample, cut where it ended (`cut_sample`), with its distributions."""
        cut = cut_sample(tokens.tolist(), params, self.stop_ids, self.decode)
        k, length = params.top_logprobs, cut.length
        return Sample(
            token_ids=tokens[:length].astype(np.int32),
            token_logprobs=token_logprobs[:length],
            top_ids=top_ids[:length, :k],
            top_logprobs=top_logprobs[:length, :k],
            text=cut.text,
            finish_reason=cut.finish_reason,
            stop_reason=cut.stop_reason,
        )
