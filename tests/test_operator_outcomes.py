"""The operator's view, second pass: every night on the record (failed and cancelled ones
too), outcomes in the runs list, one line for an expected failure, the data checks and the
model in the summary, a trend with time and alarms, a `status` for people."""

import json
import subprocess
import sys

import pytest

from gender_pipeline.cli import main
from gender_pipeline.flows.scoring import nightly_scoring
from gender_pipeline.night.render import headline, render_markdown, render_text
from gender_pipeline.night.report import alarms, outcome, state_name, withheld_alarms
from gender_pipeline.runtime.errors import EXIT_EXPECTATIONS
from tests.conftest import night_options
from tests.test_operator_view import artifacts_of, by_prefix, flow_run
from tests.test_stop import ROOT


def logs_of(run_id, wanted, seconds=10.0):
    """The run's log messages once one holds `wanted` (logs reach the API in batches)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            messages = [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
            if any(wanted in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(0.2)


def run(source, output, registry, **kwargs):
    return nightly_scoring(night_options(source=str(source), output=str(output), registry=str(registry), workers=0,
                                         **kwargs))


@pytest.mark.usefixtures("prefect_harness")
def test_every_night_is_on_the_record_and_a_failure_is_one_line(uploads, tmp_path, capsys):
    from prefect.client.orchestration import get_client

    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    first = run(source, output, registry)
    details = flow_run(first["run_id"])
    assert details.state.message == f"{len(files)} new: 4 scored, {len(files) - 4} rejected"
    assert "outcome:completed" in details.tags and details.state.name == "Completed"
    assert "⚠" not in details.name  # only a night with warnings is renamed
    artifacts = artifacts_of(first["run_id"])
    assert not [a for a in artifacts if a.type == "progress"], "no leftover progress bar"
    assert all(a.description for a in artifacts if a.key), "every card says what it is"
    card = by_prefix(artifacts, "scoring-summary-")
    assert card.description.startswith("Completed, night of ") and card.description.endswith(f"into {output})")
    assert f": {len(files)} new: 4 scored" in card.description
    text = card.data
    assert "**Data checks**: listing: 5 of 5 expectations passed; rows: 18 of 18 expectations passed" in text
    assert "abstains (answers `unknown`) under 0.600 confidence" in text and "LFW" in text
    assert "faces found by retinaface, framed as dlib_chip" in text
    logs = logs_of(details.id, "batch size 64,")
    assert any("batch size 64," in m for m in logs) and not any("batch size auto" in m for m in logs)

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    status = main(["score", "--source", str(empty), "--output", str(output), "--registry", str(registry),
                   "--workers", "0", "--json"])
    out, err = capsys.readouterr()
    assert status == EXIT_EXPECTATIONS
    assert json.loads(out) == {**json.loads(out), "outcome": "failed", "exit_status": 4, "kind": "ListingLooksWrong"}
    assert "Traceback" not in err and "ephemeral docs site" not in err
    assert err.strip().splitlines()[-1].startswith("gender-pipeline: the listing looks wrong: the source lists 0")
    with get_client(sync_client=True) as client:
        failed_run = next(r for r in client.read_flow_runs() if r.state.is_failed() and str(empty.parent.name) in r.name
                          and "/empty" in r.name)
    traceback_logged = any("Traceback" in m for m in logs_of(failed_run.id, "Traceback"))
    assert failed_run.state.message.startswith("ListingLooksWrong: the source lists 0 objects")
    assert "outcome:failed" in failed_run.tags and traceback_logged, "the traceback is in the run's logs"
    failure = by_prefix(artifacts_of(failed_run.id), "scoring-summary-").data
    assert "Nightly scoring FAILED" in failure and "written: nothing" in failure
    assert "listed: 0 photos" in failure and "stage: listing the source" in failure

    third = run(source, output, registry)
    details = flow_run(third["run_id"])
    assert details.state.message.startswith("nothing new since ") and "outcome:completed" in details.tags
    trend = by_prefix(artifacts_of(third["run_id"]), "scoring-summary-").data
    assert "| failed |" in trend and trend.count("| completed |") == 2 and "| gone | left | erased |" in trend
    assert "&#" not in trend and "&nbsp;" not in trend  # the V1 UI shows entities as written
    records = sorted((output / "_runs").glob("*.json"))
    assert [json.loads(r.read_text())["outcome"] for r in records] == ["completed", "failed", "completed"]


def summary(**values):
    base = {"new": 10, "refreshed": 0, "scored": 8, "rejected": 2, "listed": 100, "warnings": [], "alarms": [],
            "rows": 10, "genders": {"female": 4, "male": 3, "unknown": 1}, "reject_reasons": {"no_face": 2},
            "skipped_unchanged": 90, "model": "m@1", "scoring_date": "2026-03-04", "p_male_histogram": [],
            "last_run_at": "2026-03-03T02:00:00+00:00"}
    return {**base, **values}


def test_outcome_messages_for_the_runs_list():
    assert outcome(summary()) == ("completed", "10 new: 8 scored, 2 rejected")
    assert outcome(summary(new=0, rows=0, scored=0,
                           rejected=0)) == ("completed", "nothing new since 2026-03-03 02:00 UTC")
    assert outcome(summary(new=0, listed=0)) == ("completed", "the source is empty: nothing listed")
    tag, message = outcome(summary(warnings=["the source is empty", "x"]))
    assert tag == "warnings" and message == "2 warnings: the source is empty; x (10 new: 8 scored, 2 rejected)"
    assert state_name(tag) == "Warnings" and state_name("completed") == "Completed"
    tag, message = outcome(summary(alarms=["reject rate 30.0% is 24.0 points over"]))
    assert message.startswith("1 warning: reject rate") and "completed" not in message
    # Photos gone and users who left are counted, with plurals.
    gone = summary(removed=1, users={"removed": 2, "users": 5, "behind": 0, "model": "m@1"})
    assert outcome(gone)[1] == ("10 new: 8 scored, 2 rejected; 1 photo gone from the source, "
                                "2 users left the users table")
    assert "1 photo gone from the source" in headline(gone) and "1 photos" not in headline(gone)
    assert headline(summary(new=1, scored=1, rejected=0, skipped_unchanged=1)).startswith("1 new photo: ")
    assert "1 photo unchanged" in headline(summary(new=1, scored=1, rejected=0, skipped_unchanged=1))


def record(rows, rejected, unknown, female, male):
    return {"rows": rows, "scored": rows - rejected, "rejected": rejected, "unknown": unknown, "female": female,
            "male": male}


def test_a_night_outside_the_last_nights_range_raises_an_alarm():
    previous = [record(100, 5, 3, 50, 42), record(100, 6, 4, 48, 42), record(100, 4, 2, 52, 42),
                {"outcome": "failed", "rows": 0}]
    assert alarms(record(100, 5, 3, 50, 42), previous) == []
    found = alarms(record(100, 30, 3, 50, 17), previous)
    assert found[0] == "reject rate 30.0% is 24.0 points over the last 3 nights' range (4.0–6.0%)"
    assert found[1].startswith("female share 74.6% is ") and "over" in found[1]
    assert alarms(record(100, 30, 3, 50, 17), previous[:2]) == []  # too few nights to tell


def test_an_alarm_needs_enough_photos_and_says_when_it_is_withheld():
    previous = [record(100, 5, 3, 50, 42), record(100, 6, 4, 48, 42), record(100, 4, 2, 52, 42)]
    small = record(2, 0, 0, 0, 2)  # 2 photos, both male, none rejected: every rate out of range
    found = alarms(small, previous)
    assert len(found) == 3 and found[2] == "female share 0.0% is 53.3 points under the last 3 nights' range " \
                                           "(53.3–55.3%)"
    assert alarms(small, previous, min_photos=100) == []
    withheld = withheld_alarms(small, previous, 100)
    assert withheld[2] == ("female share 0.0% is 53.3 points under the last 3 nights' range (53.3–55.3%), on 2 "
                           "photos: fewer than the 100 an alarm needs")
    # Each rate counts its own photos: 500 read, 498 rejected is an alarm on 500 photos.
    rejected = record(500, 498, 0, 1, 1)
    assert [a.split(" ", 2)[:2] for a in alarms(rejected, previous, min_photos=100)] == [["reject", "rate"]]
    assert any(w.startswith("female share 50.0% is ") for w in withheld_alarms(rejected, previous, 100))
    text = render_text({**summary(alarms_withheld=withheld_alarms(small, previous, 100)), "wall_seconds": 0})
    assert "withheld     alarm: female share 0.0%" in text and "WARNING" not in text
    assert outcome(summary(alarms_withheld=["x"]))[0] == "completed"  # a withheld alarm is no warning


def test_the_empty_source_and_the_sql_read_right():
    text = render_markdown(summary(new=0, listed=0, rows=0, scored=0, rejected=0,
                                   written=["/lake/predictions/dt=2026-03-04/part-1.parquet"]), "/up", "/lake")
    assert "The source is empty: no photo listed" in text and "all answered before" not in text
    python = text.split("```python", 1)[1].split("```", 1)[0]
    assert "import pandas as pd" in python  # the snippet runs as it is
    sql = text.split("```sql", 1)[1].split("```", 1)[0]
    assert max(len(line) for line in sql.splitlines()) <= 80  # not clipped on the right


def test_status_reads_as_a_summary_and_json_for_scripts(tmp_path, capsys):
    from tests.test_forget_and_status import lake

    lake(tmp_path)
    assert main(["status", "--output", str(tmp_path / "lake")]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"output       {tmp_path / 'lake'}\n")
    assert "users        2 with an answer: female 0, male 2, unknown 0; answered by m@1 100.0%" in text
    assert "2026-01-02        2     50.0%" in text and "last runs    none recorded" in text
    assert main(["status", "--output", str(tmp_path / "lake"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 4
    # Piped into head: no BrokenPipe traceback.
    piped = subprocess.run(f"{sys.executable} -m gender_pipeline.cli status --output {tmp_path / 'lake'} | head -1",
                           shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert piped.stdout.startswith("output") and "Traceback" not in piped.stderr and "Broken" not in piped.stderr
    assert "the output's URL or path" in subprocess.run(
        [sys.executable, "-m", "gender_pipeline.cli", "status", "--help"], cwd=ROOT, capture_output=True,
        text=True).stdout


def test_status_shows_the_last_runs_with_their_outcomes(tmp_path, capsys):
    from gender_pipeline.lake.runs import record_run
    from tests.test_forget_and_status import lake

    store = lake(tmp_path)
    base = {"source": "/up", "model": "m@1", "wall_seconds": 12.0}
    record_run(store, {**base, "run_id": "r1", "listed_at": "2026-03-01T02:00:00+00:00", "outcome": "completed",
                       "message": "10 new: 8 scored, 2 rejected; 1 photo gone from the source"})
    record_run(store, {**base, "run_id": "r2", "listed_at": "2026-03-02T02:00:00+00:00", "outcome": "failed",
                       "message": "ListingLooksWrong: the source lists 0 objects"})
    record_run(store, {**base, "run_id": "r3", "listed_at": "2026-03-03T02:00:00+00:00", "outcome": "warnings",
                       "message": "2 warnings: a; b (3 new: 3 scored, 0 rejected)"})
    assert main(["status", "--output", str(tmp_path / "lake")]) == 0
    text = capsys.readouterr().out
    assert "last runs    the last 3 runs (UTC), newest last:" in text
    assert "2026-03-01 02:00  completed  10 new: 8 scored, 2 rejected; 1 photo gone from the source" in text
    assert "2026-03-02 02:00  failed     ListingLooksWrong" in text
    assert "2026-03-03 02:00  warnings   2 warnings: a; b" in text
    assert "last finished (completed or warnings): 2026-03-03 02:00 UTC" in text
    assert "failed or cancelled: 1 of the last 3 (2026-03-02 02:00" in text
    assert "completed: completed" not in text and "completed with" not in text


@pytest.mark.usefixtures("prefect_harness")
def test_a_night_with_warnings_ends_in_a_state_named_warnings(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = run(empty, tmp_path / "lake", tmp_path / "registry")
    details = flow_run(summary["run_id"])
    assert details.state.is_completed() and details.state.name == "Warnings"
    assert details.state.message == "1 warning: the source is empty: no object listed"
    assert "outcome:warnings" in details.tags and details.name.startswith("⚠ 1 warning · ")
    # The night's one word is the same in its record, its trend row and its summary's card.
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "lake" / "_runs").glob("*.json")]
    assert record["outcome"] == summary["outcome"] == "warnings"
    card = by_prefix(artifacts_of(summary["run_id"]), "scoring-summary-")
    assert card.description.startswith("Warnings, night of ")
    logs = logs_of(details.id, "the source is empty")
    assert any("the source is empty" in m for m in logs)


def _warning_logs(run_id, wanted, seconds=10.0):
    """The run's log messages at WARNING level or above, once one holds `wanted`."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            messages = [log.message for log in client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[run_id]), level=LogFilterLevel(ge_=30)))]
            if any(wanted in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(0.2)


@pytest.mark.usefixtures("prefect_harness")
def test_an_alarm_is_a_warning_everywhere_and_is_withheld_on_too_few_photos(uploads, tmp_path):
    from gender_pipeline.lake.runs import record_run
    from gender_pipeline.lake.storage import Store

    source, files = uploads
    past = {"outcome": "completed", "listed": len(files), "rows": 200, "scored": 200, "rejected": 0, "unknown": 0,
            "female": 100, "male": 100, "model": "m@1", "source": str(source)}
    for name in ("few", "enough"):
        for day in (1, 2, 3):  # three quiet nights before: nothing rejected
            record_run(Store(str(tmp_path / name)), {**past, "run_id": f"r{day}",
                                                     "listed_at": f"2026-03-0{day}T02:00:00+00:00"})
    # Tonight most photos are rejected (the fixture's broken files): a reject rate far over the range.
    withheld = run(source, tmp_path / "few", tmp_path / "registry")
    assert withheld["alarms"] == [] and withheld["outcome"] == "completed"
    assert withheld["alarms_withheld"][0].startswith("reject rate ")
    assert f"on {len(files)} photos: fewer than the 100 an alarm needs" in withheld["alarms_withheld"][0]
    assert flow_run(withheld["run_id"]).state.name == "Completed"

    fired = run(source, tmp_path / "enough", tmp_path / "registry", alarm_min_photos=10)
    assert fired["alarms"][0].startswith("reject rate ") and fired["outcome"] == "warnings"
    details = flow_run(fired["run_id"])
    assert details.state.name == "Warnings" and "outcome:warnings" in details.tags
    assert details.name.startswith(f"⚠ {len(fired['alarms'])} warning")
    logged = _warning_logs(details.id, "alarm: reject rate")
    assert any(m.startswith("alarm: reject rate ") for m in logged), logged
    card = by_prefix(artifacts_of(fired["run_id"]), "scoring-summary-").data
    assert "> **Warning:** reject rate" in card and "**Alarm" not in card and "ALARM" not in card
    assert "> Alarm withheld: female share" in card  # on the 4 photos scored
    assert "| warnings |" in card  # tonight's row of the trend


def test_a_model_that_withholds_no_age_band_says_so():
    from gender_pipeline.night.render import model_lines

    card = {"kind": "onnx-attributes", "framing": {}, "abstain_threshold": 0.6, "trained_on": "x", "accuracy": None,
            "age": {"abstain_threshold": 0.0, "mae": None, "band_accuracy": None}}
    lines = model_lines(summary(model_card=card))
    assert "answers age too: a band for every face (no threshold)" in lines and "0.000" not in " ".join(lines)
    card["age"]["abstain_threshold"] = 0.4
    assert "answers age too: the band is `unknown` under 0.400 probability" in model_lines(summary(model_card=card))
