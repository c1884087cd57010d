"""A real Prefect server on 127.0.0.1: serve the nightly-scoring deployment with the CLI,
trigger it with run_deployment, and see it complete with its artifacts."""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pandas as pd
import psutil
import pytest

from gender_pipeline.tasks.reports import artifact_key
from tests.conftest import free_port


def wait_for(url, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def run_served_deployment(timeout: float):
    """Trigger the nightly deployment once `serve` has registered it (within two minutes)."""
    from prefect.deployments import run_deployment

    deadline = time.time() + 120
    while True:
        try:
            return run_deployment("nightly-scoring/nightly-scoring", timeout=timeout)
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_KEY", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health")
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_served_deployment_runs_on_a_real_server(prefect_server, uploads, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, LogFilter,
                                                LogFilterFlowRunId)
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    source, files = uploads
    output = tmp_path / "lake"
    serve = subprocess.Popen(
        [sys.executable, "-m", "gender_pipeline.cli", "serve", "--source", str(source), "--output", str(output),
         "--registry", str(tmp_path / "registry"), "--workers", "0", "--cron", "0 3 * * *"],
        env=prefect_server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
            run = run_served_deployment(timeout=300)
            assert run.state.is_completed(), run.state
            # A run sent the flat parameters of 0.1 runs with them read into the deployment's options.
            flat = run_deployment("nightly-scoring/nightly-scoring", timeout=300,
                                  parameters={"output": str(tmp_path / "lake-flat"), "refresh_budget": 0})
            assert flat.state.is_completed(), flat.state
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("nightly-scoring/nightly-scoring")
                artifacts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flat.id])))
        assert any("flat parameters of gender-pipeline 0.1 (output, refresh_budget)" in log.message for log in logs)
        assert len(pd.read_parquet(str(tmp_path / "lake-flat" / "predictions"))) == len(files)
        # As deployments/prefect.yaml has it: a clean entrypoint, the schedule's time zone, one run at a time.
        assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * *"
        assert deployment.schedules[0].schedule.timezone == "UTC"
        assert deployment.entrypoint == "gender_pipeline.flows.scoring.nightly_scoring"
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
        keys = {a.key for a in artifacts}
        assert {artifact_key(name, str(output)) for name in ("scoring-counts", "rejected-photos",
                                                             "scoring-summary")} <= keys
        frame = pd.read_parquet(str(output / "predictions"))
        assert sorted(frame["photo_key"]) == sorted(files)
        assert set(frame["run_id"]) == {str(run.id)}
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


def test_cancelling_a_served_run_through_the_api_stops_it(prefect_server, uploads, tmp_path):
    """Cancel from the UI/API while the decoders work: the run ends Cancelled within
    seconds, its processes end, the lock is free and nothing is published."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    from tests.test_stop import ROOT, alive, gone, is_tracker, published

    hooks = tmp_path / "hooks"  # makes the decoding of the served flow runs slow
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "from tests.stopping_points import patch_from_environment\npatch_from_environment()\n")
    env = {**prefect_server, "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", "STOP_TEST_STAGE": "decoding",
           "PYTHONUNBUFFERED": "1"}
    source, _ = uploads
    output = tmp_path / "lake"
    serve = subprocess.Popen(
        [sys.executable, "-m", "gender_pipeline.cli", "serve", "--source", str(source), "--output", str(output),
         "--registry", str(tmp_path / "registry"), "--workers", "2"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True).start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
            run = run_served_deployment(timeout=0)
            deadline = time.time() + 120
            while not any("stage-reached: decoding" in line for line in lines):
                assert time.time() < deadline + 120, "".join(lines)
                time.sleep(0.2)
            # the flow run's process and its workers (the serve process's own resource tracker stays)
            flow_processes = [p for p in psutil.Process(serve.pid).children(recursive=True) if not is_tracker(p)]
            with get_client(sync_client=True) as client:
                cancelled_at = time.monotonic()
                client.set_flow_run_state(run.id, Cancelling(message="cancelled from the UI"), force=True)
                while not (state := client.read_flow_run(run.id).state).is_final():
                    assert time.monotonic() - cancelled_at < 60, "".join(lines)
                    time.sleep(0.2)
                seconds = time.monotonic() - cancelled_at
        assert state.is_cancelled(), state
        assert seconds < 15, seconds
        assert gone(flow_processes, within=10), [p.cmdline() for p in alive(flow_processes)]
        assert not (output / "_locks" / "nightly-scoring.json").exists()
        assert published(output) == []
        assert any("cancelled from Prefect" in line for line in lines), "".join(lines)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
