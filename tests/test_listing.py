"""The streamed listing: local folders, S3 pages in parallel key ranges (moto), S3 Inventory
reports (Parquet and CSV, in S3's layout), and the key rules in SQL."""

import gzip
import hashlib
import io
import json
import os
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

import gender_pipeline.lake.s3_listing as s3_listing
from gender_pipeline.lake.inventory import InventoryError
from gender_pipeline.lake.keys import bad_key_sql, user_of
from gender_pipeline.lake.listing import ListingSpec, list_source
from gender_pipeline.lake.s3_listing import split_points
from gender_pipeline.lake.sql import duckdb_session
from gender_pipeline.lake.storage import StorageError, Store

ODD_KEYS = ["a b/c d.jpg", "ü ñ/😀.jpg", "p%41ct/x%2By.jpg", "plus+/a+b.jpg", "hash#/q?.jpg", "ok/z.jpg",
            "star*/[x].png", "noext/photo"]
HOSTILE = ["evil/../x.jpg", "dot/./y.jpg", "/rooted.jpg"]


def listed(store, spec=ListingSpec(), boundaries=None):
    with list_source(store, spec, boundaries) as spool:
        table = spool.table()
    assert len(set(table["key"].to_pylist())) == table.num_rows  # no key twice
    return table


def test_local_listing_streams_every_file_with_size_and_time(tmp_path):
    root = tmp_path / "uploads"
    for i, key in enumerate(ODD_KEYS + [f"deep/a/b/c{i}.jpg" for i in range(3)]):
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i + 1))
    (root / "linked").symlink_to(root / "ok", target_is_directory=True)  # not followed
    table = listed(Store(str(root)))
    fs_keys = sorted(Store(str(root)).fs.find(str(root)))
    assert sorted(table["key"].to_pylist()) == sorted(k[len(str(root)) + 1:] for k in fs_keys
                                                      if not k.startswith(str(root / "linked")))
    sizes = dict(zip(table["key"].to_pylist(), table["size"].to_pylist()))
    assert sizes["a b/c d.jpg"] == 1 and sizes["ü ñ/😀.jpg"] == 2
    stamp = table["modified"][0].as_py()
    assert stamp.tzinfo is not None and abs((stamp - datetime.now(timezone.utc)).total_seconds()) < 600
    with pytest.raises(StorageError, match="does not exist"):
        listed(Store(str(tmp_path / "missing")))


@pytest.fixture
def bucket(s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"listing-{os.getpid()}-{abs(hash(s3_endpoint)) % 10**6}"
    client.create_bucket(Bucket=name)
    return client, name


def put(client, bucket, keys):
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"1234")


@pytest.mark.parametrize("page", [3, 7, 1000])
def test_s3_listing_serial_and_parallel_give_the_same_keys(bucket, s3_endpoint, monkeypatch, page):
    import s3fs

    client, name = bucket
    keys = [f"{h:02x}{i:03d}/IMG_{i}.jpg" for i, h in enumerate(range(0, 256, 7))] + ODD_KEYS + HOSTILE
    put(client, name, [f"uploads/{k}" for k in keys] + ["uploadsX/outside.jpg", "other/x.jpg"])
    monkeypatch.setattr(s3_listing, "PAGE", page)  # pagination boundaries inside the ranges
    s3fs.S3FileSystem.clear_instance_cache()
    store = Store(f"s3://{name}/uploads", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    expected = sorted(keys)
    results = []
    for spec, boundaries in [(ListingSpec(fanout=1, client="s3fs"), None), (ListingSpec(fanout=1), None),
                             (ListingSpec(fanout=8), None), (ListingSpec(fanout=8), ["1", "5a", "c", "ü"]),
                             (ListingSpec(fanout=8, client="s3fs"), ["40"])]:
        table = listed(store, spec, boundaries)
        assert sorted(table["key"].to_pylist()) == expected, spec
        assert set(table["size"].to_pylist()) == {4}
        results.append(table)
    assert all(t["modified"].null_count == 0 for t in results)


def test_s3_listing_of_a_missing_bucket_is_a_storage_error(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    store = Store("s3://no-such-bucket-here/uploads", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    with pytest.raises(StorageError):
        listed(store, ListingSpec(fanout=4))


class GenericError(Exception):
    """Stands for obstore's error class: no errno, only its text says what failed."""


# obstore's text when a connection is dropped before the answer (seen through a dropping proxy).
DROPPED = ("Generic S3 error: Error performing list request: Error performing GET http://127.0.0.1:1/b?list-type=2 "
           "in 221ms, after 2 retries, max_retries: 2, retry_timeout: 20s  - HTTP error: error sending request "
           "... hyper::Error(Canceled, hyper::Error(IncompleteMessage))")


@pytest.mark.parametrize("text, retried", [(DROPPED, True), ("Generic S3 error: ... 503 Slow Down", True),
                                           ("Generic S3 error: Client error with status 403 Forbidden", False)])
def test_an_obstore_page_is_retried_when_its_request_failed_not_when_it_was_refused(monkeypatch, text, retried):
    from types import SimpleNamespace

    from gender_pipeline.lake import storage

    monkeypatch.setattr(storage, "_sleep", lambda s: None)
    page = s3_listing.Page(pa.array(["a/1.jpg"]), pa.array([4], pa.int64()),
                               pa.array([None], s3_listing.TIMESTAMP), False)
    calls = []

    def fetch(after):
        calls.append(after)
        if len(calls) < 3:
            raise GenericError(text)
        return page

    lister = object.__new__(s3_listing.S3Lister)
    lister.store, lister.fetch = SimpleNamespace(url="s3://b/uploads"), fetch
    if retried:
        assert lister._page("") is page and len(calls) == 3
    else:
        with pytest.raises(GenericError):
            lister._page("")
        assert len(calls) == 1


def test_split_points_cut_the_rest_of_a_range_where_its_keys_vary():
    page = [f"user-{i:06d}/a.jpg" for i in range(1000)]
    points = split_points(page, None, limit=100)
    assert points == sorted(points) and all(p > page[-1] for p in points)
    assert points[:3] == ["user-001", "user-002", "user-003"] and "user-1" in points
    bounded = split_points(page, "user-05", limit=100)
    assert all(p < "user-05" for p in bounded) and bounded[-1] == "user-04"
    assert len(split_points(page, None, limit=5)) == 5


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ab/.é ", min_size=1, max_size=12), min_size=1, max_size=30))
def test_bad_keys_in_sql_are_the_keys_without_a_user(keys):
    with duckdb_session() as con:
        con.register("listing", pa.table({"key": keys}))
        flags = [row[0] for row in con.rows(f"SELECT {bad_key_sql()} FROM listing")]
    assert flags == [user_of(k) is None for k in keys]


# -- S3 Inventory ----------------------------------------------------------------------------------

T = datetime(2026, 11, 30, 22, 15, tzinfo=timezone.utc)


def write_report(fs, fmt, entries, *, stamp="2026-12-01T01-00Z", checksum=True, corrupt=None):
    """An inventory report of bucket `signups` in S3's layout, under the bucket `inventory`."""
    base = "inventory/reports/signups/nightly"
    if fmt == "CSV":
        lines = "".join(f'"signups","{key}","{size}","2026-11-30T22:15:00.000Z","{latest}","{marker}"\n'
                        for key, size, latest, marker in entries)
        data, ext = gzip.compress(lines.encode()), "csv.gz"
        schema = "Bucket, Key, Size, LastModifiedDate, IsLatest, IsDeleteMarker"
    else:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"bucket": ["signups"] * len(entries), "key": [e[0] for e in entries],
                                 "size": [e[1] for e in entries],
                                 "last_modified_date": pa.array([T] * len(entries), pa.timestamp("ms", tz="UTC")),
                                 "is_latest": [e[2] == "true" for e in entries],
                                 "is_delete_marker": [e[3] == "true" for e in entries]}), buffer)
        data, ext = buffer.getvalue(), "parquet"
        schema = "message s3.inventory { required binary bucket (STRING); required binary key (STRING); }"
    if corrupt == "data":
        data = data[: len(data) // 2]
    fs.pipe(f"{base}/data/{stamp}.{ext}", data)
    manifest = json.dumps({"sourceBucket": "signups", "destinationBucket": "arn:aws:s3:::inventory",
                           "version": "2016-11-30", "fileFormat": fmt, "fileSchema": schema,
                           "files": [{"key": f"reports/signups/nightly/data/{stamp}.{ext}", "size": len(data),
                                      "MD5checksum": hashlib.md5(data).hexdigest()}]}).encode()
    fs.pipe(f"{base}/{stamp}/manifest.json", manifest)
    if checksum:
        digest = hashlib.md5(manifest if corrupt != "manifest" else manifest + b" ").hexdigest()
        fs.pipe(f"{base}/{stamp}/manifest.checksum", digest.encode())
    return f"s3://{base}"


@pytest.fixture
def inventory(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    for name in ("inventory", "signups"):
        if not fs.exists(name):
            fs.mkdir(name)
    store = Store("s3://signups/uploads", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    yield fs, store
    fs.rm("inventory/reports", recursive=True)


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_an_inventory_report_is_the_listing_without_a_list_call(inventory, fmt, monkeypatch):
    fs, store = inventory
    encoded = {"uploads/a b/c d.jpg": "uploads/a+b/c+d.jpg", "uploads/ü/x.jpg": "uploads/%C3%BC/x.jpg",
               "uploads/plus+/x.jpg": "uploads/plus%2B/x.jpg"}
    entries = [(encoded.get(k, k) if fmt == "CSV" else k, 10, "true", "false")
               for k in ["uploads/ok/z.jpg", "uploads/a b/c d.jpg", "uploads/ü/x.jpg", "uploads/plus+/x.jpg",
                         "elsewhere/not-ours.jpg"]]
    entries += [("uploads/old/v1.jpg", 5, "false", "false"), ("uploads/gone/x.jpg", 0, "true", "true")]
    write_report(fs, fmt, entries, stamp="2026-11-30T01-00Z")
    url = write_report(fs, fmt, entries)
    fs.pipe("inventory/reports/signups/nightly/2026-12-02T01-00Z/manifest.json", b"{}")  # being written: no checksum
    monkeypatch.setattr(s3_listing.S3Lister, "batches", lambda self: pytest.fail("a LIST call"))
    for where in (url, f"{url}/2026-12-01T01-00Z/manifest.json"):
        table = listed(store, ListingSpec.parse(f"inventory:{where}"))
        assert sorted(table["key"].to_pylist()) == ["a b/c d.jpg", "ok/z.jpg", "plus+/x.jpg", "ü/x.jpg"]
        assert set(table["size"].to_pylist()) == {10}
        assert table["modified"][0].as_py() == T.replace(minute=15)


@pytest.mark.parametrize("problem, message", [
    ("missing-data", "is missing"), ("data", "cannot be read"), ("manifest", "does not match its manifest.checksum"),
    ("no-report", "no complete inventory report"), ("other-bucket", "not the source's")])
def test_a_missing_or_corrupt_report_is_a_clear_error(inventory, problem, message):
    fs, store = inventory
    url = write_report(fs, "Parquet", [("uploads/a/b.jpg", 1, "true", "false")],
                       corrupt=problem if problem in ("data", "manifest") else None)
    if problem == "missing-data":
        fs.rm("inventory/reports/signups/nightly/data", recursive=True)
    if problem == "no-report":
        fs.rm("inventory/reports/signups/nightly/2026-12-01T01-00Z/manifest.checksum")
    if problem == "other-bucket":
        store = Store("s3://someone-else/uploads", store.options)
    with pytest.raises(InventoryError, match=message):
        listed(store, ListingSpec.parse(f"inventory:{url}"))


def test_listing_option_is_checked():
    assert ListingSpec.parse("inventory:s3://b/x") == ListingSpec("inventory", "s3://b/x")
    for bad in ("inventory:", "s3://b/x", "find"):
        with pytest.raises(ValueError, match="--listing"):
            ListingSpec.parse(bad)
    with pytest.raises(ValueError, match="fan-out"):
        ListingSpec.parse("list", 0)
