"""What a data engineer sees of a scoring run in Prefect: artifacts on the flow run, keyed
per output; honest summaries of quiet nights; a wrong source caught; time per stage; bars
and a trend; rejected photos by key; file URLs that work; named and tagged runs; parameter
help."""

import json

import pytest

from gender_pipeline.cli import main
from gender_pipeline.flows.retrain import retrain
from gender_pipeline.flows.scoring import nightly_scoring
from gender_pipeline.runtime.errors import EXIT_EXPECTATIONS
from tests.conftest import night_options

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(source, output, registry, **kwargs):
    return nightly_scoring(night_options(source=str(source), output=str(output), registry=str(registry), workers=0,
                                         **kwargs))


def artifacts_of(run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def flow_run(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def by_prefix(artifacts, prefix):
    found = [a for a in artifacts if a.key and a.key.startswith(prefix)]
    assert found, (prefix, [a.key for a in artifacts])
    return found[0]


def test_a_run_reports_on_the_flow_run_keyed_per_output(uploads, tmp_path):
    source, files = uploads
    first = run(source, tmp_path / "lake-a", tmp_path / "registry", scoring_date="2026-03-04")
    other = run(source, tmp_path / "lake-b", tmp_path / "registry", scoring_date="2026-03-04")
    mine, theirs = artifacts_of(first["run_id"]), artifacts_of(other["run_id"])
    summary = by_prefix(mine, "scoring-summary-")
    assert summary.task_run_id is None, "the summary hangs on the flow run, not on a task"
    assert summary.key != by_prefix(theirs, "scoring-summary-").key, "each output has its own history"
    text = summary.data
    assert "lake-a" in text and "█" in text  # the output it is about, and the p_male bars
    for stage in ("list the source", "check the listing", "read, decode, find faces", "publish"):
        assert stage in text, stage
    assert first["wall_seconds"] >= sum(first["timings"].values()) - 0.05
    written = first["written"][0]
    assert f"`{written}`" in text and "pd.read_parquet(" in text and "read_parquet('" in text
    assert not [a for a in mine if a.type == "link"], "a local file is no link a browser can open"

    rejected = json.loads(by_prefix(mine, "rejected-photos-").data)
    assert {r["photo_key"] for r in rejected} == {k for k in files if k.startswith("bad-")}
    assert all(r["reason"] and r["detail"] for r in rejected)

    details = flow_run(first["run_id"])
    assert details.name.startswith("2026-03-04 ") and "lake-a" in details.name
    assert {"scoring-date:2026-03-04", "model:dlib-gender-v1@1", "started-by:cli"} <= set(details.tags)


def test_nothing_new_says_so_and_names_the_production_model(uploads, tmp_path):
    source, _ = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    run(source, output, registry)
    again = run(source, output, registry)
    text = by_prefix(artifacts_of(again["run_id"]), "scoring-summary-").data
    assert "Nothing new since the run of" in text and "dlib-gender-v1@1 would have answered" in text
    assert "none | 0" not in text and "0.0 photos/s" not in text and "| scored |" not in text
    assert "The last 2 runs of this output" in text
    assert again["model"] == "dlib-gender-v1@1"


def test_a_source_that_empties_fails_the_run_with_a_reason(uploads, tmp_path, capsys):
    source, _ = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    run(source, output, registry)
    empty = tmp_path / "empty-source"
    empty.mkdir()
    args = ["score", "--source", str(empty), "--output", str(output), "--registry", str(registry), "--workers", "0"]
    assert main(args) == EXIT_EXPECTATIONS
    assert "the listing looks wrong" in capsys.readouterr().err
    assert main(args + ["--max-listing-drop", "1"]) == 0  # photos really removed: the guard can be lifted
    assert "WARNING      the source is empty" in capsys.readouterr().out


def test_a_first_run_on_an_empty_source_warns_and_the_minimum_guard_fails(tmp_path, capsys):
    empty = tmp_path / "uploads"
    empty.mkdir()
    summary = run(empty, tmp_path / "lake", tmp_path / "registry")
    assert summary["warnings"] == ["the source is empty: no object listed"]
    status = main(["score", "--source", str(empty), "--output", str(tmp_path / "lake2"), "--registry",
                   str(tmp_path / "registry"), "--min-new-photos", "1"])
    assert status == EXIT_EXPECTATIONS and "fewer than --min-new-photos 1" in capsys.readouterr().err


def test_file_links_only_where_a_browser_can_open_them():
    from gender_pipeline.lake.storage import Store
    from gender_pipeline.tasks.reports import file_link

    store = Store("memory://lake")
    url = "s3://shop-lake/gender/predictions/dt=2026-03-04/part-1.parquet"
    assert file_link(url, "none", store) is None
    assert file_link("/tmp/lake/predictions/part-1.parquet", "presigned", Store("/tmp")) is None
    template = "https://console.aws.amazon.com/s3/object/{bucket}?prefix={key}"
    assert file_link(url, template, store) == ("https://console.aws.amazon.com/s3/object/shop-lake?"
                                               "prefix=gender/predictions/dt=2026-03-04/part-1.parquet")


def test_every_flow_parameter_has_help_and_a_type():
    for flow in (nightly_scoring, retrain):
        schema = flow.parameters.model_dump()
        definitions = schema.get("definitions", {})

        def helped(p: dict) -> bool:  # a group's help is its definition's description
            return bool(p.get("description") or definitions.get(p.get("$ref", "").rsplit("/", 1)[-1], {})
                        .get("description"))

        # The night's options are one parameter whose groups are definitions: every field of each has help.
        for properties in [schema["properties"]] + [d["properties"] for d in definitions.values()]:
            assert all(helped(p) for p in properties.values()), [name for name, p in properties.items()
                                                                 if not helped(p)]
    definitions = nightly_scoring.parameters.model_dump()["definitions"]
    assert definitions["Compute"]["properties"]["device"]["enum"] == ["auto", "cpu", "cuda"]
