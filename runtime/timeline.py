"""Where a command's seconds go: with GENDER_PIPELINE_TIMELINE=1, each milestone of a run
(the server answering, the flow starting, the listing, the first photo read, the first
answer, the end) prints one `timeline:` line on stderr with the seconds since the process
started (its start time from /proc, so interpreter start-up and imports are counted).
benchmarks/bench_startup.py reads these lines."""

from __future__ import annotations

import os
import sys
import time

ENABLED = os.environ.get("GENDER_PIPELINE_TIMELINE") == "1"
_seen: set[str] = set()


def _clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def _process_start() -> float:
    """When this process started, on the boot clock (Linux, to 10 ms; now elsewhere)."""
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _clock()


STARTED = _process_start() if ENABLED else 0.0


def since_start() -> float:
    """Seconds since this process started (start-up and imports included)."""
    return _clock() - (STARTED if ENABLED else _process_start())


def mark(event: str, once: bool = True) -> None:
    """Print `event` with the seconds since the process started (when enabled)."""
    if not ENABLED or (once and event in _seen):
        return
    _seen.add(event)
    print(f"timeline: {event} {_clock() - STARTED:.3f}", file=sys.stderr, flush=True)
