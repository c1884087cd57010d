"""What a person wants to read after a run: counts, reasons, gender split, histogram."""

from __future__ import annotations

from collections import Counter

import numpy as np

from core.predictions import PhotoResult
from core.scoring import ScoringStats


def summarize(rows: list[PhotoResult], stats: ScoringStats, skipped_unchanged: int) -> dict:
    status = Counter(r.status for r in rows)
    reasons = Counter(r.reject_reason for r in rows if r.reject_reason)
    genders = Counter(r.gender for r in rows if r.status == "scored")
    p_male = np.array([r.p_male for r in rows if r.p_male is not None], dtype=np.float64)
    counts, edges = np.histogram(p_male, bins=10, range=(0.0, 1.0))
    return {
        "listed": stats.listed + skipped_unchanged,
        "skipped_unchanged": skipped_unchanged + stats.skipped_same_hash,
        "rows": len(rows),
        "scored": status.get("scored", 0),
        "rejected": status.get("rejected", 0),
        "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "genders": {g: genders.get(g, 0) for g in ("female", "male", "unknown")},
        "p_male_histogram": [{"bin": f"{edges[i]:.1f}-{edges[i + 1]:.1f}", "photos": int(counts[i])}
                             for i in range(len(counts))],
        "seconds": round(stats.seconds, 3),
        "photos_per_second": round(stats.photos_per_second, 2),
        "model_seconds": round(stats.stage_seconds["model"], 3),
        "stage_seconds": {k: round(v, 3) for k, v in stats.stage_seconds.items()},
    }


def render_text(summary: dict) -> str:
    """The one-screen summary the CLI prints."""
    lines = [
        f"model        {summary.get('model', '?')}",
        f"listed       {summary['listed']:>8}   (unchanged, skipped: {summary['skipped_unchanged']})",
        f"rows written {summary['rows']:>8}   scored {summary['scored']}, rejected {summary['rejected']}",
    ]
    if summary["reject_reasons"]:
        lines.append("reject reasons " + ", ".join(f"{k}={v}" for k, v in summary["reject_reasons"].items()))
    g = summary["genders"]
    lines.append(f"genders      female {g['female']}, male {g['male']}, unknown {g['unknown']}")
    if summary["scored"]:
        peak = max(b["photos"] for b in summary["p_male_histogram"]) or 1
        lines.append("p_male histogram")
        for b in summary["p_male_histogram"]:
            lines.append(f"  {b['bin']}  {'#' * round(30 * b['photos'] / peak):<30} {b['photos']}")
    lines.append(f"throughput   {summary['photos_per_second']} photos/s over {summary['seconds']} s")
    written = summary.get("written") or []
    lines.append(f"output       {', '.join(written) if written else 'nothing new: no file written'}")
    return "\n".join(lines)


def render_markdown(summary: dict) -> str:
    g = summary["genders"]
    parts = [
        "## Nightly scoring",
        f"Model **{summary.get('model', '?')}**; {summary['rows']} rows written "
        f"({summary['scored']} scored, {summary['rejected']} rejected), "
        f"{summary['skipped_unchanged']} photos unchanged since their last answer.",
        "",
        "| gender | photos |", "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in g.items()),
        "",
        "| reject reason | photos |", "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in summary["reject_reasons"].items()),
        "",
        "| p_male | photos |", "| --- | --- |",
        *(f"| {b['bin']} | {b['photos']} |" for b in summary["p_male_histogram"]),
        "",
        f"Throughput: {summary['photos_per_second']} photos/s ({summary['seconds']} s).",
        f"Output: {', '.join(summary.get('written') or []) or 'nothing new, no file written'}",
    ]
    return "\n".join(parts)
