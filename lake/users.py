"""The recommender's table: one current answer per user, and the rule that picks it.

`{output}/users/` is a Delta table with one row per user who has a usable answer. The
rule, written down once (here) and applied to the photos the pipeline knows of a user
(see lake.photo_state: every photo still in the source, with its latest answer):

1. The user's newest photo by upload time whose latest answer is *scored* gives the
   answer (its gender, p_male and confidence, from the model that scored it). `unknown`
   (under the abstain threshold) is an answer too.
2. A newer photo that was rejected does not take the answer away: `newest_photo_key` and
   `newest_reject_reason` say that the newest photo was rejected, and why.
3. A photo no longer in the source backs nothing: the user falls back to their next newest
   scored photo, or leaves the table.
4. An erased user's photos that were in the source when `forget` listed it are never
   answered again; a photo uploaded after the erasure is.

One clock: the upload time is the time the *source's listing* gives the object (its
Last-Modified), as listed when the photo was last read. It is only ever compared with
other times from the same listing, never with this machine's clock: what is new or
changed is what the listing says differently from the last time (size or time), and what
is erased is what was listed so when `forget` listed the source. A photo dated in the
future by a skewed clock is therefore read once and ordered by the time it carries.
Ties in upload time go to the larger key (so the answer never depends on when a photo
was answered, and a rebuild from the history gives the same row).

The table is partitioned by `answered_on` (the day of the answer's run), so a night's
MERGE rewrites only the days of the users it changes.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from gender_pipeline.lake.answers import ModelRef
from gender_pipeline.lake.columns import AGE_ANSWER, GENDER_ANSWER, WHO_ANSWERED, schema, with_null_columns
from gender_pipeline.lake.tables import TableSpec

USERS_SCHEMA_VERSION = 2  # 2: age_years, age_band, age_confidence (null where the model answers no age)

USERS_SCHEMA = schema(
    ("user_id", *GENDER_ANSWER, "photo_key", "photo_sha256", "uploaded_at", "answered_at", *WHO_ANSWERED,
     "photos_seen", "newest_photo_key", "newest_reject_reason", "run_id", "schema_version", *AGE_ANSWER,
     "answered_on"),
    required=("user_id",))

USERS = TableSpec(
    name="gender-pipeline users", schema=USERS_SCHEMA, partition_by=("answered_on",), change_data_feed=True,
    stats_columns=("gender", "p_male", "confidence", "uploaded_at", "answered_at", "model_name", "model_version",
                   "age_years", "age_band"),
    description="One current answer (gender, and age where the model answers it) per user, kept by "
                "gender-pipeline's nightly-scoring flow.")

# "Newest first": by upload time (the listing's), then the larger key.
NEWEST_FIRST = "uploaded_at DESC NULLS LAST, photo_key DESC"

# The rule, over a relation `photos` with the photo state's columns.
ANSWERS_SQL = f"""
WITH known AS (
    SELECT *,
           row_number() OVER (PARTITION BY user_id ORDER BY {NEWEST_FIRST}) AS newest,
           count(*) OVER (PARTITION BY user_id) AS photos_seen
    FROM photos WHERE user_id IS NOT NULL
),
scored AS (
    SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY {NEWEST_FIRST}) AS rank
    FROM known WHERE status = 'scored'
)
SELECT a.user_id, a.gender, a.p_male, a.confidence, a.photo_key, a.photo_sha256, a.uploaded_at,
       a.answered_at, a.model_name, a.model_version, CAST(a.photos_seen AS INTEGER) AS photos_seen,
       n.photo_key AS newest_photo_key,
       CASE WHEN n.status = 'rejected' THEN n.reject_reason END AS newest_reject_reason,
       a.run_id, CAST({USERS_SCHEMA_VERSION} AS SMALLINT) AS schema_version, a.age_years, a.age_band,
       a.age_confidence, a.answered_on
FROM scored a JOIN known n ON n.user_id = a.user_id AND n.newest = 1
WHERE a.rank = 1
"""


def answers(con, photos) -> pa.Table:
    """The users' rows that the rule gives for `photos` (an Arrow table or dataset with the
    photo state's columns, every known photo of each user in it)."""
    if isinstance(photos, pa.Table):  # photos answered before ages existed read as no age
        photos = with_null_columns(photos, [USERS_SCHEMA.field(name) for name in AGE_ANSWER])
    con.register("photos", photos)
    try:
        table = con.arrow(ANSWERS_SQL)
    finally:
        con.unregister("photos")
    return table.select(USERS_SCHEMA.names).cast(USERS_SCHEMA)


def user_counts(con, model: str) -> tuple[int, int]:
    """(users in the registered `users` relation, those answered by another model than
    `model`); nobody counts as behind when the run's model is not known."""
    ref = ModelRef.of(model)
    if ref is None:
        return con.rows("SELECT count(*) FROM users")[0][0], 0
    return tuple(con.rows("SELECT count(*), count(*) FILTER (WHERE model_name IS DISTINCT FROM $1 "
                          "OR model_version IS DISTINCT FROM $2) FROM users", [ref.name, ref.version])[0])


def behind(users: pa.Table, model: str) -> int:
    """How many of `users` are answered by another model than `model` (none when unknown)."""
    ref = ModelRef.of(model)
    if ref is None or not users.num_rows:
        return 0
    same = pc.and_(pc.equal(users["model_name"], ref.name), pc.equal(users["model_version"], ref.version))
    return users.num_rows - int(pc.sum(pc.cast(pc.fill_null(same, False), pa.int64())).as_py() or 0)


def user_rows(count: int, **columns) -> pa.Table:
    """`count` rows of the users table's columns: those given, the others null."""
    data = {name: columns.get(name, pa.nulls(count, f.type)) for name, f in zip(USERS_SCHEMA.names, USERS_SCHEMA)}
    return pa.table(data).cast(USERS_SCHEMA.set(0, pa.field("user_id", pa.string())))
