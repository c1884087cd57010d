"""Counts in words, for what people read (summaries, state messages, the CLI)."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`1 photo`, `2 photos`, `1,200 users` (`many` for irregular plurals)."""
    return f"{count:,} {noun if count == 1 else (many or noun + 's')}"


def run_time(run: dict, missing: str = "") -> str:
    """When a run listed its source, to the minute (`2026-12-07 02:00`, UTC like every time
    the pipeline keeps); `missing` where the record has no time."""
    return str(run.get("listed_at", missing))[:16].replace("T", " ")
