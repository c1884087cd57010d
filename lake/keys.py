"""The upload key rule, `{user_id}/{file name}`, in the three forms the code needs.

The user id is a key's first path segment. A key has no usable user id when it has no
`/`, or a segment that is empty, `.` or `..` (a key that would climb out of the source).
Python (one key), SQL (a DuckDB expression over a column) and Arrow (a column of keys)
give the same answer: a test holds them together on hostile keys.

A key's *folder* is its first segment whatever the rest: opt-outs and erasures match on
it, so that no object under a user's folder escapes them (not even one whose key breaks
the rule further down).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORBIDDEN_SEGMENTS = ("", ".", "..")
KEY_RULE = "{user_id}/{file name}"


def user_of(key: str) -> str | None:
    """The user id of `key`, or None when the key has no usable one."""
    parts = key.split("/")
    if len(parts) < 2 or any(p in FORBIDDEN_SEGMENTS for p in parts):
        return None
    return parts[0]


def folder_of(key: str) -> str:
    """The first path segment of `key` (the user id of a key that follows the rule)."""
    return key.split("/", 1)[0]


def check_user_id(text: str) -> str:
    """A user id as the upload key rule can produce it (a folder under the source), else
    ValueError saying why: empty or only spaces, a `/`, `.` or `..`, a control character,
    bytes that are not UTF-8."""
    if not text or not text.strip():
        raise ValueError(f"user id {text!r} is empty")
    if "/" in text or text in FORBIDDEN_SEGMENTS:
        raise ValueError(f"user id {text!r} is not a folder name under the source ({KEY_RULE})")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"user id {text!r} holds a control character")
    if not _utf8(text):
        raise ValueError(f"user id {text!r} is not valid UTF-8")
    if len(text.encode("utf-8")) > 255:
        raise ValueError(f"user id {text[:40]!r}… is longer than a folder name may be (255 bytes)")
    return text


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 on the command line
        return False
    return True


def bad_key_sql(column: str = "key") -> str:
    """A DuckDB condition: `column` holds a key without a usable user id."""
    wrapped = f"('/' || {column} || '/')"
    return (f"(NOT contains({column}, '/') OR contains({wrapped}, '//') OR contains({wrapped}, '/./') "
            f"OR contains({wrapped}, '/../'))")


def user_of_sql(column: str = "key") -> str:
    """A DuckDB expression: the user id of `column`, NULL when the key has none."""
    return f"(CASE WHEN {bad_key_sql(column)} THEN NULL ELSE split_part({column}, '/', 1) END)"


def folder_sql(column: str = "key") -> str:
    """A DuckDB expression: the first path segment of `column`."""
    return f"split_part({column}, '/', 1)"


def folders(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The first path segment of each key."""
    return pc.list_element(pc.split_pattern(keys, "/", max_splits=1), 0)


def user_ids(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The user id of each key (a string array), null where the key has none."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    keys = keys.cast(pa.string())
    parts = pc.split_pattern(keys, "/")
    forbidden = pc.is_in(pc.list_flatten(parts), pa.array(FORBIDDEN_SEGMENTS, pa.string()))
    owners = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False)
    bad = np.bincount(owners[forbidden.to_numpy(zero_copy_only=False)], minlength=len(keys)) > 0
    bad |= pc.fill_null(pc.less(pc.list_value_length(parts), 2), True).to_numpy(zero_copy_only=False)
    first = pc.list_element(pc.fill_null(parts, pa.scalar([""], pa.list_(pa.string()))), 0)
    return pc.if_else(pa.array(bad), pa.nulls(len(keys), pa.string()), first)
