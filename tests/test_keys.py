"""The upload key rule in its three forms (Python, DuckDB SQL, Arrow) gives the same
answer on every key, hostile ones first."""

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from gender_pipeline.lake.keys import bad_key_sql, folder_of, folder_sql, folders, user_ids, user_of, user_of_sql

HOSTILE = ["", "a", "/a", "a/", "a//b", "./a", "a/./b", "../a", "a/../b", "a/..", "a/b/.", "..", ".", "/", "//",
           "a/b/", "u1/x.jpg", "a/b/c", "ü/ß.jpg", "a b/c d.jpg", "u\n1/x", "u\x00/x", "%2e%2e/x", "a\\b/c",
           "a/.b", ".a/b", " /x", "x/ ", "🙂/🙂.jpg"]


def _sql(keys: list[str], expression: str) -> list:
    con = duckdb.connect()
    con.register("t", pa.table({"key": pa.array(keys, pa.string())}))
    return [row[0] for row in con.sql(f"SELECT {expression} FROM t").fetchall()]


def _agree(keys: list[str]) -> None:
    python = [user_of(k) for k in keys]
    assert user_ids(pa.array(keys, pa.string())).to_pylist() == python
    assert _sql(keys, user_of_sql()) == python
    assert _sql(keys, bad_key_sql()) == [u is None for u in python]
    first = [folder_of(k) for k in keys]
    assert folders(pa.array(keys, pa.string())).to_pylist() == first == _sql(keys, folder_sql())


def test_the_three_forms_agree_on_hostile_keys():
    _agree(HOSTILE)
    assert user_of("u1/x.jpg") == "u1" and user_of("a/b/c") == "a"
    assert [user_of(k) for k in ("", "a", "../a", "a/../b", "a//b", "a/b/.", "a/")] == [None] * 7


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["..", ".", "", "a", "ü", " ", "x.jpg", "\\", "%2e", "\t"]),
                         min_size=1, max_size=5).map("/".join), min_size=1, max_size=20))
def test_the_three_forms_agree_on_any_key(keys):
    _agree(keys)


@pytest.mark.parametrize("key", HOSTILE)
def test_a_user_id_never_escapes_its_folder(key):
    user = user_of(key)
    if user is not None:
        assert user not in ("", ".", "..") and "/" not in user and key.startswith(user + "/")
