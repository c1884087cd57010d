"""The same flow against a real S3 API (moto's server on 127.0.0.1) through s3fs."""

import pandas as pd
import pytest

from flows.scoring import nightly_scoring

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
    summary = nightly_scoring(source=f"s3://{name}/uploads", output=f"s3://{name}/lake",
                              registry=f"s3://{name}/registry", endpoint_url=s3_endpoint, workers=0,
                              scoring_date="2026-05-06")
    assert summary["written"][0].startswith(f"s3://{name}/lake/predictions/dt=2026-05-06/")
    frame = pd.read_parquet(f"s3://{name}/lake/predictions",
                            storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert sorted(frame["photo_key"]) == sorted(files)
    assert (frame.status == "scored").sum() == 4

    again = nightly_scoring(source=f"s3://{name}/uploads", output=f"s3://{name}/lake",
                            registry=f"s3://{name}/registry", endpoint_url=s3_endpoint, workers=0)
    assert again["rows"] == 0


@pytest.mark.usefixtures("s3_endpoint")
def test_unreachable_storage_fails_the_run(monkeypatch):
    from tasks import storage
    from tasks.storage import StorageError

    from tasks.scoring_tasks import list_new_photos

    monkeypatch.setattr(storage, "_sleep", lambda s: None)
    monkeypatch.setattr(list_new_photos, "retry_delay_seconds", [0, 0])
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries; ours are counted below
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="failed after 4 attempts"):
        nightly_scoring(source="s3://nowhere/uploads", output="s3://nowhere/lake",
                        endpoint_url="http://127.0.0.1:9", workers=0)


def test_missing_credentials_are_a_clear_error(monkeypatch):
    from tasks.storage import StorageError, Store

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="credentials"):
        Store("s3://private/uploads", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}).exists()
