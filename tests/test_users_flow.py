"""The users table through the real flow and CLI, on local files and on the S3 API: nights
of new, replaced, removed and rejected photos; a promotion and a rollback; erasure that
stays erased; opt-outs never read; wrong outputs; a foreign table; the README's readers."""

import json
import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from deltalake import DeltaTable

from gender_pipeline import samples
from gender_pipeline.cli import main
from gender_pipeline.flows.scoring import nightly_scoring
from gender_pipeline.lake.storage import Store
from gender_pipeline.runtime.errors import EXIT_EXPECTATIONS, EXIT_STORAGE
from tests.conftest import night_options

pytestmark = pytest.mark.usefixtures("prefect_harness")
DOCS = [Path(__file__).resolve().parents[1] / name for name in ("README.md", "docs/outputs.md")]


def run(source, output, registry, **kwargs):
    return nightly_scoring(night_options(source=str(source), output=str(output), registry=str(registry), workers=0,
                                         **kwargs))


def users(output, options=None):
    return DeltaTable(str(output) + "/users", storage_options=options).to_pandas().set_index("user_id").sort_index()


def history(output, **kwargs):
    return pd.read_parquet(str(output) + "/predictions", **kwargs)


def later(path, seconds):
    stamp = time.time() + seconds
    os.utime(path, (stamp, stamp))


def test_one_row_per_user_over_nights_and_the_readme_readers(uploads, tmp_path, face_files, broken_files,
                                                            monkeypatch):
    source, files = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    summary = run(source, output, registry, scoring_date="2026-03-01")
    table = users(output)
    assert sorted(table.index) == ["ada", "bea", "cy", "dee"]  # broken uploads have no answer
    assert summary["users"]["users"] == 4 and summary["users"]["share"] == 1.0
    frame = history(output)
    answered = frame[frame.status == "scored"].set_index("photo_key")
    for user, row in table.iterrows():
        assert row["gender"] == answered.loc[row["photo_key"], "gender"]
        assert row["p_male"] == pytest.approx(answered.loc[row["photo_key"], "p_male"])

    # Night 2: ada adds a newer photo that is rejected; bea's photo is replaced by
    # another face; cy deletes theirs; a newcomer signs up.
    samples.write_tree(str(source), {"ada/later.jpg": samples.encode(samples.no_face_photo(), "JPEG"),
                                     "bea/photo.heic": face_files["photo.webp"],
                                     "newbie/me.jpg": face_files["progressive.jpg"]})
    for key in ("ada/later.jpg", "bea/photo.heic", "newbie/me.jpg"):
        later(source / key, 60)
    os.remove(source / "cy" / "astronaut.png")
    summary = run(source, output, registry, scoring_date="2026-03-02")
    assert summary["removed"] == 1 and summary["new"] == 3
    table = users(output)
    assert sorted(table.index) == ["ada", "bea", "dee", "newbie"]
    assert table.loc["ada", "photo_key"] == "ada/baseline.jpg"
    assert table.loc["ada", "newest_photo_key"] == "ada/later.jpg"
    assert table.loc["ada", "newest_reject_reason"] == "no_face" and table.loc["ada", "photos_seen"] == 2
    replaced = history(output).query("photo_key == 'bea/photo.heic'").sort_values("scored_at")
    assert len(replaced) == 2 and table.loc["bea", "photo_sha256"] == replaced["photo_sha256"].iloc[-1]
    assert str(table.loc["bea", "answered_on"]) == "2026-03-02"

    # The README's and docs/outputs.md's pandas and Polars readers, run as written, from the output's parent.
    monkeypatch.chdir(tmp_path)
    for doc in DOCS:
        snippets = re.findall(r"<!-- users-readers -->\n(.*?)<!-- /users-readers -->", doc.read_text(), re.S)
        assert snippets, f"{doc.name} shows how to read the users table"
        code = "\n".join(re.findall(r"```python\n(.*?)```", snippets[0], re.S))
        namespace = {}
        exec(compile(code.replace('"lake/', f'"{output.name}/'), doc.name, "exec"), namespace)
        assert sorted(namespace["users"]["user_id"]) == sorted(table.index)
        assert sorted(namespace["current"]["user_id"].to_list()) == sorted(table.index)


def copy_baseline(registry, version):
    from gender_pipeline.models.registry import Registry

    reg = Registry(str(registry))
    reg.ensure_baseline()
    card = {k: v for k, v in reg.card("dlib-gender-v1", "1").items() if k not in ("name", "version", "registered_at")}
    reg.register("gender-classifier", version, card, {"model.onnx": reg.store.read("dlib-gender-v1/1/model.onnx")})
    return reg


def test_a_promotion_then_a_rollback_move_every_user_within_the_budget(uploads, tmp_path, capsys):
    source, _ = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    run(source, output, registry)
    reg = copy_baseline(registry, "1")
    copy_baseline(registry, "2")
    assert main(["promote", "gender-classifier@2", "--reason", "better", "--registry", str(registry)]) == 0
    first = run(source, output, registry, refresh_budget=3)
    assert first["new"] == 0 and first["refreshed"] == 3
    assert first["users"] == {**first["users"], "users": 4, "on_model": 3, "behind": 1, "nights_left": 1,
                              "model": "gender-classifier@2", "share": 0.75}
    second = run(source, output, registry, refresh_budget=3)
    assert second["refreshed"] == 1 and second["users"]["share"] == 1.0 and second["users"]["nights_left"] == 0
    assert set(users(output)["model_version"]) == {"2"}
    # Rollback: production points at version 1 again; the next night moves everyone back.
    assert main(["promote", "gender-classifier@1", "--reason", "rollback", "--registry", str(registry)]) == 0
    third = run(source, output, registry)
    assert third["refreshed"] == 4 and set(users(output)["model_version"]) == {"1"}
    capsys.readouterr()
    assert main(["status", "--output", str(output), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["users"]["models"] == [{"model": "gender-classifier@1", "users": 4, "share": 1.0}]


def test_forget_many_users_stays_erased_and_opt_outs_are_never_read(uploads, tmp_path, face_files, capsys,
                                                                  monkeypatch):
    source, _ = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    run(source, output, registry)
    ids = tmp_path / "erase.txt"
    ids.write_text("# requests of the week\nbea\n\ncy\n")
    assert main(["forget", "--user-id", "ada", "--users-from", str(ids), "--output", str(output)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["users"] == 3 and report["rows_removed"] == 3 and report["users_table_rows_removed"] == 3
    assert sorted(report["source_objects"]) == ["ada/baseline.jpg", "bea/photo.heic", "cy/astronaut.png"]
    assert set(history(output)["user_id"]).isdisjoint({"ada", "bea", "cy"})
    assert list(users(output).index) == ["dee"]

    read = []
    original = Store.read_many
    monkeypatch.setattr(Store, "read_many", lambda self, keys: read.extend(keys := list(keys)) or original(self, keys))
    opt_out = tmp_path / "opt-out.txt"
    opt_out.write_text("eve\n")
    samples.write_tree(str(source), {"eve/me.jpg": face_files["baseline.jpg"],
                                     "cy/new.jpg": face_files["grayscale.jpg"]})
    later(source / "cy" / "new.jpg", 60)  # uploaded after the erasure: a new signup
    summary = run(source, output, registry, exclude_users=str(opt_out))
    assert read == ["cy/new.jpg"]  # neither the erased users' old photos nor the opted-out user's
    assert summary["erased_skipped"] == 3 and summary["excluded"] == 1 and summary["erased_users"] == 3
    assert sorted(users(output).index) == ["cy", "dee"]
    assert set(history(output)["user_id"]) & {"ada", "bea", "eve"} == set()


@pytest.mark.parametrize("command", [["forget", "--user-id", "u1"], ["status"]])
def test_a_mistyped_output_is_exit_3_with_the_path(tmp_path, capsys, command):
    wrong = tmp_path / "lake-typo"
    assert main([*command, "--output", str(wrong)]) == EXIT_STORAGE
    assert str(wrong) in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*command, "--output", str(tmp_path / "empty")]) == EXIT_STORAGE


def test_a_foreign_users_table_stops_the_run_with_exit_4(uploads, tmp_path, capsys):
    from deltalake import write_deltalake
    import pyarrow as pa

    source, _ = uploads
    write_deltalake(str(tmp_path / "lake" / "users"), pa.table({"customer": ["x"]}), name="crm customers")
    status = main(["score", "--source", str(source), "--output", str(tmp_path / "lake"),
                   "--registry", str(tmp_path / "reg"), "--workers", "0"])
    assert status == EXIT_EXPECTATIONS
    assert "crm customers" in capsys.readouterr().err
    assert DeltaTable(str(tmp_path / "lake" / "users")).to_pandas()["customer"].tolist() == ["x"]
    assert main(["rebuild-users", "--source", str(source), "--output", str(tmp_path / "lake")]) == EXIT_EXPECTATIONS
    assert main(["rebuild-users", "--source", str(source), "--output", str(tmp_path / "lake"), "--replace"]) == 0
    assert users(tmp_path / "lake").empty  # nothing was ever scored into this output


def test_users_table_and_erasure_on_the_s3_api(s3_endpoint, uploads):
    import s3fs

    source, files = uploads
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    bucket = f"users-{abs(hash(str(source))) % 10**8}"
    fs.mkdir(bucket)
    fs.pipe({f"{bucket}/uploads/{key}": data for key, data in files.items()})
    s3 = dict(source=f"s3://{bucket}/uploads", output=f"s3://{bucket}/lake", registry=f"s3://{bucket}/registry",
              endpoint_url=s3_endpoint, workers=0)
    summary = nightly_scoring(night_options(**s3))
    options = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    assert sorted(users(s3["output"], options).index) == ["ada", "bea", "cy", "dee"]
    assert summary["users"]["table"] == f"s3://{bucket}/lake/users"
    fs.rm(f"{bucket}/uploads/dee/rotated")
    nightly_scoring(night_options(**s3))
    assert sorted(users(s3["output"], options).index) == ["ada", "bea", "cy"]
    assert main(["forget", "--user-id", "ada", "--output", s3["output"], "--endpoint-url", s3_endpoint]) == 0
    assert sorted(users(s3["output"], options).index) == ["bea", "cy"]
    storage = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    assert "ada" not in set(history(s3["output"], storage_options=storage)["user_id"])
    again = nightly_scoring(night_options(**s3))
    assert again["rows"] == 0 and again["erased_skipped"] == 1
    assert main(["rebuild-users", "--source", s3["source"], "--output", s3["output"],
                 "--endpoint-url", s3_endpoint]) == 0
    assert sorted(users(s3["output"], options).index) == ["bea", "cy"]
