"""Liveness and readiness apart, and /metrics behind the API key only when asked."""

from __future__ import annotations

import httpx

from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher


def test_liveness_holds_while_readiness_follows_loading_and_draining(tiny_model_dir):
    with BackgroundTeacher(ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0)) as teacher:
        assert httpx.get(teacher.http_url + "/health/ready").json() == {"status": "ok"}
        teacher.server.service.begin_drain()
        assert httpx.get(teacher.http_url + "/health/ready").status_code == 503
        assert httpx.get(teacher.http_url + "/health/live").status_code == 200


def test_metrics_can_require_the_api_key(tiny_model_dir):
    options = ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0, api_key="k", metrics_need_api_key=True)
    with BackgroundTeacher(options) as teacher:
        assert httpx.get(teacher.http_url + "/metrics").status_code == 401
        answer = httpx.get(teacher.http_url + "/metrics", headers={"Authorization": "Bearer k"})
        assert answer.status_code == 200 and "potstill_requests_total" in answer.text
