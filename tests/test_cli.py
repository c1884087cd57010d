import json
import os

import pandas as pd
import pytest

from gender_pipeline.cli import main
from gender_pipeline.runtime.errors import EXIT_STORAGE, EXIT_USAGE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, message", [
    (["score"], "--source"),
    (["score", "--source", "a", "--output", "b", "--batch-size", "0"], "at least 1"),
    (["score", "--source", "a", "--output", "b", "--date", "29/11/2026"], "YYYY-MM-DD"),
    (["score", "--source", "a", "--output", "b", "--device", "tpu"], "invalid choice"),
    (["score", "--source", "a", "--output", "b", "--model", "x/y"], "NAME@VERSION"),
    (["score", "--source", "a", "--output", "b", "--abstain-below", "0.2"], "[0.5, 1]"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_harness")
def test_score_prints_a_summary_and_exits_0(uploads, tmp_path, capsys):
    source, files = uploads
    status = main(["score", "--source", str(source), "--output", str(tmp_path / "lake"),
                   "--registry", str(tmp_path / "reg"), "--workers", "0", "--json"])
    assert status == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["rows"] == len(files) and summary["model"] == "dlib-gender-v1@1"
    assert len(pd.read_parquet(str(tmp_path / "lake" / "predictions"))) == len(files)

    status = main(["score", "--source", str(source), "--output", str(tmp_path / "lake"),
                   "--registry", str(tmp_path / "reg"), "--workers", "0"])
    assert status == 0
    assert "nothing new" in capsys.readouterr().out


@pytest.mark.usefixtures("prefect_harness")
def test_missing_source_exits_3(tmp_path, capsys):
    status = main(["score", "--source", str(tmp_path / "nope"), "--output", str(tmp_path / "lake"),
                   "--registry", str(tmp_path / "reg")])
    assert status == EXIT_STORAGE
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_harness")
def test_unknown_model_exits_2(uploads, tmp_path, capsys):
    source, _ = uploads
    status = main(["score", "--source", str(source), "--output", str(tmp_path / "lake"),
                   "--registry", str(tmp_path / "reg"), "--model", "gender-classifier@9"])
    assert status == EXIT_USAGE
    assert "no model gender-classifier@9" in capsys.readouterr().err


def test_serve_passes_schedule_and_parameters(monkeypatch):
    from gender_pipeline.flows.scoring import nightly_scoring

    seen = {}
    monkeypatch.setattr(type(nightly_scoring), "serve", lambda self, **kwargs: seen.update(kwargs))
    status = main(["serve", "--source", "s3://b/uploads", "--output", "s3://b/lake", "--cron", "30 1 * * *",
                   "--batch-size", "32"])
    assert status == 0
    assert seen["name"] == "nightly-scoring"
    (schedule,) = seen["schedules"]
    assert (schedule.cron, schedule.timezone) == ("30 1 * * *", "UTC")
    assert seen["global_limit"] == 1 and seen["entrypoint_type"].value == "module_path"
    options = seen["parameters"]["options"]
    assert options["where"]["source"] == "s3://b/uploads" and options["compute"]["batch_size"] == 32
    assert seen["description"].endswith("Runs every day at 01:30 UTC (cron '30 1 * * *').")
    assert seen["description"].count("UTC") == 1  # the zone stated once


def test_serve_and_the_deployment_file_agree():
    """`serve` schedules and limits the nightly run as deployments/prefect.yaml does."""
    import yaml

    from gender_pipeline.flows.schedule import schedule_text
    from gender_pipeline.flows.schedule import NIGHTLY_CONCURRENCY, NIGHTLY_CRON, NIGHTLY_TIMEZONE
    from gender_pipeline.cli import build_parser
    from gender_pipeline.night.options import NightOptions

    with open(os.path.join(ROOT, "deployments", "prefect.yaml")) as handle:
        nightly = next(d for d in yaml.safe_load(handle)["deployments"] if d["name"] == "nightly-scoring")
    (schedule,) = nightly["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == (NIGHTLY_CRON, NIGHTLY_TIMEZONE)
    assert nightly["concurrency_limit"] == NIGHTLY_CONCURRENCY
    assert nightly["entrypoint"] == "gender_pipeline.flows.scoring.nightly_scoring"
    serve = build_parser().parse_args(["serve", "--source", "a", "--output", "b"])
    assert (serve.cron, serve.timezone) == (NIGHTLY_CRON, NIGHTLY_TIMEZONE)
    options = NightOptions.model_validate(nightly["parameters"]["options"])  # the file holds to the model
    assert options.model.name == NightOptions.model_fields["model"].default.name == "production"
    assert getattr(serve, "model.name") is None  # the CLI sends only what it was told
    # The UI's schedule card shows "At 02:00 AM" alone: the description names the zone.
    assert f"Runs {schedule_text(NIGHTLY_CRON, NIGHTLY_TIMEZONE)}." in nightly["description"]
    assert schedule_text("0 2 * * *", "Europe/Berlin").startswith("every day at 02:00 Europe/Berlin (cron")
    # The zone stated once, the same in the CLI's default, the README and the deployment file.
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme = handle.read()
    assert f"on its schedule (02:00 {NIGHTLY_TIMEZONE})" in readme and "Europe/Berlin" not in readme


def test_demo_tree_has_faces_and_every_broken_kind(tmp_path):
    from gender_pipeline import samples
    from gender_pipeline.demo import build_uploads

    known = build_uploads(str(tmp_path))
    assert len(known) == len(samples.demo_uploads()) + len(samples.broken_files())
    users = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(users) == len(known) and all(len(list(u.iterdir())) == 1 for u in users)
    subjects = [k.split("-")[0] for k, v in known.items() if v in ("male", "female")]
    assert subjects.count("grace") == subjects.count("eileen") == 8  # both portraits equally often


def test_demo_says_whether_every_encoding_got_the_same_answer(tmp_path, capsys):
    import pandas as pd

    from gender_pipeline.demo import show_answers

    (tmp_path / "predictions").mkdir()
    frame = pd.DataFrame({"photo_key": ["ada-lee-00/a.jpg", "ada-lee-01/first-frame.gif", "bea-02/b.jpg",
                                        "bea-03/b-2.png"],
                          "status": "scored", "reject_reason": None, "p_male": [0.1, 0.7, 0.2, 0.2],
                          "gender": ["female", "male", "female", "female"]})
    frame.to_parquet(tmp_path / "predictions" / "part.parquet")
    known = {key: "female" for key in frame["photo_key"]}
    show_answers(str(tmp_path), known)
    out = capsys.readouterr().out
    assert "3 of 4 right" in out and "The encodings of ada-lee do not all get the same answer" in out
    frame.assign(gender="female").to_parquet(tmp_path / "predictions" / "part.parquet")
    show_answers(str(tmp_path), known)
    assert "Every encoding of a portrait gets the same answer" in capsys.readouterr().out
    # A model that answers age: each answer shows it.
    frame.assign(age_years=[31.2, 30.0, 40.0, 70.4], age_band=["25-34", "25-34", "35-44", "65+"]).to_parquet(
        tmp_path / "predictions" / "part.parquet")
    show_answers(str(tmp_path), known)
    assert "female (p_male 0.10), age 31 (25-34)" in capsys.readouterr().out


@pytest.mark.usefixtures("prefect_harness")
def test_promote_moves_the_one_production_pointer_that_scoring_reads(uploads, tmp_path, capsys):
    """Any model can be production: promoting dlib-attributes-v1@1 makes the next night
    answer with it; `models` and the run's summary name it; a rollback is a promote."""
    source, _ = uploads
    registry = str(tmp_path / "reg")
    assert main(["promote", "dlib-attributes-v1@1", "--reason", "gender and age", "--registry", registry]) == 0
    out = capsys.readouterr()
    moved = json.loads(out.out)
    assert (moved["from"], moved["to"], moved["reason"]) == ("dlib-gender-v1@1", "dlib-attributes-v1@1",
                                                             "gender and age")
    assert "production is now dlib-attributes-v1@1 (was dlib-gender-v1@1)" in out.err
    assert main(["promote", "dlib-age-v1@1", "--reason", "age only", "--registry", registry]) == EXIT_USAGE
    assert "answers age only" in capsys.readouterr().err
    assert main(["models", "--registry", registry]) == 0
    assert "production  dlib-attributes-v1@1" in capsys.readouterr().out
    assert main(["score", "--source", str(source), "--output", str(tmp_path / "lake"), "--registry", registry,
                 "--workers", "0", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["model"] == "dlib-attributes-v1@1" and summary["production"] == "dlib-attributes-v1@1"
    assert main(["promote", "dlib-gender-v1@1", "--reason", "rollback", "--registry", registry]) == 0
    assert json.loads(capsys.readouterr().out)["history"][-1]["name"] == "dlib-attributes-v1"
