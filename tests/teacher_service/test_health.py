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
    options = ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0, api_keys=("k",), metrics_need_api_key=True)
    with BackgroundTeacher(options) as teacher:
        assert httpx.get(teacher.http_url + "/metrics").status_code == 401
        answer = httpx.get(teacher.http_url + "/metrics", headers={"Authorization": "Bearer k"})
        assert answer.status_code == 200 and "potstill_requests_total" in answer.text


def test_key_lists_skip_blanks_and_comments_and_every_key_is_compared():
    from teacher_service.auth import bearer_matches, parse_keys

    assert parse_keys("# ops\nk1\n\n  k2  # rotated in March\nk3,k4\n") == ("k1", "k2", "k3", "k4")
    assert bearer_matches("Bearer k3", ("k1", "k2", "k3")) and bearer_matches("bearer k1", ("k1", "k2"))
    assert not bearer_matches("Bearer k", ("k1", "k2")) and not bearer_matches("Basic k1", ("k1",))
    assert not bearer_matches("Bearer ", ("k1",)) and not bearer_matches("Bearer k1", ())
