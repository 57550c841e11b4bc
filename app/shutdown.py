"""Graceful shutdown: on SIGTERM (or SIGINT), stop admitting work, finish what was accepted, then exit.

uvicorn installs its own SIGTERM/SIGINT handlers before our lifespan starts; we wrap them. The first signal
turns on draining (/readyz answers 503 and new inference requests get 503 with Retry-After) and waits, up to
the grace period, for the requests already admitted to be answered; only then is uvicorn's handler called,
and uvicorn shuts down as usual. If the grace period runs out first, `on_grace_over` (the lifespan stops the
inference worker) answers the requests still waiting with 503 at once: uvicorn's shutdown waits for every open
request, and would otherwise keep the process past the grace period, until the orchestrator kills it mid-answer.
A second signal ends the grace period at once: `on_grace_over`, then uvicorn's handler.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from app import metrics

logger = logging.getLogger(__name__)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    """Tracks the inference requests in progress and whether new ones are still admitted."""

    def __init__(self) -> None:
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def track(self, route: str) -> Iterator[None]:
        in_progress = metrics.REQUESTS_IN_PROGRESS.labels(route)
        self._active += 1
        in_progress.inc()
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            in_progress.dec()
            if self._active == 0:
                self._idle.set()

    async def finish(self, grace_s: float) -> bool:
        """Stop admitting; wait for admitted requests to be answered. False if the grace period ran out."""
        self.draining = True
        logger.info("draining", extra={"active_requests": self._active, "grace_s": grace_s})
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            logger.warning("grace period over with requests unanswered", extra={"active_requests": self._active})
            return False
        logger.info("drained")
        return True


@contextmanager
def drain_on_signals(drain: Drain, grace_s: float, on_grace_over: Callable[[], object]
                     ) -> Iterator[Callable[[], bool]]:
    """While active, SIGTERM/SIGINT drain `drain` before reaching the handlers installed before us, calling
    `on_grace_over` first when requests are still unanswered after `grace_s`, or on a second signal.

    Yields `stop()`, for the service to end itself as a SIGTERM would (drain, then uvicorn shuts down); it
    returns False, doing nothing, where the signals are not ours (not in the main thread, e.g. a server
    embedded in a test) or nobody handles SIGTERM.
    """
    loop = asyncio.get_running_loop()
    originals: dict[int, Any] = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    draining_tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def wrap(original: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            if drain.draining:  # a second signal: no more waiting, for the drain or the requests still waiting
                loop.call_soon_threadsafe(on_grace_over)
                original(signum, frame)
                return
            drain.draining = True  # at once, so that /readyz turns 503 before the loop even wakes up

            async def drain_then_exit() -> None:
                if not await drain.finish(grace_s):
                    on_grace_over()
                original(signum, frame)

            def start() -> None:
                task = loop.create_task(drain_then_exit())
                draining_tasks.add(task)
                task.add_done_callback(draining_tasks.discard)

            loop.call_soon_threadsafe(start)

        return handler

    def cannot_stop() -> bool:
        return False

    if threading.current_thread() is not threading.main_thread():
        logger.warning("not in the main thread: signals will not drain the service first")
        yield cannot_stop
        return
    wrapped = {sig: wrap(original) for sig, original in originals.items()
               if callable(original)}  # SIG_DFL / SIG_IGN: nobody to hand over to, leave them alone
    for sig, handler in wrapped.items():
        signal.signal(sig, handler)

    def stop() -> bool:
        wrapped[signal.SIGTERM](signal.SIGTERM, None)
        return True

    try:
        yield stop if signal.SIGTERM in wrapped else cannot_stop
    finally:
        for sig, original in originals.items():
            signal.signal(sig, original)
