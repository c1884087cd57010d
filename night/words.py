"""Counts in words, for what people read (summaries, state messages, the CLI)."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`1 photo`, `2 photos`, `1,200 users` (`many` for irregular plurals)."""
    return f"{count:,} {noun if count == 1 else (many or noun + 's')}"
