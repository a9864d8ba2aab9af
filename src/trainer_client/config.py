"""One schema for a training run: every default lives here, with its help text and range.

A run is configured by flags alone or by `--config run.yaml` with flags overriding the file;
both land in `TrainConfig`, whose errors name the offending key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Method = Literal["sft", "seq-kd", "logit-kd"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tv"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- what is trained, from whom, on what ---
    student: str = Field(description="Student model: a local path or a hub id (AutoModelForCausalLM).")
    teachers: list[str] = Field(
        default_factory=list,
        description="Teacher endpoints: grpc://, grpcs://, http(s)://, openai+http(s)://...; "
        "append '#name=N&tags=a,b&weight=W' to name, tag or weight one.",
    )
    data: str = Field(description="Training rows: a JSONL file with 'prompt', optional 'completion' and 'answer'.")
    eval_data: str | None = Field(None, description="Held-out rows (JSONL); defaults to none (no evaluation).")
    output: str = Field("runs/potstill", description="Run directory: metrics.jsonl, checkpoints/, final/, report.")
    resume: bool = Field(False, description="Continue from the newest checkpoint in the output directory.")
    skip_bad_rows: bool = Field(False, description="Skip malformed data rows (counted) instead of failing.")

    # --- the method ---
    method: Method = Field("logit-kd", description="sft: reference completions; seq-kd: teacher samples as targets; "
                           "logit-kd: a divergence to the teachers' top-k log-probs.")
    loss: Divergence = Field("forward_kl", description="Divergence for logit-kd.")
    beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD interpolation (0 = forward KL, 1 = reverse KL).")
    tail: Literal["bucket", "renormalize"] = Field("bucket", description="Top-k tail: a (k+1)-th bucket, or renormalise.")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature (the loss is scaled by its square).")
    top_k: int = Field(20, ge=1, description="Teacher log-probs per position (k).")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the cross-entropy on the target tokens added to logit-kd.")
    kd_targets: Literal["data", "teacher"] = Field(
        "data", description="logit-kd on the dataset's completions, or on teacher samples."
    )
    samples_per_prompt: int = Field(1, ge=1, description="Teacher samples per prompt (seq-kd, logit-kd on samples).")
    sample_temperature: float = Field(1.0, ge=0, description="Teacher sampling temperature (0 = greedy).")
    max_new_tokens: int = Field(32, ge=1, description="Longest teacher sample.")

    # --- optimisation ---
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Prompts per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW). 3e-4 suits models of ~100M and below; "
                      "use ~1e-5 to 5e-5 for billion-parameter students.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    max_seq_len: int = Field(512, ge=8, description="Prompt + completion tokens kept per example.")
    seed: int = Field(0, ge=0)

    # --- bookkeeping ---
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_rows: int = Field(256, ge=1, description="Held-out rows used per evaluation.")
    save_every: int = Field(100, ge=1, description="Checkpoint interval (steps).")
    verifier: str | None = Field(None, description="Checks generated answers against rows' 'answer' (e.g. 'integer').")
    eval_max_new_tokens: int = Field(16, ge=1)

    # --- teachers over the network ---
    prefetch: int = Field(4, ge=0, description="Batches prepared ahead of the optimizer (0 = wait for teachers each step).")
    teacher_timeout: float = Field(60.0, gt=0, description="Seconds per teacher request.")
    teacher_max_wait: float = Field(600.0, gt=0, description="Seconds to wait for a teacher to come back before stopping.")
    api_key_file: str | None = Field(None, description="File with the teachers' API key.")

    @field_validator("student", "data", "eval_data", "output", "api_key_file")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        # A hub id ("org/model") has no "~" and passes through unchanged.
        return os.path.expanduser(value) if value else value

    @model_validator(mode="after")
    def _teachers_for_method(self) -> TrainConfig:
        if self.method != "sft" and not self.teachers:
            raise ValueError(f"method {self.method!r} needs at least one --teacher")
        return self

    @property
    def white_box(self) -> bool:
        return self.method == "logit-kd"


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The YAML file's keys (dashes or underscores), then every override that is not None."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        values = {key.replace("-", "_"): value for key, value in loaded.items()}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return TrainConfig(**values)
