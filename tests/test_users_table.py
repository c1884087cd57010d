"""The users table and the photo state, as plain functions: the rule, several nights,
refresh toward a new model, a failure between the two writes, rebuild, erasure."""

from datetime import date, datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from gender_pipeline.lake.erasure import erase
from gender_pipeline.lake.history import PhotoResult, to_table, write_predictions
from gender_pipeline.lake.output import OutputState
from gender_pipeline.lake.photo_state import SourceListing, listing_table
from gender_pipeline.lake.sql import duckdb_session
from gender_pipeline.lake.storage import ObjectInfo, Store
from gender_pipeline.lake.tables import TableError
from gender_pipeline.lake.users import answers

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)


def scored(key, p_male, run="r1", at=T0, model=("m", "1")):
    return PhotoResult(user_id=key.split("/")[0], photo_key=key, photo_sha256=f"sha-{key}-{run}", status="scored",
                       gender="unknown" if max(p_male, 1 - p_male) < 0.6 else ("male" if p_male >= 0.5 else "female"),
                       p_male=p_male, p_female=1 - p_male, confidence=max(p_male, 1 - p_male), face_count=1,
                       face_box=[1, 2, 3, 4], model_name=model[0], model_version=model[1], scored_at=at, run_id=run)


def rejected(key, reason, run="r1", at=T0):
    row = PhotoResult.rejected(key.split("/")[0], key, f"sha-{key}", reason)
    row.scored_at, row.run_id, row.model_name, row.model_version = at, run, "m", "1"
    return row


def users_frame(state: OutputState) -> pd.DataFrame:
    table = DeltaTable(state.users.uri)
    return table.to_pandas().sort_values("user_id").set_index("user_id")


class Lake:
    """An output driven night by night through the state, as the flow drives it."""

    def __init__(self, root, one_day=False):
        self.store = Store(str(root))
        self.state = OutputState(self.store)
        self.night, self.one_day = 0, one_day
        self.source = root.parent / f"{root.name}-source"  # the objects of the last night, as files

    def put(self, objects):
        """The source holds `objects` ({key: upload time}, 10 bytes each), and nothing else."""
        import os
        import shutil

        shutil.rmtree(self.source, ignore_errors=True)
        for key, at in objects.items():
            path = self.source / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"0123456789")
            os.utime(path, ns=(int(at.timestamp() * 1e9),) * 2)

    def run(self, objects, answer, model="m@1", budget=10_000, excluded=()):
        """One night: plan against `objects` ({key: upload time}); `answer(key, why)` gives the
        row for each photo read (or None: same bytes as before)."""
        self.night += 1
        day = date(2026, 3, 1 if self.one_day else self.night)
        at = T0 + timedelta(days=self.night - 1)
        self.put(objects)
        listing = SourceListing(listing_table([ObjectInfo(k, 10, t) for k, t in objects.items()]), tuple(excluded))
        plan = self.state.plan(listing, model, budget)
        run_id = f"run{self.night}"
        rows, same = [], []
        for item in plan.to_read.to_pylist():
            row = answer(item["key"], item["why"], run_id, at)
            (rows.append(row) if row is not None else same.append(item["key"]))
        if rows:
            self.state.begin(plan, run_id, day)
            write_predictions(self.store, to_table(rows), day, f"part-{run_id}-00000")
        self.state.apply_night(plan, to_table(rows, day), same, at, run_id)
        return plan


def test_the_rule_newest_scored_photo_answers(tmp_path):
    """Newest scored photo by upload time answers; a newer rejected one is noted, not used;
    `unknown` is an answer; a user with no scored photo has no row."""
    photos = pa.table({
        "photo_key": ["ann/1.jpg", "ann/2.jpg", "ann/3.jpg", "bob/1.jpg", "cy/1.jpg", "dee/a.jpg", "dee/b.jpg"],
        "user_id": ["ann", "ann", "ann", "bob", "cy", "dee", "dee"],
        "uploaded_at": [T0, T0 + timedelta(hours=1), T0 + timedelta(hours=2), T0, T0, T0, T0],
        "answered_at": [T0] * 5 + [T0, T0 + timedelta(days=1)],
        "status": ["scored", "scored", "rejected", "scored", "rejected", "scored", "scored"],
        "reject_reason": [None, None, "no_face", None, "corrupt", None, None],
        "gender": ["male", "female", None, "unknown", None, "male", "female"],
        "p_male": pa.array([0.9, 0.1, None, 0.55, None, 0.8, 0.2], pa.float32()),
        "confidence": pa.array([0.9, 0.9, None, 0.55, None, 0.8, 0.8], pa.float32()),
        "photo_sha256": ["a1", "a2", "a3", "b1", "c1", "d1", "d2"],
        "model_name": ["m"] * 7, "model_version": ["1"] * 7, "run_id": ["r"] * 7,
        "answered_on": [date(2026, 3, 1)] * 7})
    with duckdb_session() as con:
        users = answers(con, photos).to_pandas().set_index("user_id")
    assert sorted(users.index) == ["ann", "bob", "dee"]  # cy has no scored photo
    assert users.loc["ann", "photo_key"] == "ann/2.jpg" and users.loc["ann", "gender"] == "female"
    assert users.loc["ann", "newest_photo_key"] == "ann/3.jpg"
    assert users.loc["ann", "newest_reject_reason"] == "no_face" and users.loc["ann", "photos_seen"] == 3
    assert users.loc["bob", "gender"] == "unknown" and users.loc["bob", "confidence"] == pytest.approx(0.55)
    assert pd.isna(users.loc["bob", "newest_reject_reason"])
    assert users.loc["dee", "photo_key"] == "dee/b.jpg"  # same upload time: the later answer


def test_nights_with_new_replaced_removed_and_rejected_photos(tmp_path):
    lake = Lake(tmp_path / "lake")
    first = {"ann/a.jpg": T0 - timedelta(hours=5), "bob/b.jpg": T0 - timedelta(hours=4),
             "cy/c.jpg": T0 - timedelta(hours=3), "bad key.jpg": T0 - timedelta(hours=3)}

    def night1(key, why, run, at):
        return rejected(key, "bad_key", run, at) if "/" not in key else scored(key, 0.9, run, at)

    plan = lake.run(first, night1)
    assert sorted(plan.to_read["key"].to_pylist()) == sorted(first)
    users = users_frame(lake.state)
    assert sorted(users.index) == ["ann", "bob", "cy"] and set(users["photos_seen"]) == {1}

    # Night 2: ann adds a newer photo that is rejected; bob's photo is replaced (new bytes,
    # now female); cy's photo is deleted; dee signs up.
    t1 = T0 + timedelta(hours=20)
    second = {"ann/a.jpg": first["ann/a.jpg"], "ann/new.png": t1, "bob/b.jpg": t1, "dee/d.jpg": t1,
              "bad key.jpg": first["bad key.jpg"]}

    def night2(key, why, run, at):
        return {"ann/new.png": rejected(key, "no_face", run, at), "bob/b.jpg": scored(key, 0.1, run, at),
                "dee/d.jpg": scored(key, 0.3, run, at)}[key]

    plan = lake.run(second, night2)
    assert dict(zip(plan.to_read["key"].to_pylist(), plan.to_read["why"].to_pylist())) == {
        "ann/new.png": "new", "bob/b.jpg": "changed", "dee/d.jpg": "new"}
    assert plan.removed["photo_key"].to_pylist() == ["cy/c.jpg"]
    users = users_frame(lake.state)
    assert sorted(users.index) == ["ann", "bob", "dee"]  # cy left: their only photo is gone
    assert users.loc["ann", "photo_key"] == "ann/a.jpg" and users.loc["ann", "gender"] == "male"
    assert users.loc["ann", "newest_reject_reason"] == "no_face" and users.loc["ann", "photos_seen"] == 2
    assert users.loc["bob", "gender"] == "female" and users.loc["bob", "run_id"] == "run2"
    assert users.loc["dee", "uploaded_at"] == pd.Timestamp(t1)

    # Night 3: ann's scored photo is deleted (only the rejected one is left): ann leaves.
    third = {k: v for k, v in second.items() if k != "ann/a.jpg"}
    plan = lake.run(third, lambda *a: pytest.fail("nothing to read"))
    assert plan.to_read.num_rows == 0 and plan.removed["photo_key"].to_pylist() == ["ann/a.jpg"]
    assert sorted(users_frame(lake.state).index) == ["bob", "dee"]

    # The same night again changes nothing; rebuilding from the history gives the same table.
    incremental = users_frame(lake.state)
    lake.run(third, lambda *a: pytest.fail("nothing to read"))
    pd.testing.assert_frame_equal(users_frame(lake.state), incremental)
    lake.state.rebuild(listing_table([ObjectInfo(k, 10, t) for k, t in third.items()]), seq=99)
    pd.testing.assert_frame_equal(users_frame(lake.state), incremental)


def test_same_bytes_read_again_are_not_read_a_third_time(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.run({"ann/a.jpg": T0 - timedelta(hours=1)}, lambda k, w, r, at: scored(k, 0.9, r, at))
    touched = {"ann/a.jpg": T0 + timedelta(hours=3)}  # touched: newer mtime, same bytes
    plan = lake.run(touched, lambda k, w, r, at: None)
    assert plan.known_hashes() == {"ann/a.jpg": {"sha-ann/a.jpg-run1"}}
    plan = lake.run(touched, lambda *a: pytest.fail("read again"))
    assert plan.to_read.num_rows == 0 and plan.unchanged == 1
    assert users_frame(lake.state).loc["ann", "uploaded_at"] == pd.Timestamp(touched["ann/a.jpg"])


def test_answers_move_to_the_production_model_within_the_budget(tmp_path):
    lake = Lake(tmp_path / "lake")
    photos = {f"u{i}/p.jpg": T0 - timedelta(hours=10 - i) for i in range(7)}
    lake.run(photos, lambda k, w, r, at: scored(k, 0.9, r, at, ("old", "1")), model="old@1")
    budget, remaining = 3, 7
    for nights_left in (3, 2, 1):
        assert -(-remaining // budget) == nights_left
        plan = lake.run(photos, lambda k, w, r, at: scored(k, 0.2, r, at, ("new", "2")), model="new@2",
                        budget=budget)
        assert plan.behind == remaining and plan.refresh == min(budget, remaining)
        assert set(plan.to_read["why"].to_pylist()) == {"refresh"}
        remaining -= plan.refresh
        assert lake.state.user_counts("new@2") == (7, remaining)
    users = users_frame(lake.state)
    assert set(users["model_name"]) == {"new"} and set(users["gender"]) == {"female"}
    # Oldest answers moved first: u0..u2 on the first night.
    assert set(users.loc[["u0", "u1", "u2"], "run_id"]) == {"run2"}
    # A rollback moves them back the same way; budget 0 turns the refresh off.
    assert lake.run(photos, lambda *a: None, model="old@1", budget=0).refresh == 0
    plan = lake.run(photos, lambda k, w, r, at: scored(k, 0.9, r, at, ("old", "1")), model="old@1", budget=10)
    assert plan.refresh == 7 and lake.state.user_counts("old@1") == (7, 0)


def test_a_failure_between_the_two_writes_is_caught_up_by_the_next_run(tmp_path, monkeypatch):
    lake = Lake(tmp_path / "lake")
    photos = {"ann/a.jpg": T0 - timedelta(hours=1), "bob/b.jpg": T0 - timedelta(hours=1)}
    original = OutputState._merge_users

    def crash(*args, **kwargs):
        raise RuntimeError("MERGE failed")

    monkeypatch.setattr(OutputState, "_merge_users", crash)
    with pytest.raises(RuntimeError, match="MERGE failed"):
        lake.run(photos, lambda k, w, r, at: scored(k, 0.9, r, at))
    assert DeltaTable(lake.state.photos.uri).to_pandas().shape[0] == 2  # the state has them, users not
    monkeypatch.setattr(OutputState, "_merge_users", original)
    plan = lake.run(photos, lambda *a: pytest.fail("published rows are not read again"))
    assert plan.caught_up == ["run1"] and sorted(users_frame(lake.state).index) == ["ann", "bob"]
    assert not (tmp_path / "lake" / "_state" / "pending").exists() or \
        not list((tmp_path / "lake" / "_state" / "pending").iterdir())


def test_a_missing_state_is_rebuilt_from_the_history(tmp_path):
    lake = Lake(tmp_path / "lake")
    photos = {"ann/a.jpg": T0 - timedelta(hours=1), "bob/b.jpg": T0 - timedelta(hours=1)}
    lake.run(photos, lambda k, w, r, at: scored(k, 0.9, r, at))
    before = users_frame(lake.state)
    import shutil

    shutil.rmtree(tmp_path / "lake" / "_state")
    plan = lake.run({**photos, "cy/c.jpg": T0}, lambda k, w, r, at: scored(k, 0.2, r, at))
    assert plan.rebuilt and plan.to_read["key"].to_pylist() == ["cy/c.jpg"]
    pd.testing.assert_frame_equal(users_frame(lake.state).loc[["ann", "bob"]], before)


def test_opted_out_users_are_never_read_and_have_no_answer(tmp_path):
    lake = Lake(tmp_path / "lake")
    photos = {"ann/a.jpg": T0 - timedelta(hours=1), "bob/b.jpg": T0 - timedelta(hours=1)}
    plan = lake.run(photos, lambda k, w, r, at: scored(k, 0.9, r, at), excluded=["bob"])
    assert plan.to_read["key"].to_pylist() == ["ann/a.jpg"] and plan.excluded == 1 and plan.listed == 2
    assert list(users_frame(lake.state).index) == ["ann"]
    # Opting out later removes the answer, as a photo gone from the source would.
    lake.run(photos, lambda *a: pytest.fail("read"), excluded=["ann", "bob"])
    assert users_frame(lake.state).empty


def everything_stored(root) -> str:
    """Every value of every Parquet file under `root` (all table versions: what time travel
    could read) and the text of every other file, but the tombstones."""
    import pyarrow.parquet as pq

    parts = []
    for path in root.rglob("*"):
        if not path.is_file() or "_state/erased" in str(path):
            continue
        if path.suffix == ".parquet":
            parts.append(str(pq.read_table(path).to_pylist()))
        else:
            parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def test_erasure_of_many_users_in_one_pass_stays_erased(tmp_path):
    lake = Lake(tmp_path / "lake")
    photos = {f"user{i:03d}/p.jpg": T0 - timedelta(hours=1) for i in range(30)}
    lake.run(photos, lambda k, w, r, at: scored(k, 0.9, r, at))
    more = {f"user{i:03d}/q.jpg": T0 for i in range(20, 30)}
    lake.run({**photos, **more}, lambda k, w, r, at: scored(k, 0.2, r, at))
    gone = [f"user{i:03d}" for i in (3, 7, 25)]
    assert all(u in everything_stored(tmp_path / "lake") for u in gone)
    erased_at = T0 + timedelta(days=2)
    report = erase(lake.state, gone, erased_at, Store(str(lake.source)))
    assert report.users == 3 and report.rows_removed == 4 and report.files_read == 2
    assert report.files_rewritten == 2 and report.users_removed == 3 and report.photos_removed == 4
    assert report.vacuumed >= 2
    assert report.source_keys == ["user003/p.jpg", "user007/p.jpg", "user025/p.jpg", "user025/q.jpg"]
    # Gone from every file under the output, logs and time travel included (only the
    # tombstones keep the ids).
    stored = everything_stored(tmp_path / "lake")
    assert not any(u in stored for u in gone)
    assert len(users_frame(lake.state)) == 27
    # The next night does not read their photos (still in the source); a photo uploaded
    # after the erasure is a new signup and is scored.
    later = {"user007/new.jpg": erased_at + timedelta(hours=1)}
    plan = lake.run({**photos, **more, **later}, lambda k, w, r, at: scored(k, 0.2, r, at))
    assert plan.to_read["key"].to_pylist() == ["user007/new.jpg"] and plan.erased_skipped == 4
    users = users_frame(lake.state)
    assert "user003" not in users.index and users.loc["user007", "photo_key"] == "user007/new.jpg"


def test_a_foreign_or_damaged_users_table_is_an_error_and_left_alone(tmp_path):
    from deltalake import write_deltalake

    lake = Lake(tmp_path / "lake")
    write_deltalake(str(tmp_path / "lake" / "users"), pa.table({"id": [1, 2]}), name="someone else's")
    before = sorted(p.read_bytes() for p in (tmp_path / "lake" / "users").rglob("*") if p.is_file())
    with pytest.raises(TableError, match="someone else's"):
        lake.run({"ann/a.jpg": T0}, lambda k, w, r, at: scored(k, 0.9, r, at))
    assert sorted(p.read_bytes() for p in (tmp_path / "lake" / "users").rglob("*") if p.is_file()) == before
    other = tmp_path / "other"
    (other / "users").mkdir(parents=True)
    (other / "users" / "notes.txt").write_text("not a table")
    with pytest.raises(TableError, match="no _delta_log"):
        OutputState(Store(str(other))).plan(listing_table([]), "m@1")
    # rebuild-users --replace is the way out
    OutputState(Store(str(other))).rebuild(listing_table([]), seq=1, replace=True)
    assert DeltaTable(str(other / "users")).to_pandas().empty


def test_weekly_compaction_keeps_the_tables_and_merges_their_files(tmp_path, capsys):
    import json

    from gender_pipeline.cli import main

    lake = Lake(tmp_path / "lake", one_day=True)
    photos = {}
    for night in range(4):  # four runs, each adding users to the same day's partition
        photos.update({f"n{night}u{i}/p.jpg": T0 for i in range(5)})
        lake.run(photos, lambda k, w, r, at: scored(k, 0.9, r, at))
    before = users_frame(lake.state)
    files = len(DeltaTable(lake.state.users.uri).file_uris())
    assert main(["compact", "--output", str(tmp_path / "lake"), "--retention-hours", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert files >= 3 and report["users"]["files_removed"] == files and report["users"]["files_added"] == 1
    assert len(DeltaTable(lake.state.users.uri).file_uris()) == 1
    pd.testing.assert_frame_equal(users_frame(lake.state), before)
    lake.run(photos, lambda *a: pytest.fail("nothing new"))  # and the next night still works


def test_a_run_that_published_nothing_is_not_reported_as_caught_up(tmp_path, caplog):
    """A run cancelled after its plan (marker written, nothing published) leaves nothing to
    apply: the next night says nothing about it."""
    lake = Lake(tmp_path / "lake")
    photos = {"ann/a.jpg": T0 - timedelta(hours=1)}
    lake.run(photos, lambda k, w, r, at: scored(k, 0.9, r, at))
    lake.put({**photos, "bob/b.jpg": T0})
    plan = lake.state.plan(listing_table([ObjectInfo(k, 10, t) for k, t in {**photos, "bob/b.jpg": T0}.items()]),
                           "m@1")
    lake.state.begin(plan, "cancelled-run", date(2026, 3, 2))  # then stopped: nothing published
    assert list((tmp_path / "lake" / "_state" / "pending").glob("*.parquet"))
    caplog.clear()
    plan = lake.run({**photos, "bob/b.jpg": T0}, lambda k, w, r, at: scored(k, 0.2, r, at))
    assert plan.caught_up == [] and "cancelled-run" not in caplog.text
    assert plan.to_read["key"].to_pylist() == ["bob/b.jpg"]
    assert not list((tmp_path / "lake" / "_state" / "pending").iterdir())
