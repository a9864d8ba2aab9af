"""metrics.jsonl, the run's source of truth, and the experiment tracker it is mirrored to.

Trackers are accelerate's (TensorBoard, Weights & Biases, MLflow), so each library is driven by
its own client: TensorBoard event files under `<output>/tensorboard/`, wandb under `<output>/wandb`
(WANDB_MODE=offline works without an account), MLflow at MLFLOW_TRACKING_URI or, when unset, a
local SQLite store `<output>/mlflow.db` (`mlflow ui --backend-store-uri sqlite:///<output>/mlflow.db`). On resume, tracker points past the checkpoint may repeat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_client.rundir import whole_records

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
EXTRAS = {"tensorboard": "train", "wandb": "wandb", "mlflow": "mlflow"}


def accelerator_tracking(report_to: str, output: Path) -> dict[str, Any]:
    """`Accelerator(**...)` arguments for `report_to` ('none': no tracker); fails early if its library is missing."""
    if report_to == "none":
        return {}
    import importlib.util

    if importlib.util.find_spec(TRACKER_PACKAGES[report_to]) is None:
        raise ValueError(
            f"--report-to {report_to} needs the {TRACKER_PACKAGES[report_to]} package: pip install 'potstill[{EXTRAS[report_to]}]'"
        )
    return {"log_with": report_to, "project_dir": str(output)}


def start_tracking(accelerator, report_to: str, output: Path, config: dict[str, Any]) -> None:
    """Open the run in the tracker with the run's settings as its hyper-parameters."""
    if report_to == "none":
        return
    if report_to == "mlflow":
        _default_mlflow_store(output)
    flat = {key: value if isinstance(value, int | float | str | bool) else json.dumps(value) for key, value in config.items()}
    init = {"wandb": {"dir": str(output), "name": output.name}} if report_to == "wandb" else {}
    project = "tensorboard" if report_to == "tensorboard" else output.name
    accelerator.init_trackers(project, config=flat, init_kwargs=init)


def finish_tracking(accelerator) -> None:
    """Close the tracker's run (files flushed, run marked finished). Not `accelerator.end_training`:
    that also tears down the process group, which the final save still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _default_mlflow_store(output: Path) -> None:
    import os

    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(f"sqlite:///{(output / 'mlflow.db').resolve()}")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with its `step`, mirrored to the tracker.
    On resume, lines past the checkpoint (written by the interrupted run after it) are dropped so
    no step appears twice, and so is a torn last line. Only the main process of a distributed run touches the file."""

    def __init__(self, path: Path, keep_through_step: int | None, accelerator=None):
        self.path = path
        self.accelerator = accelerator
        self.writer = accelerator is None or accelerator.is_main_process
        if self.writer and path.exists():
            # A torn last line (the run was killed while writing it) is dropped with the lines past the checkpoint.
            records = whole_records(path.read_text()) if keep_through_step is not None else []
            path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= keep_through_step))

    def write(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as log:
            log.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
