"""Cross-request batching: concurrent requests share passes, and each gets what it would get alone.

The `Batcher` is checked with a plain batch function that records its passes; the HF backend is
checked end to end: items with different k, temperatures, seeds, top-p and lengths, submitted
concurrently, equal the same items run one at a time.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from urllib.parse import urlparse

import numpy as np
import pytest

from teacher_service.backends.base import BackendConfig, GenerateItem, SamplingParams, ScoreItem
from teacher_service.backends.hf import HFBackend
from teacher_service.batching import Batcher, BatchingSettings

ATOL = 1e-5  # the same numbers through differently padded batches


class RecordingPasses:
    """A batch function that doubles its items and remembers each pass it was given."""

    def __init__(self, fail_on: int | None = None):
        self.passes: list[list[int]] = []
        self.fail_on = fail_on
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.release.wait()
        self.passes.append(items)
        if self.fail_on in items:
            raise RuntimeError(f"item {self.fail_on} broke the pass")
        return [2 * item for item in items]


def run(coroutine):
    """`coroutine` on a loop of its own, leaving this thread's current loop as it was (unlike
    asyncio.run, which leaves none, and code that asks for the current loop fails after it)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def run_batcher(passes: RecordingPasses, work, window_seconds=0.05, max_batch_tokens=100, cost=lambda item: 1):
    async def main():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as executor:
            return await work(Batcher(passes, cost, BatchingSettings(window_seconds, max_batch_tokens), executor))

    return run(main())


def test_concurrent_requests_share_one_pass_and_get_their_own_results():
    passes = RecordingPasses()

    async def work(batcher):
        return await asyncio.gather(*(batcher.submit([10 * r + i for i in range(3)]) for r in range(4)))

    results = run_batcher(passes, work)
    assert results == [[20 * r + 2 * i for i in range(3)] for r in range(4)]
    assert len(passes.passes) == 1 and sorted(passes.passes[0]) == [10 * r + i for r in range(4) for i in range(3)]


def test_the_token_budget_splits_passes_in_arrival_order():
    passes = RecordingPasses()

    async def work(batcher):
        return await asyncio.gather(batcher.submit([1, 2, 3]), batcher.submit([4, 50]))

    # cost = the item itself: 1+2+3+4 fit 10, 50 alone exceeds it but still runs.
    results = run_batcher(passes, work, max_batch_tokens=10, cost=lambda item: item)
    assert results == [[2, 4, 6], [8, 100]]
    assert passes.passes == [[1, 2, 3, 4], [50]]


def test_items_arriving_during_a_pass_share_the_next_one():
    passes = RecordingPasses()

    async def work(batcher):
        passes.release.clear()
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.1)  # the window is over: [1] is running, held by `release`
        later = [asyncio.ensure_future(batcher.submit([i])) for i in (2, 3, 4)]
        await asyncio.sleep(0.01)
        passes.release.set()
        return await first, await asyncio.gather(*later)

    assert run_batcher(passes, work, window_seconds=0.01) == ([2], [[4], [6], [8]])
    assert passes.passes == [[1], [2, 3, 4]]


def test_a_failed_pass_fails_its_callers_only():
    passes = RecordingPasses(fail_on=7)

    async def work(batcher):
        broken = asyncio.ensure_future(batcher.submit([6, 7]))
        with pytest.raises(RuntimeError, match="item 7 broke the pass"):
            await broken
        return await batcher.submit([8])

    assert run_batcher(passes, work) == [16]


def test_a_cancelled_request_is_not_run():
    passes = RecordingPasses()

    async def work(batcher):
        cancelled = asyncio.ensure_future(batcher.submit([1, 2]))
        kept = asyncio.ensure_future(batcher.submit([3]))
        await asyncio.sleep(0)
        cancelled.cancel()
        return await kept

    assert run_batcher(passes, work) == [6]
    assert passes.passes == [[3]]


# --- the HF backend: batched equals unbatched ---


def score_items() -> list[ScoreItem]:
    rng = np.random.default_rng(1)
    return [
        ScoreItem(rng.integers(5, 384, 1 + 3 * i).tolist(), rng.integers(5, 384, 2 + i).tolist(), k, temperature)
        for i, (k, temperature) in enumerate([(0, 1.0), (3, 0.5), (7, 2.0), (1, 1.0), (5, 0.7)])
    ]


def generate_items() -> list[GenerateItem]:
    settings = [
        SamplingParams(n=2, max_tokens=6, temperature=0.9, top_p=1.0, seed=1, top_logprobs=2),
        SamplingParams(n=3, max_tokens=3, temperature=1.3, top_p=0.8, seed=2, top_logprobs=0),
        SamplingParams(n=2, max_tokens=9, temperature=0.0, top_p=1.0, seed=None, top_logprobs=4),
        SamplingParams(n=1, max_tokens=5, temperature=0.6, top_p=0.9, seed=3, top_logprobs=1),
    ]
    prompts = [[5, 6, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108], [42], [9, 300, 7, 250, 12]]
    return [GenerateItem(prompt, params) for prompt, params in zip(prompts, settings)]


def assert_same_arrays(one, other) -> None:
    for name, value in vars(one).items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            np.testing.assert_allclose(value, getattr(other, name), atol=ATOL, rtol=0, err_msg=name)
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, getattr(other, name), err_msg=name)
        else:
            assert value == getattr(other, name), name


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    backend = HFBackend.load(BackendConfig(model=tiny_model_dir, batch_window_ms=20))
    yield backend
    backend.close()


def test_concurrent_scores_equal_one_at_a_time(backend):
    items = score_items()
    alone = [backend.score_now([item])[0] for item in items]

    async def concurrently():
        return await asyncio.gather(*(backend.score([item]) for item in items))

    together = [result for (result,) in run(concurrently())]
    for one, other, item in zip(alone, together, items):
        assert other.top_ids.shape == (len(item.completion_ids), item.top_logprobs)
        assert_same_arrays(one, other)


def test_concurrent_generates_equal_one_at_a_time(backend):
    items = [item for item in generate_items() if item.params.seed is not None or item.params.temperature == 0]
    alone = [backend.generate_now([item])[0] for item in items]

    async def concurrently():
        return await asyncio.gather(*(backend.generate([item]) for item in items))

    together = [result for (result,) in run(concurrently())]
    for one, other, item in zip(alone, together, items):
        assert len(other.samples) == item.params.n
        for sample, same in zip(one.samples, other.samples):
            assert len(same.token_ids) <= item.params.max_tokens
            assert same.top_ids.shape == (len(same.token_ids), item.params.top_logprobs)
            assert_same_arrays(sample, same)


# --- the served connection ---


def test_served_http_connections_disable_nagle(teacher):
    """Small answers are sent at once, not after the client's delayed ACK: TCP_NODELAY on the server side."""
    url = urlparse(teacher.http_url)
    connection = http.client.HTTPConnection(url.hostname, url.port)
    try:
        connection.request("GET", "/v1/model")
        assert connection.getresponse().read()
        client_port = connection.sock.getsockname()[1]
        served = [
            c.transport.get_extra_info("socket")
            for c in teacher.server.http.server_state.connections
            if c.transport.get_extra_info("peername")[1] == client_port
        ]
        assert len(served) == 1
        assert served[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        connection.close()


def test_abandoning_fails_the_waiting_items_and_the_running_pass_at_once():
    passes = RecordingPasses()

    async def work(batcher):
        passes.release.clear()
        running = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0.01)
        batcher.abandon_waiting(ConnectionAbortedError("shutting down"))
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)  # while the pass is still held
        passes.release.set()
        return outcomes

    outcomes = run_batcher(passes, work, window_seconds=0.01)
    assert [type(outcome) for outcome in outcomes] == [ConnectionAbortedError, ConnectionAbortedError]
    assert passes.passes == [[1]]  # the held pass had started; the waiting item never reached the model
