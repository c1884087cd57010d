"""What a night shows in the Prefect UI: its summary as a Markdown artifact (keyed per
output, so each output's history reads as one series), its counts and rejected photos as
tables, links to the files it wrote; a failed or cancelled night's report. The summaries
themselves come from night.report."""

from __future__ import annotations

import hashlib
import re

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from gender_pipeline.lake.answers import ModelRef
from gender_pipeline.lake.storage import Store
from gender_pipeline.models.registry import Registry
from gender_pipeline.night.night import Night, UsersUpdate
from gender_pipeline.night.render import render_failure_markdown, render_markdown
from gender_pipeline.night.report import completed_summary, failed_summary, rejected_rows


def artifact_key(name: str, output: str) -> str:
    """`name` keyed per output (artifact keys take lowercase letters, digits and dashes), so
    each output's history in the UI reads as one series."""
    tail = re.sub(r"[^a-z0-9]+", "-", output.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:24]
    return f"{name}-{tail or 'output'}-{hashlib.sha256(output.encode()).hexdigest()[:8]}"


def file_link(url: str, how: str, store: Store) -> str | None:
    """A URL a browser can open for a written file, or None: `how` is none, presigned (the
    store signs an https URL, e.g. S3), or an https:// template with {url}, {bucket}, {key}."""
    if how == "none":
        return None
    if how == "presigned":
        try:
            link = store.fs.url(url.split("://", 1)[-1], expires=7 * 24 * 3600)
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            return None
        return link if str(link).startswith("https://") else None
    bucket, _, key = url.split("://", 1)[-1].partition("/")
    return how.format(url=url, bucket=bucket, key=key)


def model_card_summary(registry: Registry, model: str) -> dict | None:
    """From the model card: what an operator needs to read the answers."""
    ref = ModelRef.of(model)
    if ref is None:
        return None
    try:
        card = registry.card(ref.name, ref.version)
    except Exception:  # a report must not fail the run
        return None
    data, metrics = card.get("data") or {}, card.get("metrics") or {}
    test = metrics.get("test") or {}
    if data:
        trained_on = (f"{data.get('faces_used', data.get('images'))} faces of a {data.get('format')} dataset "
                      f"(fingerprint {str(data.get('fingerprint', ''))[:12]}…)")
    else:
        trained_on = card.get("source", "?")
    if test.get("accuracy") is not None:
        accuracy = f"{100 * test['accuracy']:.2f}% on {test.get('count')} test faces"
    elif (metrics.get("reported") or {}).get("lfw_accuracy"):
        accuracy = f"{100 * metrics['reported']['lfw_accuracy']:.0f}% on LFW (reported by its authors)"
    else:
        accuracy = None
    age = None
    if "age" in (card.get("attributes") or ()):
        measured = test.get("age") or {}
        age = {"abstain_threshold": float((card.get("age") or {}).get("abstain_threshold", 0.0)),
               "mae": measured.get("mae"), "band_accuracy": measured.get("band_accuracy")}
    return {"kind": f"{card.get('format')} ({card.get('arch')})", "framing": card.get("framing") or {},
            "abstain_threshold": float(card.get("abstain_threshold", 0.5)), "trained_on": trained_on,
            "accuracy": accuracy, "attributes": list(card.get("attributes") or ["gender"]), "age": age}


def report_night(night: Night, users: UsersUpdate | None, listing_suite: dict | None) -> dict:
    """The night's summary, recorded beside the output and shown on the flow run (called
    from the flow, not from a task: the artifacts belong to the flow run itself)."""
    where = night.options.where
    registry = Registry(where.registry, night.context.stores.options)
    summary = completed_summary(night, users, listing_suite, model_card_summary(registry, night.context.model))
    output, source = where.output, where.source
    message = summary["message"]
    # Each entry of a key's history names its night: the Artifacts pages list them by description.
    night_of = f"night of {summary['scoring_date']} (listed {night.context.listed_at:%Y-%m-%d %H:%M} UTC)"
    create_markdown_artifact(render_markdown(summary, source, output), key=artifact_key("scoring-summary", output),
                             description=f"{summary['outcome'].capitalize()}, {night_of}: {message} (nightly "
                                         f"scoring of {source} into {output})")
    create_table_artifact([{"status": "scored", "photos": summary["scored"]},
                           {"status": "rejected", "photos": summary["rejected"]},
                           {"status": "unchanged (skipped)", "photos": summary["skipped_unchanged"]}],
                          key=artifact_key("scoring-counts", output),
                          description=f"Photos by status, {night_of}, in {output}")
    rejected = rejected_rows([row for result in night.results for row in result.rows])
    more = summary["rejected"] - len(rejected)
    # Every night, none rejected included: the key's latest entry is always tonight's.
    create_table_artifact(rejected or [{"photo_key": "", "reason": "", "detail": "no photo rejected tonight"}],
                          key=artifact_key("rejected-photos", output),
                          description=f"Rejected photos, {night_of}, in {output}: "
                                      + (f"{len(rejected)}, with the reason" if rejected else "none")
                                      + (f" (the first {len(rejected)}; {more} more in the Parquet)" if more else ""))
    store = night.context.output
    for url in summary["written"]:
        link = file_link(url, where.file_links, store)
        if link:
            create_link_artifact(link, link_text=url, key=artifact_key("predictions-file", output),
                                 description=f"A Parquet file written on the night of {summary['scoring_date']}")
    return summary


def report_failed_night(night: Night, outcome_name: str, message: str, error: BaseException | None = None) -> dict:
    """A failed or cancelled night on the record (night.report.failed_summary) and on the
    flow run. Never raises: the failure is what matters."""
    summary = failed_summary(night, outcome_name, message, error)
    where = night.options.where
    try:
        create_markdown_artifact(render_failure_markdown(summary, where.source, where.output),
                                 key=artifact_key("scoring-summary", where.output),
                                 description=f"{outcome_name.capitalize()}, night of {summary['scoring_date']}: "
                                             f"{message} (nightly scoring of {where.source} into {where.output})")
    except Exception as failure:
        get_run_logger().warning("the failure report could not be written: %s", failure)
    return summary
