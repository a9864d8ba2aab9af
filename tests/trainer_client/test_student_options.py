"""The student's options: LoRA adapters, dtype, gradient checkpointing, device, trackers, chat rows, run output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from potstill.cli import main as cli_main
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from trainer_client.config import TrainConfig
from trainer_client.trainer import train


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("student") / "student", seed=2, hidden_size=48))


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> str:
    return str(write_jsonl(make_rows(64, seed=0), tmp_path_factory.mktemp("rows") / "train.jsonl"))


def _sft(student, rows, output, **overrides) -> TrainConfig:
    settings = dict(student=student, data=rows, output=str(output), method="sft", steps=4, batch_size=4,
                    lr=1e-2, warmup_steps=0, save_every=2, log_every=1)
    return TrainConfig(**{**settings, **overrides})


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_trains_only_adapters_and_saves_adapter_and_merged_model(student, rows, tmp_path):
    result = train(_sft(student, rows, tmp_path / "run", lora_r=4, lora_alpha=8, merge_lora=True), progress=False)
    final = result.output / "final"
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]  # Llama's default
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # B starts at zero: it trained
    # The merged model is a plain model with changed attention weights and untouched MLPs.
    base = AutoModelForCausalLM.from_pretrained(student)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert not (final / "merged" / "adapter_config.json").exists()
    q = "model.layers.0.self_attn.q_proj.weight"
    mlp = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])
    assert torch.equal(merged.state_dict()[mlp], base.state_dict()[mlp])
    # The adapter folder itself loads through transformers' peft integration, same outputs as merged.
    with_adapter = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.tensor([[1, 20, 30, 40]])
    torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_resume_from_a_checkpoint_restores_the_adapters(student, rows, tmp_path, capsys):
    """Resuming the finished run from its step-2 checkpoint replays steps 3-4 to the same adapter."""
    config = _sft(student, rows, tmp_path / "run", lora_r=4)
    train(config, progress=False)
    expected = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    capsys.readouterr()
    train(config.model_copy(update={"resume": True}), progress=False)
    assert f"resumed from step 2 ({tmp_path / 'run' / 'checkpoints' / 'step-00000002'})" in capsys.readouterr().out
    actual = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_lora_on_an_unknown_architecture_asks_for_target_modules(student, rows, tmp_path, monkeypatch):
    from peft.utils import constants

    monkeypatch.delitem(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "llama")
    with pytest.raises(ValueError, match="--lora-target-modules"):
        train(_sft(student, rows, tmp_path / "run", lora_r=4), progress=False)
    result = train(_sft(student, rows, tmp_path / "run", lora_r=4, lora_target_modules="q_proj, up_proj"), progress=False)
    assert sorted(json.loads((result.output / "final" / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "up_proj"]


def test_bfloat16_student_with_gradient_checkpointing_trains(student, rows, tmp_path):
    result = train(_sft(student, rows, tmp_path / "run", dtype="bfloat16", gradient_checkpointing=True, steps=3), progress=False)
    saved = load_file(result.output / "final" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    losses = [m["loss"] for m in _metrics(result.output) if "loss" in m]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # finite, not NaN


def test_cuda_on_a_cpu_only_torch_is_one_line_for_train_and_serve(student, rows, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in (["train", "--student", student, "--data", rows, "--method", "sft", "--output", str(tmp_path), "--device", "cuda"],
                 ["serve", "--model", student, "--device", "cuda:1"]):
        with pytest.raises(SystemExit) as exited:
            cli_main(argv)
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "use --device cpu" in error, error
        assert error.startswith(f"potstill {argv[0]}: error: --device cuda"), error


def test_tensorboard_gets_the_same_metrics_as_metrics_jsonl(student, rows, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_sft(student, rows, tmp_path / "run", report_to="tensorboard"), progress=False)
    events = list((result.output / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, list(result.output.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    logged = {(e.step, round(e.value, 5)) for e in accumulator.Scalars("loss")}
    expected = {(m["step"], round(m["loss"], 5)) for m in _metrics(result.output) if "loss" in m}
    assert logged == expected and len(expected) == 4


def test_wandb_offline_run_records_the_metrics(student, rows, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(_sft(student, rows, tmp_path / "run", report_to="wandb"), progress=False)
    [run] = (result.output / "wandb").glob("offline-run-*/run-*.wandb")
    # The run file (what `wandb sync` uploads) holds each logged loss as its JSON text.
    recorded = run.read_bytes()
    losses = [m["loss"] for m in _metrics(result.output) if "loss" in m]
    assert len(losses) == 4 and all(json.dumps(loss).encode() in recorded for loss in losses)


def test_mlflow_local_store_records_the_metrics(student, rows, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train(_sft(student, rows, tmp_path / "run", report_to="mlflow"), progress=False)
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{result.output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("run")
    [run] = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert run.data.params["method"] == "sft"


def test_chat_rows_render_with_the_students_template_and_reach_teachers_as_turns(student, tmp_path, teacher):
    chat = [{"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"]}], "answer": r["answer"]} for r in make_rows(32, seed=0)]
    data = write_jsonl(chat, tmp_path / "chat.jsonl")
    result = train(_sft(student, str(data), tmp_path / "sft", eval_data=str(data), eval_rows=8, verifier="integer",
                        eval_every=4, eval_max_new_tokens=4), progress=False)
    assert "eval/accuracy" in _metrics(result.output)[-1]
    # seq-kd sends the turns; the teacher renders them with its template and samples a completion.
    config = _sft(student, str(data), tmp_path / "seq", method="seq-kd", teachers=[teacher.http_url],
                  sample_temperature=0.0, max_new_tokens=4, steps=2)
    result = train(config, progress=False)
    assert json.loads((result.output / "teacher_traffic.json").read_text())[teacher.http_url]["requests"] >= 2


def test_chat_rows_become_prompt_turns_and_completion(student):
    from trainer_client.data import Row
    from trainer_client.samples import PromptGroup, StudentTokens
    from trainer_client.student_model import load_tokenizer

    tokenizer = load_tokenizer(student)
    tokens = StudentTokens(tokenizer, 64)
    row = Row.model_validate({"messages": [{"role": "user", "content": "12+30="}, {"role": "assistant", "content": "42"}]})
    assert row.completion == "42" and row.prompt_text == "12+30="
    assert tokenizer.decode(tokens.prompt(row.prompt)) == "<|user|>12+30=<|assistant|>"
    # Teachers get the turns (and render them with their own template); text prompts go as the student's ids.
    assert PromptGroup(row, tokens.prompt(row.prompt)).teacher_prompt() == [{"role": "user", "content": "12+30="}]
    text = Row(prompt="12+30=")
    assert PromptGroup(text, tokens.prompt(text.prompt)).teacher_prompt() == tokenizer("12+30=")["input_ids"]
    with pytest.raises(ValueError, match="not both"):
        Row.model_validate({"prompt": "x", "messages": [{"role": "user", "content": "y"}]})


def test_chat_rows_load_from_parquet_too(tmp_path):
    import datasets

    from trainer_client.data import load_rows

    turns = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}, {"role": "assistant", "content": "002"}]
    datasets.Dataset.from_list([{"messages": turns, "answer": "002"}] * 3).to_parquet(tmp_path / "chat.parquet")
    rows = load_rows(str(tmp_path / "chat.parquet")).rows
    assert len(rows) == 3
    assert rows[0].chat_turns() == turns[:2] and rows[0].completion == "002" and rows[0].answer == "002"


def test_progress_off_a_terminal_is_plain_lines_and_the_last_line_names_the_report(student, rows, tmp_path, capsys, caplog):
    cli_main(["train", "--student", student, "--data", rows, "--method", "sft", "--steps", "4", "--batch-size", "2",
              "--log-every", "2", "--save-every", "2", "--output", str(tmp_path / "run")])
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"]
    assert all("loss" in line and "eta" in line and "━" not in line for line in progress), progress
    assert lines[-1] == f"report: {tmp_path / 'run' / 'report.md'}"
    # Checkpoints of a model with tied embeddings (safetensors, tied weights stored once) log no
    # "Removed shared tensor" warning into the output.
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_report_shows_accuracy_as_a_percentage(tmp_path):
    from trainer_client.report import write_report

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.125}\n{"step": 10, "eval/accuracy": 0.8375}\n')
    assert "last: 83.8% at step 10" in write_report(tmp_path).read_text()
