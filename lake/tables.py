"""Delta Lake tables under the output, written with delta-rs (`deltalake`).

One place knows where a table lives (a local path or `s3://…` with the store's endpoint),
how to recognise a table this pipeline wrote (its name in the table metadata and its
columns), and how a run marks its commits (an app transaction per run, so a commit that
already happened is never applied twice). DuckDB queries the tables through their Arrow
datasets, on local files and on S3 alike.

On S3, delta-rs (>= 1.6.1) commits with conditional writes (`If-None-Match`), safe with
concurrent writers without a DynamoDB lock; S3-compatible stores that lack them take
`AWS_CONDITIONAL_PUT=etag` (MinIO) from the environment, like every other `AWS_*` setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError
from deltalake.schema import Field

from gender_pipeline.lake.sql import duckdb_type, retried_query
from gender_pipeline.lake.storage import Store, with_retries
from gender_pipeline.runtime.errors import DataFailure

APP_ID = "gender-pipeline"  # the app transaction id our commits carry
CHANGE_DATA_FEED = "delta.enableChangeDataFeed"
CHANGE_DATA = "_change_data"  # where delta keeps a commit's change data, beside the table's files
RETENTION_HOURS = 168  # compaction keeps a week of time travel
# A `touch` (same bytes seen again) updates only these columns of a photo's state.
TOUCH_COLUMNS = ("size", "uploaded_at", "checked_at")


class TableError(DataFailure, RuntimeError):
    """A table under the output is damaged or was not written by this pipeline. Nothing
    is overwritten: move it away, or rebuild it (`gender-pipeline rebuild-users --replace`)."""


@dataclass(frozen=True)
class TableSpec:
    """What one of our tables is."""

    name: str  # kept in the table's metadata: how a table of ours is told from a foreign one
    schema: pa.Schema
    partition_by: tuple[str, ...] = ()
    # Columns whose min/max go into the Delta log. Never a user id or a key: the log is
    # not rewritten by an erasure.
    stats_columns: tuple[str, ...] = ()
    description: str = ""
    # Delta's change data feed: each commit keeps what it inserted, updated and deleted
    # (`_change_data/`), so readers can follow "what changed since version N".
    change_data_feed: bool = False

    @property
    def properties(self) -> dict[str, str]:
        """The table properties a table of this kind carries."""
        found = {"delta.dataSkippingStatsColumns": ",".join(self.stats_columns)} if self.stats_columns else {}
        if self.change_data_feed:
            found[CHANGE_DATA_FEED] = "true"
        return found


def delta_location(store: Store, key: str) -> tuple[str, dict[str, str]]:
    """The table URI and delta-rs storage options for `{store}/{key}`."""
    path = store.path(key)
    protocol = store.protocol
    if protocol in ("file", "local"):
        return os.path.abspath(path), {}
    if protocol in ("s3", "s3a"):
        options = {"AWS_REGION": store.region}
        endpoint = store.endpoint_url
        if endpoint:
            options["AWS_ENDPOINT_URL"] = endpoint
            if endpoint.startswith("http://"):
                options["AWS_ALLOW_HTTP"] = "true"
        return f"s3://{path}", options
    return f"{protocol}://{path}", {}


def _commit(seq: int | None):
    if seq is None:
        return None
    return CommitProperties(app_transactions=[Transaction(app_id=APP_ID, version=seq)])


class Table:
    """One Delta table of ours at `{store}/{key}`. Reads and writes are retried on transient
    storage errors; a write that carries a run's sequence number is not repeated when the
    failed attempt did commit (its app transaction is in the log)."""

    def __init__(self, store: Store, key: str, spec: TableSpec) -> None:
        self.store, self.key, self.spec = store, key, spec
        self.uri, self.options = delta_location(store, key)

    @property
    def url(self) -> str:
        return self.store.full_url(self.key)

    def exists(self) -> bool:
        """Something is at the table's place (ours or not)."""
        path = self.store.path(self.key)
        return with_retries(lambda: self.store.fs.exists(path), f"checking {self.url}")

    def _load(self):
        return with_retries(lambda: DeltaTable(self.uri, storage_options=self.options), f"reading {self.url}")

    def open(self):
        """The table, or None when nothing is there; TableError when what is there is not
        a table of ours or cannot be read."""
        self.store.fs.invalidate_cache()
        if not self.exists():
            return None
        try:
            table = self._load()
        except TableNotFoundError:
            raise TableError(f"{self.url} holds files but no Delta table (no _delta_log): not written by "
                             f"gender-pipeline; nothing was changed. Move it away or choose another output.") from None
        except (DeltaError, ValueError) as error:
            raise TableError(f"the Delta table at {self.url} cannot be read ({error}); nothing was changed. "
                             f"Rebuild it with `gender-pipeline rebuild-users --replace`.") from error
        name = table.metadata().name
        if name != self.spec.name:
            raise TableError(f"the Delta table at {self.url} is {name!r}, not the {self.spec.name!r} table "
                             f"gender-pipeline writes; nothing was changed. Move it away or choose another output.")
        missing = [n for n in self.missing_columns(table) if not self.spec.schema.field(n).nullable]
        if missing:
            raise TableError(f"the Delta table at {self.url} lacks the columns {missing}; nothing was changed. "
                             f"Rebuild it with `gender-pipeline rebuild-users --replace`.")
        return table

    def missing_columns(self, table) -> list[str]:
        """Columns of the spec that `table` lacks: nullable ones were added by a later
        version of the pipeline (readers see them as null until the first write adds them)."""
        have = {field.name for field in table.schema().to_arrow()}
        return [n for n in self.spec.schema.names if n not in have]

    def evolve(self, table):
        """Before a write: add the spec's new (nullable) columns to `table` (an additive
        schema change, so older readers keep working) and the table properties a table
        written by an earlier version lacks (the change data feed). Returns the table as
        it is now."""
        missing = self.missing_columns(table)
        if missing:
            fields = [Field.from_arrow(self.spec.schema.field(n)) for n in missing]
            with_retries(lambda: self._load().alter.add_columns(fields), f"adding {missing} to {self.url}")
        have = table.metadata().configuration or {}
        lacking = {k: v for k, v in self.spec.properties.items() if have.get(k) != v}
        if lacking:
            with_retries(lambda: self._load().alter.set_table_properties(lacking), f"setting {lacking} on {self.url}")
        return self._load() if missing or lacking else table

    def version(self) -> int | None:
        """The table's current version (None when there is no table)."""
        table = self.open()
        return table.version() if table is not None else None

    def scrub_change_data(self, ids: pa.Array, on: str) -> list[str]:
        """Delete the change data files that hold a row whose `on` is in `ids` (an erasure:
        change data is never rewritten, so a file that holds an erased row goes whole).
        Returns the files deleted."""
        folder = self.store.path(f"{self.key}/{CHANGE_DATA}")
        try:
            files = [f for f in self.store.fs.find(folder) if f.endswith(".parquet")]
        except FileNotFoundError:
            return []
        deleted = []
        for path in files:
            with self.store.fs.open(path, "rb") as handle:
                column = pq.read_table(handle, columns=[on])[on].cast(pa.string())  # delta-rs writes string views
            if pc.any(pc.fill_null(pc.is_in(column, ids), False)).as_py():
                with_retries(lambda p=path: self.store.fs.rm_file(p), f"removing {path}")
                deleted.append(self.store.key_of(path))
        return deleted

    def open_or_create(self):
        return self.open() or self.create()

    def _write(self, action, what: str, seq: int | None):
        """Run a commit, retried on transient errors; with a sequence number, an attempt
        after a failed one first checks whether the failed one committed after all."""
        attempts = {"n": 0}

        def attempt():
            attempts["n"] += 1
            if attempts["n"] > 1 and seq is not None:
                current = self._load()
                if self.applied(current, seq):
                    return None
            return action()

        return with_retries(attempt, what)

    def _data(self, data: pa.Table) -> pa.Table:
        return data.select(self.spec.schema.names).cast(self.spec.schema)

    def create(self, data: pa.Table | None = None, seq: int | None = None, mode: str = "error"):
        """Write `data` (or nothing) as a new table version: `error` creates the table,
        `overwrite` replaces an existing table of ours in one commit."""
        configuration = self.spec.properties or None
        data = self._data(data if data is not None else self.spec.schema.empty_table())

        def write() -> None:
            write_deltalake(self.uri, data, mode=mode, partition_by=list(self.spec.partition_by) or None,
                            name=self.spec.name, description=self.spec.description, configuration=configuration,
                            storage_options=self.options, commit_properties=_commit(seq),
                            schema_mode="overwrite" if mode == "overwrite" else None)

        try:
            self._write(write, f"writing {self.url}", seq)
        except Exception as error:
            if mode == "error" and "exists" in str(error).lower() and self.open() is not None:
                pass  # an earlier attempt created it
            else:
                raise
        return self._load()

    def append(self, data: pa.Table, seq: int | None) -> None:
        data = self._data(data)
        current = self.open()
        if current is not None:
            self.evolve(current)
        self._write(lambda: write_deltalake(self.uri, data, mode="append",
                                            partition_by=list(self.spec.partition_by) or None,
                                            storage_options=self.options, commit_properties=_commit(seq)),
                    f"appending to {self.url}", seq)

    def applied(self, table, seq: int) -> bool:
        """True when this table already holds the commit of run `seq` (or a later one)."""
        done = table.transaction_version(APP_ID) if table is not None else None
        return done is not None and done >= seq

    def merge(self, source: pa.Table, on: str, partitions: list[str], seq: int | None) -> dict:
        """A MERGE of `source` (our columns plus `_op`: upsert | delete | touch) on `on`,
        pruned to the target partitions in `partitions` (literal values, which delta-rs's
        streamed MERGE needs to skip the other files). Returns delta-rs's metrics."""
        part = self.spec.partition_by[0]
        values = ", ".join(f"'{p}'" for p in sorted(set(partitions)))
        predicate = f"t.{on} = s.{on} AND t.{part} IN ({values})"
        columns = self.spec.schema.names
        upsert = {c: f"s.{c}" for c in columns}
        touch = {c: f"s.{c}" for c in columns if c in TOUCH_COLUMNS}

        self.evolve(self._load())

        def run() -> dict:
            merger = self._load().merge(source, predicate, source_alias="s", target_alias="t",
                                        commit_properties=_commit(seq))
            merger = merger.when_matched_delete(predicate="s._op = 'delete'")
            if touch:
                merger = merger.when_matched_update(touch, predicate="s._op = 'touch'")
            merger = merger.when_matched_update(upsert, predicate="s._op = 'upsert'")
            merger = merger.when_not_matched_insert(upsert, predicate="s._op = 'upsert'")
            return merger.execute()

        return self._write(run, f"merging into {self.url}", seq) or {}

    def delete_matching(self, ids: pa.Table, on: str) -> dict:
        """Delete the rows whose `on` is in `ids`: a MERGE, so that the ids never appear in
        the table's log (a DELETE records its predicate, literals included). Retried as a
        whole: deleting what is gone already deletes nothing."""
        return self._write(lambda: self._load().merge(ids, f"t.{on} = s.{on}", source_alias="s", target_alias="t")
                           .when_matched_delete().execute(), f"deleting from {self.url}", None)

    def vacuum(self) -> list[str]:
        """Remove every file the current version does not use: what time travel would read."""
        return self._write(lambda: self._load().vacuum(retention_hours=0, dry_run=False,
                                                       enforce_retention_duration=False),
                           f"vacuuming {self.url}", None)

    def compact(self, retention_hours: int = RETENTION_HOURS) -> dict:
        """Merge small files (each night adds some), checkpoint the log, and vacuum files
        older than `retention_hours` that no version newer than that uses."""
        metrics = with_retries(lambda: self._load().optimize.compact(), f"compacting {self.url}")
        with_retries(lambda: self._load().create_checkpoint(), f"checkpointing {self.url}")
        removed = with_retries(lambda: self._load().vacuum(retention_hours=retention_hours, dry_run=False,
                                                           enforce_retention_duration=False),
                               f"vacuuming {self.url}")
        with_retries(lambda: self._load().cleanup_metadata(), f"cleaning the log of {self.url}")
        return {"files_added": metrics.get("numFilesAdded", 0), "files_removed": metrics.get("numFilesRemoved", 0),
                "vacuumed": len(removed)}

    def view(self, con, name: str, table) -> None:
        """Make the table's current version (None: an empty table) queryable as `name` in a
        DuckDB session. DuckDB reads the version's files itself (through the store's
        fsspec filesystem where they are not local); delta-rs writes no deletion vectors,
        so the files are the version."""
        files = table.file_uris() if table is not None else []
        if not files:
            con.register(name, self.spec.schema.empty_table())
            return
        if self.store.protocol not in ("file", "local") and self.store.protocol not in con.list_filesystems():
            con.register_filesystem(self.store.fs)
        # Files written before a column was added lack it: read by name, and a column no
        # file has yet is null.
        relation = retried_query(lambda: con.read_parquet(files, hive_partitioning=bool(self.spec.partition_by),
                                                     union_by_name=True), f"reading {self.url}")
        have = set(relation.columns)
        columns = ", ".join(f'"{f.name}"' if f.name in have else f'CAST(NULL AS {duckdb_type(f.type)}) AS "{f.name}"'
                            for f in self.spec.schema)
        retried_query(lambda: relation.project(columns).create_view(name, replace=True), f"reading {self.url}")
