"""A scoring run killed (SIGKILL) at several points, then rerun: exactly one row per photo."""

import os
import signal
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")

# Where the run is killed: as soon as each of these log lines appears.
KILL_POINTS = ["Beginning flow run", "progress: 6/", "predictions: passed", "published"]


def score_process(source, output, registry):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen(
        [sys.executable, "-m", "gender_pipeline.cli", "score", "--source", str(source), "--output", str(output),
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
