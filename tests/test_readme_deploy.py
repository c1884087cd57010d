"""The deploy steps of docs/operating.md, run as written: a Prefect server, two work pools, the
deployments from deployments/prefect.yaml, two workers, and a nightly run that completes."""

import os
import re
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from gender_pipeline.demo import build_uploads
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def stop_group(pid: int) -> None:
    """SIGTERM to the steps' process group, then SIGKILL to whatever still runs after 20 s."""
    import psutil

    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    members = [p for p in psutil.process_iter() if _group(p) == pid]
    _, alive = psutil.wait_procs(members, timeout=20)
    for process in alive:
        process.kill()


def _group(process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def deploy_steps() -> str:
    text = (ROOT / "docs" / "operating.md").read_text()
    block = re.search(r"<!-- deploy-steps -->\s*```sh\n(.*?)```\s*<!-- /deploy-steps -->", text, re.S)
    assert block, "docs/operating.md lost its deploy steps"
    return block.group(1)


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "activate").exists(), reason="needs the project's .venv")
def test_the_readme_deploy_steps_work_as_written(tmp_path):
    clone = tmp_path / "demo"  # stands for the repository's demo-output/, which `make demo` makes
    build_uploads(str(clone / "uploads"))
    script = deploy_steps().replace("4200", str(free_port())).replace("$PWD/demo-output", str(clone))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "steps.log"  # a file: the server and workers the steps start keep their output open
    with open(log, "w") as handle:
        steps = subprocess.Popen(["bash", "-e", "-c", script], cwd=ROOT, env=env, stdout=handle,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            steps.wait(timeout=420)
        finally:
            stop_group(steps.pid)  # the server and the workers the steps started
    out = log.read_text()
    assert steps.returncode == 0, out[-4000:]
    assert "Completed" in out, out[-4000:]
    frame = pd.read_parquet(str(clone / "lake" / "predictions"))
    assert len(frame) == sum(p.is_file() for p in (clone / "uploads").rglob("*"))  # one row per upload
