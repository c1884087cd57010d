"""A night's summary: what was new, what happened to it, how it compares with the last
nights (alarms), and the outcome that names the run's final state."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from gender_pipeline.engine.engine import ScoringStats, merge_stats
from gender_pipeline.lake.answers import in_band_order
from gender_pipeline.lake.history import PhotoResult
from gender_pipeline.lake.runs import completed, erasure_counts, recent_runs, record_run
from gender_pipeline.night.render import gone_line
from gender_pipeline.night.shards import ShardResult
from gender_pipeline.night.words import plural

if TYPE_CHECKING:
    from gender_pipeline.night.night import Night, UsersUpdate

log = logging.getLogger(__name__)

def summarize(rows: list[PhotoResult], stats: ScoringStats, listed: int, skipped_unchanged: int) -> dict:
    status = Counter(r.status for r in rows)
    reasons = Counter(r.reject_reason for r in rows if r.reject_reason)
    genders = Counter(r.gender for r in rows if r.status == "scored")
    bands = Counter(r.age_band for r in rows if r.status == "scored" and r.age_band is not None)
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
        # Tonight's scored photos by age band (empty when the model answers no age).
        "age_bands": in_band_order(bands),
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


def outcome(summary: dict) -> tuple[str, str]:
    """The night's outcome (`completed` or `warnings`: lake.runs.OUTCOMES) and the
    one-line message of its final state."""
    warnings = (summary.get("warnings") or []) + (summary.get("alarms") or [])
    if summary["new"] or summary.get("refreshed"):
        what = f"{summary['new']} new" + (f", {summary['refreshed']} re-scored" if summary.get("refreshed") else "")
        message, worked = f"{what}: {summary['scored']} scored, {summary['rejected']} rejected", True
    elif not summary["listed"]:
        message, worked = "the source is empty: nothing listed", False
    else:
        last = summary.get("last_run_at")
        message, worked = "nothing new" + (f" since {str(last)[:16].replace('T', ' ')} UTC" if last else ""), False
    gone = gone_line(summary)
    if gone:
        message += f"; {gone}"
    if not warnings:
        return "completed", message
    # Every warning: the runs list shows no more than this line.
    return "warnings", f"{plural(len(warnings), 'warning')}: {'; '.join(warnings)}" + (
        f" ({message})" if worked or gone else "")


def state_name(outcome_name: str) -> str:
    """The name of a finished night's final state: its outcome, capitalised (`Completed`,
    `Warnings`)."""
    return outcome_name.capitalize()


def _outside_range(record: dict, previous: list[dict], at_least: int, margin: float) -> list[tuple[str, int]]:
    """(what, photos it rests on) for each of tonight's rates outside the range of the
    previous finished nights that answered photos (at least `at_least` of them) by more
    than `margin`."""
    def rates(run: dict) -> dict:
        rows, scored = run.get("rows", 0), run.get("scored", 0)
        decided = run.get("female", 0) + run.get("male", 0)
        return {"reject rate": (run.get("rejected", 0) / rows if rows else None, rows),
                "unknown rate": (run.get("unknown", 0) / scored if scored else None, scored),
                "female share": (run.get("female", 0) / decided if decided else None, decided)}

    history = [rates(r) for r in previous if r.get("rows") and completed(r)]
    if len(history) < at_least or not record.get("rows"):
        return []
    found = []
    for name, (value, photos) in rates(record).items():
        past = [h[name][0] for h in history if h[name][0] is not None]
        if value is None or len(past) < at_least:
            continue
        low, high = min(past), max(past)
        span = f"the last {len(past)} nights' range ({100 * low:.1f}–{100 * high:.1f}%)"
        if value < low - margin:
            found.append((f"{name} {100 * value:.1f}% is {100 * (low - value):.1f} points under {span}", photos))
        elif value > high + margin:
            found.append((f"{name} {100 * value:.1f}% is {100 * (value - high):.1f} points over {span}", photos))
    return found


def alarms(record: dict, previous: list[dict], at_least: int = 3, margin: float = 0.01,
           min_photos: int = 0) -> list[str]:
    """Where tonight's reject rate, `unknown` rate or female share falls outside the range of
    the previous finished nights that answered photos (at least `at_least` of them) by more
    than `margin` (a point: less is noise), each rate measured on at least `min_photos`
    photos (photos read, scored and answered female or male)."""
    return [what for what, photos in _outside_range(record, previous, at_least, margin) if photos >= min_photos]


def withheld_alarms(record: dict, previous: list[dict], min_photos: int, at_least: int = 3,
                    margin: float = 0.01) -> list[str]:
    """The alarms tonight's rates would raise, withheld because each rests on fewer than
    `min_photos` photos."""
    return [f"{what}, on {plural(photos, 'photo')}: fewer than the {min_photos} an alarm needs"
            for what, photos in _outside_range(record, previous, at_least, margin) if photos < min_photos]


# -- a night's summary and its record -------------------------------------------------------------

def run_record(summary: dict, night: "Night", outcome_name: str, message: str) -> dict:
    """What the output keeps of a run (`_runs/`), for the next runs' trend and guards."""
    genders = summary.get("genders") or {}
    return {"run_id": summary["run_id"], "listed_at": night.context.listed_at.isoformat(),
            "source": night.options.where.source, "model": summary.get("model"),
            "production": night.production, "outcome": outcome_name,
            "message": message, "listed": summary.get("listed"), "new": summary.get("new", 0),
            "rows": summary.get("rows", 0), "scored": summary.get("scored", 0),
            "rejected": summary.get("rejected", 0), "unknown": genders.get("unknown", 0),
            "female": genders.get("female", 0), "male": genders.get("male", 0),
            "wall_seconds": summary.get("wall_seconds"), "files": summary.get("written") or [],
            "removed": summary.get("removed", 0), "users_left": (summary.get("users") or {}).get("removed", 0),
            "erased": summary.get("erased_users", 0)}


def _suites(listing_suite: dict | None, results: list[ShardResult]) -> dict:
    rows = [r.suite for r in results if r.suite]
    merged = None
    if rows:
        merged = {"suite": "predictions", "success": all(r["success"] for r in rows),
                  "evaluated": rows[0]["evaluated"], "passed": min(r["passed"] for r in rows),
                  "failures": [f for r in rows for f in r["failures"]], "runs": len(rows)}
    return {"listing_suite_report": listing_suite, "rows_suite_report": merged}


def _users(night: "Night", users: UsersUpdate) -> dict:
    return {"table": night.state.users.url, "users": users.users, "model": users.model,
            "on_model": users.users - users.behind, "behind": users.behind,
            "share": round((users.users - users.behind) / users.users, 4) if users.users else None,
            "refresh_budget": users.refresh_budget, "nights_left": users.nights_left,
            "upserted": users.applied.users_upserted, "removed": users.applied.users_removed,
            "versions": _versions(users.applied)}


def _versions(applied) -> dict | None:
    """The users table's versions the night wrote (its feed: after `from`, up to `to`)."""
    if applied.users_version_to is None:
        return None
    return {"from": applied.users_version_from, "to": applied.users_version_to}


def completed_summary(night: "Night", users: UsersUpdate | None, listing_suite: dict | None,
                      model_card: dict | None) -> dict:
    """The summary of a night that completed, with its outcome tag and the one-line
    message of its final state; the run's record is written beside the output."""
    results, listing, context = night.results, night.listing, night.context
    rows = [row for result in results for row in result.rows]
    answered = next((row for row in rows if row.model_name), None)
    # The publish and suite times are inside "score"; the summary separates them.
    checked, published = sum(r.suite_seconds for r in results), sum(r.publish_seconds for r in results)
    timings = {**night.timings, "predictions_suite": checked, "publish": published}
    timings["score"] = timings.get("score", 0.0) - checked - published
    summary = summarize(rows, merge_stats([r.stats for r in results]), listing.listed, listing.skipped_unchanged)
    last = next((r["listed_at"] for r in reversed(listing.recent_runs) if completed(r)), None)
    summary.update(model=f"{answered.model_name}@{answered.model_version}" if answered else context.model,
                   written=night.published(), shards=len(results), warnings=list(listing.warnings),
                   last_run_at=str(last) if last else None, run_id=context.run_id,
                   scoring_date=context.day.isoformat(), timings={k: round(v, 3) for k, v in timings.items()},
                   wall_seconds=round(night.seconds(), 3), model_card=model_card, production=night.production,
                   **_suites(listing_suite, results))
    plan = listing.plan
    summary.update(new=summary["new"] - plan.refresh, refreshed=plan.refresh, removed=plan.removed.num_rows,
                   excluded=plan.excluded, erased_skipped=plan.erased_skipped, waiting=listing.waiting,
                   erased_users=erasure_counts(listing.erasures)[0],
                   erasure_ids_unmatched=erasure_counts(listing.erasures)[1])
    if users is not None:
        summary["users"] = _users(night, users)
    tonight, least = run_record(summary, night, "completed", ""), night.options.guards.alarm_min_photos
    summary["alarms"] = alarms(tonight, listing.recent_runs, min_photos=least)
    summary["alarms_withheld"] = withheld_alarms(tonight, listing.recent_runs, least)
    for alarm in summary["alarms"]:
        log.warning("alarm: %s", alarm)
    for withheld in summary["alarms_withheld"]:
        log.info("alarm withheld: %s", withheld)
    outcome_name, message = outcome(summary)
    summary.update(outcome=outcome_name, message=message)
    record = run_record(summary, night, outcome_name, message)
    if users is not None:
        record.update(users=users.users, users_behind=users.behind, users_versions=_versions(users.applied))
    record_run(context.output, record)
    summary["recent_runs"] = listing.recent_runs[-9:] + [record]
    return summary


def failed_summary(night: "Night", outcome_name: str, message: str, error: BaseException | None = None) -> dict:
    """A night that failed or was cancelled is on the record too: what was listed, what
    failed and why, what was written, and (while the run holds the output) a row in the
    output's trend. Never raises: the failure is what matters."""
    listing, context = night.listing, night.context
    summary = {"run_id": context.run_id, "scoring_date": context.day.isoformat(), "outcome": outcome_name,
               "message": message, "stage": night.stage, "model": context.model, "written": night.published(),
               "listed": listing.listed if listing else getattr(error, "listed", None),
               "new": len(listing.objects) if listing else getattr(error, "new", 0),
               "timings": {k: round(v, 3) for k, v in night.timings.items()}, "wall_seconds": round(night.seconds(), 3)}
    try:
        # A run that never held the output (locked, unreachable) reads and writes nothing there.
        previous = listing.recent_runs if listing else (recent_runs(context.output) if night.holds_output else [])
        record = run_record(summary, night, outcome_name, message)
        if night.holds_output:
            record_run(context.output, record)
        summary["recent_runs"] = previous[-9:] + [record]
    except Exception as failure:  # storage may be what failed
        log.warning("the failed run could not be recorded beside the output: %s", failure)
    return summary
