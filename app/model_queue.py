"""The queue of one in front of the loaded models, and its limits.

Nothing here imports torch: `start_live` imports `workers.inference` only when the server was
started with `--live`. Every use of the models (activations, searches, and what later runs on
them) goes through `ModelQueue.call`: one call at a time on the model (one forward pass uses
every core or the whole GPU); the others wait in line, and one that cannot start within
`max_wait` seconds is refused (503 with Retry-After) instead of piling up. Texts are tokenized
within the limits (413 over them) before they queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from app.config import Settings
from app.inference_errors import BadInput, Busy, TooLong

if TYPE_CHECKING:
    from workers.inference import ServedModels

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_TEXT_CHARS = 100_000
"""Longer texts are refused before they are tokenized (their tokens would be over any limit)."""


@dataclass
class InferenceLimits:
    """What one request may ask of the models."""

    max_tokens: int = 1024
    """Tokens per text (413 beyond)."""
    max_texts: int = 16
    """Texts per request (413 beyond)."""
    max_wait: float = 10.0
    """Seconds a request may wait for its turn (503 beyond)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_texts < 1 or not self.max_wait > 0:
            raise ValueError(f"inference limits must be positive, got {self}")

    @classmethod
    def from_settings(cls, settings: Settings) -> InferenceLimits:
        return cls(max_tokens=settings.live_max_tokens, max_texts=settings.live_max_texts,
                   max_wait=settings.live_max_wait)


class ModelQueue:
    """The loaded models (a `workers.inference.ServedModels`) behind a queue of one."""

    def __init__(self, models: ServedModels, limits: InferenceLimits):
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
            raise Busy(f"the model is busy: {self.waiting} requests are waiting; try again "
                       "shortly", headers={"Retry-After": str(self.retry_after())}) from None
        finally:
            self.waiting -= 1
        try:
            t0 = time.perf_counter()
            out = await anyio.to_thread.run_sync(fn, self.models, *args, limiter=self._limiter)
            self._recent = 0.8 * self._recent + 0.2 * (time.perf_counter() - t0)
            return out
        finally:
            self._turn.release()

    async def tokenize(self, model: str, texts: list[str]) -> list[list[int]]:
        """The token ids of each text as the harvest tokenized its corpus, within the limits.
        Tokenizing needs no turn on the model: it runs beside the queue."""
        if not texts:
            raise BadInput("texts is empty")
        if len(texts) > self.limits.max_texts:
            raise TooLong(f"{len(texts)} texts; this server takes at most "
                          f"{self.limits.max_texts} per request")
        for text in texts:
            if len(text) > MAX_TEXT_CHARS:
                raise TooLong(f"the text is {len(text):,} characters long; this server takes "
                              f"at most {self.limits.max_tokens} tokens per text")
            if not text.strip():
                raise BadInput("the text is empty")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadInput("the text has a lone surrogate (not valid Unicode)") from None
        served = self.models.model(model)
        runs = await anyio.to_thread.run_sync(lambda: [served.tokenize(t) for t in texts])
        for ids in runs:
            self.check_length(len(ids))
        return runs

    def check_length(self, n_tokens: int) -> None:
        if n_tokens > self.limits.max_tokens:
            raise TooLong(f"the text is {n_tokens} tokens long; this server takes at most "
                          f"{self.limits.max_tokens} tokens per text "
                          "(FEATURESCOPE_LIVE_MAX_TOKENS)")


def start_live(engine, settings: Settings) -> ModelQueue:
    """Load every model that has ready sources, with those sources, behind the queue (imports
    torch)."""
    from workers.inference import ServedModels
    from workers.loading import resolve_device

    device = resolve_device(settings.live_device)
    t0 = time.perf_counter()
    models = ServedModels.load(engine, device=device, cache_dir=settings.cache_dir)
    log.info("live inference: %d models loaded in %.1f s", len(models.models),
             time.perf_counter() - t0)
    return ModelQueue(models, InferenceLimits.from_settings(settings))
