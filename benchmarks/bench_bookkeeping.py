"""What a night costs besides the photos: the listing diff, shard planning, the history
write, the photo state's and the users table's updates, at a history of millions of
answered photos, against the code before (the history read whole into pandas and a diff
of Python dicts), measured in the same run; then listing S3 serially, in parallel, and
from an S3 Inventory report.

    python benchmarks/bench_bookkeeping.py --history 1000000,10000000 --new 10000 --work /tmp/bk

Each size is built once (synthetically, through the project's own writers: the photo
state and the users table with delta-rs, the history with `write_predictions`, the
listing spool) and measured in a fresh process that samples its resident memory every
10 ms; the peak of each stage is printed. No image is read and no model runs.

The listing part puts `--listing-keys` keys behind two S3 endpoints, each answering
with `--delay` seconds of added latency per request: moto's server (in its own process,
behind a loopback proxy that holds each request) and a listing stub with S3's cost
profile (latency, no server CPU; benchmarks/s3_listing_stub.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

T0 = datetime(2024, 1, 1, 2, tzinfo=timezone.utc)
NIGHT = datetime(2027, 1, 1, 2, tzinfo=timezone.utc)
MODEL = ("dlib-gender-v1", "1")
CHUNK = 1_000_000


def user_ids(start: int, stop: int, new: bool = False) -> list[str]:
    """Ids of answered users (even numbers) or of the night's new users (odd ones, among
    the others: their keys interleave with the known ones, as real signups' do)."""
    return [f"u{2 * i + new:010d}" for i in range(start, stop)]


# -- building a size --------------------------------------------------------------------------

def build(work: str, size: int, new: int, with_history: bool) -> None:
    """The output of `size` answered photos (one per user, answered over 1,000 days) and a
    listing of them plus `new` photos of new users, uploaded since."""
    from gender_pipeline.lake.listing import Spool
    from gender_pipeline.lake.history import conform, write_predictions
    from gender_pipeline.lake.output import OutputState
    from gender_pipeline.lake.photo_state import PHOTOS_SCHEMA
    from gender_pipeline.lake.storage import Store
    from gender_pipeline.lake.users import USERS_SCHEMA

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    state = OutputState(Store(os.path.join(work, "lake")))
    spool = Spool()
    rng = np.random.default_rng(size)
    for start in range(0, size, CHUNK):
        stop = min(size, start + CHUNK)
        n = stop - start
        users = user_ids(start, stop)
        keys = [f"{u}/photo.jpg" for u in users]
        days = rng.integers(0, 1000, n)
        answered = np.datetime64("2024-01-01T02:00:00", "us") + days.astype("timedelta64[D]")
        uploaded = answered - np.timedelta64(3600, "s")
        p = rng.random(n).astype(np.float32)
        gender = np.where(p >= 0.5, "male", "female")
        ts = pa.timestamp("us", tz="UTC")
        photos = table_of({
            "photo_key": keys, "user_id": users, "size": np.full(n, 150_000), "uploaded_at": pa.array(uploaded, ts),
            "photo_sha256": [f"{i:064x}" for i in range(start, stop)], "status": ["scored"] * n,
            "reject_reason": pa.nulls(n, pa.string()), "gender": gender, "p_male": p,
            "confidence": np.maximum(p, 1 - p), "model_name": [MODEL[0]] * n, "model_version": [MODEL[1]] * n,
            "answered_at": pa.array(answered, ts), "checked_at": pa.array(answered, ts),
            "run_id": [f"run-{d}" for d in days], "answered_on": pa.array(answered.astype("datetime64[D]"))},
            PHOTOS_SCHEMA)
        users_rows = table_of({
            "user_id": users, "gender": gender, "p_male": p, "confidence": np.maximum(p, 1 - p), "photo_key": keys,
            "photo_sha256": photos["photo_sha256"], "uploaded_at": photos["uploaded_at"],
            "answered_at": photos["answered_at"], "model_name": photos["model_name"],
            "model_version": photos["model_version"], "photos_seen": np.ones(n, np.int32),
            "newest_photo_key": keys, "newest_reject_reason": pa.nulls(n, pa.string()), "run_id": photos["run_id"],
            "schema_version": np.ones(n, np.int16), "answered_on": photos["answered_on"]}, USERS_SCHEMA)
        if start == 0:
            state.photos.create(photos, seq=1)
            state.users.create(users_rows, seq=1)
        else:
            state.photos.append(photos, seq=1)
            state.users.append(users_rows, seq=1)
        spool.add(pa.record_batch([pa.array(keys), pa.array(np.full(n, 150_000)), photos["uploaded_at"].combine_chunks()],
                                  names=["key", "size", "modified"]))
        if with_history:
            store = Store(os.path.join(work, "lake"))
            for part in range(0, n, 2000):
                rows = photos.slice(part, 2000)
                m = rows.num_rows
                history = conform(pa.table({
                    "user_id": rows["user_id"], "photo_key": rows["photo_key"], "photo_sha256": rows["photo_sha256"],
                    "status": rows["status"], "reject_reason": rows["reject_reason"], "gender": rows["gender"],
                    "p_male": rows["p_male"], "p_female": pa.array(1 - rows["p_male"].to_numpy()),
                    "confidence": rows["confidence"], "face_count": np.ones(m, np.int16),
                    "face_box": [[1, 2, 3, 4]] * m, "model_name": rows["model_name"],
                    "model_version": rows["model_version"], "scored_at": rows["answered_at"], "run_id": rows["run_id"],
                    "schema_version": np.ones(m, np.int16)}))
                write_predictions(store, history, date(2024, 1, 1) + timedelta(days=(start + part) // 2000 % 1000),
                                  f"part-build-{(start + part) // 2000:06d}")
        print(f"  built {stop:,} of {size:,}", file=sys.stderr, flush=True)
    spread = max(1, size // new)  # the new users' ids spread over the whole id range
    new_keys = [f"{u}/IMG_0001.jpg" for u in user_ids(0, new * spread, new=True)[::spread]]
    uploaded = pa.array([NIGHT - timedelta(hours=3)] * new, pa.timestamp("us", tz="UTC"))
    spool.add(pa.record_batch([pa.array(new_keys), pa.array(np.full(new, 2_000_000)), uploaded],
                              names=["key", "size", "modified"]))
    for table in (state.photos, state.users):  # as the weekly compaction leaves them
        table.compact(retention_hours=0)
    spool.close()
    shutil.move(spool.path, os.path.join(work, "listing.parquet"))
    spool.remove()


# -- measuring ----------------------------------------------------------------------------------

class Sampler:
    """The process's resident memory every 10 ms; the peak of each stage."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stage(self):
        self.peak = self.process.memory_info().rss
        return self

    def mib(self) -> float:
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak / 2**20


def _stage(results: dict, sampler: Sampler, name: str, action):
    sampler.stage()
    started = time.perf_counter()
    value = action()
    results[name] = {"seconds": round(time.perf_counter() - started, 3), "peak_mib": round(sampler.mib(), 1)}
    return value


def table_of(columns: dict, schema: pa.Schema) -> pa.Table:
    """`columns` as a table of `schema`, the columns it leaves out null (the newer ones)."""
    n = len(next(iter(columns.values())))
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)


def night_rows(objects, run_id: str):
    """The night's answers, as the scoring shards would publish them (every photo scored)."""
    from gender_pipeline.lake.history import conform

    n = len(objects)
    p = np.random.default_rng(1).random(n).astype(np.float32)
    return conform(pa.table({
        "user_id": [o.key.split("/")[0] for o in objects], "photo_key": [o.key for o in objects],
        "photo_sha256": [f"{i:064x}" for i in range(n)], "status": ["scored"] * n,
        "reject_reason": pa.nulls(n, pa.string()), "gender": np.where(p >= 0.5, "male", "female"), "p_male": p,
        "p_female": 1 - p, "confidence": np.maximum(p, 1 - p), "face_count": np.ones(n, np.int16),
        "face_box": [[1, 2, 3, 4]] * n, "model_name": [MODEL[0]] * n, "model_version": [MODEL[1]] * n,
        "scored_at": pa.array([NIGHT] * n, pa.timestamp("us", tz="UTC")), "run_id": [run_id] * n,
        "schema_version": np.ones(n, np.int16)}))


def measure(work: str) -> dict:
    """One night's bookkeeping on a built size, stage by stage (a fresh process). The
    engines are imported before the start is taken, as pandas is for the code before."""
    import deltalake  # noqa: F401
    import duckdb  # noqa: F401

    sampler = Sampler()
    from gender_pipeline.lake.history import write_predictions
    from gender_pipeline.lake.output import NightRows, OutputState
    from gender_pipeline.lake.photo_state import SourceListing
    from gender_pipeline.lake.storage import Store
    from gender_pipeline.night.shards import split

    results: dict = {"start_mib": round(sampler.mib(), 1)}
    store = Store(os.path.join(work, "lake"))
    state = OutputState(store)
    versions = {table: table._load().version() for table in (state.photos, state.users)}
    listing = SourceListing(os.path.join(work, "listing.parquet"))
    plan = _stage(results, sampler, "listing diff (plan)", lambda: state.plan(listing, "@".join(MODEL), 10_000))
    objects = plan.objects()
    shards = _stage(results, sampler, "shard planning", lambda: split(objects, plan.known_hashes(), 2000))
    run_id = "bench-night"
    rows = night_rows(objects, run_id)

    def publish() -> None:
        for shard in shards:
            part = rows.slice(shard.index * 2000, len(shard.objects))
            write_predictions(store, part, NIGHT.date(), f"part-{run_id}-{shard.index:05d}")

    _stage(results, sampler, "history write", publish)
    dated = rows.append_column("dt", pa.array([NIGHT.date().isoformat()] * rows.num_rows))
    timings: dict = {}
    night = NightRows(dated, plan.to_read, NIGHT, removed=plan.removed, partitions=plan.partitions(),
                      model="@".join(MODEL))
    applied = _stage(results, sampler, "state update + users MERGE", lambda: state.apply(night, plan.seq,
                                                                                          timings=timings))
    results["  of which photo state"] = {"seconds": round(timings.get("photo_state", 0), 3)}
    results["  of which users table"] = {"seconds": round(timings.get("users_table", 0), 3)}
    counts = (plan.users + applied.users_added, plan.behind + applied.behind_added)  # as the flow counts them
    results["bookkeeping_seconds"] = round(sum(v["seconds"] for k, v in results.items()
                                                if isinstance(v, dict) and not k.startswith(" ")), 3)
    results["peak_mib"] = round(max(v.get("peak_mib", 0) for v in results.values() if isinstance(v, dict)), 1)
    results["to_read"], results["users"], results["users_behind"] = len(objects), counts[0], counts[1]
    results["users_inserted"] = applied.users_upserted
    undo_night(store, state, run_id, versions)
    return results


def undo_night(store, state, run_id: str, versions: dict) -> None:
    """Put the output back as it was built, so that the size can be measured again."""
    folder = store.path(f"predictions/dt={NIGHT.date().isoformat()}")
    if store.fs.exists(folder):
        store.fs.rm(folder, recursive=True)
    for table, version in versions.items():
        loaded = table._load()
        if loaded.version() != version:
            loaded.restore(version)


# -- the code before this issue (copied from it) ------------------------------------------------

@dataclass
class Diff:
    to_read: list
    known_hashes: dict
    skipped_unchanged: int


def read_predictions_before(store):
    """The history read whole into pandas (the previous `read_predictions`)."""
    import pyarrow.dataset as ds

    from gender_pipeline.lake.history import DATASET, PREDICTIONS_SCHEMA

    dataset = ds.dataset(store.path(DATASET), filesystem=store.fs, format="parquet", partitioning="hive",
                         schema=PREDICTIONS_SCHEMA.append(pa.field("dt", pa.string())))
    return dataset.to_table(columns=["photo_key", "photo_sha256", "reject_reason", "scored_at"]).to_pandas()


def diff_before(objects, existing) -> Diff:
    """The previous `diff_against_dataset`: Python dicts over every answered photo."""
    import pandas as pd

    answered = existing[~existing["reject_reason"].isin(("read_error",))]
    known: dict[str, set[str]] = {}
    last_answer: dict[str, datetime] = {}
    for key, sha, at in zip(answered.get("photo_key", []), answered.get("photo_sha256", []),
                            answered.get("scored_at", [])):
        if not (sha is None or (isinstance(sha, float) and pd.isna(sha))):
            known.setdefault(key, set()).add(sha)
        at = pd.Timestamp(at).to_pydatetime()
        if key not in last_answer or at > last_answer[key]:
            last_answer[key] = at
    to_read, skipped = [], 0
    for obj in objects:
        answered_at = last_answer.get(obj.key)
        if answered_at is not None and obj.modified is not None and obj.modified < answered_at:
            skipped += 1
            continue
        to_read.append(obj)
    return Diff(to_read, known, skipped)


def measure_before(work: str) -> dict:
    import pandas  # noqa: F401

    from gender_pipeline.lake.storage import ObjectInfo, Store

    table = pq.read_table(os.path.join(work, "listing.parquet"))
    objects = [ObjectInfo(k, s, m) for k, s, m in zip(table["key"].to_pylist(), table["size"].to_pylist(),
                                                       table["modified"].to_pylist())]
    del table
    sampler = Sampler()
    results: dict = {"start_mib (1 ObjectInfo per listed key already made)": round(sampler.mib(), 1)}
    store = Store(os.path.join(work, "lake"))
    existing = _stage(results, sampler, "read history (pandas)", lambda: read_predictions_before(store))
    diff = _stage(results, sampler, "diff (Python dicts)", lambda: diff_before(objects, existing))
    results["known_hashes_pickled_mib"] = round(len(pickle.dumps(diff.known_hashes)) / 2**20, 1)
    results["bookkeeping_seconds"] = round(sum(v["seconds"] for v in results.values() if isinstance(v, dict)), 3)
    results["peak_mib"] = round(max(v["peak_mib"] for v in results.values() if isinstance(v, dict)), 1)
    results["to_read"] = len(diff.to_read)
    return results


# -- listing ----------------------------------------------------------------------------------------

def serve_moto(keys: int, port: int, delay: float) -> None:
    """moto's S3 server with `keys` keys (put through its backend), behind a proxy that
    holds each request for `delay` seconds; prints the proxy's port, then serves."""
    import logging

    from moto.backends import get_backend
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="signups")
    backend = get_backend("s3")["123456789012"]["global"]
    for key in listing_keys(keys):
        backend.put_object("signups", f"uploads/{key}", b"x")
    proxy = DelayProxy(port, delay)
    print(proxy.port, flush=True)
    threading.Event().wait()


def listing_keys(count: int) -> list[str]:
    rng = np.random.default_rng(3)
    return sorted(f"{rng.integers(16**8):08x}-{i:06d}/IMG_{i:05d}.jpg" for i in range(count))


class DelayProxy:
    """Loopback TCP proxy that holds every client-to-server chunk (one request on a
    keep-alive connection) for `delay` seconds."""

    def __init__(self, upstream: int, delay: float) -> None:
        import socket

        self.upstream, self.delay = upstream, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket

        while True:
            client, _ = self.server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, target, hold: bool) -> None:
        try:
            while data := source.recv(65536):
                if hold:
                    time.sleep(self.delay)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.close()
                except OSError:
                    pass


def serve_stub(keys: int, delay: float) -> None:
    from benchmarks.s3_listing_stub import ListingStub

    stub = ListingStub("signups", [f"uploads/{k}" for k in listing_keys(keys)], delay=delay)
    stub.__enter__()
    print(stub.endpoint.rsplit(":", 1)[1], flush=True)
    threading.Event().wait()


def time_listings(endpoint: str, keys: int, variants) -> list[dict]:
    import s3fs

    from gender_pipeline.lake.listing import key_sample, list_source
    from gender_pipeline.lake.storage import Store

    sample = key_sample(listing_keys(keys)[::97], 32)
    rows = []
    for label, spec, seeded in variants:
        s3fs.S3FileSystem.clear_instance_cache()
        store = Store("s3://signups/uploads", {"client_kwargs": {"endpoint_url": endpoint}})
        started = time.perf_counter()
        with list_source(store, spec, sample if seeded else None) as spool:
            listed = spool.rows
        rows.append({"variant": label, "seconds": round(time.perf_counter() - started, 2), "keys": listed})
    return rows


def write_inventory(endpoint: str, keys: int, fmt: str) -> str:
    """An S3 Inventory report of the listing keys, in S3's layout, on moto."""
    import gzip
    import hashlib

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    if not fs.exists("inventory"):
        fs.mkdir("inventory")
    base = f"inventory/reports/signups/nightly-{fmt.lower()}"
    names = [f"uploads/{k}" for k in listing_keys(keys)]
    if fmt == "CSV":
        lines = "".join(f'"signups","{n.replace(" ", "+")}","150000","2026-01-01T00:00:00.000Z"\n' for n in names)
        data, schema, ext = gzip.compress(lines.encode()), "Bucket, Key, Size, LastModifiedDate", "csv.gz"
    else:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"bucket": ["signups"] * len(names), "key": names, "size": [150_000] * len(names),
                                 "last_modified_date": pa.array([T0] * len(names), pa.timestamp("ms", tz="UTC"))}),
                       buffer)
        data = buffer.getvalue()
        schema, ext = "message s3.inventory { required binary bucket (STRING); required binary key (STRING); }", "parquet"
    fs.pipe(f"{base}/data/part-0.{ext}", data)
    manifest = json.dumps({"sourceBucket": "signups", "destinationBucket": "arn:aws:s3:::inventory",
                           "version": "2016-11-30", "fileFormat": fmt, "fileSchema": schema,
                           "files": [{"key": f"reports/signups/nightly-{fmt.lower()}/data/part-0.{ext}",
                                      "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()}]}).encode()
    fs.pipe(f"{base}/2026-12-01T01-00Z/manifest.json", manifest)
    fs.pipe(f"{base}/2026-12-01T01-00Z/manifest.checksum", hashlib.md5(manifest).hexdigest().encode())
    return f"s3://{base}"


def bench_listing(keys: int, delay: float) -> None:
    from gender_pipeline.lake.listing import ListingSpec

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    variants = [("s3fs (botocore), serial", ListingSpec(fanout=1, client="s3fs"), False),
                ("obstore, serial", ListingSpec(fanout=1), False),
                ("obstore, 16 ranges split as they go (a first night)", ListingSpec(fanout=16), False),
                ("obstore, 16 ranges from the known keys (every later night)", ListingSpec(fanout=16), True),
                ("s3fs (botocore), 16 ranges from the known keys", ListingSpec(fanout=16, client="s3fs"), True)]
    for name, command in (("stub (S3's cost profile: latency only)", "--_stub"), ("moto", "--_moto")):
        print(f"\nListing {keys:,} keys, {delay * 1000:.0f} ms added per request, server: {name}", flush=True)
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, __file__, command, str(keys), str(delay)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            port = int(server.stdout.readline())
            print(f"  (server ready in {time.perf_counter() - started:.0f} s)", flush=True)
            endpoint = f"http://127.0.0.1:{port}"
            rows = time_listings(endpoint, keys, variants)
            serial = rows[0]["seconds"]
            for row in rows:
                print(f"  {row['variant']:<62} {row['seconds']:>7.2f} s  {row['keys']:,} keys  "
                      f"{serial / row['seconds']:5.1f}x the botocore serial listing", flush=True)
            if command == "--_moto":
                import s3fs

                from gender_pipeline.lake.listing import list_source
                from gender_pipeline.lake.storage import Store

                for fmt in ("Parquet", "CSV"):
                    url = write_inventory(endpoint, keys, fmt)
                    s3fs.S3FileSystem.clear_instance_cache()
                    store = Store("s3://signups/uploads", {"client_kwargs": {"endpoint_url": endpoint}})
                    started = time.perf_counter()
                    with list_source(store, ListingSpec("inventory", url)) as spool:
                        listed = spool.rows
                    seconds = time.perf_counter() - started
                    print(f"  {'S3 Inventory report (' + fmt + '), no LIST call':<62} {seconds:>7.2f} s  "
                          f"{listed:,} keys  {serial / seconds:5.1f}x", flush=True)
        finally:
            server.kill()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        command, *rest = sys.argv[1:]
        if command == "--_build":
            build(rest[0], int(rest[1]), int(rest[2]), rest[3] == "1")
        elif command == "--_measure":
            print(json.dumps(measure(rest[0])))
        elif command == "--_before":
            print(json.dumps(measure_before(rest[0])))
        elif command == "--_moto":
            from tests.conftest import free_port

            serve_moto(int(rest[0]), free_port(), float(rest[1]))
        elif command == "--_stub":
            serve_stub(int(rest[0]), float(rest[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", default="1000000,10000000", help="answered photos, comma-separated sizes")
    parser.add_argument("--new", type=int, default=10_000, help="new photos in the night's listing")
    parser.add_argument("--work", default="/tmp/bookkeeping", help="scratch folder (one subfolder per size)")
    parser.add_argument("--before-at", type=int, default=1_000_000, help="the size at which the code before is timed")
    parser.add_argument("--listing-keys", type=int, default=100_000)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--skip-listing", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse sizes built by an earlier run")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": ROOT}
    sizes = [int(s) for s in args.history.split(",") if s]
    measured = {}
    for size in sizes:
        work = os.path.join(args.work, str(size))
        if not (args.reuse and os.path.exists(os.path.join(work, "listing.parquet"))):
            print(f"building {size:,} answered photos + {args.new:,} new ...", flush=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--_build", work, str(size), str(args.new),
                            "1" if size == args.before_at else "0"], check=True, env=env)
            print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
        if size == args.before_at:
            out = subprocess.run([sys.executable, __file__, "--_before", work], check=True, env=env,
                                 capture_output=True, text=True).stdout
            measured[f"before {size}"] = json.loads(out.strip().splitlines()[-1])
        out = subprocess.run([sys.executable, __file__, "--_measure", work], check=True, env=env,
                             capture_output=True, text=True).stdout
        measured[size] = json.loads(out.strip().splitlines()[-1])
    for size, result in measured.items():
        print(f"\n{'The code before this issue' if str(size).startswith('before') else 'Now'}, "
              f"{int(str(size).split()[-1]):,} answered photos, {args.new:,} new:")
        for stage, value in result.items():
            if isinstance(value, dict):
                peak = f"  peak {value['peak_mib']:>8.1f} MiB" if "peak_mib" in value else ""
                print(f"  {stage:<40} {value['seconds']:>8.2f} s{peak}")
            else:
                print(f"  {stage:<40} {value}")
    for size in sizes:
        before = measured.get(f"before {size}")
        if before:
            now = measured[size]
            extra_now = now["peak_mib"] - now["start_mib"]
            extra_before = before["peak_mib"] - next(v for k, v in before.items() if k.startswith("start_mib"))
            print(f"\nAt {size:,}: {before['bookkeeping_seconds'] / now['bookkeeping_seconds']:.1f}x faster "
                  f"({before['bookkeeping_seconds']:.1f} s -> {now['bookkeeping_seconds']:.1f} s, the new path "
                  f"including the history write and both tables' updates); extra memory {extra_before:.0f} MiB -> "
                  f"{extra_now:.0f} MiB ({extra_now / extra_before:.2f} of it)")
    if not args.skip_listing:
        bench_listing(args.listing_keys, args.delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
