"""Admission before work: a budget of decoded pixels in flight, charged from the image headers before decoding.

Full-size pixels exist only while an upload is being decoded (contract/images.py shrinks them right away), so
the memory a burst of large images can take is bounded by what is being decoded at once. Each request charges
its two images' header pixels (width x height, the size before any reduced decoding: an upper bound that needs
no second look at the file) until its images are decoded, and gives them back right after. A request that
cannot be admitted within a short wait is refused with 503 at once, rather than holding its uploads until it
times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import numpy as np

from app import metrics
from contract.memory import give_back_free_memory

T = TypeVar("T")


class BudgetExhausted(Exception):
    """The pixels did not fit within the wait: the service is busy decoding other images."""


class OverBudget(Exception):
    """The pixels can never fit: they exceed the whole budget."""


class PixelBudget:
    """A counter of decoded pixels in flight with a capacity: `acquire` waits for room, `release` frees it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._in_use = 0  # this process's
        self._freed = asyncio.Event()  # set, then replaced, at each release: wakes every waiter to look again
        metrics.DECODE_PIXELS_IN_FLIGHT.set(0)

    @property
    def in_use(self) -> int:
        """The pixels this process holds."""
        return self._in_use

    async def acquire(self, pixels: int, wait_s: float) -> None:
        """Hold `pixels`; OverBudget if they exceed the capacity, BudgetExhausted if they do not fit within
        `wait_s` (pixels that fit now are admitted without waiting, even at 0)."""
        if pixels > self.capacity:
            raise OverBudget
        try:
            async with asyncio.timeout(wait_s):
                while not self._take(pixels):
                    await self._some_released()
        except TimeoutError:
            raise BudgetExhausted from None
        metrics.DECODE_PIXELS_ADMITTED.inc(pixels)

    def release(self, pixels: int) -> None:
        self._add(-pixels)
        self._freed.set()
        self._freed = asyncio.Event()

    def _take(self, pixels: int) -> bool:
        if self._in_use + pixels > self.capacity:
            return False
        self._add(pixels)
        return True

    async def _some_released(self) -> None:
        await self._freed.wait()

    def _add(self, pixels: int) -> None:
        self._in_use += pixels
        metrics.DECODE_PIXELS_IN_FLIGHT.set(self._in_use)

    def close(self) -> None:
        """Nothing to let go of here; a shared budget closes its descriptor."""


class SharedPixelBudget(PixelBudget):
    """The budget of all the front processes of a container together (app/container.py), as one process has it:
    each front's pixels are one counter of a block of shared memory that the main process made (`pixel_counters`),
    and a front takes pixels when the sum of every counter leaves room, holding a lock on the block (flock) while
    it looks and adds. Another front's release is seen within POLL_S."""

    POLL_S = 0.01

    def __init__(self, capacity: int, counters_fd: int, index: int) -> None:
        """`counters_fd`: the block's descriptor as the main process passed it to every front."""
        super().__init__(capacity)
        # The front's own open file description of the block: flock excludes only other descriptions, and the
        # descriptor every front inherits is one description shared by all of them (and the main process).
        self._fd = os.open(f"/proc/self/fd/{counters_fd}", os.O_RDWR | os.O_CLOEXEC)
        self._counters = np.frombuffer(mmap.mmap(self._fd, 0), dtype=np.int64)
        self._index = index

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """The block's lock, as this front holds it while it looks at the sum and adds: no other front (and not
        the main process) takes pixels or forgets a dead front's meanwhile."""
        return _locked(self._fd)

    def _take(self, pixels: int) -> bool:
        with self.locked():
            if int(self._counters.sum()) + pixels > self.capacity:
                return False
            self._counters[self._index] += pixels
        self._add(pixels)
        return True

    def release(self, pixels: int) -> None:
        # No lock: only this front writes its counter, and a front that reads it while it falls sees the old
        # value (an aligned 8-byte store is never seen half done) and waits a little longer. Only taking pixels,
        # a look at the sum and an add that must not interleave with another front's, holds the lock.
        self._counters[self._index] -= pixels
        super().release(pixels)

    def close(self) -> None:
        os.close(self._fd)

    async def _some_released(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.POLL_S):
                await super()._some_released()


def pixel_counters(fronts: int) -> int:
    """A block of one pixel counter per front (SharedPixelBudget), for the main process to pass to its fronts:
    its file descriptor."""
    fd = os.memfd_create("siamcam-pixel-budget")  # inherited only where passed (pass_fds)
    os.ftruncate(fd, 8 * fronts)
    return fd


def forget_front_pixels(counters_fd: int, index: int) -> None:
    """Give back what the front at `index` held when it died: its replacement starts from zero."""
    with _locked(counters_fd), mmap.mmap(counters_fd, 0) as block:
        np.frombuffer(block, dtype=np.int64)[index] = 0


def _each(calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Every call's result, or the exception it raised."""
    results: list[T | BaseException] = []
    for call in calls:
        try:
            results.append(call())
        except BaseException as error:  # raised by run_all once every call has ended
            results.append(error)
    return results


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


# How long no image may have been decoded before the freed memory is given back. Trimming between two requests
# of a steady stream costs them: malloc_trim locks every arena in turn (the model thread's mid-batch too) and
# unmaps free pages that the next request's tensors then fault back in (what faulting costs the model:
# bench/RESULTS.md, "Model runtime").
IDLE_BEFORE_TRIM_S = 1.0


class ImageWork:
    """Where uploads are decoded and overlays rendered: a small thread pool of the service's own (not asyncio's
    default one, which other libraries share), so that image work queues there and never delays the model's
    thread; and the budget of pixels those threads may be decoding at once."""

    def __init__(self, workers: int, budget: PixelBudget, idle_before_trim_s: float = IDLE_BEFORE_TRIM_S,
                 give_back: Callable[[], None] = give_back_free_memory,
                 on_thread_start: Callable[[], None] | None = None) -> None:
        """`on_thread_start` prepares each image thread (where the model runs in this process too, it keeps
        torch single-threaded there: app/torch_threads.py)."""
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="images", initializer=on_thread_start)
        self.budget = budget
        self.idle_before_trim_s = idle_before_trim_s
        self._give_back = give_back
        self._trim: asyncio.TimerHandle | None = None

    def pixels_at_once(self, pixels_per_image: Sequence[int]) -> int:
        """What one request's images charge: the pixels of those that may be decoded at the same time, its
        `workers` largest (those threads decode one image each; at least a pair, both of whose images count)."""
        return sum(sorted(pixels_per_image, reverse=True)[:max(2, self.workers)])

    async def admit(self, pixels: int, wait_s: float) -> None:
        """Charge `pixels` to the budget (see PixelBudget.acquire); give them back with `discharge`."""
        await self.budget.acquire(pixels, wait_s)

    def discharge(self, pixels: int) -> None:
        """Give back admitted pixels once their images are decoded. Once no image has been decoded for
        `idle_before_trim_s`, the freed memory is given back to the system too, on an image thread (nobody waits
        for it): after a burst, not between the requests of a steady stream."""
        self.budget.release(pixels)
        if self._trim is not None:
            self._trim.cancel()
        self._trim = asyncio.get_running_loop().call_later(self.idle_before_trim_s, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim = None
        if self.budget.in_use == 0:
            self.pool.submit(self._give_back)

    async def run_all(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """The `calls` side by side on the image threads, in at most one hand-off per thread (a front process
        has one image thread on 2 CPUs: a pair's two pictures then cost one hand-off, not two); every call ends
        before the first error is raised, so that no decoding outlives the pixels charged for it."""
        loop = asyncio.get_running_loop()
        shares = [calls[start::self.workers] for start in range(min(self.workers, len(calls)))]
        outcomes = await asyncio.gather(*(loop.run_in_executor(self.pool, _each, share) for share in shares))
        results: list[T | BaseException] = [None] * len(calls)  # type: ignore[list-item]  # all filled below
        for start, share_outcomes in enumerate(outcomes):
            results[start::self.workers] = share_outcomes
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]  # no exceptions left

    async def run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(function, *args))

    def close(self) -> None:
        if self._trim is not None:
            self._trim.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.budget.close()
