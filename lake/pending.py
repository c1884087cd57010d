"""Crash markers: a run that may have published history rows not yet in the tables.

Before a run publishes anything it writes `{output}/_state/pending/{seq}-{run}.json`, and
beside it the listing its photos were read under and the photos it found gone. When the
run completes, the marker goes. The next run finds the markers of runs that died and
applies their published rows first (see lake.output: catch-up), with the listing they
were read under.
"""

from __future__ import annotations

import io
import json
import re
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gender_pipeline.lake.columns import schema
from gender_pipeline.lake.history import DATASET
from gender_pipeline.lake.keys import folders
from gender_pipeline.lake.storage import Store, with_retries

PENDING = "_state/pending"
# What a pending run keeps of its plan: the listing its photos were read under, and the
# photos it found gone (`removed`).
PLAN_LISTING = schema(("key", "size", "modified", "first_seen_run")).append(pa.field("removed", pa.bool_()))


class PendingRuns:
    """The markers under `{output}/_state/pending/`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def markers(self) -> list[dict]:
        """The pending runs' markers, in run order."""
        folder = self.store.path(PENDING)
        self.store.fs.invalidate_cache()
        try:
            names = with_retries(lambda: self.store.fs.ls(folder, detail=False), f"listing {PENDING}")
        except FileNotFoundError:
            return []
        markers = []
        for name in sorted(n for n in names if n.rsplit("/", 1)[-1].endswith(".json")
                           and not n.rsplit("/", 1)[-1].startswith("_")):
            try:
                markers.append(json.loads(with_retries(lambda n=name: self.store.fs.cat_file(n), f"reading {name}")))
            except (FileNotFoundError, ValueError):
                continue
        return sorted(markers, key=lambda m: m["seq"])

    def _key(self, seq: int, run_id: str, suffix: str = ".json") -> str:
        return f"{PENDING}/{seq:012d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)}{suffix}"

    def begin(self, seq: int, run_id: str, scoring_date: date, read: pa.Table | None = None,
              gone: pa.Table | None = None) -> None:
        """Before a run publishes history rows or changes the tables: say so, for the next
        run if this one dies. The photos it reads (`read`: key, size, listing time, first
        run seen) and the photos it found gone (`gone`: key) are kept beside the marker:
        the published rows are applied with the listing they were read under, and a run
        that died between its two commits has its users brought up to date."""
        record = {"seq": seq, "run_id": run_id, "scoring_date": scoring_date.isoformat()}
        if read is not None:
            gone = gone if gone is not None else pa.table({"key": pa.array([], pa.string())})
            kept = pa.concat_tables([
                read.append_column("removed", pa.array([False] * read.num_rows, pa.bool_())).cast(PLAN_LISTING),
                pa.table({"key": gone["key"], **{f.name: pa.nulls(gone.num_rows, f.type) for f in PLAN_LISTING
                                                if f.name not in ("key", "removed")},
                          "removed": pa.array([True] * gone.num_rows, pa.bool_())}).select(PLAN_LISTING.names)
                .cast(PLAN_LISTING)])
            record["listing"] = self._key(seq, run_id, ".parquet")
            self.store.write_atomic(record["listing"], _parquet(kept))
        self.store.write_atomic(self._key(seq, run_id), json.dumps(record).encode())

    def end(self, seq: int, run_id: str) -> None:
        for suffix in (".json", ".parquet"):
            path = self.store.path(self._key(seq, run_id, suffix))
            try:
                with_retries(lambda p=path: self.store.fs.rm_file(p), f"removing {path}")
            except FileNotFoundError:
                pass

    def listing(self, marker: dict) -> pa.Table | None:
        """The listing a pending run read its photos under (None for markers that kept none)."""
        if not marker.get("listing"):
            return None
        try:
            return pq.read_table(io.BytesIO(self.store.read(marker["listing"])))
        except FileNotFoundError:
            return None

    def scrub(self, user_ids: list[str]) -> None:
        """Erasure: the users' keys out of the listings that pending runs kept."""
        wanted = pa.array(sorted(set(user_ids)), pa.string())
        for marker in self.markers():
            listed = self.listing(marker)
            if listed is None:
                continue
            keep = pc.invert(pc.fill_null(pc.is_in(folders(listed["key"]), wanted), False))
            if pc.all(keep).as_py():
                continue
            self.store.write_atomic(marker["listing"], _parquet(listed.filter(keep)))

    def run_files(self, run_id: str, scoring_date: str) -> list[str]:
        """History files a run published (keys), found by name in its date partition."""
        folder = self.store.path(f"{DATASET}/dt={scoring_date}")
        self.store.fs.invalidate_cache()
        try:
            names = with_retries(lambda: self.store.fs.ls(folder, detail=False), f"listing {folder}")
        except FileNotFoundError:
            return []
        prefix = f"part-{run_id}-"
        return sorted(self.store.key_of(n) for n in names
                      if n.rsplit("/", 1)[-1].startswith(prefix) and n.endswith(".parquet"))


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()
