"""What a person reads after a run and of an output: the one-screen summary the CLI
prints, the run's Markdown artifact in the Prefect UI (what was new, where the time went,
the trend of the last nights, where the rows are), the failure report, and `status`."""

from __future__ import annotations

from gender_pipeline.lake.answers import in_band_order
from gender_pipeline.lake.runs import completed, erasure_counts
from gender_pipeline.night.words import plural, run_time


# The flow's stages, in order, for the time table.
STAGES = (("list", "list the source"), ("listing_suite", "check the listing (suite)"),
          ("score", "read, decode, find faces, classify"), ("predictions_suite", "check the rows (suite)"),
          ("publish", "publish the Parquet files"), ("users", "update the users table (MERGE)"))


WORKER_STAGES = ("read", "decode", "detect", "landmarks", "warp", "model")


# the GPU path's own stages: headers read on the CPU, JPEGs decoded on the device
GPU_STAGES = ("header", "device_decode")


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


def gone_line(summary: dict) -> str | None:
    """Photos gone from the source tonight and users who left the table, in words."""
    removed = summary.get("removed") or 0
    left = (summary.get("users") or {}).get("removed") or 0
    parts = ([f"{plural(removed, 'photo')} gone from the source"] if removed else []) + (
        [f"{plural(left, 'user')} left the users table"] if left else [])
    return ", ".join(parts) or None


def erased_line(summary: dict) -> str | None:
    """The erasures since the last night: the users erased, and the ids asked that matched
    nothing (nobody was erased for them)."""
    erased, unmatched = summary.get("erased_users") or 0, summary.get("erasure_ids_unmatched") or 0
    if not (erased or unmatched):
        return None
    return (f"{plural(erased, 'user')} erased since the last run"
            + (f" ({plural(unmatched, 'more id')} asked matched nobody)" if unmatched else ""))


def headline(summary: dict) -> str:
    """One sentence: what this run did."""
    refreshed = summary.get("refreshed", 0)
    erased = erased_line(summary)
    erased = f" {erased[0].upper()}{erased[1:]}." if erased else ""
    gone = gone_line(summary)
    gone = f" {gone[0].upper()}{gone[1:]}." if gone else ""
    if summary["new"] == 0 and not refreshed:
        since = f" since the run of {summary['last_run_at'][:16].replace('T', ' ')} UTC" if summary.get(
            "last_run_at") else ""
        if not summary["listed"]:
            return (f"The source is empty: no photo listed, no file written. {summary['model']} would have "
                    f"answered.{gone}{erased}")
        listed = ("the photo listed was" if summary["listed"] == 1
                  else f"the {plural(summary['listed'], 'photo')} listed were all")
        return (f"Nothing new{since}: {listed} answered before; no file written. {summary['model']} would have "
                f"answered.{gone}{erased}")
    what = plural(summary["new"], "new photo")
    if refreshed:
        what += f" and {refreshed} re-scored (their users had another model's answer)"
    return (f"{what}: {summary['scored']} scored, {summary['rejected']} rejected, by {summary['model']}; "
            f"{plural(summary['skipped_unchanged'], 'photo')} unchanged since their last answer.{gone}{erased}")


def users_line(summary: dict) -> str | None:
    """The users table in one sentence: its size and how much of it the run's model answers."""
    users = summary.get("users")
    if not users:
        return None
    if not users["users"]:
        return "the users table has no user with an answer yet"
    if not users["behind"]:
        return f"{plural(users['users'], 'user')}, every answer from {users['model']}"
    if users["nights_left"] is None:
        left = "--refresh-budget is 0: they keep their answers"
    else:
        left = f"{plural(users['nights_left'], 'more night')} at --refresh-budget {users['refresh_budget']}"
    behind = ("1 still has" if users["behind"] == 1 else f"{users['behind']:,} still have")
    return (f"{plural(users['users'], 'user')}; {users['model']} answers {users['on_model']} "
            f"({100 * users['share']:.1f}%), {behind} another model's answer: {left}")


def age_bands_line(bands: dict | None) -> str | None:
    """`18-24 12, 25-34 30, …, unknown 2` (bands in order; None when there is no age)."""
    if not bands:
        return None
    return ", ".join(f"{band} {count:,}" for band, count in in_band_order(bands).items())


def suites_line(summary: dict) -> str | None:
    """Both data checks' verdicts in one line."""
    parts = []
    for key, name in (("listing_suite_report", "listing"), ("rows_suite_report", "rows")):
        report = summary.get(key)
        if not report:
            continue
        if report["success"]:
            parts.append(f"{name}: {report['passed']} of {report['evaluated']} expectations passed"
                         + (f" ({report['runs']} shards)" if report.get("runs", 1) > 1 else ""))
        else:
            parts.append(f"{name}: FAILED " + "; ".join(report["failures"]))
    return "; ".join(parts) or None


def production_line(summary: dict) -> str | None:
    """Whether the model that answered is production, and which one production is."""
    production = summary.get("production")
    if not production:
        return None
    if production == summary.get("model"):
        return "the production model (`gender-pipeline promote NAME@VERSION` moves it)"
    return f"not production: production is {production}"


def model_lines(summary: dict) -> list[str]:
    """What an operator needs to read the answers: production or not, and the model card."""
    card = summary.get("model_card")
    production = production_line(summary)
    if not card:
        return [production] if production else []
    framing = card.get("framing") or {}
    lines = ([production] if production else []) + [f"kind {card.get('kind')}; faces found by {framing.get('detector', 'retinaface')}, framed as "
             f"{framing.get('kind')} ({framing.get('size')} px, padding {framing.get('padding')})",
             f"abstains (answers `unknown`) under {card['abstain_threshold']:.3f} confidence"
             + (f" ({plural(summary['genders']['unknown'], 'photo')} tonight)" if summary.get("genders", {}).get("unknown")
                else "")]
    age = card.get("age")
    if age:
        measured = (f"; held-out age MAE {age['mae']:.2f} years, band right {100 * age['band_accuracy']:.1f}%"
                    if age.get("mae") is not None else "")
        withheld = (f"the band is `unknown` under {age['abstain_threshold']:.3f} probability"
                    if age["abstain_threshold"] > 0 else "a band for every face (no threshold)")
        lines.append(f"answers age too: {withheld}" + measured)
    trained = card.get("trained_on")
    accuracy = card.get("accuracy")
    lines.append(f"trained on {trained}" + (f"; held-out accuracy {accuracy}" if accuracy else ""))
    return lines


def render_text(summary: dict, command_seconds: float | None = None) -> str:
    """The one-screen summary the CLI prints (`command_seconds`: how long the command has
    run, start-up included, beside the flow's own time)."""
    lines = [headline(summary)]
    lines += [f"WARNING      {w}" for w in summary.get("warnings", []) + summary.get("alarms", [])]
    lines += [f"withheld     alarm: {a}" for a in summary.get("alarms_withheld", [])]
    lines.append(f"listed       {summary['listed']:>8}   new {summary['new']}, unchanged {summary['skipped_unchanged']}"
                 + (f", gone {summary['removed']}" if summary.get("removed") else ""))
    if summary["rows"]:
        lines.append(f"rows written {summary['rows']:>8}   scored {summary['scored']}, rejected {summary['rejected']}")
        if summary["reject_reasons"]:
            lines.append("reject reasons " + ", ".join(f"{k}={v}" for k, v in summary["reject_reasons"].items()))
        g = summary["genders"]
        lines.append(f"genders      female {g['female']}, male {g['male']}, unknown {g['unknown']}")
        if age_bands_line(summary.get("age_bands")):
            lines.append(f"age bands    {age_bands_line(summary['age_bands'])}")
    if summary["scored"]:
        lines.append("p_male")
        lines += ["  " + line for line in bars(summary["p_male_histogram"]).splitlines()]
    wall = summary.get("wall_seconds")
    if wall:
        rate = f", {summary['rows'] / wall:.2f} photos/s over the whole run" if summary["rows"] else ""
        command = f" ({command_seconds:.1f} s since the command started)" if command_seconds else ""
        lines.append(f"time         {wall:.1f} s in the flow{command}{rate}; "
                     + ", ".join(f"{name} {summary['timings'].get(key, 0):.1f} s" for key, name in
                                 (("list", "list"), ("listing_suite", "listing suite"), ("score", "scoring"),
                                  ("predictions_suite", "predictions suite"), ("publish", "publish"),
                                  ("users", "users table"))))
    suites = suites_line(summary)
    if suites:
        lines.append(f"data checks  {suites}")
    for number, line in enumerate(model_lines(summary)):
        lines.append(f"{'model' if number == 0 else '':<12} {summary['model'] + ': ' if number == 0 else ''}{line}")
    written = summary.get("written") or []
    lines.append(f"output       {', '.join(written) if written else 'nothing new: no file written'}")
    if users_line(summary):
        left = (summary.get("users") or {}).get("removed")
        lines.append(f"users        {users_line(summary)}" + (f"; {plural(left, 'user')} left the table tonight"
                                                               if left else ""))
        lines.append(f"             {summary['users']['table']}")
        if feed_line(summary):
            lines.append(f"             {feed_line(summary)}")
    return "\n".join(lines)


def feed_line(summary: dict) -> str | None:
    """Which versions of the users table the night wrote: its change data feed."""
    versions = (summary.get("users") or {}).get("versions")
    if not versions:
        return None
    first = (versions["from"] if versions["from"] is not None else -1) + 1
    span = f"version {versions['to']}" if first == versions["to"] else f"versions {first} to {versions['to']}"
    return f"tonight's changes: {span} (`DeltaTable(…).load_cdf(starting_version={first})`)"


def render_markdown(summary: dict, source: str, output: str) -> str:
    """The run's report for the Prefect UI."""
    parts = [f"## Nightly scoring, {summary['scoring_date']}",
             f"`{source}` → `{output}`", "", headline(summary), ""]
    for warning in summary.get("warnings", []) + summary.get("alarms", []):
        parts.append(f"> **Warning:** {warning}")
    for withheld in summary.get("alarms_withheld", []):
        parts.append(f"> Alarm withheld: {withheld}")
    if summary.get("warnings") or summary.get("alarms") or summary.get("alarms_withheld"):
        parts.append("")
    if summary["rows"]:
        g = summary["genders"]
        parts += ["| | photos |", "| --- | --- |",
                  f"| scored | {summary['scored']} |", f"| rejected | {summary['rejected']} |",
                  *(f"| rejected: {k} | {v} |" for k, v in summary["reject_reasons"].items()),
                  *(f"| {k} | {v} |" for k, v in g.items() if v), ""]
        if summary.get("age_bands"):
            parts += ["**Age bands** of the scored photos (`unknown`: under the model's age threshold)", "",
                      "| age band | photos |", "| --- | --- |",
                      *(f"| {band} | {count} |" for band, count in summary["age_bands"].items()), ""]
    suites, model = suites_line(summary), model_lines(summary)
    if suites:
        parts += [f"**Data checks**: {suites}.", ""]
    if model:
        parts += [f"**Model** {summary['model']}: " + "; ".join(model) + ".", ""]
    if summary["scored"]:
        parts += ["**p_male of the scored photos**", "", "```", bars(summary["p_male_histogram"]), "```", ""]
    users = summary.get("users")
    if users:
        parts += [f"**Users table** (`{users['table']}`, one current answer per user): {users_line(summary)}."
                  + (f" {feed_line(summary)[0].upper()}{feed_line(summary)[1:]}." if feed_line(summary) else ""), "",
                  "```python", "from deltalake import DeltaTable", f'DeltaTable("{users["table"]}").to_pandas()',
                  "```", ""]
    parts += _time_table(summary)
    parts += _trend_table(summary)
    written = summary.get("written") or []
    if written:
        root = f"{output.rstrip('/')}/predictions"
        parts += ["**Files written** (copy a URL; readers skip the `_`-prefixed temporaries):", ""]
        parts += [f"- `{url}`" for url in written]
        parts += ["", "```python", "import pandas as pd", "", "# every day, with a dt column",
                  f'pd.read_parquet("{root}")', "```",
                  "```sql", "SELECT *", f"FROM read_parquet('{root}/*/*.parquet',", "                  hive_partitioning = true,", "                  union_by_name = true);",
                  "```"]
    return "\n".join(parts)


def render_failure_markdown(summary: dict, source: str, output: str) -> str:
    """The report of a run that failed or was cancelled: what was listed, what failed and
    why, what was (not) written."""
    title = "FAILED" if summary["outcome"] == "failed" else "CANCELLED"
    parts = [f"## Nightly scoring {title}, {summary['scoring_date']}", f"`{source}` → `{output}`", "",
             f"**{summary['message']}**", ""]
    if summary.get("listed") is not None:
        parts.append(f"- listed: {plural(summary['listed'], 'photo')} under the source, {summary.get('new', 0)} new to read")
    else:
        parts.append("- the source was not listed")
    parts.append(f"- stage: {summary.get('stage', '?')}")
    written = summary.get("written") or []
    parts.append(f"- written: {plural(len(written), 'shard file')} published before the end" if written else
                 "- written: nothing (no history file, the users table unchanged)")
    parts += [f"  - `{url}`" for url in written]
    if written:
        parts.append("- the next run applies the published rows to the users table first, and reads every other "
                     "photo again")
    parts += [f"- model: {summary.get('model', '?')}", ""]
    parts += _time_table(summary) if summary.get("timings") else []
    parts += _trend_table(summary)
    return "\n".join(parts)


def _time_table(summary: dict) -> list[str]:
    wall = summary.get("wall_seconds")
    if not wall:
        return []
    timings = summary.get("timings", {})
    rate = f" ({summary['rows'] / wall:.2f} photos/s)" if summary.get("rows") else ""
    rows = [f"**Where the time went**: {wall:.1f} s in the flow{rate}.", "", "| stage | seconds |", "| --- | --- |"]
    rows += [f"| {name} | {timings[key]:.2f} |" for key, name in STAGES if key in timings]
    other = wall - sum(timings.get(key, 0) for key, _ in STAGES)
    rows.append(f"| other (Prefect, lock, this report) | {max(0.0, other):.2f} |")
    inside = summary.get("stage_seconds", {})
    if summary.get("new") and any(inside.get(k) for k in WORKER_STAGES):
        rows += ["", "Inside scoring (seconds summed over the worker processes working at once): "
                 + ", ".join(f"{k.replace('_', ' ')} {inside.get(k, 0):.1f}" for k in WORKER_STAGES
                             + tuple(k for k in GPU_STAGES if inside.get(k))) + "."]
    return rows + [""]


def _trend_table(summary: dict) -> list[str]:
    runs = summary.get("recent_runs") or []
    if len(runs) < 2:
        return []
    # Narrow columns (the Prefect UI shows an artifact beside its details panel): the time
    # kept on one line with a non-breaking hyphen and space (characters, not HTML entities:
    # the V1 UI shows those as written), the model a column only when the runs differ.
    models = {run.get("model") for run in runs}
    one_model = len(models) == 1
    rows = [f"**The last {len(runs)} runs of this output** (gone: photos no longer in the source; left: users "
            "who left the users table with them; erased: users erased by `forget` before the run"
            + (f"; every run answered by {next(iter(models))}" if one_model else "") + ")", "",
            "| UTC | outcome | listed | new | rows | rejected | unknown | female | gone | left | erased | s |"
            + ("" if one_model else " model |"),
            "| --- " * (12 if one_model else 13) + "|"]
    for run in runs:
        wall, count = run.get("wall_seconds") or 0, run.get("rows", 0)
        decided = run.get("female", 0) + run.get("male", 0)
        when = str(run.get("listed_at", ""))[5:16].replace("T", "\u00a0").replace("-", "\u2011")
        rows.append(f"| {when} | {run.get('outcome', 'completed')} "
                    f"| {'—' if run.get('listed') is None else run['listed']} | {run.get('new', 0)} "
                    f"| {count} | {_rate(run.get('rejected', 0), count)} "
                    f"| {_rate(run.get('unknown', 0), run.get('scored', 0))} | {_rate(run.get('female', 0), decided)} "
                    f"| {run.get('removed', '—')} | {run.get('users_left', '—')} | {run.get('erased', '—')} "
                    f"| {wall:.0f} |" + ("" if one_model else f" {run.get('model', '')} |"))
    return rows + [""]


def run_line(run: dict) -> str:
    """One run of the output, for `status`: when, the outcome, what it did, the model."""
    seconds = f", {run['wall_seconds']:.0f} s" if run.get("wall_seconds") else ""
    what = run.get("message") or ""
    return f"{run_time(run)}  {run.get('outcome', 'completed'):<9}  {what} (model {run.get('model')}{seconds})"


def render_status(status: dict, days: int = 14, runs_shown: int = 5) -> str:
    """`gender-pipeline status` for people: the last run and its outcome, the history, the
    users table, rates by day, the models."""
    lines = [f"output       {status['output']}"]
    runs = status.get("runs") or []
    if runs:
        shown = runs[-runs_shown:]
        lines.append(f"last runs    the last {plural(len(shown), 'run')} (UTC), newest last:")
        lines += [f"             {run_line(run)}" for run in shown]
        done = next((r for r in reversed(runs) if completed(r)), None)
        failed = [r for r in runs if not completed(r)]
        lines.append("             last finished (completed or warnings): "
                     + (run_time(done) + " UTC" if done else "none of these"))
        production = next((r.get("production") for r in reversed(runs) if r.get("production")), None)
        if production:
            lines.append(f"production   {production}, as the last night found it (`gender-pipeline models` for the "
                         f"registry's own view)")
        if failed:
            which = ", ".join(f"{run_time(r)} {r.get('outcome')}" for r in failed[-3:])
            lines.append(f"             failed or cancelled: {len(failed)} of the last {len(runs)} ({which})")
    else:
        lines.append("last runs    none recorded")
    days_seen = len(status["partitions"])
    lines.append(f"history      {plural(status['rows'], 'row')} in {plural(status['files'], 'file')} over {days_seen} "
                 f"day{'s' if days_seen != 1 else ''}")
    users = status["users"]
    if users["users"]:
        g = users["genders"]
        share = ", ".join(f"{m['model']} {100 * m['share']:.1f}%" for m in users["models"])
        lines.append(f"users        {users['users']:,} with an answer: female {g['female']:,}, male {g['male']:,}, "
                     f"unknown {g['unknown']:,}; answered by {share}")
        if users.get("age_bands"):
            without = users["users"] - sum(users["age_bands"].values())
            lines.append(f"age bands    {age_bands_line(users['age_bands'])}"
                         + (f"; {plural(without, 'user')} without an age (a model that answers none)"
                            if without else ""))
    else:
        lines.append("users        none with an answer yet")
    lines.append(f"             {users['table']}" + (f" (version {users['version']})" if users.get("version")
                                                     is not None else ""))
    feed = users.get("feed")
    if feed:
        first = (feed["from"] if feed["from"] is not None else -1) + 1
        lines.append(f"             the last night's changes: versions {first} to {feed['to']} of its change data "
                     f"feed (load_cdf(starting_version={first}))")
    if status["partitions"]:
        shown = status["partitions"][-days:]
        lines.append(f"by day       {'dt':<10} {'rows':>8} {'rejected':>9} {'unknown':>8}"
                     + (f"   (the last {len(shown)} of {len(status['partitions'])})" if len(shown) < len(
                         status["partitions"]) else ""))
        lines += [f"             {p['dt']:<10} {p['rows']:>8,} {100 * p['reject_rate']:>8.1f}% "
                  f"{100 * p['unknown_rate']:>7.1f}%" for p in shown]
    if status["reject_reasons"]:
        lines.append("rejected     " + ", ".join(f"{k} {v:,}" for k, v in status["reject_reasons"].items()))
    if status["models"]:
        lines.append("models       " + ", ".join(f"{m['model']} {plural(m['rows'], 'row')}" for m in status["models"]))
    erasures = status.get("erasures") or []
    if erasures:
        erased, unmatched = erasure_counts(erasures)
        lines.append(f"erasures     {len(erasures)}: {plural(erased, 'user')} erased"
                     + (f", {plural(unmatched, 'id')} that matched nobody" if unmatched else "")
                     + f"; the last {str(erasures[-1].get('listed_at', ''))[:16].replace('T', ' ')} UTC")
    return "\n".join(lines)
