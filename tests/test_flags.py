"""Flags generated from a settings schema: help shows each default, choice and range; values
resolve from a YAML file, then the environment, then flags; bad values are refused by name."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from potstill.cli import build_parser
from potstill.flags import settings_values
from teacher_service.config import ENV_PREFIX, ServeOptions
from trainer_client.config import TrainConfig


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv).parse_args(argv)


def help_text(command: str) -> str:
    return build_parser([command])._subparsers._group_actions[0].choices[command].format_help()


def test_serve_help_lists_defaults_ranges_choices_and_environment_variables():
    text = " ".join(help_text("serve").split())
    assert "(default: 8000; range: >= 0, <= 65535; env: POTSTILL_HTTP_PORT)" in text
    assert "choices: float32, bfloat16, float16, auto" in text
    assert "(required; env: POTSTILL_MODEL)" in text
    assert "--config" in text


def test_train_help_lists_every_choice_and_range():
    text = " ".join(help_text("train").split())
    assert "choices: forward_kl, reverse_kl, jsd, tv" in text
    assert "choices: bucket, renormalize" in text and "choices: cosine, linear, constant" in text
    assert "(default: 16; range: >= 1)" in text  # --batch-size
    assert "env:" not in text  # the trainer reads flags and its YAML file only


def test_file_then_environment_then_flags(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("model: from-file\nhttp-port: 1\ngrpc_port: 2\nmax-batch: 3\n")
    environ = {f"{ENV_PREFIX}GRPC_PORT": "20", f"{ENV_PREFIX}MAX_BATCH": "30", "UNRELATED": "x"}
    args = parse(["serve", "--config", str(config), "--max-batch", "300"])
    options = ServeOptions(**settings_values(args, ServeOptions, args.config, ENV_PREFIX, environ))
    assert (options.model, options.http_port, options.grpc_port, options.max_batch) == ("from-file", 1, 20, 300)


def test_out_of_range_values_are_refused_naming_the_setting():
    args = parse(["serve", "--model", "m", "--http-port", "70000"])
    with pytest.raises(ValidationError, match="http_port"):
        ServeOptions(**settings_values(args, ServeOptions, None, ENV_PREFIX, {}))
    with pytest.raises(ValidationError, match="device"):
        ServeOptions(model="m", device="gpu")
    with pytest.raises(SystemExit):
        parse(["serve", "--dtype", "int4"])


def test_train_flags_reach_the_config(tmp_path):
    args = parse(["train", "--student", "s", "--data", "d.jsonl", "--method", "sft", "--steps", "7", "--resume", "--loss", "jsd"])
    config = TrainConfig(**settings_values(args, TrainConfig))
    assert (config.steps, config.resume, config.loss, config.teachers) == (7, True, "jsd", [])


@pytest.mark.parametrize("command", ["train", "serve", "eval"])
def test_every_option_shows_its_default_or_that_it_is_required(command):
    sub = build_parser([command])._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            assert "default: " in action.help or "required" in action.help, (action.option_strings, action.help)


def test_new_train_settings_show_choices_and_ranges():
    text = " ".join(help_text("train").split())
    assert "choices: float32, bfloat16, float16" in text  # --dtype
    assert "choices: none, tensorboard, wandb, mlflow" in text  # --report-to
    assert "(default: 0.05; range: >= 0, < 1)" in text  # --lora-dropout
