"""A scoring run killed (SIGKILL) at several points, then rerun: exactly one row per photo."""

import os
import signal
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")

# Where the run is killed: as soon as each of these log lines appears ("published": between
# the history write and the users table's MERGE).
KILL_POINTS = ["Beginning flow run", "progress: 6/", "predictions: passed", "published"]


def score_process(source, output, registry, slow_stage=None):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = ["-m", "tests.stopping_points", slow_stage] if slow_stage else ["-m", "gender_pipeline.cli"]
    return subprocess.Popen(
        [sys.executable, *command, "score", "--source", str(source), "--output", str(output),
         "--registry", str(registry), "--workers", "0", "--batch-size", "2",
         "--lock-lease", "3", "--lock-wait", "60"],  # a killed run's lock expires in 3 s
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def test_killed_runs_then_a_rerun_leave_one_row_per_photo(uploads, tmp_path):
    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    killed_at = []
    for marker in KILL_POINTS:
        process = score_process(source, output, registry)
        for line in process.stdout:
            if marker in line:
                os.killpg(process.pid, signal.SIGKILL)
                killed_at.append(marker)
                break
        process.wait(timeout=120)
        assert process.returncode == -signal.SIGKILL, f"run finished before '{marker}'"
        if os.path.exists(output / "predictions"):  # whatever was published is whole and unique
            frame = pd.read_parquet(str(output / "predictions"))
            assert frame.groupby(["photo_key", "photo_sha256"], dropna=False).size().max() == 1
    assert killed_at == KILL_POINTS
    final = score_process(source, output, registry)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out
    frame = pd.read_parquet(str(output / "predictions"))
    assert sorted(frame["photo_key"]) == sorted(files)  # none missing, none duplicated
    # The users table caught up with what the killed runs published: it equals a rebuild.
    from deltalake import DeltaTable

    from gender_pipeline.lake.listing import list_source
    from gender_pipeline.lake.output import OutputState
    from gender_pipeline.lake.photo_state import SourceListing
    from gender_pipeline.lake.storage import Store

    def users():
        return DeltaTable(str(output / "users")).to_pandas().sort_values("user_id").reset_index(drop=True)

    kept = users()
    assert sorted(kept["user_id"]) == ["ada", "bea", "cy", "dee"]
    state = OutputState(Store(str(output)))
    with list_source(Store(str(source))) as spool:  # the listing the runs and rebuild-users use
        state.rebuild(SourceListing(spool.close().path), seq=1000)
    pd.testing.assert_frame_equal(users(), kept)


def test_killed_between_the_photo_state_and_the_users_table_then_caught_up(uploads, tmp_path):
    """SIGKILL after the history and the photo state were written, before the users MERGE:
    the next run applies the published rows to the users table first."""
    from deltalake import DeltaTable

    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    process = score_process(source, output, registry, slow_stage="users")
    for line in process.stdout:
        if "stage-reached: users" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert len(DeltaTable(str(output / "_state" / "photos")).to_pandas()) == len(files)
    assert not (output / "users").exists() or DeltaTable(str(output / "users")).to_pandas().empty
    final = score_process(source, output, registry)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out
    assert "applied the published rows of run" in out
    users = DeltaTable(str(output / "users")).to_pandas()
    assert sorted(users["user_id"]) == ["ada", "bea", "cy", "dee"]
    assert len(pd.read_parquet(str(output / "predictions"))) == len(files)  # nothing scored twice
