"""Admission before work: a budget of decoded pixels in flight, charged from the image headers before decoding.

Full-size pixels exist only while an upload is being decoded (contract/images.py shrinks them right away), so
the memory a burst of large images can take is bounded by what is being decoded at once. Each request charges
its two images' header pixels (width x height, the size before any reduced decoding: an upper bound that needs
no second look at the file) while its pair is decoded, and gives them back right after. A request that cannot
be admitted within a short wait is refused with 503 at once, rather than holding its uploads until it times out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import TypeVar

from app import metrics
from app.memory import give_back_free_memory

T = TypeVar("T")


class BudgetExhausted(Exception):
    """The pixels did not fit within the wait: the service is busy decoding other images."""


class OverBudget(Exception):
    """The pixels can never fit: they exceed the whole budget."""


class PixelBudget:
    """A counter of decoded pixels in flight with a capacity; `async with budget.charge(n, wait_s):` holds `n`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._in_use = 0
        self._freed = asyncio.Condition()
        metrics.DECODE_PIXELS_IN_FLIGHT.set(0)

    @property
    def in_use(self) -> int:
        return self._in_use

    @asynccontextmanager
    async def charge(self, pixels: int, wait_s: float) -> AsyncIterator[None]:
        """Hold `pixels` for the block; OverBudget if they exceed the capacity, BudgetExhausted if they do not
        fit within `wait_s`."""
        if pixels > self.capacity:
            raise OverBudget
        async with self._freed:
            try:
                async with asyncio.timeout(wait_s):  # pixels that fit now are admitted without waiting, even at 0
                    await self._freed.wait_for(lambda: self._in_use + pixels <= self.capacity)
            except TimeoutError:
                raise BudgetExhausted from None
            self._add(pixels)
        metrics.DECODE_PIXELS_ADMITTED.inc(pixels)
        try:
            yield
        finally:
            async with self._freed:
                self._add(-pixels)
                self._freed.notify_all()

    def _add(self, pixels: int) -> None:
        self._in_use += pixels
        metrics.DECODE_PIXELS_IN_FLIGHT.set(self._in_use)


class ImageWork:
    """Where uploads are decoded and overlays rendered: a small thread pool of the service's own (not asyncio's
    default one, which other libraries share), so that image work queues there and never delays the model's
    thread; and the budget of pixels those threads may be decoding at once."""

    def __init__(self, workers: int, max_pixels_in_flight: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="images")
        self.budget = PixelBudget(max_pixels_in_flight)

    async def decode(self, pixels: int, wait_s: float, decodings: Sequence[Callable[[], T]]) -> list[T]:
        """The `decodings` (one per image) run side by side on the image threads once `pixels` are admitted (see
        PixelBudget.charge); when they were the last decodes in flight, the freed memory is given back to the
        system meanwhile."""
        loop = asyncio.get_running_loop()
        async with self.budget.charge(pixels, wait_s):
            # Every decoding ends before the pixels are given back, even when one fails.
            results = await asyncio.gather(*(loop.run_in_executor(self.pool, decoding) for decoding in decodings),
                                           return_exceptions=True)
        if self.budget.in_use == 0:
            self.pool.submit(give_back_free_memory)  # the answer does not wait for it
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]  # no exceptions left

    async def run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(function, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
