"""What a new user's mistakes and a failing run look like: one line, the right exit status, nothing lost.

A mistake is one line on stderr naming the flag or file, exit status 2 (a traceback only with
`--debug`); a run stopped by a fault checkpoints first and names the `--resume` command; the run
directory has one writer, keeps its old run unless told otherwise, and survives torn writes.
"""

from __future__ import annotations

import fcntl
import json

import pytest
import torch
from safetensors.torch import load_file

from potstill.cli import main as cli_main
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from potstill.usage import UsageError
from trainer_client import rundir
from trainer_client.checkpoints import checkpointed_step
from trainer_client.config import TrainConfig
from trainer_client.rundir import LOCK_FILE, stop_note
from trainer_client.tracking import MetricsLog
from trainer_client.trainer import train


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("run-faults") / "student", seed=2, hidden_size=32))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_jsonl(make_rows(64, seed=0), tmp_path_factory.mktemp("run-faults-data") / "train.jsonl"))


def _sft(student, data, output, *extra: str) -> list[str]:
    return ["train", "--student", student, "--data", data, "--method", "sft", "--output", str(output),
            "--steps", "4", "--batch-size", "4", "--save-every", "2", "--log-every", "1", *extra]


def _config(student, data, output, **overrides) -> TrainConfig:
    settings = dict(student=student, data=data, method="sft", output=str(output), steps=4, batch_size=4, save_every=2, log_every=1)
    return TrainConfig(**{**settings, **overrides})


def _user_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2, err
    assert "Traceback" not in err, err
    message = err.splitlines()[-1]  # (lines before it are transformers' loading bars)
    assert message.startswith("potstill ") and " error: " in message, err
    return message


def test_each_user_mistake_is_one_line_and_exit_status_2(student, data, tmp_path, capsys):
    out = tmp_path / "run"
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "1+1=", "completion": "2"}\nnot json\n')
    cases = [
        (_sft(student, data, out, "--loss", "kll"), "--loss"),
        (_sft(student, data, out, "--steps", "-1"), "--steps"),
        (_sft(student, str(tmp_path / "missing.jsonl"), out), "missing.jsonl: no such file"),
        (_sft(student, str(bad_jsonl), out), "bad.jsonl:2"),
        (_sft(student, data, out, "--teacher", "ftp://host:1", "--method", "logit-kd"), "ftp://host:1"),
        (_sft(student, data, out, "--teacher", "grpc://127.0.0.1:9", "--method", "logit-kd", "--teacher-timeout", "2"), "127.0.0.1:9"),
        (_sft(str(tmp_path / "no-such-student"), data, out), "--student"),
        (_sft("./no/such/student", data, out), "--student ./no/such/student: no such directory"),
    ]
    for argv, named in cases:
        assert named in _user_error(capsys, argv), argv


def test_debug_shows_the_traceback(student, tmp_path):
    with pytest.raises(Exception, match="no such file"):
        cli_main(["--debug", *_sft(student, str(tmp_path / "missing.jsonl"), tmp_path / "run")])


def test_an_empty_api_key_file_refuses_to_serve(tmp_path, capsys, student):
    key = tmp_path / "key"
    key.write_text(" \n")
    err = _user_error(capsys, ["serve", "--model", student, "--api-key-file", str(key), "--http-port", "0", "--grpc-port", "0"])
    assert "empty" in err


def test_a_second_trainer_on_one_output_is_refused(student, data, tmp_path, capsys):
    output = tmp_path / "run"
    with rundir.locked(output):  # a first trainer holds the directory
        err = _user_error(capsys, _sft(student, data, output))
    assert "in use by another trainer" in err and "pid" in err
    train(_config(student, data, output), progress=False)  # released: the directory is free again
    with (output / LOCK_FILE).open() as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and nothing holds it after the run


def test_a_previous_run_is_kept_unless_resumed_or_overwritten(student, data, tmp_path, capsys):
    output = tmp_path / "run"
    train(_config(student, data, output), progress=False)
    err = _user_error(capsys, _sft(student, data, output))
    assert "--resume" in err and "--overwrite" in err
    train(_config(student, data, output, overwrite=True, steps=2), progress=False)
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_torn_metrics_line_and_a_half_written_checkpoint_do_not_block_resume(student, data, tmp_path):
    straight = train(_config(student, data, tmp_path / "straight"), progress=False)
    output = tmp_path / "run"
    train(_config(student, data, output, steps=2), progress=False)
    with (output / "metrics.jsonl").open("a") as log:
        log.write('{"step": 3, "lo')  # killed mid-line
    partial = output / "checkpoints" / "step-00000003"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 4096)  # killed mid-save: no marker
    resumed = train(_config(student, data, output, resume=True), progress=False)
    assert not partial.exists()
    steps = [json.loads(line)["step"] for line in (resumed.output / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    expected, actual = load_file(straight.output / "final" / "model.safetensors"), load_file(resumed.output / "final" / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_a_fault_mid_run_checkpoints_first_and_names_the_resume_command(student, data, tmp_path, capsys, monkeypatch):
    from trainer_client import trainer

    real_step = trainer.train_step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("something broke\nover several lines")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", failing_step)
    argv = _sft(student, data, tmp_path / "run", "--save-every", "100")
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 1 and "Traceback" not in err, err
    err = err.splitlines()[-1]
    assert "something broke over several lines" in err and "2 completed steps are checkpointed" in err
    assert err.endswith("potstill " + " ".join(argv) + " --resume")
    assert checkpointed_step(tmp_path / "run") == 2


def test_a_full_disk_is_named_and_its_partial_checkpoint_removed(student, data, tmp_path, monkeypatch):
    from trainer_client import checkpoints

    def disk_full(model, filename, **kwargs):
        with open(filename, "wb") as partial:
            partial.write(b"\0" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 0\nframe #0: c10::...")

    monkeypatch.setattr(checkpoints, "save_model", disk_full)
    with pytest.raises(OSError) as stopped:
        train(_config(student, data, tmp_path / "run"), progress=False)
    message = str(stopped.value)
    assert "could not write the checkpoint of step 2" in message and "MiB free" in message and "\n" not in message
    assert "steps since the last checkpoint are lost" in stop_note(stopped.value)
    assert not (tmp_path / "run" / "checkpoints" / "step-00000002").exists()


def test_a_torn_line_other_than_the_last_is_an_error(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(UsageError, match="line 2"):
        MetricsLog(log, keep_through_step=2)
