"""An S3 Inventory report as the night's listing: no LIST call at all.

S3 writes a report daily or weekly (the first one up to 48 hours after it is configured):

    {destination-prefix}/{source-bucket}/{config-ID}/{YYYY-MM-DDTHH-MMZ}/manifest.json
    {destination-prefix}/{source-bucket}/{config-ID}/{YYYY-MM-DDTHH-MMZ}/manifest.checksum
    {destination-prefix}/{source-bucket}/{config-ID}/data/{file}.csv.gz | .parquet

`inventory:URL` names a `manifest.json`, or the `{config-ID}` folder (the newest report
whose `manifest.checksum` is written, which S3 writes last, is used). The manifest's
checksum is verified, its source bucket must be the source's, and its files (CSV with
URL-encoded keys, or Parquet; ORC is not read) are streamed in Arrow batches, keeping the
source's prefix. A report is up to a day stale by design: photos uploaded since are read
the night after.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator
from urllib.parse import unquote_plus

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gender_pipeline.lake.columns import LISTING_SCHEMA, TIMESTAMP
from gender_pipeline.lake.storage import StorageError, Store, with_retries

REPORT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}Z$")


class InventoryError(StorageError):
    """The report is missing, incomplete or cannot be read."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


def _read(fs, path: str, what: str) -> bytes:
    try:
        return with_retries(lambda: fs.cat_file(path), f"reading {what}")
    except FileNotFoundError:
        raise InventoryError(f"{what} not found: {path}") from None


def locate_manifest(url: str, options: dict | None = None) -> tuple[object, str]:
    """(filesystem, path of manifest.json) for a manifest URL or a report folder."""
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    path = path.rstrip("/")
    if path.endswith("manifest.json"):
        return fs, path
    fs.invalidate_cache()
    try:
        children = with_retries(lambda: fs.ls(path, detail=False), f"listing {url}")
    except FileNotFoundError:
        raise InventoryError(f"inventory folder not found: {url}") from None
    reports = sorted(c.rstrip("/") for c in children if REPORT.match(c.rstrip("/").rsplit("/", 1)[-1]))
    for report in reversed(reports):
        if fs.exists(f"{report}/manifest.checksum"):
            return fs, f"{report}/manifest.json"
    raise InventoryError(f"no complete inventory report (a YYYY-MM-DDTHH-MMZ folder with manifest.checksum) "
                         f"under {url}")


def read_manifest(fs, path: str) -> dict:
    """The manifest, checked against manifest.checksum (when S3 wrote one)."""
    data = _read(fs, path, "inventory manifest")
    checksum_path = posixpath.join(posixpath.dirname(path), "manifest.checksum")
    if fs.exists(checksum_path):
        expected = _read(fs, checksum_path, "inventory checksum").decode().strip().split()[0].lower()
        if hashlib.md5(data).hexdigest() != expected:
            raise InventoryError(f"inventory manifest {path} does not match its manifest.checksum: corrupt or "
                                 f"still being written")
    try:
        manifest = json.loads(data)
        files, file_format = manifest["files"], manifest["fileFormat"]
        manifest["sourceBucket"]
    except (ValueError, KeyError, TypeError) as error:
        raise InventoryError(f"inventory manifest {path} cannot be read ({error})") from None
    if file_format not in ("CSV", "Parquet"):
        raise InventoryError(f"inventory {path} is {file_format}: only CSV and Parquet reports are read")
    if not isinstance(files, list):
        raise InventoryError(f"inventory manifest {path} has no list of files")
    return manifest


def _file_path(fs, manifest_path: str, manifest: dict, key: str) -> str:
    """Where a data file is: in the destination bucket on S3, else under the same root as
    the manifest (a copy of the report on another store)."""
    destination = str(manifest.get("destinationBucket", "")).rsplit(":", 1)[-1]
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("s3", "s3a") and destination:
        return f"{destination}/{key}"
    config = key.split("/data/", 1)[0]
    root = manifest_path[:manifest_path.find(config)] if config and config in manifest_path else posixpath.dirname(
        posixpath.dirname(posixpath.dirname(manifest_path)))
    return f"{root.rstrip('/')}/{key}" if root else key


def iter_inventory(url: str, source: Store) -> Iterator[pa.RecordBatch]:
    """The source's objects from the report at `url`: (key relative to the source, size,
    modified), latest versions only, delete markers left out."""
    fs, manifest_path = locate_manifest(url, source.options)
    manifest = read_manifest(fs, manifest_path)
    bucket, _, prefix = source.root.partition("/")
    if manifest["sourceBucket"] != bucket:
        raise InventoryError(f"inventory {manifest_path} lists bucket {manifest['sourceBucket']!r}, not the source's "
                             f"{bucket!r}")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    columns = [c.strip() for c in str(manifest.get("fileSchema", "")).split(",")]
    for entry in manifest["files"]:
        path = _file_path(fs, manifest_path, manifest, entry["key"])
        if not fs.exists(path):
            raise InventoryError(f"inventory file {path} (listed in {manifest_path}) is missing")
        try:
            if manifest["fileFormat"] == "CSV":
                batches = _csv_batches(fs, path, columns)
            else:
                batches = _parquet_batches(fs, path)
            for raw in batches:
                found = _ours(raw, prefix)
                if found.num_rows:
                    yield found
        except InventoryError:
            raise
        except (pa.ArrowInvalid, OSError, KeyError, ValueError, EOFError) as error:
            raise InventoryError(f"inventory file {path} cannot be read ({error})") from None


def _csv_batches(fs, path: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if "Key" not in columns or "Bucket" not in columns:
        raise InventoryError(f"inventory CSV schema {columns} has no Bucket and Key columns")
    wanted = [c for c in ("Key", "Size", "LastModifiedDate", "IsLatest", "IsDeleteMarker") if c in columns]
    options = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, include_columns=wanted)
    with fs.open(path, "rb") as raw:
        stream = pa.CompressedInputStream(raw, "gzip") if path.endswith(".gz") else raw
        reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(column_names=columns, block_size=8 << 20),
                                convert_options=options)
        for record_batch in reader:
            keys = record_batch.column("Key")
            encoded = pc.match_substring_regex(keys, r"[%+]")
            if pc.any(encoded).as_py():  # CSV reports URL-encode keys
                keys = pa.array([unquote_plus(k) if e else k for k, e in zip(keys.to_pylist(), encoded.to_pylist())],
                                pa.string())
            yield pa.record_batch({
                "key": keys,
                "size": pc.cast(pc.if_else(pc.equal(record_batch.column("Size"), ""), None, record_batch.column("Size")),
                                pa.int64()) if "Size" in wanted else pa.nulls(len(keys), pa.int64()),
                "modified": _timestamps(record_batch.column("LastModifiedDate")) if "LastModifiedDate" in wanted
                else pa.nulls(len(keys), TIMESTAMP),
                "latest": _flags(record_batch, "IsLatest", True),
                "deleted": _flags(record_batch, "IsDeleteMarker", False)})


def _flags(record_batch: pa.RecordBatch, name: str, default: bool) -> pa.Array:
    if name not in record_batch.schema.names:
        return pa.array([default] * record_batch.num_rows)
    return pc.equal(pc.utf8_lower(record_batch.column(name)), "true")


def _timestamps(text: pa.Array) -> pa.Array:
    return pc.cast(pc.strptime(pc.utf8_slice_codeunits(text, 0, 19), "%Y-%m-%dT%H:%M:%S", "us"), pa.timestamp("us")
                   ).cast(pa.timestamp("us", tz="UTC"))


def _parquet_batches(fs, path: str) -> Iterator[pa.RecordBatch]:
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if "key" not in names:
            raise InventoryError(f"inventory Parquet file {path} has no key column")
        wanted = [c for c in ("key", "size", "last_modified_date", "is_latest", "is_delete_marker") if c in names]
        for record_batch in parquet.iter_batches(columns=wanted, batch_size=65536):
            n = record_batch.num_rows
            modified = record_batch.column("last_modified_date") if "last_modified_date" in wanted else pa.nulls(n, TIMESTAMP)
            yield pa.record_batch({
                "key": record_batch.column("key").cast(pa.string()),
                "size": record_batch.column("size").cast(pa.int64()) if "size" in wanted else pa.nulls(n, pa.int64()),
                "modified": pc.cast(modified, pa.timestamp("us", tz="UTC")),
                "latest": pc.fill_null(record_batch.column("is_latest"), True) if "is_latest" in wanted
                else pa.array([True] * n),
                "deleted": pc.fill_null(record_batch.column("is_delete_marker"), False) if "is_delete_marker" in wanted
                else pa.array([False] * n)})


def _ours(raw: pa.RecordBatch, prefix: str) -> pa.RecordBatch:
    keep = pc.and_(raw.column("latest"), pc.invert(raw.column("deleted")))
    if prefix:
        keep = pc.and_(keep, pc.starts_with(raw.column("key"), prefix))
    kept = raw.filter(keep)
    keys = pc.utf8_slice_codeunits(kept.column("key"), len(prefix)) if prefix else kept.column("key")
    return pa.record_batch([keys, kept.column("size"), kept.column("modified")], schema=LISTING_SCHEMA)
