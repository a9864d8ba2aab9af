"""Server faults are retried elsewhere; a teacher back from an outage is used again at once.

A crashed handler (HTTP 500, gRPC INTERNAL) used to end a training run as if the request were
bad; the client now classifies errors by the kind the teacher sends in gRPC trailing metadata.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainer_client.pool import PoolRunner
from trainer_client.teachers import TeacherRequestError, TeacherUnavailable

from .test_pool import GROUP, REQUEST, start_teacher


async def _crash(request):
    raise RuntimeError("a bug in the teacher")


@pytest.fixture(scope="module")
def crashing_and_sound(tiny_model_dir):
    crashing, sound = start_teacher(tiny_model_dir), start_teacher(tiny_model_dir)
    crashing.server.service.score = _crash
    yield crashing, sound
    crashing.stop()
    sound.stop()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_server_fault_is_transient_and_a_bad_request_is_not(crashing_and_sound, transport):
    crashing, sound = crashing_and_sound
    runner = PoolRunner.connect([getattr(crashing, f"{transport}_url")])
    client = runner.pool.groups()[0].endpoints[0].client
    try:
        with pytest.raises(TeacherUnavailable, match="internal error") as failed:
            runner.run(client.score(REQUEST))
        assert not failed.value.overloaded
        with pytest.raises(TeacherRequestError) as refused:
            runner.run(client.score({**REQUEST, "top_logprobs": 10**6}))
        assert refused.value.field == "top_logprobs" and "top_logprobs:" not in refused.value.message
    finally:
        runner.close()


def test_a_crashing_replica_is_retried_on_the_other(crashing_and_sound):
    crashing, sound = crashing_and_sound
    runner = PoolRunner.connect([crashing.grpc_url, sound.http_url], max_wait=30.0, probe_initial=0.1, probe_max=0.5)
    try:
        answers = [runner.score(GROUP, REQUEST).result(60) for _ in range(6)]
        assert all(a.results[0].top_ids.shape[1] == 4 for a in answers)
        stats = runner.pool.stats()
        assert stats[crashing.grpc_url]["failures"] >= 1 and stats[sound.http_url]["retries"] >= 1
    finally:
        runner.close()


def test_a_teacher_back_from_an_outage_is_used_again_without_waiting_out_its_probe_backoff(tiny_model_dir):
    only = start_teacher(tiny_model_dir)
    ports = (only.server.http_port, only.server.grpc_port)
    # Scheduled probes would come only after 1000 s: the answer below proves the pool probes at once.
    runner = PoolRunner.connect([only.grpc_url], max_wait=60.0, probe_initial=1000.0, probe_max=1000.0)
    try:
        reference = runner.run(runner.pool.score(GROUP, REQUEST)).results[0]
        only.stop()
        with pytest.raises(TeacherUnavailable):
            runner.run(_once(runner))
        only = start_teacher(tiny_model_dir, *ports)
        again = runner.score(GROUP, REQUEST).result(60).results[0]
        np.testing.assert_allclose(again.top_logprobs, reference.top_logprobs, atol=1e-5)
    finally:
        runner.close()
        only.stop()


async def _once(runner: PoolRunner):
    """One request straight to the stopped endpoint, so the pool marks it dead."""
    endpoint = runner.pool.groups()[0].endpoints[0]
    return await runner.pool._attempt(endpoint, "score", REQUEST, is_retry=False)


def test_probe_backoff_doubles_up_to_five_seconds_by_default(tiny_model_dir):
    leaving = start_teacher(tiny_model_dir)
    runner = PoolRunner.connect([leaving.grpc_url])  # the default backoff: 0.5 s doubling, at most 5 s
    endpoint = runner.pool.groups()[0].endpoints[0]
    try:
        leaving.stop()
        with pytest.raises(TeacherUnavailable):
            runner.run(_once(runner))
        delays = [endpoint.probe_delay]
        for _ in range(6):
            runner.run(runner.pool._probe(endpoint))
            delays.append(endpoint.probe_delay)
        assert not endpoint.alive
        assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    finally:
        runner.close()
