"""The deployment files start commands that exist: every `potstill` and `python -m potstill.toy`
command in the Dockerfile, the Compose stack and each rendered Kubernetes overlay is parsed by
the project's own parsers (and a `train` command's settings by its config schema), so renaming
a flag breaks CI here rather than a pod in a cluster. Linting and schema checks of the same
files run in `.ci/deploy-checks`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from potstill.cli import build_parser
from potstill.toy.__main__ import build_parser as toy_parser
from potstill.flags import settings_values
from trainer_client.config import TrainConfig
from trainer_client.pool import TeacherSpec

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = sorted(path.parent for path in (DEPLOY / "k8s" / "overlays").glob("*/kustomization.yaml"))
IMAGE_ENTRYPOINT = ["potstill"]  # the Dockerfile's ENTRYPOINT for both targets


def check_command(argv: list[str]) -> None:
    """Parse a container's full command line as the process would, or fail naming it."""
    if argv[:3] == ["python", "-m", "potstill.toy"]:
        toy_parser().parse_args(argv[3:])
        return
    if argv[0] == "torchrun":  # torchrun's own options, then the module it runs with its arguments
        start = argv.index("-m")
        assert argv[start + 1] == "potstill.cli", f"torchrun runs {argv[start + 1]}"
        argv = ["potstill", *argv[start + 2 :]]
    assert argv[0] == "potstill", f"unexpected program in {argv}"
    arguments = argv[1:]
    try:
        parsed = build_parser(arguments).parse_args(arguments)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            return
        pytest.fail(f"potstill refuses {' '.join(argv)} (exit {exit_.code})")
    if parsed.command == "train":
        config = TrainConfig(**settings_values(parsed, TrainConfig))
        for url in config.teachers:
            TeacherSpec.parse(url)


def container_commands(document: dict) -> list[list[str]]:
    """Each container's command line in a Deployment or Job: its command, else the image's entrypoint plus args."""
    spec = document["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    return [c.get("command") or IMAGE_ENTRYPOINT + c.get("args", []) for c in containers]


def dockerfile_cmd(target: str) -> list[str]:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
    return json.loads(re.search(r"^CMD (\[.*\])$", stage, re.MULTILINE).group(1))


def test_the_dockerfile_commands_parse():
    check_command(IMAGE_ENTRYPOINT + dockerfile_cmd("teacher"))
    check_command(IMAGE_ENTRYPOINT + dockerfile_cmd("trainer"))


def test_every_compose_service_command_parses():
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert set(services) == {"world", "teacher-a", "teacher-b", "trainer"}
    for name, service in services.items():
        check_command(service.get("entrypoint", IMAGE_ENTRYPOINT) + service["command"])
    trainer = services["trainer"]["command"]
    assert "grpc://teacher-a:50051" in trainer and "http://teacher-b:8000" in trainer


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the overlays")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda path: f"overlay-{path.name}")  # not "gpu": that id would read as the gpu mark
def test_every_overlay_renders_and_its_commands_parse(overlay):
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Job", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    workloads = [d for d in documents if d["kind"] in ("Deployment", "Job")]
    for workload in workloads:
        for argv in container_commands(workload):
            check_command(argv)
    teacher = next(d for d in workloads if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    args = teacher["containers"][0]["args"]
    grace = float(next(a for a in args if a.startswith("--grace-seconds=")).split("=")[1])
    # The pod is killed only after preStop and the service's own grace have both run out.
    pre_stop = float(teacher["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert teacher["terminationGracePeriodSeconds"] > grace + pre_stop


def test_the_toy_world_builder_makes_a_servable_teacher_and_a_trainable_run(tmp_path):
    from potstill.toy.__main__ import main
    from trainer_client.data import load_rows
    from transformers import AutoModelForCausalLM

    main([str(tmp_path), "--teacher-steps", "5", "--train-rows", "20", "--eval-rows", "4"])
    for model in ("arith", "student"):
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "models" / model).num_parameters() > 0
    assert len(load_rows(str(tmp_path / "data" / "train.jsonl"), False).rows) == 20
    assert len(load_rows(str(tmp_path / "data" / "eval.jsonl"), False).rows) == 4
    main([str(tmp_path / "trainer-node"), "--no-teacher", "--train-rows", "3", "--eval-rows", "1"])
    assert sorted(p.name for p in (tmp_path / "trainer-node" / "models").iterdir()) == ["student"]
