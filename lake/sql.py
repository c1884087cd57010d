"""DuckDB for the bookkeeping joins: a session with bounded memory (spilling to disk
beyond it), the cores this process may use, and queries retried when a remote read fails
for a reason that may pass."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import pyarrow as pa

from gender_pipeline.lake.storage import TRANSIENT_NAMES, with_retries
from gender_pipeline.runtime.processes import cpu_count

# DuckDB's working memory for the bookkeeping joins; beyond it DuckDB spills to disk.
DUCKDB_MEMORY = os.environ.get("GENDER_PIPELINE_DUCKDB_MEMORY", "256MB")


def duckdb_type(arrow_type: pa.DataType) -> str:
    """DuckDB's name for an Arrow type of our schemas (for a column that is still null)."""
    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMPTZ" if arrow_type.tz else "TIMESTAMP"
    names = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.int16(): "SMALLINT",
             pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.date32(): "DATE", pa.bool_(): "BOOLEAN"}
    if arrow_type in names:
        return names[arrow_type]
    raise TypeError(f"no DuckDB type for {arrow_type}")




# Words in a DuckDB error that wraps a storage error worth another try (DuckDB reads
# remote files through the store's fsspec filesystem, and reports its errors as text).
_TRANSIENT_TEXT = (*TRANSIENT_NAMES, "ConnectionResetError", "Connection reset", "timed out", "Broken pipe")


def retried_query(run, what: str):
    def attempt():
        try:
            return run()
        except duckdb.Error as error:
            if any(word in str(error) for word in _TRANSIENT_TEXT):
                raise ConnectionError(str(error).strip().splitlines()[-1]) from error
            raise

    return with_retries(attempt, what)


class Session:
    """A DuckDB connection whose queries are retried when a remote read fails for a
    reason that may pass; results are fetched whole (they are the night's size)."""

    def __init__(self, con) -> None:
        self.con = con

    def __getattr__(self, name: str):
        return getattr(self.con, name)

    def execute(self, query: str, params=None):
        return retried_query(lambda: self.con.execute(query, params) if params is not None else self.con.execute(query),
                        "a bookkeeping query")

    def rows(self, query: str, params=None) -> list[tuple]:
        return retried_query(lambda: self.con.sql(query, params=params).fetchall(), "a bookkeeping query")

    def arrow(self, query: str, params=None) -> pa.Table:
        return retried_query(lambda: self.con.sql(query, params=params).to_arrow_table(), "a bookkeeping query")


@contextmanager
def duckdb_session() -> Iterator[Session]:
    """A DuckDB session for the bookkeeping joins: bounded memory (spilling to a
    temporary folder beyond it), the cores this process may use."""
    with tempfile.TemporaryDirectory(prefix="gp-duckdb-") as spill:
        con = duckdb.connect()
        try:
            con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
            con.execute(f"SET threads = {max(1, cpu_count())}")
            con.execute(f"SET temp_directory = '{spill}'")
            con.execute("SET preserve_insertion_order = false")
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET parquet_metadata_cache = true")  # table files never change: read each footer once
            yield Session(con)
        finally:
            con.close()
