"""`potstill eval` against a real teacher service: KL per teacher, CE, verified accuracy, summaries."""

from __future__ import annotations

import json

import pytest

from potstill.cli import main as cli_main
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from trainer_client.data import Row
from trainer_client.evaluation import greedy_completions
from trainer_client.samples import StudentTokens
from trainer_client.student_model import load_model, load_tokenizer


def test_eval_reports_kl_per_teacher_ce_and_accuracy(tiny_model_dir, teacher, tmp_path, capsys):
    # Answers: the model's own greedy completion on even rows, a wrong one on odd rows -> 50% accuracy.
    rows = make_rows(8, seed=3, split="eval")
    tokens = StudentTokens(load_tokenizer(tiny_model_dir), 512)
    completions = greedy_completions(load_model(tiny_model_dir), tokens, [Row(**r) for r in rows], 4)
    for index, (row, completion) in enumerate(zip(rows, completions)):
        row["answer"] = completion if index % 2 == 0 else completion + "never"
    data = write_jsonl(rows, tmp_path / "eval.jsonl")
    other = build_tiny_model(tmp_path / "other", seed=5, initializer_range=0.3)  # peaked: far from the teacher

    def run(model: str, output: str) -> dict:
        cli_main(["eval", "--model", model, "--data", str(data), "--teacher", f"{teacher.grpc_url}#name=same",
                  "--teacher", f"{teacher.http_url}#name=again", "--verifier", "exact", "--max-new-tokens", "4",
                  "--output", str(tmp_path / output)])
        *_, summary, last = capsys.readouterr().out.strip().splitlines()
        assert last == f"summary: {tmp_path / output / 'eval.md'}"
        assert json.loads((tmp_path / output / "eval.json").read_text())["model"] == model
        return json.loads(summary)

    itself = run(tiny_model_dir, "itself")
    assert itself["eval/accuracy"] == 0.5
    # The teacher's own model is at zero KL from it, through either transport.
    assert itself["eval/kl/same"] == pytest.approx(0.0, abs=1e-4)
    assert itself["eval/kl/again"] == pytest.approx(0.0, abs=1e-4)
    assert itself["eval/teacher_version/same"] == 1  # the weights the KL was measured against
    assert itself["eval/loss"] > 0
    different = run(str(other), "other")
    assert different["eval/kl/same"] > 0.1
    assert different["eval/kl/again"] == pytest.approx(different["eval/kl/same"], rel=1e-4)
    assert "| eval/accuracy | 50.0% |" in (tmp_path / "itself" / "eval.md").read_text()


def test_eval_of_chat_rows_without_teachers(tiny_model_dir, tmp_path):
    from trainer_client.evaluate import EvalConfig, evaluate

    chat = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}], "answer": "2"}] * 3
    results = evaluate(EvalConfig(model=tiny_model_dir, data=str(write_jsonl(chat, tmp_path / "chat.jsonl")),
                                  verifier="integer", output=str(tmp_path / "out"), max_new_tokens=2))
    assert set(results) == {"eval/loss", "eval/accuracy"}
    assert Row.model_validate(chat[0]).chat_turns() == chat[0]["messages"][:1]
