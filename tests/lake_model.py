"""A model of the source and the output over many nights, for the users table's property
test (tests/test_users_property.py) and its long run (benchmarks/users_property_run.py).

The source is a folder of files whose times are set the way a storage clock sets them:
behind, at or ahead of this machine's clock. A night runs the pipeline's own plain
functions, as the scoring flow's tasks call them (the listing, the plan, the scoring
engine, the publish, the MERGEs into the tables), with a fake face front end and fake
models, so that it takes a fraction of a second. After every completed night the output
is checked against the rule, computed here again, independently, from the history (read
as the recommender reads it) and from what this model knows the listing held:

- the users table: for each user, the newest photo by the listing's time (then the larger
  key) among the photos the rule may use, whose latest answer in the history is `scored`,
  answers with that answer's model and gender; opted-out users and erased photos nowhere;
- the history: no photo answered twice in a row with the same bytes by the same model
  while it stayed in the source (a promotion or a rollback answers again, by design);
  nothing of an erased user from before the erasure, and never an erased photo again;
- `rebuild-users` (on a copy of the output) gives the incremental table.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from types import SimpleNamespace

import numpy as np
import pandas as pd

from gender_pipeline.engine.engine import RunStamp, ScoringEngine, ScoringOptions
from gender_pipeline.engine.prepared import Prepared
from gender_pipeline.faces.framing import Framing
from gender_pipeline.lake.erasure import erase
from gender_pipeline.lake.history import to_table, write_predictions
from gender_pipeline.lake.keys import user_of
from gender_pipeline.lake.listing import ListingSpec, list_source
from gender_pipeline.lake.output import OutputState
from gender_pipeline.lake.photo_state import SourceListing
from gender_pipeline.lake.storage import Store

START = datetime(2026, 1, 1, 2, 0, tzinfo=timezone.utc)
SIZES = (64, 80, 96)  # few sizes: an overwrite often keeps the size, as a re-encoded photo may
# Where an upload's time lands against this machine's clock when it was made.
SKEWS = {"past": timedelta(hours=-30), "recent": timedelta(minutes=-5), "now": timedelta(0),
         "ahead": timedelta(seconds=90), "far-ahead": timedelta(days=2)}
KILLS = (None, "before-publish", "after-publish", "between-merges")


def identity(key: str, obj: "Obj") -> tuple[str, int, datetime]:
    """An object as a listing tells it apart: key, size, time to the second."""
    return key, len(obj.data), obj.mtime.replace(microsecond=0)


class Killed(Exception):
    """A night stopped at one of its kill points (as SIGKILL would stop it there)."""


def content(kind: str, value: str, nonce: int, size: int) -> bytes:
    """A fake photo: `FACE <p_male>` or `BROKEN <reason>`, padded to `size` bytes."""
    head = f"{kind} {value} {nonce} ".encode()
    return head + b"." * max(0, size - len(head))


def fake_front_end(key: str, data: bytes, sha: str) -> Prepared:
    """What the decoder and the face front end would make of a fake photo."""
    kind, value, *_ = data.split(b" ", 2)
    if kind == b"FACE":
        return Prepared(key, user_of(key), sha, chip=np.full((1, 1, 1), float(value), np.float32), box=[1, 2, 3, 4],
                        face_count=1, format="FAKE")
    return Prepared(key, user_of(key), sha, reject_reason=value.decode(), detail="fake", format="FAKE")


class FakeModel:
    """A face model whose answer is the photo's value shifted by `shift` (so that each
    version answers differently)."""

    framing = Framing()
    abstain_threshold = 0.6
    device = "cpu"

    def __init__(self, ref: str, shift: float) -> None:
        self.name, self.version = ref.split("@")
        self.shift = shift

    def auto_batch_size(self) -> int:
        return 4

    def predict(self, chips):
        p = (np.asarray(chips, np.float64).reshape(len(chips), -1)[:, 0] + self.shift) % 1.0
        return SimpleNamespace(p_male=np.clip(p, 0.01, 0.99).astype(np.float32))


MODELS = {ref: FakeModel(ref, shift) for ref, shift in (("m@1", 0.0), ("m@2", 0.37), ("m@3", 0.61))}


@dataclass
class Obj:
    data: bytes
    mtime: datetime


@dataclass
class Lake:
    """The source, the output, and what this model knows of both."""

    root: str
    files: dict[str, Obj] = field(default_factory=dict)
    clock: datetime = START  # this machine's clock: a night a day
    production: str = "m@1"
    excluded: set[str] = field(default_factory=set)
    tombstones: set[tuple[str, int, datetime]] = field(default_factory=set)  # (key, size, time to the second)
    erased_at: dict[str, datetime] = field(default_factory=dict)
    nights: int = 0
    completed: list[tuple[datetime, set[str]]] = field(default_factory=list)  # (listed at, photos the rule used)
    last: tuple[int, dict, set] | None = None  # the last completed night: its number, listing and opted-out users
    ops: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    nonce: int = 0

    def __post_init__(self) -> None:
        self.source_dir = os.path.join(self.root, "source")
        self.output_dir = os.path.join(self.root, "output")
        os.makedirs(self.source_dir, exist_ok=True)
        self.source, self.output = Store(self.source_dir), Store(self.output_dir)
        self.state = OutputState(self.output)

    # -- what happens between nights ------------------------------------------------------

    def _note(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        self.ops.append(text)

    def _write(self, key: str, data: bytes, mtime: datetime) -> None:
        old = self.files.get(key)
        if old is not None and old.mtime == mtime:  # a store gives an overwrite a new time
            mtime += timedelta(seconds=1)
        path = os.path.join(self.source_dir, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        nanos = int(mtime.timestamp()) * 1_000_000_000 + mtime.microsecond * 1000
        os.utime(path, ns=(nanos, nanos))
        self.files[key] = Obj(data, mtime)

    def _time(self, skew: str, hours_before_night: float) -> datetime:
        """When a storage clock with `skew` dates an upload made `hours_before_night`
        hours before the next night (this machine's clock)."""
        return self.clock + timedelta(days=1) - timedelta(hours=hours_before_night) + SKEWS[skew]

    def upload(self, key: str, value: str, size: int, skew: str = "now", hours: float = 3.0) -> None:
        """A new photo, or a new photo over an existing key; `value` is a p_male for a face
        (`0.83`) or a reject reason (`corrupt`, `no_face`)."""
        self.nonce += 1
        kind = "FACE" if value[0].isdigit() else "BROKEN"
        data = content(kind, value, self.nonce, size)
        what = ("overwrite" if key in self.files else "upload") + ("-broken" if kind == "BROKEN" else "")
        self._note(what, f"{what} {key} {value} ({len(data)} B, clock {skew})")
        self._write(key, data, self._time(skew, hours))

    def touch(self, key: str, skew: str = "now", hours: float = 2.0) -> None:
        """The same bytes with a new time (a copy in place, a re-sync)."""
        if key in self.files:
            self._note("touch", f"touch {key} (clock {skew})")
            self._write(key, self.files[key].data, self._time(skew, hours))

    def delete(self, key: str) -> None:
        if key in self.files:
            self._note("delete", f"delete {key}")
            os.remove(os.path.join(self.source_dir, key))
            del self.files[key]

    def opt_out(self, user: str) -> None:
        self._note("opt-out", f"opt-out {user}")
        self.excluded.add(user)

    def opt_in(self, user: str) -> None:
        if user in self.excluded:
            self._note("opt-in", f"opt-in {user}")
            self.excluded.discard(user)

    def compact(self) -> None:
        """The weekly upkeep (`gender-pipeline compact`) between two nights."""
        if os.path.isdir(self.output_dir):
            self._note("compact", "compact")
            self.state.compact()

    def promote(self, model: str) -> None:
        if model != self.production:
            kind = "rollback" if int(model[-1]) < int(self.production[-1]) else "promote"
            self._note(kind, f"{kind} to {model}")
            self.production = model

    def erase(self, users: list[str]) -> None:
        """`forget` between two nights, at this machine's clock (an hour before the next
        night), under the output's lock as the CLI takes it."""
        if not os.path.isdir(self.output_dir):  # `forget` needs an output (exit 3 before the first night)
            return
        at = self.clock + timedelta(hours=23)
        self._note("erase", f"erase {', '.join(users)}")
        for user in users:
            mine = {k: o for k, o in self.files.items() if user_of(k) == user}
            self.tombstones |= {identity(k, o) for k, o in mine.items()}
            self.erased_at[user] = at
        erase(self.state, users, at, self.source)

    # -- a night ------------------------------------------------------------------------------

    def night(self, budget: int = 10_000, kill: str | None = None, reupload: str | None = None,
              shard_size: int = 3) -> bool:
        """One night as the scoring flow runs it; `kill` stops it at that point (the next
        night catches up), `reupload` overwrites that key after the listing and before it
        is read. Returns whether the night completed (then the output is checked)."""
        self.nights += 1
        self.clock += timedelta(days=1)
        listed_at, day, run_id = self.clock, self.clock.date(), f"night-{self.nights:04d}"
        self._note("night" if kill is None else f"killed {kill}",
                   f"night {self.nights} ({self.production}, budget {budget}"
                   + (f", killed {kill}" if kill else "") + (f", {reupload} re-uploaded while it runs" if reupload
                                                            else "") + ")")
        listed = {k: Obj(o.data, o.mtime) for k, o in self.files.items()}
        model = MODELS[self.production]
        spool = list_source(self.source, ListingSpec())
        try:
            return self._run(spool.close().path, listed, model, listed_at, day, run_id, budget, kill, reupload,
                             shard_size)
        finally:
            spool.remove()

    def _run(self, spool: str, listed: dict[str, Obj], model: FakeModel, listed_at: datetime, day: date,
             run_id: str, budget: int, kill: str | None, reupload: str | None, shard_size: int) -> bool:
        plan = self.state.plan(SourceListing(spool, tuple(sorted(self.excluded))), self.production, budget)
        if reupload is not None and reupload in self.files:  # new bytes between the listing and the read
            self.counts["re-upload during a run"] += 1
            old = self.files[reupload].data
            self.nonce += 1
            new = (content("FACE", "0.9", self.nonce, len(old)) if old.startswith(b"BROKEN")
                   else content("BROKEN", "no_face", self.nonce, len(old)))
            self._write(reupload, new, listed_at + timedelta(minutes=1))
        objects = plan.objects()
        if objects or plan.removed.num_rows:
            self.state.begin(plan, run_id, day)
        try:
            if kill == "before-publish":
                raise Killed(kill)
            read = []
            self.source.read_many = lambda keys, store=self.source: (read.extend(keys := list(keys)) or
                                                                     Store.read_many(store, keys))
            rows, stats = ScoringEngine(model, ScoringOptions(workers=0, read_chunk=4), RunStamp(run_id, listed_at),
                                        worker_job=fake_front_end).score(self.source, objects, plan.known_hashes())
            for row in rows:  # never a photo that was in the source, as it is, when its user was erased
                assert row.photo_key not in listed or identity(row.photo_key, listed[row.photo_key]) \
                    not in self.tombstones, f"night {self.nights}: {row.photo_key}, erased, was read again"
            for start in range(0, len(rows), shard_size):  # a file per shard, as the flow publishes
                write_predictions(self.output, to_table(rows[start:start + shard_size]), day,
                                  f"part-{run_id}-{start // shard_size:05d}")
            if kill == "after-publish":
                raise Killed(kill)
            commits = []

            def before_commit() -> None:
                commits.append(1)
                if kill == "between-merges" and len(commits) == 2:
                    raise Killed(kill)

            if rows or stats.same_content or plan.removed.num_rows:
                self.state.apply_night(plan, to_table(rows, day), stats.same_content, listed_at, run_id,
                                       before_commit)
        except Killed:
            return False
        used = {k for k, o in listed.items() if self._usable(k, o)}
        self.check_reads(read if "read" in locals() else [], listed)
        self.completed.append((listed_at, used))
        self.last = (self.nights, listed, set(self.excluded))
        self.check(listed, spool)
        return True

    def _usable(self, key: str, obj: Obj) -> bool:
        """Whether the rule may use a listed photo: a user's, not opted out, not the very
        object that was in the source when its user was erased."""
        user = user_of(key)
        return user is not None and user not in self.excluded and identity(key, obj) not in self.tombstones

    # -- the checks ---------------------------------------------------------------------------

    def history(self) -> pd.DataFrame:
        path = os.path.join(self.output_dir, "predictions")
        if not os.path.isdir(path) or not any(n.endswith(".parquet") for _, _, names in os.walk(path)
                                                for n in names):
            return pd.DataFrame(columns=["photo_key", "user_id", "photo_sha256", "status", "reject_reason",
                                         "gender", "p_male", "model_name", "model_version", "scored_at", "run_id"])
        return pd.read_parquet(path)

    def users(self) -> pd.DataFrame:
        from deltalake import DeltaTable

        from gender_pipeline.lake.users import USERS_SCHEMA

        path = os.path.join(self.output_dir, "users")
        table = DeltaTable(path).to_pandas() if os.path.isdir(path) else USERS_SCHEMA.empty_table().to_pandas()
        return table.sort_values("user_id").reset_index(drop=True)

    def expected_users(self, listed: dict[str, Obj], history: pd.DataFrame) -> pd.DataFrame:
        """The rule, computed from the history and the listing alone."""
        latest = (history.sort_values(["scored_at", "run_id"]).groupby("photo_key").tail(1).set_index("photo_key")
                  if len(history) else history.set_index("photo_key"))
        photos = defaultdict(list)
        for key, obj in listed.items():
            if not self._usable(key, obj):
                continue
            assert key in latest.index, f"{key} is in the source and usable, but the history never answered it"
            photos[user_of(key)].append((obj.mtime, key, latest.loc[key]))
        rows = []
        for user, found in sorted(photos.items()):
            found.sort(key=lambda p: (p[0], p[1]), reverse=True)
            scored = [p for p in found if p[2]["status"] == "scored"]
            if not scored:
                continue
            mtime, key, row = scored[0]
            newest = found[0]
            rows.append({"user_id": user, "photo_key": key, "gender": row["gender"], "p_male": float(row["p_male"]),
                         "model_name": row["model_name"], "model_version": row["model_version"],
                         "uploaded_at": pd.Timestamp(mtime), "run_id": row["run_id"], "photos_seen": len(found),
                         "newest_photo_key": newest[1],
                         "newest_reject_reason": newest[2]["reject_reason"] if newest[2]["status"] == "rejected"
                         else None})
        return pd.DataFrame(rows, columns=["user_id", "photo_key", "gender", "p_male", "model_name", "model_version",
                                           "uploaded_at", "run_id", "photos_seen", "newest_photo_key",
                                           "newest_reject_reason"])

    def check(self, listed: dict[str, Obj], spool: str) -> None:
        history = self.history()
        expected = self.expected_users(listed, history)
        actual = self.users()
        where = f"after night {self.nights}"
        assert list(actual["user_id"]) == list(expected["user_id"]), \
            f"{where}: users {list(actual['user_id'])}, the rule gives {list(expected['user_id'])}"
        for column in expected.columns:
            mine, rule = list(actual[column]), list(expected[column])
            if column == "p_male":
                assert np.allclose(mine, rule, atol=1e-6), f"{where}: p_male {mine} != {rule}"
            elif column == "uploaded_at":
                assert [pd.Timestamp(a) for a in mine] == rule, f"{where}: uploaded_at {mine} != {rule}"
            else:
                assert [None if pd.isna(a) else a for a in mine] == [None if pd.isna(b) else b for b in rule], \
                    f"{where}: {column} {mine} != {rule} (users {list(expected['user_id'])})"
        self.check_history(history)
        self.check_rebuild(actual, spool)

    def check_reads(self, read: list[str], listed: dict[str, Obj]) -> None:
        """Right after a completed night, a photo listed as it was then, whose latest answer
        is this night's model's, is not read again (whatever its time says)."""
        if self.last is None or self.last[0] != self.nights - 1:
            return
        _, before, excluded = self.last
        history = self.history()
        latest = history.sort_values(["scored_at", "run_id"]).groupby("photo_key").tail(1).set_index("photo_key")
        name, version = self.production.split("@")
        for key in read:
            was = before.get(key)
            if (was is None or listed.get(key) is None or identity(key, was) != identity(key, listed[key])
                    or user_of(key) in excluded or key not in latest.index):
                continue
            row = latest.loc[key]
            if row["run_id"] == f"night-{self.nights:04d}":  # answered tonight: what did it hold before?
                earlier = history[(history["photo_key"] == key) & (history["run_id"] != row["run_id"])]
                if earlier.empty:
                    continue
                row = earlier.sort_values(["scored_at", "run_id"]).iloc[-1]
            if (row["model_name"], row["model_version"]) == (name, version):
                raise AssertionError(f"night {self.nights}: {key} was read again, unchanged in the listing "
                                     f"and answered by {self.production} already")

    def check_history(self, history: pd.DataFrame) -> None:
        where = f"after night {self.nights}"
        for user, at in self.erased_at.items():
            early = history[(history["user_id"] == user) & (history["scored_at"] < pd.Timestamp(at))]
            assert early.empty, f"{where}: rows of {user} from before their erasure: {early['photo_key'].tolist()}"
        answered = history.dropna(subset=["photo_sha256"]).sort_values(["scored_at", "run_id"])
        for key, rows in answered.groupby("photo_key"):
            previous = None
            for sha, name, version, at in zip(rows["photo_sha256"], rows["model_name"], rows["model_version"],
                                              rows["scored_at"]):
                if previous is not None and previous[:3] == (sha, name, version) and not self._left_between(
                        key, previous[3], at):
                    raise AssertionError(f"{where}: {key} answered twice in a row with the same bytes by "
                                         f"{name}@{version} ({previous[3]} and {at})")
                previous = (sha, name, version, at)

    def _left_between(self, key: str, first, second) -> bool:
        """Whether a completed night between two answers did not use the photo (it had
        left the source, or its user had opted out)."""
        return any(pd.Timestamp(first) < pd.Timestamp(at) < pd.Timestamp(second) and key not in used
                   for at, used in self.completed)

    def check_rebuild(self, incremental: pd.DataFrame, spool: str) -> None:
        """`rebuild-users` on a copy of the output gives the same table."""
        with tempfile.TemporaryDirectory(prefix="rebuild-") as copy:
            target = os.path.join(copy, "output")  # what a rebuild reads: the history and the tombstones
            for part in ("predictions", os.path.join("_state", "erased")):
                if os.path.isdir(os.path.join(self.output_dir, part)):
                    shutil.copytree(os.path.join(self.output_dir, part), os.path.join(target, part))
            state = OutputState(Store(target))
            state.rebuild(SourceListing(spool, tuple(sorted(self.excluded))), seq=state.next_seq(None, None))
            from deltalake import DeltaTable

            rebuilt = DeltaTable(os.path.join(target, "users")).to_pandas().sort_values("user_id").reset_index(
                drop=True)
        columns = [c for c in incremental.columns]
        pd.testing.assert_frame_equal(rebuilt[columns], incremental[columns], check_dtype=False,
                                      obj=f"rebuild-users after night {self.nights}")


# -- random nights, for the long run --------------------------------------------------------

USERS = tuple(f"u{i}" for i in range(8))
NAMES = ("a.jpg", "b.png", "c")


def random_night(lake: Lake, rng: random.Random) -> bool:
    """A few random changes to the source and the settings, then a night."""
    for _ in range(rng.randint(0, 6)):
        keys = sorted(lake.files)
        op = rng.choices(["upload", "overwrite", "broken", "touch", "delete", "erase", "opt-out", "opt-in",
                          "promote", "loose"], weights=[8, 4, 2, 3, 2, 0.6, 0.6, 0.6, 1, 0.3])[0]
        if op in ("upload", "broken"):
            key = f"{rng.choice(USERS)}/{rng.choice(NAMES)}"
            value = f"{rng.random():.3f}" if op == "upload" else rng.choice(["corrupt", "no_face"])
            lake.upload(key, value, rng.choice(SIZES), rng.choice(list(SKEWS)), rng.uniform(0.5, 20))
        elif op == "overwrite" and keys:
            lake.upload(rng.choice(keys), f"{rng.random():.3f}", rng.choice(SIZES), rng.choice(list(SKEWS)))
        elif op == "touch" and keys:
            lake.touch(rng.choice(keys), rng.choice(list(SKEWS)), rng.uniform(0.5, 20))
        elif op == "delete" and keys:
            lake.delete(rng.choice(keys))
        elif op == "erase":
            lake.erase(rng.sample(USERS, rng.randint(1, 2)))
        elif op == "opt-out":
            lake.opt_out(rng.choice(USERS))
        elif op == "opt-in" and lake.excluded:
            lake.opt_in(rng.choice(sorted(lake.excluded)))
        elif op == "promote":
            lake.promote(rng.choice(sorted(MODELS)))
        elif op == "loose":
            lake.upload(f"loose-{rng.randint(0, 3)}.jpg", "0.5", rng.choice(SIZES))
    if lake.nights % 7 == 6:
        lake.compact()
    keys = sorted(lake.files)
    return lake.night(budget=rng.choice([0, 1, 2, 3, 10_000]), kill=rng.choices(KILLS, weights=[10, 1, 1, 1])[0],
                      reupload=rng.choice(keys) if keys and rng.random() < 0.15 else None,
                      shard_size=rng.randint(1, 5))
