"""Cross-request batching: the items of concurrent requests share forward passes.

A request submits its items (sequences to score, prompts to sample) and awaits their results.
A worker task takes waiting items in arrival order: when the first arrives at an idle batcher it
waits `window_seconds` for others to join, then takes as many as fit `max_batch_tokens` (by
`cost`, at least one item), runs them in one call of `run_batch` on the backend's worker thread,
and hands each item its own result. Items arriving while a pass runs wait for the next one, so
under load passes fill up without any window. Every setting an item carries (k, temperature,
sampling, seed) is applied per row by the batch function, so any items may share a pass and a
result does not depend on its neighbours (up to float rounding of a differently padded batch).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchingSettings:
    window_seconds: float  # how long the first waiting item waits for company
    max_batch_tokens: int  # summed item costs per pass (one item alone may exceed it)


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], list[Result]],
        cost: Callable[[Item], int],
        settings: BatchingSettings,
        executor: Executor,
    ):
        self._run_batch = run_batch
        self._cost = cost
        self._settings = settings
        self._executor = executor
        self._waiting: deque[tuple[Item, asyncio.Future]] = deque()
        self._running: list[asyncio.Future] = []  # the futures of the pass under way
        self._worker: asyncio.Task | None = None

    async def submit(self, items: list[Item]) -> list[Result]:
        """The results of `items`, in order, once the passes that carry them have run."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._waiting.extend(zip(items, futures))
        # The worker runs while items wait and ends when none is left, so no task outlives its work.
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="potstill-batcher")
        # Cancelling the request cancels its futures; the worker skips cancelled items.
        return list(await asyncio.gather(*futures))

    def abandon_waiting(self, error: Exception) -> None:
        """Fail every item not yet answered with `error`, those of the pass under way included: that
        pass runs on (a thread cannot be interrupted) but its results are dropped, so a shutdown
        ends on time however long the pass takes."""
        abandoned = [future for _, future in self._waiting] + self._running
        self._waiting.clear()
        if self._worker is not None:
            self._worker.cancel()  # it would only wait for the dropped pass
        for future in abandoned:
            if not future.done():
                future.set_exception(error)

    async def _work(self) -> None:
        if self._settings.window_seconds > 0:
            await asyncio.sleep(self._settings.window_seconds)
        while batch := self._take():
            await self._run(batch)

    def _take(self) -> list[tuple[Item, asyncio.Future]]:
        """Waiting items in arrival order, as many as fit the token budget (at least one)."""
        batch, total = [], 0
        while self._waiting:
            item, future = self._waiting[0]
            if future.done():  # cancelled by its caller
                self._waiting.popleft()
                continue
            cost = self._cost(item)
            if batch and total + cost > self._settings.max_batch_tokens:
                break
            batch.append(self._waiting.popleft())
            total += cost
        return batch

    async def _run(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        items = [item for item, _ in batch]
        self._running = [future for _, future in batch]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, items)
        except Exception as error:  # every caller in the pass learns why it failed
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            self._running = []
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
