"""The history: every answer, one Parquet row per photo a run read, Hive-partitioned by
day at `{output}/predictions/dt=YYYY-MM-DD/`. Its schema is the recommender's contract;
files are published atomically and never rewritten, except by an erasure."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gender_pipeline.lake.columns import AGE_ANSWER, schema, with_null_columns
from gender_pipeline.lake.storage import Store, modified_time

log = logging.getLogger(__name__)

# 2: age_years, age_band and age_confidence added at the end (null where the model does
# not answer age); v1 files stay as they are and read as null there.
SCHEMA_VERSION = 2
DATASET = "predictions"

PREDICTIONS_SCHEMA = schema(
    ("user_id", "photo_key", "photo_sha256", "status", "reject_reason", "gender", "p_male", "p_female",
     "confidence", "face_count", "face_box", "model_name", "model_version", "scored_at", "run_id",
     "schema_version", *AGE_ANSWER),
    required=("photo_key", "status", "face_count", "scored_at", "run_id", "schema_version"),
    metadata={"schema_version": str(SCHEMA_VERSION)})
# The history's rows with their day, as read back (the partition column).
DAY = pa.field("dt", pa.string())
HISTORY_SCHEMA = PREDICTIONS_SCHEMA.append(DAY)


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


def to_table(rows: list[PhotoResult], scoring_date: date | None = None) -> pa.Table:
    """Rows as Arrow; with `scoring_date`, with their day (`dt`) as the history reads back."""
    table = pa.Table.from_pydict({name: [getattr(r, name) for r in rows] for name in PREDICTIONS_SCHEMA.names},
                                 schema=PREDICTIONS_SCHEMA)
    if scoring_date is None:
        return table
    return table.append_column(DAY, pa.array([scoring_date.isoformat()] * table.num_rows, pa.string()))


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


def published_files(store: Store) -> list[str]:
    """Keys of the published Parquet files (temporaries and hidden files excluded)."""
    root = store.path(DATASET)
    store.fs.invalidate_cache()
    if not store.fs.exists(root):
        return []
    keys = [store.key_of(p) for p in store.fs.find(root)]
    return sorted(k for k in keys if k.endswith(".parquet")
                  and not any(part.startswith(("_", ".")) for part in k.split("/")))


def empty_history() -> pa.Table:
    return HISTORY_SCHEMA.empty_table()


def history_dataset(store: Store) -> ds.Dataset | None:
    """The published history as one Arrow dataset (with `dt`), or None when there is none."""
    files = published_files(store)
    if not files:
        return None
    return ds.dataset([store.path(k) for k in files], filesystem=store.fs, format="parquet",
                      schema=HISTORY_SCHEMA, partitioning=ds.partitioning(pa.schema([DAY]), flavor="hive"),
                      partition_base_dir=store.path(DATASET))


def read_history_files(store: Store, keys: list[str]) -> pa.Table:
    """Rows of some history files, with their `dt`."""
    tables = []
    for key in keys:
        table = conform(pq.read_table(io.BytesIO(store.read(key))))
        day = re.search(r"dt=(\d{4}-\d{2}-\d{2})", key).group(1)
        tables.append(table.append_column(DAY, pa.array([day] * table.num_rows, pa.string())))
    return pa.concat_tables(tables) if tables else empty_history()
