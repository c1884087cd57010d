"""The predictions dataset: its schema, incremental diff, and atomic writes."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gender_pipeline.lake.tables import with_null_columns
from gender_pipeline.lake.storage import Store, modified_time

log = logging.getLogger(__name__)

# 2: age_years, age_band and age_confidence added at the end (null where the model does
# not answer age); v1 files stay as they are and read as null there.
SCHEMA_VERSION = 2
DATASET = "predictions"

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("photo_key", pa.string(), nullable=False),
    pa.field("photo_sha256", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reject_reason", pa.string()),
    pa.field("gender", pa.string()),
    pa.field("p_male", pa.float32()),
    pa.field("p_female", pa.float32()),
    pa.field("confidence", pa.float32()),
    pa.field("face_count", pa.int16(), nullable=False),
    pa.field("face_box", pa.list_(pa.int32())),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("age_years", pa.float32()),
    pa.field("age_band", pa.string()),
    pa.field("age_confidence", pa.float32()),
], metadata={"schema_version": str(SCHEMA_VERSION)})
AGE_COLUMNS = ("age_years", "age_band", "age_confidence")

COLUMNS = PREDICTIONS_SCHEMA.names
STATUSES = ("scored", "rejected")
GENDERS = ("male", "female", "unknown")
# Age bands: the first age of each band (the last one open-ended), then their names.
AGE_BAND_STARTS = (0, 18, 25, 35, 45, 55, 65)
AGE_BANDS = ("0-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65+")
UNKNOWN_BAND = "unknown"  # under the model's age abstain threshold
AGE_BAND_VALUES = (*AGE_BANDS, UNKNOWN_BAND)  # every value of the age_band column, in order
# Reasons a photo can be rejected for; `read_error` photos are retried by the next run.
REJECT_REASONS = ("empty", "truncated", "corrupt", "not_an_image", "unsupported_format",
                  "too_small", "too_large", "decompression_bomb", "no_face", "bad_key",
                  "read_error", "decoder_crash")
RETRYABLE_REASONS = ("read_error",)


def gender_of(p_male: np.ndarray, abstain_threshold: float) -> list[str]:
    """'male' / 'female', or 'unknown' where the confidence is under the threshold."""
    confidence = np.maximum(p_male, 1.0 - p_male)
    return ["unknown" if c < abstain_threshold else ("male" if p >= 0.5 else "female")
            for p, c in zip(p_male, confidence)]


def age_band_index(years) -> np.ndarray:
    """The band of each age in years (an index into AGE_BANDS)."""
    return np.searchsorted(np.asarray(AGE_BAND_STARTS[1:]), np.asarray(years, dtype=np.float64), side="right")


def age_bands_of(years, confidence, abstain_threshold: float) -> list[str]:
    """The band of each age, or `unknown` where the band's probability is under the
    threshold."""
    return [UNKNOWN_BAND if c < abstain_threshold else AGE_BANDS[i]
            for i, c in zip(age_band_index(years), np.asarray(confidence, dtype=np.float64))]


def in_band_order(counts) -> dict[str, int]:
    """Counts per age band (a mapping, a Counter or a pandas Series) in band order, the
    bands without any left out."""
    return {band: int(counts[band]) for band in AGE_BAND_VALUES if band in counts and counts[band]}


def conform(table: pa.Table) -> pa.Table:
    """History rows as the current schema: files written before a column existed get it
    as nulls (an additive change)."""
    return with_null_columns(table, PREDICTIONS_SCHEMA).select(PREDICTIONS_SCHEMA.names).cast(PREDICTIONS_SCHEMA)


@dataclass
class PhotoResult:
    """One row of the predictions dataset, before it becomes Arrow."""

    user_id: str | None
    photo_key: str
    photo_sha256: str | None
    status: str
    reject_reason: str | None = None
    gender: str | None = None
    p_male: float | None = None
    p_female: float | None = None
    confidence: float | None = None
    face_count: int = 0
    face_box: list[int] | None = None
    model_name: str | None = None
    model_version: str | None = None
    scored_at: datetime | None = None
    run_id: str = ""
    schema_version: int = SCHEMA_VERSION
    age_years: float | None = None
    age_band: str | None = None
    age_confidence: float | None = None  # the probability of the age band
    # Why, in words (for the run's report; not a column: the reason is the contract).
    reject_detail: str = ""

    @classmethod
    def rejected(cls, user_id: str | None, key: str, sha256: str | None, reason: str,
                 face_count: int = 0, detail: str = "") -> "PhotoResult":
        return cls(user_id=user_id, photo_key=key, photo_sha256=sha256, status="rejected",
                   reject_reason=reason, face_count=face_count, reject_detail=detail)


def to_table(rows: list[PhotoResult]) -> pa.Table:
    columns = {name: [getattr(r, name) for r in rows] for name in COLUMNS}
    return pa.Table.from_pydict(columns, schema=PREDICTIONS_SCHEMA)


def partition_dir(scoring_date: date) -> str:
    return f"{DATASET}/dt={scoring_date.isoformat()}"


def write_predictions(store: Store, table: pa.Table, scoring_date: date, part_name: str,
                      before_move: Callable[[], None] | None = None) -> str:
    """Publish one Parquet file into the date partition, atomically. Returns its URL.
    `before_move` (e.g. "this run still holds the output") runs just before the move."""
    if table.schema != PREDICTIONS_SCHEMA:
        table = table.cast(PREDICTIONS_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    key = f"{partition_dir(scoring_date)}/{part_name}.parquet"
    store.write_atomic(key, buffer.getvalue(), before_move)
    remove_stale_temporaries(store, partition_dir(scoring_date))
    return store.full_url(key)


def remove_stale_temporaries(store: Store, folder: str, older_than: timedelta = timedelta(hours=6)) -> int:
    """Delete `_tmp-` files a killed run left behind. Readers never saw them; a run in
    progress writes and moves its own within seconds, so only old ones are touched."""
    cutoff = datetime.now(timezone.utc) - older_than
    removed = 0
    try:
        entries = store.fs.ls(store.path(folder), detail=True)
    except FileNotFoundError:
        return 0
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        modified = modified_time(entry)
        if name.startswith("_tmp-") and modified is not None and modified < cutoff:
            store.fs.rm_file(entry["name"])
            removed += 1
    return removed


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def published_files(store: Store) -> list[str]:
    """Keys of the published Parquet files (temporaries and hidden files excluded)."""
    root = store.path(DATASET)
    store.fs.invalidate_cache()
    if not store.fs.exists(root):
        return []
    keys = [store.key_of(p) for p in store.fs.find(root)]
    return sorted(k for k in keys if k.endswith(".parquet")
                  and not any(part.startswith(("_", ".")) for part in k.split("/")))
