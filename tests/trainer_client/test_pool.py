"""The teacher pool against real replicas: grouping, balancing, failover, probing back, refusals."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest

from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.pool import PoolRunner, TeacherPool, TeacherSpec
from trainer_client.teachers import TeacherRequestError, TeacherUnavailable

REQUEST = {"sequences": [{"prompt": "what is 12+34?", "completion": " 46"}], "top_logprobs": 4}
GROUP = "tiny-teacher"  # the last path component of the tiny model's directory


def start_teacher(model: str, http_port: int = 0, grpc_port: int = 0) -> BackgroundTeacher:
    options = ServeOptions(model=model, http_port=http_port, grpc_port=grpc_port, grace_seconds=2.0)
    return BackgroundTeacher(options).start()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, seconds: float, poke=lambda: None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        poke()
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def replicas(tiny_model_dir):
    running = [start_teacher(tiny_model_dir), start_teacher(tiny_model_dir)]
    yield running
    for replica in running:
        replica.stop()


# --- specs ---


def test_spec_options_come_from_the_fragment():
    spec = TeacherSpec.parse("grpc://node1:50051#name=math&tags=math,large&weight=2&max_concurrency=3")
    assert spec == TeacherSpec("grpc://node1:50051", name="math", tags=("math", "large"), weight=2.0, max_concurrency=3)
    assert TeacherSpec.parse("http://node2:8000") == TeacherSpec("http://node2:8000")
    pinned = TeacherSpec.parse("openai+http://node3:8000/v1?model=qwen#fingerprint=ab12&vocab_size=384")
    assert pinned.url == "openai+http://node3:8000/v1?model=qwen"
    assert (pinned.fingerprint, pinned.vocab_size, pinned.weight, pinned.max_concurrency) == ("ab12", 384, 1.0, 8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grpc://h:1#colour=red", "unknown option 'colour'"),
        ("grpc://h:1#weight=0", "weight must be a positive number"),
        ("grpc://h:1#weight=heavy", "could not convert"),
        ("grpc://h:1#max_concurrency=0", "max_concurrency must be at least 1"),
        ("grpc://h:1#name=a&name=b", "given twice"),
        ("ftp://h:1", "scheme must be one of"),
    ],
)
def test_bad_specs_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        TeacherSpec.parse(text)


# --- grouping and balancing ---


def test_replicas_form_one_teacher_and_share_the_traffic(replicas, teacher):
    first, second = replicas
    specs = [
        f"{first.grpc_url}#tags=math",
        f"{second.http_url}#tags=chat",
        f"{teacher.grpc_url}#name=judge&tags=judge&weight=0.5",
    ]

    async def work():
        async with await TeacherPool.connect(specs) as pool:
            groups = {group.name: group for group in pool.groups()}
            answers = [await pool.score(GROUP, REQUEST) for _ in range(6)]
            answers += await asyncio.gather(*(pool.score(GROUP, REQUEST) for _ in range(6)))
            return groups, [g.name for g in pool.groups("judge")], answers, pool.stats()

    groups, judges, answers, stats = asyncio.run(work())
    assert set(groups) == {GROUP, "judge"}
    assert groups[GROUP].urls == [first.grpc_url, second.http_url]
    assert groups[GROUP].tags == ("math", "chat") and groups[GROUP].weight == 1.0
    assert groups["judge"].weight == 0.5 and judges == ["judge"]
    assert stats[first.grpc_url]["requests"] >= 4 and stats[second.http_url]["requests"] >= 4
    assert stats[teacher.grpc_url]["requests"] == 0
    assert all(s["failures"] == 0 and s["outstanding"] == 0 for s in stats.values())
    for answer in answers[1:]:
        np.testing.assert_allclose(answer.results[0].top_logprobs, answers[0].results[0].top_logprobs, atol=1e-5)


def test_a_refused_request_is_not_retried(replicas):
    async def work():
        async with await TeacherPool.connect([r.grpc_url for r in replicas]) as pool:
            with pytest.raises(TeacherRequestError, match="top_logprobs"):
                await pool.score(GROUP, {**REQUEST, "top_logprobs": 1000})
            return pool.stats()

    stats = asyncio.run(work())
    assert sum(s["requests"] for s in stats.values()) == 1
    assert sum(s["refused"] for s in stats.values()) == 1
    assert all(s["alive"] and s["failures"] == 0 for s in stats.values())


def test_a_batch_over_the_teachers_max_batch_is_split_and_answered_in_order(tiny_model_dir):
    small = BackgroundTeacher(ServeOptions(model=tiny_model_dir, max_batch=2, grace_seconds=2.0)).start()
    sequences = [{"prompt": f"what is {a}+{a}?", "completion": f" {2 * a}"} for a in range(5)]

    async def work():
        async with await TeacherPool.connect([small.grpc_url, small.http_url]) as pool:
            split = await pool.score(GROUP, {"sequences": sequences, "top_logprobs": 3})
            alone = [await pool.score(GROUP, {"sequences": [s], "top_logprobs": 3}) for s in sequences]
            samples = await pool.generate(GROUP, {"prompts": [s["prompt"] for s in sequences], "n": 2, "max_tokens": 3})
            return pool.group(GROUP).info, split, alone, samples, pool.stats()

    try:
        info, split, alone, samples, stats = asyncio.run(work())
    finally:
        small.stop()
    assert info.max_batch == 2
    assert len(split.results) == 5
    for got, expected in zip(split.results, alone):
        np.testing.assert_array_equal(got.top_ids, expected.results[0].top_ids)
        np.testing.assert_allclose(got.top_logprobs, expected.results[0].top_logprobs, atol=1e-5)
    assert len(samples.results) == 5 and all(len(r.samples) == 2 for r in samples.results)
    assert sum(s["requests"] for s in stats.values()) == 3 + 5 + 3  # 5 items in batches of 2, then one by one
    assert all(s["requests"] > 0 for s in stats.values())  # the parts were spread over both endpoints


# --- failures ---


def test_failover_when_a_replica_stops_and_probe_back_when_it_returns(tiny_model_dir):
    steady, leaving = start_teacher(tiny_model_dir), start_teacher(tiny_model_dir)
    ports = (leaving.server.http_port, leaving.server.grpc_port)
    runner = PoolRunner.connect([steady.grpc_url, leaving.http_url], max_wait=30.0, probe_initial=0.1, probe_max=0.5)
    try:
        reference = runner.run(runner.pool.score(GROUP, REQUEST)).results[0]
        futures = [runner.score(GROUP, REQUEST) for _ in range(40)]
        assert wait_until(lambda: sum(f.done() for f in futures) >= 4, 30)
        leaving.stop()  # mid-stream: the rest are in flight or queued
        futures += [runner.score(GROUP, REQUEST) for _ in range(6)]
        for future in futures:
            np.testing.assert_allclose(future.result(60).results[0].top_logprobs, reference.top_logprobs, atol=1e-5)
        stats = runner.pool.stats()
        assert stats[leaving.http_url]["failures"] >= 1 and not stats[leaving.http_url]["alive"]
        assert stats[steady.grpc_url]["retries"] >= 1 and stats[steady.grpc_url]["failures"] == 0

        leaving = start_teacher(tiny_model_dir, *ports)  # back on the same ports
        served_before = stats[leaving.http_url]["requests"]
        back = wait_until(
            lambda: runner.pool.stats()[leaving.http_url]["requests"] > served_before + 1,
            20,
            poke=lambda: runner.run(runner.pool.score(GROUP, REQUEST)),
        )
        assert back and runner.pool.stats()[leaving.http_url]["alive"]
    finally:
        runner.close()
        steady.stop()
        leaving.stop()


def test_with_no_live_replica_a_request_waits_then_gives_up(tiny_model_dir):
    only = start_teacher(tiny_model_dir)
    ports = (only.server.http_port, only.server.grpc_port)
    runner = PoolRunner.connect([only.grpc_url], max_wait=1.0, probe_initial=0.1, probe_max=0.3)
    try:
        only.stop()
        started = time.monotonic()
        with pytest.raises(TeacherUnavailable, match=f"'{GROUP}' did not answer within max_wait=1s") as gave_up:
            runner.run(runner.pool.score(GROUP, REQUEST))
        assert 1.0 <= time.monotonic() - started < 15 and only.grpc_url in str(gave_up.value)

        runner.pool.max_wait = 60.0
        waiting = runner.score(GROUP, REQUEST)
        time.sleep(0.5)
        assert not waiting.done()
        only = start_teacher(tiny_model_dir, *ports)
        assert waiting.result(60).results[0].top_ids.shape == (len(waiting.result().results[0].token_ids), 4)
    finally:
        runner.close()
        only.stop()


def test_an_unreachable_endpoint_at_start_is_named(teacher):
    dead = f"grpc://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherUnavailable, match="did not answer at start") as refused:
        asyncio.run(TeacherPool.connect([teacher.grpc_url, dead], timeout=5.0))
    assert refused.value.url == dead and dead in str(refused.value) and teacher.grpc_url not in str(refused.value)


# --- white-box checks ---


def test_white_box_refuses_a_teacher_with_another_tokenizer(teacher):
    async def connect(specs, white_box=True, **checks):
        pool = await TeacherPool.connect(specs, require_white_box=white_box, **checks)
        await pool.close()
        return pool.groups()

    fingerprint = asyncio.run(connect([teacher.grpc_url], white_box=False))[0].info.tokenizer_fingerprint
    asyncio.run(connect([teacher.grpc_url], student_fingerprint=fingerprint, student_vocab_size=384))
    with pytest.raises(ValueError, match="tokenizes differently") as other_tokenizer:
        asyncio.run(connect([teacher.grpc_url], student_fingerprint="0" * 64))
    assert fingerprint in str(other_tokenizer.value) and "0" * 64 in str(other_tokenizer.value)
    with pytest.raises(ValueError, match="vocab_size 384 but the student has 320"):
        asyncio.run(connect([teacher.http_url], student_vocab_size=320))
    # Black-box methods take any teacher.
    asyncio.run(connect([teacher.grpc_url], white_box=False, student_fingerprint="0" * 64, student_vocab_size=320))

    # An OpenAI-compatible endpoint cannot report its tokenizer: refused unless pinned in its spec.
    openai = f"openai+{teacher.http_url}/v1"
    with pytest.raises(ValueError, match="unknown"):
        asyncio.run(connect([openai], student_fingerprint=fingerprint))
    pinned = f"{openai}#fingerprint={fingerprint}&vocab_size=384"
    [group] = asyncio.run(connect([pinned], student_fingerprint=fingerprint, student_vocab_size=384))
    assert group.info.tokenizer_fingerprint == fingerprint and group.info.vocab_size == 384
