"""Erasure of many users on a large history: `gender-pipeline forget`'s one pass against the
earlier per-user `forget`, measured in the same run.

Builds a synthetic output through the project's own writers (history files of 2,000 rows
per shard, as the nightly flow writes them, then the photo state and the users table
rebuilt from it), erases `--erase` random users in one call, and times the earlier
implementation (one call per user, each reading every file whole) on `--baseline-calls`
other users, extrapolated to `--erase` calls.

    python benchmarks/bench_erasure.py --rows 1000000 --erase 1000 --out /tmp/erasure
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gender_pipeline.lake.history import PREDICTIONS_SCHEMA, conform, published_files, write_predictions  # noqa: E402
from gender_pipeline.lake.columns import LISTING_SCHEMA
from gender_pipeline.lake.erasure import erase
from gender_pipeline.lake.output import OutputState  # noqa: E402
from gender_pipeline.lake.storage import Store, with_retries  # noqa: E402

SHARD = 2000
T0 = datetime(2024, 1, 1, 2, tzinfo=timezone.utc)


def build(store: Store, rows: int, seed: int = 0) -> pa.Table:
    """History of `rows` rows (a fifth of users have two photos), one file per 2,000 rows,
    one day per 4,000; returns the listing of the photos."""
    rng = np.random.default_rng(seed)
    users = rows - rows // 5
    owner = np.concatenate([np.arange(users), rng.choice(users, rows - users, replace=False)])
    photo = np.concatenate([np.zeros(users, int), np.ones(rows - users, int)])
    keys = [f"u{u:08d}/photo-{p}.jpg" for u, p in zip(owner, photo)]
    p_male = rng.random(rows).astype(np.float32)
    for start in range(0, rows, SHARD):
        part = slice(start, min(rows, start + SHARD))
        day = date(2024, 1, 1) + timedelta(days=start // (2 * SHARD))
        at = datetime.combine(day, datetime.min.time(), timezone.utc) + timedelta(hours=2)
        n = part.stop - part.start
        p = p_male[part]
        table = pa.table({
            "user_id": [f"u{u:08d}" for u in owner[part]], "photo_key": keys[part],
            "photo_sha256": [f"{start + i:064x}" for i in range(n)], "status": ["scored"] * n,
            "reject_reason": pa.nulls(n, pa.string()),
            "gender": np.where(p >= 0.5, "male", "female").tolist(), "p_male": p, "p_female": 1 - p,
            "confidence": np.maximum(p, 1 - p), "face_count": np.ones(n, np.int16),
            "face_box": [[1, 2, 3, 4]] * n, "model_name": ["dlib-gender-v1"] * n, "model_version": ["1"] * n,
            "scored_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")), "run_id": [f"run-{day}"] * n,
            "schema_version": np.full(n, 2, np.int16)})
        write_predictions(store, conform(table), day, f"part-run-{day}-{start // SHARD:05d}")
    return pa.table({"key": keys, "size": np.full(rows, 100_000), "modified": pa.array([T0] * rows, LISTING_SCHEMA.field("modified").type)},
                    schema=LISTING_SCHEMA)


def forget_user_before(store: Store, user_id: str) -> list[dict]:
    """`forget` as it was: one user, every file read whole and rewritten when it holds them."""
    removed = []
    for key in published_files(store):
        table = pq.read_table(io.BytesIO(store.read(key)))
        keep = pc.fill_null(pc.not_equal(table["user_id"], pa.scalar(user_id)), True)
        remaining = table.filter(keep)
        gone = table.num_rows - remaining.num_rows
        if gone == 0:
            continue
        if remaining.num_rows:
            buffer = io.BytesIO()
            pq.write_table(remaining.cast(PREDICTIONS_SCHEMA), buffer, compression="zstd")
            store.write_atomic(key, buffer.getvalue())
        else:
            with_retries(lambda k=key: store.fs.rm_file(store.path(k)), f"removing {key}")
        removed.append({"file": key, "rows_removed": gone})
    return removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--erase", type=int, default=1000)
    parser.add_argument("--baseline-calls", type=int, default=10)
    parser.add_argument("--out", required=True, help="a scratch folder (emptied)")
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    store = Store(os.path.join(args.out, "lake"))
    started = time.perf_counter()
    listing = build(store, args.rows)
    built = time.perf_counter() - started
    started = time.perf_counter()
    state = OutputState(store)
    photos, users = state.rebuild(listing, seq=1)
    rebuilt = time.perf_counter() - started
    files = len(published_files(store))
    print(f"history: {args.rows:,} rows in {files} files ({built:.1f} s); state and users table rebuilt from it: "
          f"{photos:,} photos, {users:,} users ({rebuilt:.1f} s)")

    rng = np.random.default_rng(1)
    chosen = rng.choice(args.rows - args.rows // 5, args.erase + args.baseline_calls, replace=False)
    ours = [f"u{u:08d}" for u in chosen[:args.erase]]
    theirs = [f"u{u:08d}" for u in chosen[args.erase:]]

    # The erased users' photos in a source folder: `forget` lists them there for the tombstones.
    source = Store(os.path.join(args.out, "source"))
    wanted = set(ours)
    for key in listing["key"].to_pylist():
        if key.split("/", 1)[0] in wanted:
            source.write_atomic(key, b"photo")

    started = time.perf_counter()
    report = erase(state, ours, datetime.now(timezone.utc), source)
    one_pass = time.perf_counter() - started
    print(f"forget, one call for {args.erase} users: {one_pass:.1f} s; {report.rows_removed} history rows removed; "
          f"{report.files_read} files read (user_id column), {report.files_rewritten} rewritten, "
          f"{report.files_deleted} deleted; users table -{report.users_removed}, photo state "
          f"-{report.photos_removed}; {report.vacuumed} files vacuumed; {len(report.source_keys)} source objects "
          f"listed for the tombstones")

    started = time.perf_counter()
    rewritten = sum(len(forget_user_before(store, user)) for user in theirs)
    per_call = (time.perf_counter() - started) / len(theirs)
    print(f"before: forget per user, {len(theirs)} calls: {per_call:.2f} s a call, {rewritten} files rewritten; "
          f"{args.erase} calls = {per_call * args.erase:.0f} s (extrapolated), "
          f"{args.erase * files:,} file reads")
    print(f"ratio: {per_call * args.erase / one_pass:.1f}x faster for {args.erase} users "
          f"(and the one pass also cleans the users table and the photo state, and vacuums them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
