"""One schema for a training run: every default lives here, with its help text and range.

A run is configured by flags alone or by `--config run.yaml` with flags overriding the file;
both land in `TrainConfig`, whose errors name the offending key.
"""

from __future__ import annotations

import os
import string
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from potstill.devices import DEVICE_HELP, DEVICE_PATTERN
from trainer_client.data import Columns

Method = Literal["sft", "seq-kd", "multi-sample", "logit-kd", "guided", "on-policy", "self-distill", "grpo", "visd"]
# Methods whose loss is on the student's own samples, scored by the teachers (trainer_client.on_policy).
ON_POLICY_METHODS = ("on-policy", "self-distill")
# Methods that need the teachers' top-k log-probs in the student's vocabulary.
WHITE_BOX_METHODS = ("logit-kd", *ON_POLICY_METHODS, "visd")
# Methods that learn from the student's own samples by a verifier reward (trainer_client.visd).
RL_METHODS = ("grpo", "visd")
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tv"]
Route = Literal["mixture", "tags", "verified", "confidence", "lowest-ce", "gate"]
Selection = Literal["all", "verifier", "majority", "confidence", "judge"]
# The routes white-box distillation can apply (it mixes or picks teachers' distributions).
WHITE_BOX_ROUTES = ("mixture", "tags", "lowest-ce")
# `--teacher` words naming the student itself as a teacher (trainer_client.self_teacher).
SELF_TEACHERS = ("self", "ema", "lagged")
# What a self-distill privileged prompt may name (trainer_client.on_policy.privileged_prompt).
PRIVILEGED_FIELDS = ("prompt", "reference", "answer", "completion", "verdict", "feedback")
DEFAULT_JUDGE_RUBRICS = {"correctness": "Question: {prompt}\nProposed answer: {completion}\nIs the proposed answer correct?"}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- what is trained, from whom, on what ---
    student: str = Field(description="Student model: a local path or a hub id (AutoModelForCausalLM, or AutoModelForImageTextToText "
                                     "with its processor for a vision-language model).")
    student_media: Literal["pixels", "none"] = Field(
        "pixels", description="What the student sees of rows' images and video: 'pixels' (through its processor), or 'none': "
        "the text only, while teachers still receive the media (an ablation; a text-only student).")
    teachers: list[str] = Field(
        default_factory=list,
        description="Teacher endpoints: grpc://, grpcs://, http(s)://, openai+http(s)://...; "
        "append '#name=N&tags=a,b&weight=W' to name, tag or weight one. Or one self-teacher: self (the student "
        "as it started, frozen), ema (an EMA of the student), lagged (a copy refreshed every teacher_push_interval steps).",
    )
    data: str = Field(description="Training rows with a prompt, optional completion and answer: a JSONL file, a Parquet "
                      "file, a directory saved by datasets' save_to_disk, or a hub dataset name.")
    eval_data: str | None = Field(None, description="Held-out rows (same forms as data); defaults to none (no evaluation).")
    prompt_column: str = Field("prompt", description="Column of a Parquet / datasets source holding the prompt.")
    completion_column: str = Field("completion", description="Column holding the reference completion (optional in the data).")
    answer_column: str = Field("answer", description="Column holding the verifiable answer (optional in the data).")
    data_split: str = Field("train", description="Split of a hub dataset or saved DatasetDict used for training.")
    eval_split: str = Field("test", description="Split of a hub dataset or saved DatasetDict used for evaluation.")
    data_streaming: bool = Field(False, description="Read --data as a stream (hub dataset, Parquet or JSONL file), with no "
                                 "local copy: for data larger than memory and disk. Training shuffles it through a buffer.")
    shuffle_buffer: int = Field(10_000, ge=1, description="Rows in the shuffle buffer of streamed training data.")
    output: str = Field("runs/potstill", description="Run directory: metrics.jsonl, checkpoints/, final/, report.")
    resume: bool = Field(False, description="Continue from the newest checkpoint in the output directory.")
    overwrite: bool = Field(False, description="Start over in an output directory that holds a previous run (its metrics and checkpoints are deleted).")
    skip_bad_rows: bool = Field(False, description="Skip malformed data rows (counted) instead of failing.")

    # --- the method ---
    method: Method = Field("logit-kd", description="sft: reference completions; seq-kd: teacher samples as targets; "
                           "multi-sample: several samples per prompt from each routed teacher, kept or weighted by --select (R-MSD); "
                           "logit-kd: a divergence to the teachers' top-k log-probs; "
                           "guided: the student's own verified samples, teachers asked only where all of them fail (AMPO); "
                           "on-policy: the student samples, the teachers score its tokens, the loss is a divergence on them (GKD); "
                           "self-distill: on-policy, the teacher (e.g. --teacher ema) scoring under a privileged prompt "
                           "(--privileged-template); "
                           "grpo: policy gradient on the student's samples with the group-relative verifier reward (no teacher); "
                           "visd: grpo whose per-token magnitudes come from a self-teacher shown judge feedback (VISD).")
    loss: Divergence = Field("forward_kl", description="Divergence on the teachers' top-k (logit-kd; on-policy and "
                             "self-distill with on_policy_loss topk).")
    beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD interpolation (0 = forward KL, 1 = reverse KL).")
    tail: Literal["bucket", "renormalize"] = Field("bucket", description="Top-k tail: a (k+1)-th bucket, or renormalise.")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature (the loss is scaled by its square).")
    top_k: int = Field(20, ge=1, description="Teacher log-probs per position (k).")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the cross-entropy on the target tokens added to logit-kd.")
    kd_targets: Literal["data", "teacher"] = Field(
        "data", description="logit-kd on the dataset's completions, or on teacher samples."
    )
    samples_per_prompt: int = Field(1, ge=1, description="Teacher samples per prompt, from each teacher asked (seq-kd, multi-sample, guided, logit-kd on samples).")
    sample_temperature: float = Field(1.0, ge=0, description="Teacher sampling temperature (0 = greedy).")
    max_new_tokens: int = Field(32, ge=1, description="Longest teacher (or student) sample.")
    route: Route | None = Field(
        None, description="Which teachers a row learns from: mixture (one per row by weight; logit-kd: all, mixed), "
        "tags (those tagged with the row's task/tags), or one teacher per row: verified (most verified samples), "
        "confidence (highest mean token log-prob), lowest-ce (lowest cross-entropy on the row's reference), "
        "gate (a learned router on the student's prompt representation). Default: tags for multi-sample, mixture otherwise.",
    )
    select: Selection = Field(
        "all", description="Which teacher samples count (seq-kd, multi-sample): all; verifier (accepted against 'answer'); "
        "majority (the most common answer, read by the verifier's extractor); confidence (weight exp(mean token log-prob)); "
        "judge (weight = the judge's P(yes) averaged over rubric dimensions).",
    )
    select_fallback: Literal["drop", "all", "reference"] = Field(
        "drop", description="When no sample of a prompt survives --select: drop the prompt, keep all its samples, "
        "or train on the row's reference completion."
    )
    judges: list[str] = Field(default_factory=list, description="Judge endpoints (any teacher service), scoring samples "
                              "through /v1/score for --select judge.")
    judge_rubrics: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_JUDGE_RUBRICS),
        description="Judge prompt per dimension, with {prompt} and {completion}; a dimension's score is "
        "P(judge_yes) / (P(judge_yes) + P(judge_no)) after it.",
    )
    judge_yes: str = Field(" yes", min_length=1, description="The continuation whose probability is a judge's 'yes'.")
    judge_no: str = Field(" no", min_length=1, description="The continuation whose probability is a judge's 'no'.")
    student_samples: int = Field(4, ge=1, description="Student samples per prompt (guided, on-policy, self-distill; grpo and "
                                 "visd: the group size G).")
    student_temperature: float = Field(1.0, ge=0, description="Student sampling temperature (guided, on-policy, self-distill, "
                                       "grpo, visd; 0 = greedy).")
    gkd_lambda: float = Field(
        1.0, ge=0, le=1, validation_alias=AliasChoices("gkd_lambda", "lambda"),
        description="on-policy, self-distill: the probability that a micro-batch is the student's own samples; otherwise it "
        "is the dataset's completions, scored by the teachers the same way (GKD's lambda; 1 = always on-policy).",
    )
    on_policy_update: Literal["supervised", "policy-gradient"] = Field(
        "supervised", description="on-policy, self-distill: supervised backpropagates the divergence (on_policy_loss); "
        "policy-gradient weighs each sampled token's log-prob by the advantage -k(y) (kl_estimator, clamped by "
        "advantage_clip) plus reward_weight x the verifier's verdict (REINFORCE).",
    )
    on_policy_loss: Literal["topk", "sampled"] = Field(
        "topk", description="Supervised on-policy loss: topk is --loss (jsd with --beta, reverse_kl, ...) on the teachers' "
        "top-k with --tail at every sampled position; sampled is the per-token estimate (kl_estimator) at the sampled token.",
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token reverse-KL estimate at a sampled token y: k1 = log q(y) - log p(y), "
        "k3 = p(y)/q(y) - 1 - log(p(y)/q(y)) (on_policy_loss sampled, and the policy-gradient advantage).",
    )
    advantage_clip: float = Field(5.0, gt=0, description="policy-gradient: each token's advantage is clamped to "
                                  "[-advantage_clip, advantage_clip] before the reward is added.")
    reward_weight: float = Field(0.0, ge=0, description="policy-gradient: added to every token's advantage of a sample the "
                                 "verifier accepts (needs --verifier); 0 = no verifier reward.")
    privileged_template: str = Field(
        "Reference answer: {reference}\n\n{prompt}", description="self-distill: the teacher's prompt, from the row's "
        "{prompt}, {reference} (its completion), {answer}, the student's {completion}, the verifier's {verdict} (correct / "
        "incorrect; needs --verifier) or the judge's {feedback} (rubric scores; needs --judge).",
    )
    visd_judge: Literal["rules", "model"] = Field(
        "rules", description="visd: who scores each rollout's quality dimensions: rules (correctness by the verifier, "
        "consistency: it states an answer the verifier reads, grounding: the reference answer's characters it matches in "
        "place) or model (the --judge endpoint on each --judge-rubric dimension).",
    )
    visd_teacher_prompt: str = Field(
        "Feedback on the answer: {feedback}\n{prompt}", description="visd: the privileged prompt the teacher scores each "
        "rollout after; the fields of privileged_template, {feedback} being the judge's scores ('consistency: 1.00; "
        "correctness: 0.00; grounding: 0.67').",
    )
    visd_clip: float = Field(0.5, ge=0, le=1, description="visd: per-token magnitudes are clipped to [1 - visd_clip, "
                             "1 + visd_clip] (0 = grpo).")
    curriculum: Literal["none", "pass-rate"] = Field(
        "none", description="grpo, visd: pass-rate draws curriculum_pool x batch_size prompts per micro-batch and trains on "
        "the batch_size the student passes most often without having mastered them (easy first; unseen prompts count as 0.5).",
    )
    curriculum_pool: int = Field(4, ge=1, description="Prompts drawn per trained prompt by --curriculum pass-rate.")
    gate_lr: float = Field(1e-2, gt=0, description="Learning rate of the routing gate (--route gate).")
    gate_balance: float = Field(0.01, ge=0, description="Weight of the gate's load-balancing term (--route gate).")
    adversarial_weight: float = Field(
        0.0, ge=0, description="Weight of the adversarial term (multi-sample): a discriminator on the student's pooled "
        "hidden states tells teacher samples from the student's own; the student gets the non-saturating GAN loss. 0 = off.",
    )
    loss_chunk_size: int = Field(1024, ge=1, description="Positions per chunk of the student-side loss: the largest "
                                 "tensor the loss holds is [chunk, vocabulary] logits.")

    # --- optimisation ---
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Prompts per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW). 3e-4 suits models of ~100M and below; "
                      "use ~1e-5 to 5e-5 for billion-parameter students.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear learning-rate warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    max_seq_len: int = Field(512, ge=8, description="Prompt + completion tokens kept per example.")
    seed: int = Field(0, ge=0, description="Seeds data order, sampling and new weights; a run is a function of it.")

    # --- the student's precision, memory and device ---
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Student weights' dtype (float16 wants a GPU; bfloat16 halves memory on CPU too)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, more time.")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=f"Where the student trains: {DEVICE_HELP}.")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp: shard the student's weights, gradients and optimizer state across the processes of a "
        "torchrun launch (FSDP2); for methods without student rollouts (sft, seq-kd, logit-kd, multi-sample)."
    )

    # --- LoRA adapters (peft) ---
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 trains every weight, more trains only adapters of this rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA adapters' input.")
    lora_target_modules: list[str] | None = Field(
        None, description="Comma-separated module names to adapt; by default peft's choice for the architecture "
        "(q_proj,v_proj for Llama, Qwen, Mistral).",
    )
    merge_lora: bool = Field(False, description="Also save final/merged: the adapters folded into a plain model.")

    # --- bookkeeping ---
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = Field(
        "none", description="Experiment tracker fed the metrics (metrics.jsonl is always written); "
        "wandb and mlflow need the potstill[wandb] / potstill[mlflow] extras.",
    )
    log_every: int = Field(10, ge=1, description="Steps between metrics lines (and progress lines off a terminal).")
    eval_every: int = Field(50, ge=1, description="Steps between held-out evaluations.")
    eval_rows: int = Field(256, ge=1, description="Held-out rows used per evaluation.")
    save_every: int = Field(100, ge=1, description="Checkpoint interval (steps).")
    verifier: str | None = Field(None, description="Checks generated answers against rows' 'answer' (e.g. 'integer').")
    eval_max_new_tokens: int = Field(16, ge=1, description="Longest greedy completion when checking accuracy.")

    # --- teachers over the network ---
    prefetch: int = Field(4, ge=0, description="Batches prepared ahead of the optimizer (0 = wait for teachers each step).")
    teacher_timeout: float = Field(60.0, gt=0, description="Seconds per teacher request.")
    teacher_max_wait: float = Field(600.0, gt=0, description="Seconds to wait for a teacher to come back before stopping.")
    api_key_file: str | None = Field(None, description="File with the teachers' API key.")
    teacher_ca_file: str | None = Field(
        None, description="PEM certificates to trust for grpcs:// and https:// teachers (default: the system's roots).",
    )

    # --- self-teachers (--teacher self|ema|lagged) ---
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA self-teacher: after every step ema = d * ema + (1 - d) * student.")
    teacher_push_interval: int = Field(10, ge=1, description="Steps between weight pushes to an ema or lagged self-teacher "
                                       "(each push is served as model version step + 1).")
    teacher_push: Literal["stream", "path"] = Field(
        "stream", description="How a push travels: streamed safetensors bytes, or a file under --output whose path the teacher "
        "reads (it must see the same filesystem).",
    )
    self_teacher_url: str | None = Field(None, description="A running teacher service (grpc(s):// or http(s)://) to serve the "
                                         "self-teacher, its weights replaced by pushes; default: the trainer starts one on loopback.")
    admin_key_file: str | None = Field(None, description="File with the admin key of --self-teacher-url, sent with weight pushes.")

    # --- teachers from disk (`potstill collect` makes the cache) ---
    teacher_cache: str | None = Field(None, description="Teacher cache directory written by `potstill collect`: teacher "
                                      "answers are read from it instead of asking the --teacher endpoints.")
    record_teacher_cache: str | None = Field(None, description="Write every teacher answer this run receives to a teacher "
                                             "cache directory, a shard per run (or resumed part of one); single-process runs.")
    cache_miss: Literal["error", "live"] = Field("error", description="A request the cache cannot answer: stop with an "
                                                 "error, or ask the live --teacher endpoints (live).")

    @field_validator("student", "data", "eval_data", "output", "api_key_file", "teacher_ca_file", "teacher_cache", "record_teacher_cache",
                     "admin_key_file")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        # A hub id ("org/model") has no "~" and passes through unchanged.
        return os.path.expanduser(value) if value else value

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value):
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @field_validator("judge_rubrics")
    @classmethod
    def _rubrics_name_the_completion(cls, rubrics: dict[str, str]) -> dict[str, str]:
        for dimension, template in rubrics.items():
            if "{completion}" not in template:
                raise ValueError(f"judge rubric {dimension!r} must contain '{{completion}}'")
        return rubrics

    @field_validator("privileged_template", "visd_teacher_prompt")
    @classmethod
    def _template_names_known_fields(cls, template: str, info: ValidationInfo) -> str:
        named = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        unknown = sorted(named - set(PRIVILEGED_FIELDS))
        if unknown:
            raise ValueError(f"{info.field_name} names {{{unknown[0]}}}; it may use {', '.join(PRIVILEGED_FIELDS)}")
        return template

    @model_validator(mode="after")
    def _settings_fit_the_method(self) -> TrainConfig:
        if self.method not in ("sft", "grpo") and not self.teachers and not self.teacher_cache:
            raise ValueError(f"method {self.method!r} needs at least one --teacher or a --teacher-cache")
        if self.cache_miss == "live" and not (self.teachers and self.teacher_cache):
            raise ValueError("cache_miss 'live' needs a --teacher-cache and --teacher endpoints to answer what it lacks")
        if self.record_teacher_cache and (self.teacher_cache or not self.teachers):
            raise ValueError("record_teacher_cache records live --teacher answers; it cannot be used with a --teacher-cache")
        if self.route is None:
            self.route = "tags" if self.method == "multi-sample" else "mixture"
        needs_verifier = [
            why for why, applies in (
                (f"method {self.method}", self.method in ("guided", *RL_METHODS)),
                ("reward_weight", self.reward_weight > 0),
                ("privileged_template {verdict}", self.method == "self-distill" and "{verdict}" in self.privileged_template),
                (f"select {self.select}", self.select in ("verifier", "majority")),
                ("route verified", self.route == "verified"),
            ) if applies
        ]
        if needs_verifier and not self.verifier:
            raise ValueError(f"{needs_verifier[0]} needs --verifier (e.g. 'integer')")
        if self.select == "judge" and not self.judges:
            raise ValueError("select judge needs a judge endpoint: --judge URL")
        if self.white_box and self.route not in WHITE_BOX_ROUTES:
            raise ValueError(f"{self.method} routes by {', '.join(WHITE_BOX_ROUTES)}; route {self.route!r} needs teacher samples")
        if self.adversarial_weight and self.method != "multi-sample":
            raise ValueError("adversarial_weight applies to method multi-sample")
        self._check_on_policy()
        self._check_rl()
        self._check_self_teacher()
        self._check_sharding()
        return self

    def _check_on_policy(self) -> None:
        if self.method not in ON_POLICY_METHODS:
            return
        if self.on_policy_update == "supervised" and self.on_policy_loss == "sampled" and self.kl_estimator == "k1":
            raise ValueError("on_policy_loss sampled with kl_estimator k1: backpropagating log q(y) - log p(y) at fixed samples "
                             "has a zero expected gradient; use kl_estimator k3, on_policy_loss topk or on_policy_update policy-gradient")
        if self.on_policy_update == "policy-gradient" and self.gkd_lambda < 1:
            raise ValueError("on_policy_update policy-gradient needs the student's own samples in every batch: set --lambda 1")
        if self.reward_weight and self.on_policy_update != "policy-gradient":
            raise ValueError("reward_weight applies to on_policy_update policy-gradient")
        if self.teacher_cache:
            raise ValueError(f"method {self.method} scores the student's fresh samples; a --teacher-cache cannot hold them")
        if self.method == "self-distill" and "{feedback}" in self.privileged_template and not self.judges:
            raise ValueError("privileged_template {feedback} needs a judge endpoint: --judge URL")

    def _check_rl(self) -> None:
        if self.curriculum != "none" and self.method not in RL_METHODS:
            raise ValueError(f"curriculum {self.curriculum!r} orders the prompts of grpo and visd, not of {self.method}")
        if self.method == "grpo" and self.teachers:
            raise ValueError("method grpo learns from the verifier reward alone; it takes no --teacher")
        if self.method != "visd":
            return
        if len(self.teachers) != 1 or self.teacher_cache:
            raise ValueError("method visd scores rollouts with one live teacher: --teacher ema (or self, lagged, or a "
                             "teacher with the student's tokenizer)")
        if self.visd_judge == "model" and not self.judges:
            raise ValueError("visd_judge model needs a judge endpoint: --judge URL")

    def _check_sharding(self) -> None:
        if self.sharding == "none":
            return
        # A sharded forward pass is a collective: every process must run the same passes, which
        # student sampling (different lengths per process) does not.
        rollouts = (f"method {self.method}" if self.method in ("guided", *ON_POLICY_METHODS, *RL_METHODS)
                    else "adversarial_weight" if self.adversarial_weight else None)
        if rollouts:
            raise ValueError(f"sharding fsdp needs every process to run the same forward passes; {rollouts} samples from the student")
        if self.lora_r:
            raise ValueError("sharding fsdp shards full weights; LoRA students (lora_r) train few enough to use data parallelism")
        if any(spec in SELF_TEACHERS for spec in self.teachers):
            raise ValueError("sharding fsdp does not serve self-teachers (they push the student's whole weights)")

    def _check_self_teacher(self) -> None:
        named = [spec for spec in self.teachers if spec in SELF_TEACHERS]
        if len(named) > 1:
            raise ValueError(f"one self-teacher per run; --teacher names {', '.join(named)}")
        if self.self_teacher_url and not named:
            raise ValueError("self_teacher_url serves a self-teacher: add --teacher self, ema or lagged")
        if not named:
            return
        if self.lora_r:
            raise ValueError(f"--teacher {named[0]} pushes the student's full weights; it does not support LoRA students (lora_r)")
        if self.teacher_cache or self.record_teacher_cache:
            raise ValueError(f"--teacher {named[0]} changes while the run trains: it cannot be read from or recorded into a teacher cache")

    @property
    def live_teachers(self) -> bool:
        """Whether the run talks to the --teacher endpoints (with a cache, only for its misses)."""
        return bool(self.teachers) and (not self.teacher_cache or self.cache_miss == "live")

    @property
    def columns(self) -> Columns:
        return Columns(prompt=self.prompt_column, completion=self.completion_column, answer=self.answer_column)

    @property
    def white_box(self) -> bool:
        return self.method in WHITE_BOX_METHODS
