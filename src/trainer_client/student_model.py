"""The student: loaded in the asked dtype on a checked device, optionally wrapped in LoRA adapters.

With `lora_r > 0` only the adapters train (peft); checkpoints hold the whole wrapped model's state,
so `--resume` restores adapters and optimizer alike. `final/` then holds the adapter (loadable with
`AutoModelForCausalLM.from_pretrained` where peft is installed) and, with `merge_lora`, `final/merged/`
a plain model with the adapters folded into its weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from potstill import vision
from potstill.fingerprint import tokenizer_fingerprint
from potstill.usage import UsageError, check_model_source
from trainer_client.config import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name: str):
    """The student's tokenizer; `UsageError` naming --student where there is no such model."""
    check_model_source("--student", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:  # transformers' "not a valid model identifier", "Repo id must be…"
        reason = " ".join(str(error).split())[:200]
        raise UsageError(f"--student {name}: not a model directory, and not found on the hub ({reason})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_vision_student(name: str) -> bool:
    """Whether the model takes pixels (its config has a vision tower); a LoRA adapter's folder is a causal LM's."""
    try:
        return getattr(AutoConfig.from_pretrained(name), "vision_config", None) is not None
    except (OSError, ValueError):  # no config.json: an adapter
        return False


def load_processor(name: str):
    """A vision-language student's processor (it prepares the pixels of rows with images or video); None for a text model."""
    return vision.load_processor(name) if is_vision_student(name) else None


def student_fingerprint(name: str, tokenizer) -> str:
    """The student's tokenizer fingerprint as teachers report theirs: a vision student's covers its processor's media tokens."""
    processor = load_processor(name)
    return tokenizer_fingerprint(processor if processor is not None else tokenizer)


def load_model(name: str, dtype: str = "float32"):
    """A causal LM, or an image-text-to-text model for a vision-language student, from a path or hub
    id; a folder holding a LoRA adapter loads with its base model."""
    auto = AutoModelForImageTextToText if is_vision_student(name) else AutoModelForCausalLM
    return auto.from_pretrained(name, dtype=DTYPES[dtype])


def load_student(config: TrainConfig):
    """(tokenizer, model) as the config asks: dtype, gradient checkpointing, LoRA adapters."""
    tokenizer = load_tokenizer(config.student)
    model = load_model(config.student, config.dtype)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the cache is recomputed anyway, and transformers warns
    if config.lora_r:
        model = wrap_lora(model, config)
    return tokenizer, model


def wrap_lora(model, config: TrainConfig):
    """The model with LoRA adapters on `lora_target_modules`, or on peft's default modules for its architecture."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    targets = config.lora_target_modules or DEFAULT_TARGETS.get(model.config.model_type)
    if not targets:
        raise ValueError(
            f"no default LoRA target modules for the {model.config.model_type!r} architecture; "
            "name them with --lora-target-modules (e.g. q_proj,v_proj)"
        )
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(targets), task_type="CAUSAL_LM",
    )
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    return get_peft_model(model, lora)


def transformer_model(model):
    """The transformers model inside a LoRA wrapper (its adapters injected in place), or the model itself:
    what code reading `base_model`, `get_output_embeddings` or the forward's signature expects."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_student(model, tokenizer, directory: Path, merge_lora: bool, weights: dict | None = None) -> None:
    """The model (or its adapter) and tokenizer under `directory`; with `merge_lora`, also `directory/merged`.
    `weights`: the full state of a sharded model (its own parameters hold only this process's shards)."""
    if weights is not None:  # tied weights once, as save_pretrained writes them from the model itself
        weights = {name: tensor for name, tensor in weights.items() if name not in getattr(model, "all_tied_weights_keys", {})}
    model.save_pretrained(directory, state_dict=weights)
    tokenizer.save_pretrained(directory)
    if merge_lora and hasattr(model, "merge_and_unload"):
        merged = model.merge_and_unload()
        merged.save_pretrained(directory / "merged")
        tokenizer.save_pretrained(directory / "merged")
