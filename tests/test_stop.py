"""Real processes, real signals: a run stops at every stage, ends its workers, publishes
nothing after the signal, lets go of the output only once its work has stopped, and a run
started right after gives exactly one row per photo."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from gender_pipeline import samples

pytestmark = pytest.mark.usefixtures("prefect_harness")

ROOT = Path(__file__).resolve().parent.parent
STOP_LIMIT = 10.0  # seconds from the signal to the process being gone


def _env(**extra):
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": PREFECT_API_URL.value(), **extra}


class Process:
    """A CLI process with one stage slowed (tests/stopping_points.py), its output kept."""

    def __init__(self, stage, args, env=None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.stopping_points", stage, *map(str, args)], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or _env(),
            start_new_session=True)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_for(self, text, timeout=180):
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(text in line for line in self.lines):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{text!r} never came:\n{self.output}")
                self._seen.wait(0.5)

    @property
    def output(self):
        return "".join(self.lines)

    def descendants(self):
        return psutil.Process(self.process.pid).children(recursive=True)

    def workers(self, at_least, timeout=30, counts=lambda p: not is_tracker(p)):
        """The child processes once at least `at_least` of them are workers (`counts`;
        multiprocessing's resource tracker is not a worker)."""
        deadline = time.monotonic() + timeout
        while True:
            children = self.descendants()
            if len([p for p in children if counts(p)]) >= at_least or time.monotonic() > deadline:
                return children
            time.sleep(0.02)

    def flow_run(self):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        line = next(line for line in self.lines if "Beginning flow run '" in line)
        name = line.split("Beginning flow run '")[1].split("'")[0]
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return run

    def flow_run_state(self):
        return self.flow_run().state


def is_tracker(process):
    try:
        return "resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def is_worker(process):
    """A spawned multiprocessing worker (not the tracker, nor a child caught before its exec)."""
    try:
        return "spawn_main" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def gone(processes, within=5.0):
    """True once none of `processes` runs (killed workers take a moment to be reaped)."""
    deadline = time.monotonic() + within
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(processes) == []


def alive(processes):
    out = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


class LockWatch:
    """Records the moment the lock file disappears and which processes were alive then."""

    def __init__(self, lock: Path, watched):
        self.lock, self.watched = lock, watched
        self.freed_at, self.alive_when_freed = None, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.is_set():
            if not self.lock.exists():
                self.freed_at = time.monotonic()
                # multiprocessing's resource tracker only cleans up after the run; it ends
                # with it. Told apart now: caught between fork and exec, it looked like its parent.
                self.alive_when_freed = [p for p in alive(self.watched) if not is_tracker(p)]
                return
            time.sleep(0.002)

    def stop(self):
        self._done.set()
        self._thread.join()


def signal_and_wait(run, sig):
    """Send `sig` to the run's main process (as `kill` does); seconds until it is gone."""
    sent = time.monotonic()
    run.process.send_signal(sig)
    run.process.wait(timeout=60)
    return sent, time.monotonic() - sent


def published(output: Path):
    """Files a reader sees (names starting with '_' are temporaries and locks)."""
    return sorted(str(p.relative_to(output)) for p in output.rglob("*")
                  if p.is_file() and not any(part.startswith("_") for part in p.relative_to(output).parts))


def temporaries(output: Path):
    return sorted(p.name for p in output.rglob("_tmp-*"))


SCORING_POINTS = [("listing", signal.SIGTERM), ("suite", signal.SIGINT), ("reading", signal.SIGTERM),
                  ("decoding", signal.SIGTERM), ("model", signal.SIGINT), ("publishing", signal.SIGTERM)]


@pytest.mark.parametrize("stage,sig", SCORING_POINTS, ids=[p for p, _ in SCORING_POINTS])
def test_scoring_stops_cleanly_at_every_stage(stage, sig, uploads, tmp_path):
    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    args = ["score", "--source", source, "--output", output, "--registry", registry, "--workers", "2",
            "--batch-size", "2"]  # model calls happen while the decoders work
    run = Process(stage, args)
    run.wait_for(f"stage-reached: {stage}")
    # decoder processes start with the first photo and end after the last
    children = run.workers(2, counts=is_worker) if stage in ("decoding", "model") else run.descendants()
    if stage in ("decoding", "model"):
        assert len([p for p in children if is_worker(p)]) >= 2, "the decoder processes should be running"
    before = published(output)
    watch = LockWatch(output / "_locks" / "nightly-scoring.json", children)
    sent, seconds = signal_and_wait(run, sig)
    watch.stop()
    print(f"scoring, {stage}: gone {seconds:.2f} s after {signal.Signals(sig).name}, "
          f"lock freed {watch.freed_at - sent:.2f} s after it")

    assert seconds < STOP_LIMIT, run.output
    assert run.process.returncode == 128 + sig, run.output
    assert f"run stopped (received {signal.Signals(sig).name})" in run.output
    assert gone(children), "a worker process outlived the run"
    assert watch.freed_at is not None and watch.freed_at > sent
    assert watch.alive_when_freed == [], "the lock was released while workers were alive"
    assert published(output) == before == [], "nothing may be published after the signal"
    assert temporaries(output) == [], "a stopped publish removes its temporary file"
    assert run.flow_run_state().is_cancelled()

    again = subprocess.run([sys.executable, "-m", "gender_pipeline.cli", *map(str, args)], cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    frame = pd.read_parquet(str(output / "predictions"))
    assert sorted(frame["photo_key"]) == sorted(files)  # one row per photo


def test_a_cli_run_cancelled_from_prefect_stops(uploads, tmp_path):
    """No runner sends a signal to a run started from the CLI: the run notices the cancel
    itself within seconds and exits with status 6."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    source, files = uploads
    output = tmp_path / "lake"
    run = Process("decoding", ["score", "--source", source, "--output", output,
                               "--registry", tmp_path / "registry", "--workers", "2"])
    run.wait_for("stage-reached: decoding")
    children = run.workers(2)
    with get_client(sync_client=True) as client:
        cancelled_at = time.monotonic()
        client.set_flow_run_state(run.flow_run().id, Cancelling(message="cancelled from the UI"), force=True)
    run.process.wait(timeout=60)
    assert time.monotonic() - cancelled_at < STOP_LIMIT
    assert run.process.returncode == 6, run.output
    assert "run stopped (cancelled from Prefect (UI or API))" in run.output
    assert run.flow_run_state().is_cancelled()
    assert gone(children)
    assert published(output) == [] and not (output / "_locks" / "nightly-scoring.json").exists()


def test_sigkill_leaves_no_process_behind(uploads, tmp_path):
    """Without a configured Prefect API the CLI starts a temporary server; it and the
    decoder processes end with the CLI, even when the CLI is killed outright."""
    source, _ = uploads
    env = _env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL")
    run = Process("decoding", ["score", "--source", source, "--output", tmp_path / "lake",
                               "--registry", tmp_path / "registry", "--workers", "2"], env=env)
    run.wait_for("stage-reached: decoding")
    children = run.descendants()
    assert any("uvicorn" in " ".join(p.cmdline()) for p in children), "expected a temporary Prefect server"
    run.process.kill()
    run.process.wait(timeout=30)
    assert gone(children, within=10)


TRAINING = """
experiment: stop-test
model_name: gender-classifier
data: {format: manifest, split: [0.6, 0.2, 0.2], seed: 1}
framing: {kind: dlib_chip, padding: 0.25}
training: {image_size: 32, batch_size: 4, optimizer: adam, seed: 1, workers: 2}
runs:
  - {name: resnet18, arch: resnet18, lr: 1.0e-3, epochs: 4, pretrained: none}
selection: {max_train_val_gap: 1.0}
calibration: {target_coverage: 0.9}
"""


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stop-training")
    samples.write_manifest_dataset(str(root / "data"), 60, seed=3)
    (root / "config.yaml").write_text(TRAINING)
    return root


@pytest.mark.parametrize("stage", ["extraction", "training"])
def test_retraining_stops_cleanly_and_resumes(stage, training_data, tmp_path):
    registry = tmp_path / "registry"
    args = ["retrain", "--config", training_data / "config.yaml", "--data", training_data / "data",
            "--registry", registry, "--device", "cpu", "--no-promote"]
    run = Process(stage, args)
    run.wait_for("stage-reached: " + stage)
    children = run.workers(2)
    assert len([p for p in children if not is_tracker(p)]) >= 2, "alignment or DataLoader workers should run"
    _, seconds = signal_and_wait(run, signal.SIGTERM)
    print(f"retraining, {stage}: gone {seconds:.2f} s after SIGTERM")
    assert seconds < STOP_LIMIT, run.output
    assert run.process.returncode == 128 + signal.SIGTERM, run.output
    assert gone(children)
    assert run.flow_run_state().is_cancelled()
    checkpoints = list(registry.rglob("checkpoint.pt"))
    if stage == "training":
        import torch

        (checkpoint,) = checkpoints
        epochs = len(torch.load(checkpoint, weights_only=False)["history"])
        assert 1 <= epochs < 4  # the last complete epoch, not the one interrupted
    else:
        assert checkpoints == []

    again = subprocess.run([sys.executable, "-m", "gender_pipeline.cli", *map(str, args)], cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    if stage == "training":
        assert f"resuming after epoch {epochs}" in again.stdout + again.stderr
