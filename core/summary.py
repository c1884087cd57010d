"""What a person wants to read after a run: what was new, what happened to it, where the
time went, how this run compares with the last ones, and where the rows are."""

from __future__ import annotations

from collections import Counter

import numpy as np

from core.predictions import PhotoResult
from core.scoring import ScoringStats

# The flow's stages, in order, for the time table.
STAGES = (("list", "list the source"), ("listing_suite", "check the listing (suite)"),
          ("score", "read, decode, find faces, classify"), ("predictions_suite", "check the rows (suite)"),
          ("publish", "publish the Parquet files"), ("users", "update the users table (MERGE)"))
WORKER_STAGES = ("read", "decode", "detect", "landmarks", "warp", "model")


def summarize(rows: list[PhotoResult], stats: ScoringStats, listed: int, skipped_unchanged: int) -> dict:
    status = Counter(r.status for r in rows)
    reasons = Counter(r.reject_reason for r in rows if r.reject_reason)
    genders = Counter(r.gender for r in rows if r.status == "scored")
    p_male = np.array([r.p_male for r in rows if r.p_male is not None], dtype=np.float64)
    counts, edges = np.histogram(p_male, bins=10, range=(0.0, 1.0))
    return {
        "listed": listed,
        "new": stats.listed,
        "skipped_unchanged": skipped_unchanged + stats.skipped_same_hash,
        "rows": len(rows),
        "scored": status.get("scored", 0),
        "rejected": status.get("rejected", 0),
        "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "genders": {g: genders.get(g, 0) for g in ("female", "male", "unknown")},
        "p_male_histogram": [{"bin": f"{edges[i]:.1f}-{edges[i + 1]:.1f}", "photos": int(counts[i])}
                             for i in range(len(counts))],
        "scoring_seconds": round(stats.seconds, 3),
        "model_seconds": round(stats.stage_seconds["model"], 3),
        "stage_seconds": {k: round(v, 3) for k, v in stats.stage_seconds.items()},
    }


def rejected_rows(rows: list[PhotoResult], limit: int = 100) -> list[dict]:
    """The first `limit` rejected photos: key, reason, and why in words (no image data)."""
    rejected = sorted((r for r in rows if r.status == "rejected"), key=lambda r: (r.reject_reason, r.photo_key))
    return [{"photo_key": r.photo_key, "reason": r.reject_reason, "detail": r.reject_detail or ""}
            for r in rejected[:limit]]


def _rate(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


def bars(histogram: list[dict], width: int = 30) -> str:
    """The p_male histogram as text bars, one line per bin, the count before the bar (block
    characters are not always as wide as digits, even in a monospace font)."""
    peak = max((b["photos"] for b in histogram), default=0) or 1
    lines = []
    for b in histogram:
        blocks = width * b["photos"] / peak
        bar = "█" * int(blocks) + ("▌" if blocks - int(blocks) >= 0.5 else "")
        lines.append(f"{b['bin']}  {b['photos']:>6}  {bar}")
    return "\n".join(lines)


def headline(summary: dict) -> str:
    """One sentence: what this run did."""
    refreshed = summary.get("refreshed", 0)
    erased = (f" {summary['erased_users']} users erased since the last run." if summary.get("erased_users") else "")
    if summary["new"] == 0 and not refreshed:
        since = f" since the run of {summary['last_run_at'][:16].replace('T', ' ')} UTC" if summary.get(
            "last_run_at") else ""
        return (f"Nothing new{since}: {summary['listed']} photos listed, all answered before; "
                f"no file written. {summary['model']} would have answered.{erased}")
    what = f"{summary['new']} new photos"
    if refreshed:
        what += f" and {refreshed} re-scored (their users had another model's answer)"
    return (f"{what}: {summary['scored']} scored, {summary['rejected']} rejected, by {summary['model']}; "
            f"{summary['skipped_unchanged']} photos unchanged since their last answer.{erased}")


def users_line(summary: dict) -> str | None:
    """The users table in one sentence: its size and how much of it the run's model answers."""
    users = summary.get("users")
    if not users:
        return None
    if not users["users"]:
        return "the users table has no user with an answer yet"
    if not users["behind"]:
        return f"{users['users']} users, every answer from {users['model']}"
    if users["nights_left"] is None:
        left = "--refresh-budget is 0: they keep their answers"
    else:
        left = f"{users['nights_left']} more night(s) at --refresh-budget {users['refresh_budget']}"
    return (f"{users['users']} users; {users['model']} answers {users['on_model']} ({100 * users['share']:.1f}%), "
            f"{users['behind']} still have another model's answer: {left}")


def render_text(summary: dict) -> str:
    """The one-screen summary the CLI prints."""
    lines = [headline(summary)]
    lines += [f"WARNING      {w}" for w in summary.get("warnings", [])]
    lines.append(f"listed       {summary['listed']:>8}   new {summary['new']}, unchanged {summary['skipped_unchanged']}")
    if summary["rows"]:
        lines.append(f"rows written {summary['rows']:>8}   scored {summary['scored']}, rejected {summary['rejected']}")
        if summary["reject_reasons"]:
            lines.append("reject reasons " + ", ".join(f"{k}={v}" for k, v in summary["reject_reasons"].items()))
        g = summary["genders"]
        lines.append(f"genders      female {g['female']}, male {g['male']}, unknown {g['unknown']}")
    if summary["scored"]:
        lines.append("p_male")
        lines += ["  " + line for line in bars(summary["p_male_histogram"]).splitlines()]
    wall = summary.get("wall_seconds")
    if wall:
        rate = f", {summary['rows'] / wall:.2f} photos/s over the whole run" if summary["rows"] else ""
        lines.append(f"time         {wall:.1f} s in all{rate}; "
                     + ", ".join(f"{name} {summary['timings'].get(key, 0):.1f} s" for key, name in
                                 (("list", "list"), ("listing_suite", "listing suite"), ("score", "scoring"),
                                  ("predictions_suite", "predictions suite"), ("publish", "publish"),
                                  ("users", "users table"))))
    written = summary.get("written") or []
    lines.append(f"output       {', '.join(written) if written else 'nothing new: no file written'}")
    if users_line(summary):
        lines.append(f"users        {users_line(summary)}")
        lines.append(f"             {summary['users']['table']}")
    return "\n".join(lines)


def render_markdown(summary: dict, source: str, output: str) -> str:
    """The run's report for the Prefect UI."""
    parts = [f"## Nightly scoring, {summary['scoring_date']}",
             f"`{source}` → `{output}`", "", headline(summary), ""]
    for warning in summary.get("warnings", []):
        parts.append(f"> **Warning:** {warning}")
    if summary.get("warnings"):
        parts.append("")
    if summary["rows"]:
        g = summary["genders"]
        parts += ["| | photos |", "| --- | --- |",
                  f"| scored | {summary['scored']} |", f"| rejected | {summary['rejected']} |",
                  *(f"| rejected: {k} | {v} |" for k, v in summary["reject_reasons"].items()),
                  *(f"| {k} | {v} |" for k, v in g.items() if v), ""]
    if summary["scored"]:
        parts += ["**p_male of the scored photos**", "", "```", bars(summary["p_male_histogram"]), "```", ""]
    users = summary.get("users")
    if users:
        parts += [f"**Users table** (`{users['table']}`, one current answer per user): {users_line(summary)}.", "",
                  "```python", f'DeltaTable("{users["table"]}").to_pandas()  # from deltalake import DeltaTable',
                  "```", ""]
    parts += _time_table(summary)
    parts += _trend_table(summary)
    written = summary.get("written") or []
    if written:
        root = f"{output.rstrip('/')}/predictions"
        parts += ["**Files written** (copy a URL; readers skip the `_`-prefixed temporaries):", ""]
        parts += [f"- `{url}`" for url in written]
        parts += ["", "```python", f'pd.read_parquet("{root}")  # every day, with a dt column', "```",
                  "```sql", f"SELECT * FROM read_parquet('{root}/*/*.parquet', hive_partitioning = true);", "```"]
    return "\n".join(parts)


def _time_table(summary: dict) -> list[str]:
    wall = summary.get("wall_seconds")
    if not wall:
        return []
    timings = summary.get("timings", {})
    rate = f" ({summary['rows'] / wall:.2f} photos/s)" if summary["rows"] else ""
    rows = [f"**Where the time went**: {wall:.1f} s in all{rate}.", "", "| stage | seconds |", "| --- | --- |"]
    rows += [f"| {name} | {timings[key]:.2f} |" for key, name in STAGES if key in timings]
    other = wall - sum(timings.get(key, 0) for key, _ in STAGES)
    rows.append(f"| other (Prefect, lock, this report) | {max(0.0, other):.2f} |")
    inside = summary.get("stage_seconds", {})
    if summary["new"] and any(inside.get(k) for k in WORKER_STAGES):
        rows += ["", "Inside scoring (seconds summed over the worker processes working at once): "
                 + ", ".join(f"{k} {inside.get(k, 0):.1f}" for k in WORKER_STAGES) + "."]
    return rows + [""]


def _trend_table(summary: dict) -> list[str]:
    runs = summary.get("recent_runs") or []
    if len(runs) < 2:
        return []
    rows = [f"**The last {len(runs)} runs of this output**", "",
            "| listed at (UTC) | listed | new | rows | rejected | unknown |", "| --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        rows.append(f"| {str(run.get('listed_at', ''))[:16].replace('T', ' ')} | {run.get('listed', 0)} | "
                    f"{run.get('new', 0)} | {run.get('rows', 0)} | {_rate(run.get('rejected', 0), run.get('rows', 0))} "
                    f"| {_rate(run.get('unknown', 0), run.get('scored', 0))} |")
    return rows + [""]
