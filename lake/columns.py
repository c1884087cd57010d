"""Every column of the output's tables, defined once: its name and its Arrow type.

The history, the photo state, the users table, the tombstones and the listing spool each
list the names they hold, in their contract's order; a column shared by several (an
answer's gender, p_male, confidence, model and age) has one type everywhere.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

COLUMN_TYPES: dict[str, pa.DataType] = {
    # who and which photo
    "user_id": pa.string(), "photo_key": pa.string(), "photo_sha256": pa.string(),
    # the answer
    "status": pa.string(), "reject_reason": pa.string(),
    "gender": pa.string(), "p_male": pa.float32(), "p_female": pa.float32(), "confidence": pa.float32(),
    "face_count": pa.int16(), "face_box": pa.list_(pa.int32()),
    "age_years": pa.float32(), "age_band": pa.string(), "age_confidence": pa.float32(),
    # who answered, when
    "model_name": pa.string(), "model_version": pa.string(), "run_id": pa.string(),
    "scored_at": TIMESTAMP, "answered_at": TIMESTAMP, "answered_on": pa.date32(), "schema_version": pa.int16(),
    # what the listing said of the photo
    "key": pa.string(), "size": pa.int64(), "modified": TIMESTAMP, "uploaded_at": TIMESTAMP,
    "checked_at": TIMESTAMP, "first_seen_run": pa.string(),
    # the users table's own
    "photos_seen": pa.int32(), "newest_photo_key": pa.string(), "newest_reject_reason": pa.string(),
    # tombstones
    "erased_at": TIMESTAMP, "source_listed": pa.bool_(),
}

# The answer, as every table that holds one names it.
GENDER_ANSWER = ("gender", "p_male", "confidence")
AGE_ANSWER = ("age_years", "age_band", "age_confidence")
WHO_ANSWERED = ("model_name", "model_version")


def schema(names: tuple[str, ...] | list[str], required: tuple[str, ...] = (), metadata: dict | None = None
           ) -> pa.Schema:
    """The Arrow schema of `names` (their types from COLUMN_TYPES); `required` are not nullable."""
    unknown = set(required) - set(names)
    if unknown:
        raise ValueError(f"required columns {sorted(unknown)} are not among the names")
    return pa.schema([pa.field(name, COLUMN_TYPES[name], nullable=name not in required) for name in names],
                     metadata=metadata)


def with_null_columns(table: pa.Table, fields) -> pa.Table:
    """`table` with each of `fields` (pyarrow fields) it lacks added at the end as nulls:
    how rows written before an additive schema change are read."""
    for f in fields:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table


# A listing: one row per object under the source (the spool, the plan's photos).
LISTING_SCHEMA = schema(("key", "size", "modified"), required=("key",))
