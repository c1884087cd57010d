"""The same flow against a real S3 API (moto's server on 127.0.0.1) through s3fs."""

import pandas as pd
import pytest

from gender_pipeline.flows.scoring import nightly_scoring
from tests.conftest import night_options

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def bucket(s3_endpoint, uploads):
    import s3fs

    source, files = uploads
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    name = f"shop-{abs(hash(str(source))) % 10**8}"
    fs.mkdir(name)
    fs.pipe({f"{name}/uploads/{key}": data for key, data in files.items()})
    fs.invalidate_cache()
    return name, files


def test_flow_reads_and_writes_s3(bucket, s3_endpoint):
    name, files = bucket
    summary = nightly_scoring(night_options(source=f"s3://{name}/uploads", output=f"s3://{name}/lake",
                              registry=f"s3://{name}/registry", endpoint_url=s3_endpoint, workers=0,
                              scoring_date="2026-05-06"))
    assert summary["written"][0].startswith(f"s3://{name}/lake/predictions/dt=2026-05-06/")
    frame = pd.read_parquet(f"s3://{name}/lake/predictions",
                            storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert sorted(frame["photo_key"]) == sorted(files)
    assert (frame.status == "scored").sum() == 4

    again = nightly_scoring(night_options(source=f"s3://{name}/uploads", output=f"s3://{name}/lake",
                            registry=f"s3://{name}/registry", endpoint_url=s3_endpoint, workers=0))
    assert again["rows"] == 0


@pytest.mark.usefixtures("s3_endpoint")
def test_unreachable_storage_fails_the_run(monkeypatch):
    from gender_pipeline.lake import storage
    from gender_pipeline.lake.storage import StorageError

    from gender_pipeline.tasks.night_tasks import list_new_photos, lock_output

    monkeypatch.setattr(storage, "_sleep", lambda s: None)
    monkeypatch.setattr(list_new_photos, "retry_delay_seconds", [0, 0])
    monkeypatch.setattr(lock_output, "retry_delay_seconds", [0, 0])
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries; ours are counted below
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="failed after 4 attempts"):
        nightly_scoring(night_options(source="s3://nowhere/uploads", output="s3://nowhere/lake",
                        endpoint_url="http://127.0.0.1:9", workers=0))


def test_missing_credentials_are_a_clear_error(monkeypatch):
    from gender_pipeline.lake.storage import StorageError, Store

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="credentials"):
        Store("s3://private/uploads", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}).exists()


def test_hostile_keys_cannot_escape_the_source_or_output(s3_endpoint, face_files, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="hostile")
    photo = face_files["baseline.jpg"]
    keys = ["uploads/ok/me.jpg", "uploads/evil/../../secret/x.jpg", "uploads/../outside.jpg",
            "uploads//rooted.jpg", "uploads/odd/..jpg", "uploads/sp ace/ü ñ 😀.jpg"]
    for key in keys:
        client.put_object(Bucket="hostile", Key=key, Body=photo)
    client.put_object(Bucket="hostile", Key="secret/x.jpg", Body=b"must never be read")
    summary = nightly_scoring(night_options(source="s3://hostile/uploads", output="s3://hostile/lake",
                              registry=str(tmp_path / "registry"), endpoint_url=s3_endpoint, workers=0))
    frame = pd.read_parquet("s3://hostile/lake/predictions",
                            storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    by_key = {k: (None if pd.isna(r) else r) for k, r in zip(frame["photo_key"], frame["reject_reason"])}
    assert sorted(by_key) == sorted(k[len("uploads/"):] for k in keys)  # nothing from outside the source
    assert by_key["ok/me.jpg"] is None and by_key["odd/..jpg"] is None and by_key["sp ace/ü ñ 😀.jpg"] is None
    escaping = [k for k in by_key if ".." in k.split("/") or k.startswith("/") or "//" in k]
    assert len(escaping) == 3 and all(by_key[k] == "bad_key" for k in escaping)
    hashes = dict(zip(frame["photo_key"], frame["photo_sha256"]))
    assert all(pd.isna(hashes[k]) for k in escaping)  # never even read
    written = client.list_objects_v2(Bucket="hostile", Prefix="lake/")["Contents"]
    assert all(o["Key"].startswith(("lake/predictions/dt=", "lake/_runs/", "lake/users/", "lake/_state/"))
               for o in written)
    assert summary["rows"] == len(frame)
