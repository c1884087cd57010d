from datetime import date, datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gender_pipeline.lake import storage as storage_module
from gender_pipeline.lake.history import PREDICTIONS_SCHEMA, PhotoResult, to_table, write_predictions
from gender_pipeline.lake.output import OutputState
from gender_pipeline.lake.photo_state import listing_table
from gender_pipeline.lake.storage import ObjectInfo, StorageError, Store, with_retries

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(key, sha, status="scored", reason=None, at=T0):
    if status == "scored":
        return PhotoResult(user_id=key.split("/")[0], photo_key=key, photo_sha256=sha, status="scored",
                           gender="male", p_male=0.9, p_female=0.1, confidence=0.9, face_count=1,
                           face_box=[1, 2, 3, 4], model_name="m", model_version="1", scored_at=at, run_id="r")
    result = PhotoResult.rejected(key.split("/")[0], key, sha, reason)
    result.scored_at, result.run_id = at, "r"
    return result


def test_schema_is_the_contract():
    expected = [("user_id", "string"), ("photo_key", "string"), ("photo_sha256", "string"),
                ("status", "string"), ("reject_reason", "string"), ("gender", "string"),
                ("p_male", "float"), ("p_female", "float"), ("confidence", "float"),
                ("face_count", "int16"), ("face_box", "list<item: int32>"), ("model_name", "string"),
                ("model_version", "string"), ("scored_at", "timestamp[us, tz=UTC]"),
                ("run_id", "string"), ("schema_version", "int16")]
    # Version 2 adds the age at the end: a v1 reader's columns keep their names, types and places.
    v2 = [("age_years", "float"), ("age_band", "string"), ("age_confidence", "float")]
    assert [(f.name, str(f.type)) for f in PREDICTIONS_SCHEMA] == expected + v2
    assert PREDICTIONS_SCHEMA.metadata[b"schema_version"] == b"2" and row("a/1.jpg", "h").schema_version == 2


def test_a_history_of_v1_and_v2_files_reads_as_v2(tmp_path):
    """Files written before the age columns existed stay as they are; every reader of the
    history sees them as rows without an age."""
    import pyarrow.dataset as ds

    from gender_pipeline.lake.history import history_dataset, read_history_files

    store = Store(str(tmp_path / "lake"))
    old = to_table([row("a/1.jpg", "h1")]).drop_columns(["age_years", "age_band", "age_confidence"])
    old = old.set_column(old.schema.get_field_index("schema_version"), "schema_version",
                         pa.array([1], pa.int16()))
    write_v1 = store.path("predictions/dt=2026-01-01/part-old.parquet")
    store.fs.makedirs(store.path("predictions/dt=2026-01-01"), exist_ok=True)
    pq.write_table(old, write_v1)
    new = row("b/2.jpg", "h2")
    new.age_years, new.age_band, new.age_confidence = 31.5, "25-34", 0.61
    write_predictions(store, to_table([new]), date(2026, 1, 2), "part-new")
    history = history_dataset(store).to_table().to_pandas().sort_values("photo_key")
    assert history["age_band"].isna().tolist() == [True, False] and history["schema_version"].tolist() == [1, 2]
    both = read_history_files(store, ["predictions/dt=2026-01-01/part-old.parquet",
                                      "predictions/dt=2026-01-02/part-new.parquet"])
    assert both.column("age_years").to_pylist() == [None, 31.5]
    # The README's readers: pyarrow with the current schema, DuckDB by name.
    from gender_pipeline.lake.history import PREDICTIONS_SCHEMA as schema
    frame = ds.dataset(str(tmp_path / "lake" / "predictions"), schema=schema, partitioning="hive").to_table()
    assert sorted(frame.column("age_band").to_pylist(), key=str) == ["25-34", None]
    import duckdb
    rows = duckdb.sql(f"SELECT photo_key, age_band FROM read_parquet('{tmp_path}/lake/predictions/*/*.parquet', "
                      "union_by_name = true) ORDER BY 1").fetchall()
    assert rows == [("a/1.jpg", None), ("b/2.jpg", "25-34")]


def test_write_is_atomic_and_partitioned(tmp_path):
    store = Store(str(tmp_path / "lake"))
    url = write_predictions(store, to_table([row("a/1.jpg", "h1"), row("b/2.jpg", "h2", "rejected", "empty")]),
                            date(2026, 1, 2), "part-x")
    assert url.endswith("predictions/dt=2026-01-02/part-x.parquet")
    files = sorted(p.name for p in (tmp_path / "lake" / "predictions" / "dt=2026-01-02").iterdir())
    assert files == ["part-x.parquet"]  # no temporary left behind
    assert pq.read_schema(url).equals(PREDICTIONS_SCHEMA, check_metadata=False)
    frame = pd.read_parquet(str(tmp_path / "lake" / "predictions"))
    assert list(frame["photo_key"]) == ["a/1.jpg", "b/2.jpg"]
    assert str(frame["dt"].iloc[0]) == "2026-01-02"


def test_readers_skip_unpublished_temporaries(tmp_path):
    store = Store(str(tmp_path))
    write_predictions(store, to_table([row("a/1.jpg", "h1")]), date(2026, 1, 2), "part-1")
    (tmp_path / "predictions" / "dt=2026-01-02" / "_tmp-part-2.parquet").write_bytes(b"half a file")
    assert len(pd.read_parquet(str(tmp_path / "predictions"))) == 1


def test_the_plan_skips_unchanged_and_rereads_modified_or_retryable(tmp_path):
    store = Store(str(tmp_path / "lake"))
    write_predictions(store, to_table([row("a/1.jpg", "h1"), row("b/2.jpg", "h2"),
                                       row("c/3.jpg", None, "rejected", "read_error"),
                                       row("loose.jpg", None, "rejected", "bad_key")]), date(2026, 1, 1), "part-1")
    objects = [ObjectInfo("a/1.jpg", 10, T0 - timedelta(hours=1)),   # unchanged: skipped
               ObjectInfo("loose.jpg", 10, T0 - timedelta(hours=1)),  # answered unread: skipped
               ObjectInfo("b/2.jpg", 10, T0 + timedelta(hours=1)),   # touched since: read, hash decides
               ObjectInfo("c/3.jpg", 10, T0 - timedelta(hours=1)),   # failed read last time: read
               ObjectInfo("d/4.jpg", 10, None)]                      # new
    plan = OutputState(store).plan(listing_table(objects), "m@1")  # the state is built from the history
    assert plan.rebuilt
    assert sorted(o.key for o in plan.objects()) == ["b/2.jpg", "c/3.jpg", "d/4.jpg"]
    assert plan.unchanged == 2
    assert plan.known_hashes() == {"b/2.jpg": {"h2"}}


def test_memory_store_lists_reads_and_writes():
    store = Store("memory://store-test/src")
    store.fs.pipe({"/store-test/src/u1/a b.jpg": b"1", "/store-test/src/u2/ü.png": b"22"})
    assert [(o.key, o.size) for o in store.list_objects()] == [("u1/a b.jpg", 1), ("u2/ü.png", 2)]
    got = store.read_many(["u1/a b.jpg", "u2/ü.png", "u3/missing"])
    assert got["u1/a b.jpg"] == b"1" and got["u2/ü.png"] == b"22"
    assert isinstance(got["u3/missing"], FileNotFoundError)


def test_transient_errors_are_retried_then_reported(monkeypatch):
    monkeypatch.setattr(storage_module, "_sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    assert with_retries(flaky, "reading") == "ok" and len(calls) == 3

    def down():
        raise TimeoutError("timed out")

    with pytest.raises(StorageError, match="after 4 attempts"):
        with_retries(down, "listing s3://bucket")


def test_missing_objects_are_not_retried(monkeypatch):
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, "reading")
    assert len(calls) == 1


def test_stale_temporaries_of_killed_runs_are_removed_on_the_next_publish(tmp_path):
    import os
    import time

    store = Store(str(tmp_path))
    folder = tmp_path / "predictions" / "dt=2026-01-02"
    folder.mkdir(parents=True)
    (folder / "_tmp-part-old.parquet").write_bytes(b"half")
    (folder / "_tmp-part-fresh.parquet").write_bytes(b"in progress")
    old = time.time() - 7 * 3600
    os.utime(folder / "_tmp-part-old.parquet", (old, old))
    write_predictions(store, to_table([row("a/1.jpg", "h1")]), date(2026, 1, 2), "part-1")
    assert sorted(p.name for p in folder.iterdir()) == ["_tmp-part-fresh.parquet", "part-1.parquet"]
