"""`potstill eval`: the trainer's held-out evaluation as a command, for any saved model.

    potstill eval --model runs/x/final --data eval.jsonl --verifier integer --teacher grpc://t:50051

Reports the model's cross-entropy on the rows' reference completions, its verified accuracy
(with `--verifier` and rows carrying an `answer`), and its KL to each teacher separately
(forward KL(teacher || model) on the teacher's top-k at temperature 1, tail as a bucket), in
`eval.json` and `eval.md` under `--output`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from potstill.devices import DEVICE_HELP, DEVICE_PATTERN, check_device
from potstill.flags import add_schema_arguments, settings_values
from potstill.usage import UsageError
from trainer_client.data import load_rows
from trainer_client.evaluation import Evaluator
from trainer_client.methods import attach_teacher_distributions, reference_group
from trainer_client.pool import PoolRunner
from trainer_client.samples import PromptGroup, StudentTokens
from trainer_client.student_model import load_model, load_processor, load_tokenizer
from trainer_client.verifiers import VERIFIERS, get_verifier


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model to evaluate: a path (a run's final/, adapters included) or a hub id.")
    data: str = Field(description="Rows (JSONL): 'prompt' or 'messages', 'completion' for CE and KL, 'answer' for accuracy.")
    teachers: list[str] = Field(default_factory=list, description="Teacher endpoints to measure KL to, each separately.")
    output: str = Field("eval", description="Folder for eval.json and eval.md.")
    rows: int | None = Field(None, ge=1, description="Evaluate only the first N rows (none: all).")
    verifier: str | None = Field(None, description=f"Checks greedy answers against rows' 'answer': {', '.join(VERIFIERS)}.")
    max_new_tokens: int = Field(16, ge=1, description="Longest greedy completion when checking accuracy.")
    top_k: int = Field(20, ge=1, description="Teacher log-probs per position for the KL.")
    max_seq_len: int = Field(512, ge=8, description="Prompt + completion tokens kept per row.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="The model's dtype.")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=f"Where the model runs: {DEVICE_HELP}.")
    teacher_timeout: float = Field(60.0, gt=0, description="Seconds per teacher request.")
    api_key_file: str | None = Field(None, description="File with the teachers' API key.")


def evaluate(config: EvalConfig) -> dict[str, float]:
    """The metrics, also written to `output/eval.json` and `output/eval.md`."""
    device = check_device(config.device)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, config.dtype).to(device).eval()
    tokens = StudentTokens(tokenizer, config.max_seq_len, load_processor(config.model))
    rows = list(load_rows(config.data).rows[: config.rows])
    verify = get_verifier(config.verifier) if config.verifier else None
    references = _reference_groups(rows, tokens)
    examples = [example for group in references for example in group.examples(tokens)]
    results = Evaluator(rows, examples, tokens, verify, config.max_new_tokens)(model)
    if config.teachers:
        results.update(_kl_per_teacher(config, model, tokens, rows))
    _write_summary(Path(config.output), config, results)
    return results


def _reference_groups(rows, tokens: StudentTokens) -> list[PromptGroup]:
    return [reference_group(row, tokens) for row in rows if row.completion is not None]


def _kl_per_teacher(config: EvalConfig, model, tokens: StudentTokens, rows) -> dict[str, float]:
    if not any(row.completion is not None for row in rows):
        raise UsageError(f"{config.data}: KL to teachers needs rows with a 'completion'")
    api_key = Path(config.api_key_file).read_text().strip() if config.api_key_file else None
    results = {}
    with PoolRunner.connect(
        config.teachers, api_key=api_key, timeout=config.teacher_timeout, require_white_box=True,
        student_fingerprint=tokens.fingerprint,
        student_vocab_size=model.get_output_embeddings().weight.shape[0], tokenizer=tokens.tokenizer,
    ) as runner:
        for teacher in runner.pool.groups():
            groups = _reference_groups(rows, tokens)
            runner.run(attach_teacher_distributions(runner.pool, [[teacher.name]] * len(groups), tokens, groups, config, temperature=1.0))
            viewed = [example for group in groups for example in group.examples(tokens)]
            results[f"eval/kl/{teacher.name}"] = Evaluator([], viewed, tokens, None, config.max_new_tokens)(model)["eval/kl"]
            if teacher.name in runner.pool.versions():  # the weights the KL was measured against
                results[f"eval/teacher_version/{teacher.name}"] = runner.pool.versions()[teacher.name]
    return results


def _write_summary(output: Path, config: EvalConfig, results: dict[str, float]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps({"model": config.model, "data": config.data, **results}, indent=2))
    lines = [f"# Evaluation of `{config.model}`\n", f"on `{config.data}`\n", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_shown(name, value)} |" for name, value in results.items()]
    (output / "eval.md").write_text("\n".join(lines) + "\n")


def _shown(name: str, value: float) -> str:
    if name == "eval/accuracy":
        return f"{value:.1%}"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", dest="teachers", action="append", metavar="URL",
                        help="teacher endpoint to measure KL to (repeatable; default: none)")
    add_schema_arguments(parser, EvalConfig, skip={"teachers"})


def main(args: argparse.Namespace) -> None:
    config = EvalConfig(**settings_values(args, EvalConfig))
    results = evaluate(config)
    print(json.dumps(results))
    print(f"summary: {Path(config.output) / 'eval.md'}")
