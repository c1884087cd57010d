"""Prefect tasks of the nightly scoring: thin wrappers (names, retries, logs, progress)
around the steps of night.night.Night, and the model a shard loads from the registry."""

from __future__ import annotations

import time
from functools import lru_cache

import pandas as pd
from prefect import get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Completed, State

from gender_pipeline.lake.keys import user_of
from gender_pipeline.lake.storage import Stores, retry_if_transient
from gender_pipeline.models.registry import ModelRef, Registry
from gender_pipeline.night.checks import ExpectationsFailed, check_photo_metadata
from gender_pipeline.night.context import RunContext
from gender_pipeline.night.night import Night, NightListing, UsersUpdate
from gender_pipeline.night.report import state_name
from gender_pipeline.night.shards import Shard, ShardResult, score_shard
from gender_pipeline.night.words import plural
from gender_pipeline.runtime.stopping import Stop, StopRequested
from gender_pipeline.tasks.reports import artifact_key, report_failed_night
from gender_pipeline.tasks.run_control import failed, finish_all, one_line, retry_unless_stopped, stopped, tag_run


@task(name="lock-output", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def lock_output(night: Night) -> None:
    """One run at a time per output, so two runs never answer the same photo."""
    lease = night.lock()
    get_run_logger().info("holding %s/%s", night.options.where.output, lease.key)


@task(name="unlock-output", cache_policy=NO_CACHE)
def unlock_output(night: Night) -> None:
    """Let go of the output; the flow calls this only once no shard can write any more."""
    if night.holds_output:
        night.release()
        get_run_logger().info("released %s/%s", night.options.where.output, night.lease.key)


@task(name="list-new-photos", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def list_new_photos(night: Night) -> NightListing:
    """The photos to read tonight (Night.plan)."""
    return night.plan()


@task(name="check-photo-metadata", cache_policy=NO_CACHE)
def check_listing_task(listing: NightListing) -> dict | None:
    """Before inference: the photos to read have unique, contained keys and sane sizes.
    Returns the suite's verdict (None when there is nothing to read)."""
    if not listing.objects:
        get_run_logger().info("nothing to read: no listing to check")
        return None
    readable = [o for o in listing.objects if user_of(o.key) is not None]
    report = check_photo_metadata(pd.DataFrame({"photo_key": [o.key for o in readable],
                                                "size_bytes": [o.size for o in readable]}))
    get_run_logger().info(report.text())
    if not report.success:
        raise ExpectationsFailed(report)
    return report.as_dict()


def load_model(context: RunContext):
    """The night's model (checked before the lock: it answers gender), loaded once per
    process and kept (a Dask worker keeps it between shards and nights)."""
    options = context.options
    return _model(options.where.registry, options.where.endpoint_url, context.model, options.compute.device,
                  options.model.abstain_threshold, options.compute.compile)


@lru_cache(maxsize=4)
def _model(registry: str | None, endpoint_url: str | None, model: str, device: str, abstain_threshold: float | None,
           compile: bool):
    return Registry(registry, Stores(endpoint_url).options).load_predictor(
        ModelRef.parse(model), device=device, abstain_threshold=abstain_threshold, compile=compile)


class Progress:
    """A progress bar on the flow run while a shard runs, and a log line every 10% or
    5 seconds; the bar goes when the shard ends (the summary says the rest)."""

    def __init__(self, shard: Shard, output: str) -> None:
        self.total, self.logger = len(shard.objects), get_run_logger()
        self.artifact = create_progress_artifact(0.0, description=f"shard {shard.index} of {output}: photos "
                                                                  f"answered out of {self.total}")
        self.last, self.pct = time.monotonic(), 0.0

    def __call__(self, done: int, of: int) -> None:
        pct, now = 100.0 * done / max(of, 1), time.monotonic()
        if done == of or now - self.last >= 5 or pct - self.pct >= 10:
            self.logger.info("progress: %d/%d photos (%.0f%%)", done, of, pct)
            update_progress_artifact(self.artifact, pct)
            self.last, self.pct = now, pct

    def remove(self) -> None:
        try:
            with get_client(sync_client=True) as client:
                client.delete_artifact(self.artifact)
        except Exception as error:  # a leftover progress bar never fails a shard
            self.logger.debug("could not remove the progress artifact: %s", error)


@task(name="score-shard", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_stopped,
      cache_policy=NO_CACHE)
def score_shard_task(context: RunContext, shard: Shard) -> ShardResult | Cancelled:
    """Score one shard, check its rows, publish them as one file (night.shards). A retry
    redoes this shard only; the photos of shards already published are not in a rerun's
    listing."""
    logger = get_run_logger()
    progress = None
    try:
        model = load_model(context)
        options = context.options.scoring(model.device)
        logger.info("shard %d: %d photos; model %s@%s on %s, batch size %d, framing %s", shard.index,
                    len(shard.objects), model.name, model.version, model.device,
                    options.batch_size or model.auto_batch_size(), model.framing.to_dict())
        progress = Progress(shard, context.options.where.output)
        return score_shard(context, shard, model, progress, on_failed_suite=lambda report: _failed_suite(
            report, context.options.where.output))
    except StopRequested as error:
        logger.warning("shard %d stopped before publishing: %s", shard.index, error)
        return Cancelled(message=f"stopped before publishing: {error}")
    finally:
        if progress is not None:
            progress.remove()


def _failed_suite(report, output: str) -> None:
    """A failed predictions suite's report, as an artifact of the run."""
    create_markdown_artifact("```\n" + report.text() + "\n```", key=artifact_key("predictions-suite", output),
                             description=f"predictions suite failed for {output}: nothing was published")


@task(name="update-users-table", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def update_users_table(night: Night) -> UsersUpdate:
    """The night's rows into the photo state and the users table (Night.update_users)."""
    return night.update_users(night.results)


@task(name="check-inputs", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def check_inputs(night: Night) -> None:
    """Before anything is written: the source is there, the opt-out list reads, and the
    model resolves to a NAME@VERSION (the production pointer, else the shipped network),
    which every shard then loads (a long-lived worker that cached the model of an earlier
    night never answers with it after a promotion)."""
    night.check_inputs()
    options = night.options
    registry = Registry(options.where.registry, night.context.stores.options)
    name, version = registry.resolve(ModelRef.parse(options.model.name))
    registry.check_scores(name, version)
    night.answer_with(f"{name}@{version}")
    night.production = "@".join(registry.production())
    get_run_logger().info("answering with %s", night.context.model)


class NightRun:
    """The Prefect side of one night, around the flow's steps:

        with NightRun(night, stop) as run:
            ...the steps...
            run.completed(summary)
        return run.state

    Leaving, it lets every shard end before the output is let go (no shard of the night
    can write after that), puts a failed or stopped night on the record (its summary, its
    row in the trend, its outcome tag) and sets the flow's final state: Completed (named
    Warnings when the night warned), Cancelled with the reason, or Failed with one line
    for a failure the README lists (anything else raises, traceback and all)."""

    def __init__(self, night: Night, stop: Stop) -> None:
        self.night, self.stop = night, stop
        self.futures: list = []
        self.state: State | None = None

    def __enter__(self) -> "NightRun":
        return self

    def score_shards(self) -> list[ShardResult]:
        """Every shard of the night, mapped over the task runner (this process, or Dask)."""
        self.futures = score_shard_task.map(unmapped(self.night.context), self.night.shards())
        finish_all(self.futures)
        self.stop.check()
        return self.futures.result()

    def completed(self, summary: dict) -> None:
        warned = len(summary.get("warnings") or []) + len(summary.get("alarms") or [])
        # A night with warnings reads apart from a clean one in both runs lists: its name too.
        tag_run(outcome=summary["outcome"], rename=f"⚠ {plural(warned, 'warning')}" if warned else None)
        self.state = Completed(message=summary["message"], data=summary, name=state_name(summary["outcome"]))

    def __exit__(self, kind, error, _traceback) -> bool:
        finish_all(self.futures)  # stop, then let go: no shard of this run can write after this
        night = self.night
        night.results = [f.result() for f in self.futures if f.state.is_completed()]
        stopping = self.stop.requested or isinstance(error, StopRequested)
        if (error is None and not stopping) or (error is not None and not isinstance(error, Exception)):
            unlock_output(night)
            return False
        if stopping:
            held = night.holds_output
            self._on_record("cancelled", f"stopped ({self.stop.reason}) " + (
                f"while {night.stage}" if held else "before taking the output lock"))
            unlock_output(night)
            self.state = stopped(self.stop, f"{plural(len(night.published()), 'shard file')} published before the "
                                            f"stop; every other photo is new again for the next run" if held else
                                            "before taking the output lock; nothing was written")
            return True
        self._on_record("failed", one_line(error), error)
        unlock_output(night)
        self.state = failed(error)  # raises what is not a failure the README lists
        return True

    def _on_record(self, outcome_name: str, message: str, error: BaseException | None = None) -> None:
        report_failed_night(self.night, outcome_name, message, error)
        tag_run(outcome=outcome_name)
