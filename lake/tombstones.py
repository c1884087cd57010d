"""Tombstones: what `forget` records of an erased user, and the rule that keeps their
photos unread.

`{output}/_state/erased/` is a Delta table: one row per photo the user had in the source
when `forget` listed it (key, size and the listing's time, as the source's own listing
gives them), or one row with no key when there was none. Tombstones written before the
photos were recorded have `source_listed` null: for them a photo listed at or before
`erased_at` counts as erased.
"""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa

from gender_pipeline.lake.columns import schema
from gender_pipeline.lake.storage import ObjectInfo
from gender_pipeline.lake.tables import TableSpec

ERASED_SCHEMA = schema(("user_id", "erased_at", "source_listed", "photo_key", "size", "uploaded_at"),
                       required=("user_id", "erased_at"))
ERASED = TableSpec(name="gender-pipeline erasures", schema=ERASED_SCHEMA, stats_columns=("erased_at",),
                   description="Users erased by `gender-pipeline forget`, with the photos they had in the source "
                               "then: those are never read again.")


def erased_photo_sql(listed: str) -> str:
    """The SQL condition, for a tombstone `e` and a listed photo `listed` (key, size,
    modified), that the tombstone covers the photo.

    A tombstone covers the object as `forget` listed it: the same key, size and listing
    time (to the second: S3 lists whole seconds, and one way of listing a store may give
    more digits than another). The time is compared with the time the same listing gave,
    never with the erasure's: a photo dated ahead of the erasure by a skewed clock is
    still the photo that was there. Anything written under the key later (a new upload,
    even of the same file) is a new photo. Tombstones written before the photos were
    recorded fall back to the listing's time against the erasure's."""
    return f"""((e.source_listed AND e.photo_key = {listed}.key AND e.size IS NOT DISTINCT FROM {listed}.size
       AND date_trunc('second', e.uploaded_at) IS NOT DISTINCT FROM date_trunc('second', {listed}.modified))
    OR (e.source_listed IS NULL AND ({listed}.modified IS NULL OR {listed}.modified <= e.erased_at)))"""


def tombstones(ids: list[str], listed: list[ObjectInfo], erased_at: datetime) -> pa.Table:
    """One row per listed photo of each user (listed under `{user_id}/`), and one without
    a key for a user with none."""
    rows = [(o.key.split("/", 1)[0], o.key, o.size, o.modified) for o in listed]  # listed under `{user_id}/`
    with_photos = {user for user, *_ in rows}
    rows += [(user, None, None, None) for user in ids if user not in with_photos]
    users, keys, sizes, times = (list(column) for column in zip(*rows)) if rows else ([], [], [], [])
    return pa.table({"user_id": users, "erased_at": [erased_at] * len(users), "source_listed": [True] * len(users),
                     "photo_key": keys, "size": sizes, "uploaded_at": times}, schema=ERASED_SCHEMA)
