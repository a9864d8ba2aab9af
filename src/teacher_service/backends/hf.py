"""The Hugging Face transformers backend: any `AutoModelForCausalLM` on CPU or CUDA.

Scoring runs the model body once per micro-batch (bounded by `max_batch_tokens`), then applies
the output layer and the log-softmax only at completion positions, `max_logits_elements` at a
time, so memory stays bounded for long sequences and large vocabularies.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from potstill.fingerprint import tokenizer_fingerprint
from teacher_service.backends.base import BackendConfig, ModelDescription, SamplingParams, ScoreItem
from teacher_service.protocol import GenerateResult, Sample, ScoredSequence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _context_length(model_config, cap: int | None) -> int:
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


class HFBackend:
    name = "hf"

    def __init__(self, model, tokenizer, config: BackendConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(config.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.description = ModelDescription(
            vocab_size=model.get_output_embeddings().weight.shape[0],
            max_model_len=_context_length(model.config, config.max_model_len),
            eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        )
        # A sample ends at any end token the model declares (chat models add end-of-turn ids).
        declared = getattr(model.generation_config, "eos_token_id", None)
        declared = declared if isinstance(declared, list) else [declared]
        self.stop_ids = sorted({i for i in [tokenizer.eos_token_id, *declared] if i is not None})

    @classmethod
    def load(cls, config: BackendConfig) -> HFBackend:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=DTYPES[config.dtype])
        return cls(model.to(config.device).eval(), tokenizer, config)

    # --- tokenizer helpers ---

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def encode_continuation(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # --- scoring ---

    @torch.inference_mode()
    def score(self, items: list[ScoreItem], top_logprobs: int, temperature: float) -> list[ScoredSequence]:
        lengths = [len(item.prompt_ids) + len(item.completion_ids) for item in items]
        results: list[ScoredSequence | None] = [None] * len(items)
        for batch in _token_budget_batches(lengths, self.config.max_batch_tokens):
            scored = self._score_batch([items[i] for i in batch], top_logprobs, temperature)
            for index, result in zip(batch, scored):
                results[index] = result
        return results

    def _score_batch(self, items: list[ScoreItem], k: int, temperature: float) -> list[ScoredSequence]:
        sequences = [item.prompt_ids + item.completion_ids for item in items]
        input_ids, attention_mask = self._right_padded(sequences)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # The state at position t predicts token t + 1: a completion starting at p is read from p - 1.
        spans = [(len(item.prompt_ids) - 1, len(item.completion_ids)) for item in items]
        rows = torch.cat([hidden[b, start : start + length] for b, (start, length) in enumerate(spans)])
        targets = torch.tensor([t for item in items for t in item.completion_ids], device=self.device)
        token_logprobs, top_logprobs, top_ids = self._distributions(rows, targets, k, temperature)
        results, offset = [], 0
        for item, (_, length) in zip(items, spans):
            window = slice(offset, offset + length)
            offset += length
            results.append(
                ScoredSequence(
                    token_ids=np.asarray(item.completion_ids, dtype=np.int32),
                    token_logprobs=token_logprobs[window],
                    top_ids=top_ids[window],
                    top_logprobs=top_logprobs[window],
                    prompt_tokens=len(item.prompt_ids),
                )
            )
        return results

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
        self, hidden: torch.Tensor, targets: torch.Tensor, k: int, temperature: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-prob of each target and the top-k, chunked over positions: ([N], [N, k], [N, k])."""
        chunk = max(1, self.config.max_logits_elements // self.description.vocab_size)
        token_parts, value_parts, id_parts = [], [], []
        for start in range(0, hidden.shape[0], chunk):
            logprobs = torch.log_softmax(self._logits(hidden[start : start + chunk]) / temperature, dim=-1)
            token_parts.append(logprobs.gather(1, targets[start : start + chunk, None])[:, 0])
            values, ids = logprobs.topk(k, dim=-1, sorted=True)
            value_parts.append(values)
            id_parts.append(ids)
        return (
            torch.cat(token_parts).cpu().numpy().astype(np.float32),
            torch.cat(value_parts).cpu().numpy().astype(np.float32),
            torch.cat(id_parts).cpu().numpy().astype(np.int32),
        )

    # --- generation ---

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerateResult]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        per_prompt_tokens = params.n * (max(len(p) for p in prompts) + params.max_tokens)
        group = max(1, self.config.max_batch_tokens // per_prompt_tokens)
        results = []
        for start in range(0, len(prompts), group):
            results.extend(self._generate_group(prompts[start : start + group], params))
        return results

    def _generate_group(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerateResult]:
        input_ids, attention_mask = self._left_padded(prompts)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(params),
        )
        new_tokens = output.sequences[:, input_ids.shape[1] :]  # [B * n, S]
        # Raw logits (before temperature and top-p): the model's own distribution, as OpenAI reports it.
        logprobs = torch.log_softmax(torch.stack(output.logits, dim=1).float(), dim=-1)  # [B * n, S, V]
        samples = [self._sample(new_tokens[row], logprobs[row], params.top_logprobs) for row in range(len(new_tokens))]
        if params.temperature == 0:  # greedy decoding gives one answer; each of the n samples is that answer
            samples = [sample for sample in samples for _ in range(params.n)]
        return [
            GenerateResult(samples=samples[i * params.n : (i + 1) * params.n], prompt_tokens=len(prompt))
            for i, prompt in enumerate(prompts)
        ]

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # A fresh config, so defaults shipped with the model (top_k=50, penalties) do not bend the samples.
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        return GenerationConfig(
            max_new_tokens=params.max_tokens,
            num_return_sequences=params.n if params.temperature > 0 else 1,
            pad_token_id=self.pad_id,
            eos_token_id=self.stop_ids or None,
            return_dict_in_generate=True,
            output_logits=True,
            **(sampling if params.temperature > 0 else {"do_sample": False}),
        )

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _sample(self, tokens: torch.Tensor, logprobs: torch.Tensor, k: int) -> Sample:
        """One sample's tokens up to and including its first end token, with their distributions."""
        eos_positions = torch.isin(tokens, torch.tensor(self.stop_ids, device=tokens.device)).nonzero()
        finished = len(eos_positions) > 0
        length = int(eos_positions[0]) + 1 if finished else len(tokens)
        tokens, logprobs = tokens[:length], logprobs[:length]
        top_values, top_ids = logprobs.topk(k, dim=-1, sorted=True)
        ids = tokens.tolist()
        return Sample(
            token_ids=np.asarray(ids, dtype=np.int32),
            token_logprobs=logprobs.gather(1, tokens[:, None])[:, 0].cpu().numpy().astype(np.float32),
            top_ids=top_ids.cpu().numpy().astype(np.int32),
            top_logprobs=top_values.cpu().numpy().astype(np.float32),
            text=self.decode(ids),
            finish_reason="stop" if finished else "length",
        )
