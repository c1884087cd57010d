"""Seconds per stage, added into a plain dict as work goes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(timings: dict | None, stage: str) -> Iterator[None]:
    """Add the seconds the block takes to `timings[stage]` (nothing when `timings` is None)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
