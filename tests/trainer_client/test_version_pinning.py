"""A pool pinned to a model version, against a real teacher whose weights are pushed by `WeightPusher`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from potstill.toy.models import build_tiny_model
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.pool import PoolRunner
from trainer_client.teachers import TeacherRequestError, TeacherUnavailable
from trainer_client.weight_push import WeightPusher

ADMIN = "pin-admin"
REQUEST = {"sequences": [{"prompt": [5, 6, 7], "completion": [8, 9]}], "top_logprobs": 2}


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "other", seed=1)
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


@pytest.fixture
def admin_teacher(tiny_model_dir):
    options = ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0, admin_keys=(ADMIN,), grace_seconds=1.0)
    with BackgroundTeacher(options) as server:
        yield server


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_pinned_pool_refuses_answers_on_other_weights_until_pinned_again(admin_teacher, other_weights, transport):
    url = admin_teacher.http_url if transport == "http" else admin_teacher.grpc_url
    pusher = WeightPusher(url, ADMIN)
    with PoolRunner.connect([f"{admin_teacher.grpc_url}#name=t&model_version=1"], max_wait=1.0) as runner:
        assert runner.score("t", REQUEST).result().results[0].model_version == 1
        assert runner.pool.versions() == {"t": 1}

        assert runner.run(pusher.push_tensors(other_weights)) == 2
        with pytest.raises(TeacherUnavailable, match="model_version 2, but the pool pins 1"):
            runner.score("t", REQUEST).result()

        runner.pool.pin_version("t", 2)
        answer = runner.score("t", REQUEST).result()
        assert answer.results[0].model_version == 2 and runner.pool.versions() == {"t": 2}
        assert runner.run(pusher.push_tensors(other_weights, model_version=30)) == 30
        runner.pool.pin_version("t", None)  # unpinned: any version is taken, and noted
        assert runner.generate("t", {"prompts": [[5, 6]], "max_tokens": 2}).result().results[0].model_version == 30
        assert runner.pool.versions() == {"t": 30}


def test_a_push_with_the_wrong_admin_key_is_a_request_error(admin_teacher, other_weights):
    with PoolRunner() as runner:
        for url in (admin_teacher.http_url, admin_teacher.grpc_url):
            pusher = WeightPusher(url, "wrong")
            with pytest.raises(TeacherRequestError, match="admin key"):
                runner.run(pusher.push_tensors(other_weights))
    