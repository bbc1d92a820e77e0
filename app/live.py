"""Live inference in the server: the queue in front of the loaded models, and the limits.

Nothing here imports torch: `start_live` imports `workers.live` only when the server was started
with `--live`. Requests run one at a time on the model (one forward pass uses every core or the
whole GPU); the others wait in line, and one that cannot start within `live_max_wait` seconds
is answered 503 with Retry-After instead of piling up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import HTTPException

from app.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

HOW_TO_ENABLE = ("live inference is off on this server: start it with `featurescope serve --live` "
                 "to run your own text through the model")


class TooLong(HTTPException):
    def __init__(self, n_tokens: int, limit: int):
        super().__init__(413, f"the text is {n_tokens} tokens long; this server takes at most "
                              f"{limit} tokens per text (FEATURESCOPE_LIVE_MAX_TOKENS)")


@dataclass
class LiveLimits:
    max_tokens: int = 1024
    max_texts: int = 16
    max_wait: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveLimits:
        return cls(max_tokens=settings.live_max_tokens, max_texts=settings.live_max_texts,
                   max_wait=settings.live_max_wait)


class LiveService:
    """The loaded models (a `workers.live.LiveModels`) behind a queue of one."""

    def __init__(self, models: Any, limits: LiveLimits):
        self.models = models
        self.limits = limits
        self._turn = asyncio.Semaphore(1)
        self._limiter = anyio.CapacityLimiter(1)
        self.waiting = 0
        self._recent: float = 0.5  # seconds one call took lately (for Retry-After)

    def retry_after(self) -> int:
        return max(1, math.ceil(self._recent * (self.waiting + 1)))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(self.models, *args) in a worker thread, after the calls queued before it."""
        self.waiting += 1
        try:
            await asyncio.wait_for(self._turn.acquire(), timeout=self.limits.max_wait)
        except TimeoutError:
            raise HTTPException(
                503, f"the model is busy: {self.waiting} requests are waiting; try again shortly",
                headers={"Retry-After": str(self.retry_after())}) from None
        finally:
            self.waiting -= 1
        try:
            t0 = time.perf_counter()
            out = await anyio.to_thread.run_sync(fn, self.models, *args, limiter=self._limiter)
            self._recent = 0.8 * self._recent + 0.2 * (time.perf_counter() - t0)
            return out
        finally:
            self._turn.release()

    def check_length(self, n_tokens: int) -> None:
        if n_tokens > self.limits.max_tokens:
            raise TooLong(n_tokens, self.limits.max_tokens)


def start_live(engine, settings: Settings) -> LiveService:
    """Load every model that has ready sources, with those sources (imports torch)."""
    from workers.live import LiveModels
    from workers.models import resolve_device

    device = resolve_device(settings.live_device)
    t0 = time.perf_counter()
    models = LiveModels.load(engine, device=device, cache_dir=settings.cache_dir)
    log.info("live inference: %d models loaded in %.1f s", len(models.models),
             time.perf_counter() - t0)
    return LiveService(models, LiveLimits.from_settings(settings))
