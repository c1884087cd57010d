"""Great Expectations suites: the photo listing before inference, the predictions before
they are published. Ephemeral context: nothing is written to disk."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd

from gender_pipeline.lake.answers import AGE_BAND_VALUES, GENDERS, REJECT_REASONS, STATUSES
from gender_pipeline.lake.columns import AGE_ANSWER
from gender_pipeline.runtime.errors import DataFailure

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@dataclass
class SuiteReport:
    suite: str
    success: bool
    evaluated: int
    failures: list[str]

    @property
    def passed(self) -> int:
        return self.evaluated - len(self.failures)

    def as_dict(self) -> dict:
        return {"suite": self.suite, "success": self.success, "evaluated": self.evaluated, "passed": self.passed,
                "failures": list(self.failures)}

    def text(self) -> str:
        head = f"{self.suite}: {'passed' if self.success else 'FAILED'} ({self.evaluated} expectations)"
        return "\n".join([head, *(f"  - {f}" for f in self.failures)])


class ExpectationsFailed(DataFailure, RuntimeError):
    """A data check failed: nothing was published."""

    prefix = "a data check failed, nothing was published:\n"

    def __init__(self, report: SuiteReport) -> None:
        super().__init__(report.text())
        self.report = report


_context_lock = threading.Lock()


def warm_up() -> threading.Thread:
    """Import Great Expectations and build its context in a background thread (about two
    seconds, most of a suite's cost), so that the first suite of a run does not wait for it."""
    thread = threading.Thread(target=_context, name="expectations-warm-up", daemon=True)
    thread.start()
    return thread


def _context():
    # scipy (under Great Expectations) looks at sys.modules["torch"] while it imports: were
    # torch half imported by the command's own thread then, it would fail. Importing torch
    # here first waits for that import (or does it; the command needs torch either way).
    import torch  # noqa: F401 - lazy: see above

    with _context_lock:  # one context, even when the warm-up and a suite ask at once
        return _new_context()


@lru_cache(maxsize=1)
def _new_context():
    import great_expectations as gx  # lazy: two seconds to import, warmed up in a thread

    from great_expectations.data_context.types.base import ProgressBarsConfig  # lazy: as above

    # Its "temporary directory for ephemeral docs site" line is noise in a run's log.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _photo_metadata_expectations():
    import great_expectations.expectations as gxe  # lazy: as above

    return [
        gxe.ExpectColumnValuesToNotBeNull(column="photo_key"),
        gxe.ExpectColumnValuesToBeUnique(column="photo_key"),
        gxe.ExpectColumnValuesToNotBeNull(column="size_bytes"),
        gxe.ExpectColumnValuesToBeBetween(column="size_bytes", min_value=0),
        # Keys that escape the source (.., absolute) must never reach a reader.
        gxe.ExpectColumnValuesToNotMatchRegex(column="photo_key", regex=r"(?:^/)|(?:^|/)\.\.(?:/|$)"),
    ]


def _prediction_expectations():
    import great_expectations.expectations as gxe  # lazy: as above

    return [
        gxe.ExpectColumnValuesToNotBeNull(column="photo_key"),
        gxe.ExpectColumnValuesToNotBeNull(column="status"),
        gxe.ExpectColumnValuesToNotBeNull(column="run_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="scored_at"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["photo_key", "photo_sha256"]),
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=list(STATUSES)),
        gxe.ExpectColumnValuesToBeInSet(column="gender", value_set=list(GENDERS)),
        gxe.ExpectColumnValuesToBeInSet(column="reject_reason", value_set=list(REJECT_REASONS)),
        gxe.ExpectColumnValuesToBeBetween(column="p_male", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="p_female", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="confidence", min_value=0.5, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="prob_sum_error", min_value=0, max_value=1e-5),
        gxe.ExpectColumnValuesToBeBetween(column="face_count", min_value=0),
        # A scored photo has a probability and a face; a rejected one has a reason.
        gxe.ExpectColumnValuesToBeInSet(column="row_consistent", value_set=[True]),
        # Age, where the model answers it: a plausible age, a known band, a probability;
        # all three or none, and only on a scored photo.
        gxe.ExpectColumnValuesToBeBetween(column="age_years", min_value=0, max_value=120),
        gxe.ExpectColumnValuesToBeInSet(column="age_band", value_set=list(AGE_BAND_VALUES)),
        gxe.ExpectColumnValuesToBeBetween(column="age_confidence", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="age_consistent", value_set=[True]),
    ]


def _validate(name: str, frame: pd.DataFrame, expectations) -> SuiteReport:
    import great_expectations as gx  # lazy: two seconds to import, warmed up in a thread

    context = _context()
    try:
        suite = context.suites.get(name)
    except Exception:
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations():
            suite.add_expectation(expectation)
    try:
        asset = context.data_sources.get("pipeline").get_asset(name)
    except Exception:
        try:
            source = context.data_sources.get("pipeline")
        except Exception:
            source = context.data_sources.add_pandas("pipeline")
        asset = source.add_dataframe_asset(name=name)
    try:
        batch_definition = asset.get_batch_definition("whole")
    except Exception:
        batch_definition = asset.add_batch_definition_whole_dataframe("whole")
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite)
    failures = []
    for item in result.results:
        if not item.success:
            config = item.expectation_config
            kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",)}
            unexpected = (item.result or {}).get("partial_unexpected_list", [])[:5]
            count = (item.result or {}).get("unexpected_count")
            failures.append(f"{config.type} {kwargs}: {count} unexpected, e.g. {unexpected}")
    return SuiteReport(name, bool(result.success), len(result.results), failures)


def check_photo_metadata(listing: pd.DataFrame) -> SuiteReport:
    """Suite over the photos about to be read: photo_key, size_bytes."""
    return _validate("photo_metadata", listing, _photo_metadata_expectations)


def check_predictions(rows: pd.DataFrame) -> SuiteReport:
    """Suite over the rows about to be published. Derived columns make the cross-field
    rules (probabilities sum to one, scored rows are complete) checkable per row."""
    frame = rows.copy()
    both = frame["p_male"].notna() & frame["p_female"].notna()
    frame["prob_sum_error"] = (frame["p_male"].astype("float64") + frame["p_female"].astype("float64") - 1).abs().where(both, 0.0)
    scored = frame["status"] == "scored"
    complete = frame["p_male"].notna() & frame["gender"].notna() & frame["photo_sha256"].notna() \
        & (frame["face_count"] > 0) & frame["reject_reason"].isna()
    rejected_ok = frame["reject_reason"].notna() & frame["p_male"].isna() & frame["gender"].isna()
    frame["row_consistent"] = (scored & complete) | (~scored & rejected_ok)
    for column in AGE_ANSWER:
        if column not in frame:
            frame[column] = None
    ages = frame[list(AGE_ANSWER)].notna()
    frame["age_consistent"] = ~ages.any(axis=1) | (ages.all(axis=1) & scored)
    frame["face_box"] = frame["face_box"].astype(str)  # lists are not hashable for GX
    return _validate("predictions", frame, _prediction_expectations)
