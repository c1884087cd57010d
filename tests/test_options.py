"""The night's options model: defaults written once, what it refuses before anything runs,
the CLI's flags and the deployment's parameters drawn from it, and the flat parameters of
earlier versions read into it."""

import os

import pytest
import yaml
from pydantic import ValidationError

from gender_pipeline.cli import build_parser, main
from gender_pipeline.faces.decoding import DecodeLimits
from gender_pipeline.flows.scoring import nightly_scoring
from gender_pipeline.lake.lock import LEASE_SECONDS
from gender_pipeline.lake.photo_state import REFRESH_BUDGET
from gender_pipeline.models.retrain_options import RetrainOptions
from gender_pipeline.night.options import NightOptions, fields, flag_of, flat_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def where(**values) -> dict:
    return {"where": {"source": "/data/uploads", "output": "/data/lake", **values}}


def test_defaults_are_the_ones_the_code_below_uses():
    options = NightOptions.model_validate(where())
    assert options.guards.lock_lease_seconds == LEASE_SECONDS
    assert options.users.refresh_budget == REFRESH_BUDGET
    assert (options.limits.max_bytes, options.limits.max_pixels) == (DecodeLimits().max_bytes, DecodeLimits().max_pixels)
    assert options.model.name == "production" and options.listing_spec().kind == "list"
    scoring = options.scoring("cpu")
    assert scoring.limits == DecodeLimits() and scoring.jpeg_device is None and scoring.front_end == "auto"


@pytest.mark.parametrize("values, message", [
    (where(source=""), "is empty"),
    (where(source="   "), "is empty"),
    (where(output=" /data/lake"), "spaces"),
    (where(source="/data/up\nloads"), "control character"),
    (where(source="ftpx://host/uploads"), "unknown URL scheme"),
    (where(output="/data/uploads"), "the output is the source"),
    (where(output="/data/uploads/lake"), "inside the source"),
    (where(endpoint_url="minio:9000"), "http://"),
    (where(file_links="https://console/{bucket}/{path}"), "{url}, {bucket} and {key}"),
    (where(file_links="ftp://x"), "https:// template"),
    ({**where(), "model": {"name": "x/y"}}, "NAME@VERSION"),
    ({**where(), "model": {"abstain_threshold": 0.2}}, "greater than or equal to 0.5"),
    ({**where(), "listing": {"method": "inventory"}}, "inventory:URL"),
    ({**where(), "compute": {"batch_size": 0}}, "greater than 0"),
    ({**where(), "compute": {"device": "tpu"}}, "'auto', 'cpu' or 'cuda'"),
    ({**where(), "compute": {"batchsize": 3}}, "Extra inputs are not permitted"),
    ({**where(), "users": {"exclude_users": ""}}, "is empty"),
])
def test_what_cannot_run_is_refused_by_the_model(values, message):
    with pytest.raises(ValidationError) as refused:
        NightOptions.model_validate(values)
    assert message in str(refused.value)


@pytest.mark.parametrize("argv, message", [
    (["--source", "", "--output", "lake"], "--source: is empty"),
    (["--source", "up", "--output", ""], "--output: is empty"),
    (["--source", "up", "--output", "up/lake"], "inside the source"),
    (["--source", "up", "--output", "lake", "--exclude-users", " "], "--exclude-users: is empty"),
    (["--source", "up", "--output", "lake", "--listing", "ls"], "--listing: --listing is 'list' or 'inventory:URL'"),
])
def test_the_cli_refuses_before_writing_anything(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "up").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["score", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["up"]  # nothing written, not even a lock


def test_every_option_has_one_flag_with_help_in_score_and_serve():
    parser = build_parser()
    for command in ("score", "serve"):
        sub = parser._subparsers._group_actions[0].choices[command]
        by_dest = {action.dest: action for action in sub._actions}
        for group, name, info in fields():
            action = by_dest[f"{group}.{name}" if group else name]
            assert action.help and action.option_strings == [flag_of(info).name or "--" + name.replace("_", "-")]


def test_flags_build_the_options_and_serve_sends_only_what_was_set():
    parser = build_parser()
    args = parser.parse_args(["serve", "--source", "s3://b/up", "--output", "s3://b/lake", "--model", "m@2",
                              "--abstain-below", "0.7", "--lock-wait", "5", "--listing", "inventory:s3://b/inv",
                              "--refresh-budget", "0", "--gpu-decode", "--date", "2026-12-01"])
    from gender_pipeline.cli import night_options

    options = night_options(args, parser)
    assert (options.model.name, options.model.abstain_threshold, options.guards.lock_wait_seconds) == ("m@2", 0.7, 5)
    assert options.listing_spec().url == "s3://b/inv" and options.users.refresh_budget == 0
    assert options.compute.gpu_decode and str(options.scoring_date) == "2026-12-01"
    sent = options.model_dump(mode="json", exclude_unset=True)
    assert sent["compute"] == {"gpu_decode": True} and "limits" not in sent
    assert NightOptions.model_validate(sent) == options


def test_the_deployment_file_holds_to_the_models():
    with open(os.path.join(ROOT, "deployments", "prefect.yaml")) as handle:
        deployments = {d["name"]: d for d in yaml.safe_load(handle)["deployments"]}
    assert list(deployments["nightly-scoring"]["parameters"]) == ["options"]
    options = NightOptions.model_validate(deployments["nightly-scoring"]["parameters"]["options"])
    assert options.where.source.startswith("s3://") and options.compute.batch_size == 128
    retrain = RetrainOptions.model_validate(deployments["retrain"]["parameters"]["options"])
    assert retrain.device == "cuda" and os.path.exists(os.path.join(ROOT, retrain.config))


def test_the_flat_parameters_of_earlier_versions_are_read_into_options():
    flat = {"source": "s3://b/up", "output": "s3://b/lake", "registry": None, "model": "m@1", "batch_size": 32,
            "lock_wait_seconds": 10, "listing": "list", "listing_fanout": 4, "refresh_budget": 5,
            "scoring_date": "2026-12-01", "exclude_users": None, "max_bytes": None}
    options = NightOptions.from_flat(flat)
    assert (options.where.source, options.model.name, options.compute.batch_size) == ("s3://b/up", "m@1", 32)
    assert (options.guards.lock_wait_seconds, options.listing.fanout, options.users.refresh_budget) == (10, 4, 5)
    assert options.limits.max_bytes == DecodeLimits().max_bytes  # None meant the default there
    # A deployment still sending them runs: the flow reads them into its one parameter.
    assert nightly_scoring.validate_parameters(flat)["options"] == options
    assert set(flat_names()) >= set(flat) | {"max_listing_drop", "shard_size", "front_end", "file_links"}
    # Over a deployment's own options: the flat ones win, the others stay.
    merged = nightly_scoring.validate_parameters({"options": where(), "workers": 0, "output": "/data/other"})
    assert (merged["options"].where.source, merged["options"].where.output) == ("/data/uploads", "/data/other")
    assert merged["options"].compute.workers == 0
    with pytest.raises(ValueError, match="'sauce' is not a parameter"):
        NightOptions.from_flat({"sauce": "x"})
    with pytest.raises(Exception, match="sauce"):  # a name no version had: refused as before
        nightly_scoring.validate_parameters({"sauce": "x", "output": "y"})
