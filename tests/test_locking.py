import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from gender_pipeline.cli import main
from gender_pipeline.lake.lock import OutputLocked, acquire, read_holder
from gender_pipeline.lake.storage import Store
from gender_pipeline.runtime.errors import EXIT_LOCKED


def test_one_holder_at_a_time(tmp_path):
    store = Store(str(tmp_path))
    first = acquire(store, "run-1")
    with pytest.raises(OutputLocked, match="run-1"):
        acquire(store, "run-2")
    first.release()
    second = acquire(store, "run-2")
    assert read_holder(store, second.key)["owner"] == "run-2"
    second.release()
    assert read_holder(store, second.key) is None


def test_heartbeat_keeps_a_live_run_locked_and_a_dead_runs_lease_expires(tmp_path):
    store = Store(str(tmp_path))
    live = acquire(store, "live", lease_seconds=0.6)
    time.sleep(1.5)  # well past one lease: renewed by the heartbeat
    with pytest.raises(OutputLocked):
        acquire(store, "other", lease_seconds=0.6)
    live._done.set()  # the run dies: no more renewals
    live._thread.join()
    time.sleep(0.8)
    taker = acquire(store, "other", lease_seconds=0.6)
    assert read_holder(store, taker.key)["owner"] == "other"
    taker.release()


def test_waiting_for_the_holder_to_finish(tmp_path):
    store = Store(str(tmp_path))
    holder = acquire(store, "first")
    threading.Timer(0.5, holder.release).start()
    waiter = acquire(store, "second", wait_seconds=10)
    assert read_holder(store, waiter.key)["owner"] == "second"
    waiter.release()


def test_only_one_of_many_racing_runs_wins(tmp_path):
    store = Store(str(tmp_path))
    winners, losers = [], []

    def race(name):
        try:
            winners.append(acquire(store, name))
        except OutputLocked:
            losers.append(name)

    threads = [threading.Thread(target=race, args=(f"run-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7
    winners[0].release()


@pytest.mark.usefixtures("prefect_harness")
def test_a_second_run_on_a_locked_output_exits_5(uploads, tmp_path, capsys):
    source, _ = uploads
    lease = acquire(Store(str(tmp_path / "lake")), "a-running-run")
    try:
        status = main(["score", "--source", str(source), "--output", str(tmp_path / "lake"),
                       "--registry", str(tmp_path / "reg"), "--workers", "0"])
    finally:
        lease.release()
    assert status == EXIT_LOCKED
    assert "a-running-run" in capsys.readouterr().err
    assert not (tmp_path / "lake" / "predictions").exists()


def test_lock_on_s3_uses_conditional_create(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("locks")
    store = Store("s3://locks/lake", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    first = acquire(store, "run-1")
    with pytest.raises(OutputLocked, match="run-1"):
        acquire(store, "run-2")
    first.release()
    acquire(store, "run-2").release()


def _holder_record(**fields):
    from datetime import datetime, timedelta, timezone

    from gender_pipeline.lake.lock import this_process

    expires = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    return json.dumps({"owner": "other-run", "token": "t", "expires_at": expires, **this_process(),
                       **fields}).encode()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    store = Store(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "_locks").mkdir()
    (tmp_path / "_locks" / "nightly-scoring.json").write_bytes(_holder_record(pid=int(dead.stdout)))
    started = time.monotonic()
    lease = acquire(store, "rerun", lease_seconds=300)  # the dead run's lease has an hour left
    assert time.monotonic() - started < 2
    assert read_holder(store, lease.key)["owner"] == "rerun"
    lease.release()


def test_a_lock_of_a_live_process_or_of_another_host_waits_for_its_lease(tmp_path):
    store = Store(str(tmp_path))
    (tmp_path / "_locks").mkdir()
    lock = tmp_path / "_locks" / "nightly-scoring.json"
    lock.write_bytes(_holder_record())  # this very process: alive
    with pytest.raises(OutputLocked, match="other-run"):
        acquire(store, "second")
    lock.write_bytes(_holder_record(host="another-host", pid=999999))
    with pytest.raises(OutputLocked, match="another host"):
        acquire(store, "second")


def test_a_publish_checks_the_lease_just_before_the_move(tmp_path):
    from datetime import date

    from gender_pipeline.lake.lock import LeaseLost
    from gender_pipeline.lake.history import PhotoResult, to_table, write_predictions

    store = Store(str(tmp_path))
    lease = acquire(store, "run-1")
    ref = lease.ref()
    ref.check(store)  # held: fine
    (tmp_path / "_locks" / "nightly-scoring.json").write_bytes(_holder_record(token="someone-else"))
    row = PhotoResult("u", "u/a.jpg", "h", "rejected", "empty", scored_at=datetime.now(timezone.utc), run_id="r")
    with pytest.raises(LeaseLost):
        write_predictions(store, to_table([row]), date(2026, 1, 1), "part-1", before_move=lambda: ref.check(store))
    assert list(tmp_path.rglob("*.parquet")) == []  # neither published nor left behind
    lease._done.set()


def test_a_stop_request_reaches_other_processes_through_the_lease(tmp_path):
    from gender_pipeline.runtime.stopping import Stop, StopRequested

    store, stop = Store(str(tmp_path)), Stop()
    lease = acquire(store, "run-1", lease_seconds=60, stop=stop)
    stop.request("received SIGTERM")
    deadline = time.monotonic() + 5
    while "stop" not in (read_holder(store, lease.key) or {}) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(StopRequested, match="SIGTERM"):
        lease.ref().check(store)  # what a shard on a Dask worker does
    lease.release()
    assert read_holder(store, lease.key) is None
