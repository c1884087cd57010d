"""Shards mapped over a local Dask cluster of two workers give the same rows as one process."""

import pandas as pd
import pytest

from gender_pipeline.flows.scoring import nightly_scoring
from tests.conftest import night_options

pytestmark = pytest.mark.usefixtures("prefect_harness")

SAME = ["user_id", "photo_key", "photo_sha256", "status", "reject_reason", "gender", "p_male",
        "p_female", "confidence", "face_count", "face_box", "model_name", "model_version"]


def rows(output):
    frame = pd.read_parquet(str(output / "predictions"))
    frame["face_box"] = frame["face_box"].map(lambda b: None if b is None else list(b))
    return frame[SAME].sort_values("photo_key").reset_index(drop=True)


def test_shards_on_dask_equal_one_process(uploads, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL
    from prefect_dask import DaskTaskRunner

    source, files = uploads
    registry = tmp_path / "registry"
    single = nightly_scoring(night_options(source=str(source), output=str(tmp_path / "one"), registry=str(registry),
                                           workers=0))
    assert len(single["written"]) == 1

    import dask

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the Dask workers report here
    monkeypatch.setattr(dask.config, "config", {**dask.config.config})
    dask.config.set({"distributed.worker.daemon": False})  # as the CLI does: decoder processes per worker
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                            "host": "127.0.0.1", "dashboard_address": None})
    sharded = nightly_scoring.with_options(task_runner=runner)(night_options(
        source=str(source), output=str(tmp_path / "dask"), registry=str(registry), workers=1, shard_size=4))
    assert len(sharded["written"]) == -(-len(files) // 4) == sharded["shards"]
    pd.testing.assert_frame_equal(rows(tmp_path / "one"), rows(tmp_path / "dask"), check_exact=False, atol=1e-6)


def test_a_rerun_after_some_shards_were_published_redoes_only_the_rest(uploads, tmp_path, monkeypatch):
    import gender_pipeline.night.shards as shards
    import gender_pipeline.tasks.night_tasks as night_tasks
    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    original = shards.write_predictions
    calls = []

    def fail_third_shard(store, table, day, part, before_move=None):
        calls.append(part)
        if part.endswith("-00002"):
            raise RuntimeError("shard lost")
        return original(store, table, day, part, before_move)

    monkeypatch.setattr(shards, "write_predictions", fail_third_shard)
    monkeypatch.setattr(night_tasks.score_shard_task, "retry_delay_seconds", 0)
    with pytest.raises(RuntimeError, match="shard lost"):
        nightly_scoring(night_options(source=str(source), output=str(output), registry=str(registry), workers=0,
                                      shard_size=4))
    assert sum(c.endswith("-00002") for c in calls) == 2  # tried, then retried once
    published = pd.read_parquet(str(output / "predictions"))
    assert len(published) == len(files) - 4  # the other shards are published
    monkeypatch.undo()
    summary = nightly_scoring(night_options(source=str(source), output=str(output), registry=str(registry), workers=0))
    assert summary["rows"] == 4
    assert sorted(pd.read_parquet(str(output / "predictions"))["photo_key"]) == sorted(files)
