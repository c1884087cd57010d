"""The nightly-scoring flow end to end on a real (temporary) Prefect server."""

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from gender_pipeline import samples
from gender_pipeline.flows.scoring import nightly_scoring
from gender_pipeline.night.checks import ExpectationsFailed
from gender_pipeline.tasks.reports import artifact_key
from tests.conftest import night_options

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(source, output, registry, **kwargs):
    return nightly_scoring(night_options(source=str(source), output=str(output), registry=str(registry), workers=0,
                                         **kwargs))


def parquet_files(output):
    root = output / "predictions"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_scores_once_and_rerun_writes_nothing(uploads, tmp_path):
    from prefect.artifacts import Artifact

    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    summary = run(source, output, registry, scoring_date="2026-03-04")
    frame = pd.read_parquet(str(output / "predictions"))
    assert sorted(frame["photo_key"]) == sorted(files)  # one row per object
    assert frame["photo_key"].is_unique
    assert summary["rows"] == len(files) and summary["scored"] == 4
    assert set(frame["dt"].astype(str)) == {"2026-03-04"}
    assert set(frame["model_name"]) == {"dlib-gender-v1"}
    assert (frame["run_id"] == summary["run_id"]).all()
    assert frame.loc[frame.status == "scored", "gender"].isin(["male", "female", "unknown"]).all()
    for name in ("scoring-counts", "rejected-photos", "scoring-summary"):
        assert Artifact.get(artifact_key(name, str(output))) is not None, name
    counts = json.loads(Artifact.get(artifact_key("scoring-counts", str(output))).data)
    assert {"status": "scored", "photos": 4} in counts

    again = run(source, output, registry, scoring_date="2026-03-04")
    assert again["rows"] == 0 and again["written"] == []
    assert again["skipped_unchanged"] == len(files)
    assert len(parquet_files(output)) == 1


def test_only_new_and_replaced_photos_are_scored_next_time(uploads, tmp_path, face_files):
    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    run(source, output, registry, scoring_date="2026-03-04")
    time.sleep(0.05)
    samples.write_tree(str(source), {"newbie/me.webp": face_files["photo.webp"],
                                     "ada/baseline.jpg": face_files["progressive.jpg"]})  # replaced content
    # A touched file with the same bytes is read again but not scored again.
    same = source / "bea" / "photo.heic"
    os.utime(same, (time.time() + 5, time.time() + 5))
    summary = run(source, output, registry, scoring_date="2026-03-05")
    assert summary["rows"] == 2
    frame = pd.read_parquet(str(output / "predictions"))
    latest = frame[frame.dt.astype(str) == "2026-03-05"]
    assert sorted(latest["photo_key"]) == ["ada/baseline.jpg", "newbie/me.webp"]
    assert frame.groupby(["photo_key", "photo_sha256"]).size().max() == 1


def crashing(message):
    """A stand-in for a step that dies with `message`."""
    def crash(*args, **kwargs):
        raise RuntimeError(message)
    return crash


def test_crash_before_publish_then_rerun_gives_one_row_per_photo(uploads, tmp_path, monkeypatch):
    import gender_pipeline.night.shards as shards
    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"

    monkeypatch.setattr(shards, "write_predictions", crashing("node lost"))
    with pytest.raises(RuntimeError, match="node lost"):
        run(source, output, registry)
    assert parquet_files(output) == []
    monkeypatch.undo()
    run(source, output, registry)
    frame = pd.read_parquet(str(output / "predictions"))
    assert sorted(frame["photo_key"]) == sorted(files)


def test_crash_after_publish_then_rerun_adds_nothing(uploads, tmp_path, monkeypatch):
    import gender_pipeline.night.report as report
    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"

    monkeypatch.setattr(report, "summarize", crashing("killed after publish"))
    with pytest.raises(RuntimeError, match="killed after publish"):
        run(source, output, registry)
    monkeypatch.undo()
    summary = run(source, output, registry)
    assert summary["rows"] == 0
    frame = pd.read_parquet(str(output / "predictions"))
    assert sorted(frame["photo_key"]) == sorted(files)


def test_failing_predictions_suite_stops_the_publish(uploads, tmp_path, monkeypatch):
    import gender_pipeline.models.predictor as predictor_module
    from prefect.artifacts import Artifact

    source, _ = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    monkeypatch.setattr(predictor_module, "calibrate", lambda logits, t: np.full(len(logits), 1.5, np.float32))
    with pytest.raises(ExpectationsFailed, match="p_male"):
        run(source, output, registry)
    assert parquet_files(output) == []
    assert "FAILED" in Artifact.get(artifact_key("predictions-suite", str(output))).data


def test_missing_source_fails_clearly(tmp_path):
    from gender_pipeline.lake.storage import StorageError

    with pytest.raises(StorageError, match="does not exist"):
        run(tmp_path / "no-such-folder", tmp_path / "lake", tmp_path / "registry")


def test_empty_source_writes_nothing(tmp_path):
    (tmp_path / "uploads").mkdir()
    summary = run(tmp_path / "uploads", tmp_path / "lake", tmp_path / "registry")
    assert summary["rows"] == 0 and parquet_files(tmp_path / "lake") == []


def test_photos_per_run_limit_leaves_the_rest_for_the_next_run(uploads, tmp_path):
    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    first = run(source, output, registry, max_photos=5)
    assert first["rows"] == 5
    second = run(source, output, registry)
    assert second["rows"] == len(files) - 5
    frame = pd.read_parquet(str(output / "predictions"))
    assert sorted(frame["photo_key"]) == sorted(files)


def test_byte_and_pixel_limits_are_parameters(uploads, tmp_path):
    source, files = uploads
    summary = run(source, tmp_path / "lake", tmp_path / "registry", max_bytes=100_000, max_pixels=200_000)
    frame = pd.read_parquet(str(tmp_path / "lake" / "predictions"))
    too_large = set(frame.loc[frame.reject_reason == "too_large", "photo_key"])
    assert "bea/photo.heic" in too_large and "cy/astronaut.png" in too_large  # > 100 kB
    assert "ada/baseline.jpg" in too_large  # 512 x 600 = 307,200 pixels > 200,000
    assert summary["reject_reasons"]["too_large"] == len(too_large)
