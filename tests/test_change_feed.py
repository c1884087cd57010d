"""The users table's change data feed: a night's inserts, updates and deletes read back as
the recommender reads them, the versions the night names; and an erasure that leaves no
erased user's id in any file under the output (data, change data, log, checkpoints,
statistics) but the tombstone."""

import json
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from gender_pipeline import samples
from gender_pipeline.cli import main
from gender_pipeline.flows.scoring import nightly_scoring
from gender_pipeline.night.render import headline
from tests.conftest import night_options

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _night(source, output, registry, day):
    return nightly_scoring(night_options(source=str(source), output=str(output), registry=str(registry), workers=0,
                                         scoring_date=day))


def _later(path, seconds=60):
    stamp = time.time() + seconds
    os.utime(path, (stamp, stamp))


def _changes(output, starting_version):
    changes = pa.table(DeltaTable(str(output / "users")).load_cdf(starting_version=starting_version).read_all())
    return sorted(zip(changes["user_id"].to_pylist(), changes["_change_type"].to_pylist()))


def test_a_nights_inserts_updates_and_deletes_read_from_the_feed(uploads, tmp_path, face_files, capsys):
    source, _ = uploads
    output, registry = tmp_path / "lake", tmp_path / "registry"
    first = _night(source, output, registry, "2026-03-01")
    versions = first["users"]["versions"]
    assert set(_changes(output, (versions["from"] or -1) + 1)) == {(u, "insert") for u in ("ada", "bea", "cy", "dee")}

    # Night 2: bea's photo is replaced by another face, cy deletes theirs, a newcomer signs up.
    samples.write_tree(str(source), {"bea/photo.heic": face_files["photo.webp"],
                                     "newbie/me.jpg": face_files["progressive.jpg"]})
    for key in ("bea/photo.heic", "newbie/me.jpg"):
        _later(source / key)
    os.remove(source / "cy" / "astronaut.png")
    second = _night(source, output, registry, "2026-03-02")
    versions = second["users"]["versions"]
    start = versions["from"] + 1
    assert versions["to"] == DeltaTable(str(output / "users")).version() and start <= versions["to"]
    assert _changes(output, start) == [("bea", "update_postimage"), ("bea", "update_preimage"), ("cy", "delete"),
                                       ("newbie", "insert")]
    # docs/outputs.md's readers, run as written, with the version the first night wrote.
    text = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    (snippet,) = re.findall(r"<!-- feed-readers -->\n(.*?)<!-- /feed-readers -->", text, re.S)
    code = "\n".join(re.findall(r"```python\n(.*?)```", snippet, re.S))
    code = code.replace("N = 6", f"N = {start - 1}").replace('"lake/', f'"{output}/')
    namespace = {}
    exec(compile(code, "docs/outputs.md", "exec"), namespace)
    assert sorted(namespace["feed"]["_change_type"]) == sorted(namespace["changes"]["_change_type"].to_list()) \
        == ["delete", "insert", "update_postimage", "update_preimage"]
    # A reader that is up to date reads nothing, and does not fail.
    namespace = {}
    exec(compile(code.replace(f"N = {start - 1}", f"N = {versions['to']}"), "docs/outputs.md", "exec"), namespace)
    assert "feed" not in namespace and "changes" not in namespace
    # The run's record and `status` name the same versions.
    record = json.loads(sorted((output / "_runs").iterdir())[-1].read_text())
    assert record["users_versions"] == versions
    capsys.readouterr()
    assert main(["status", "--output", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["users"]["feed"] == versions


def _strings(path):
    """Every string a file holds, as text: JSON and text files whole, Parquet files' values
    (decompressed, nested columns included) and their metadata."""
    if path.suffix == ".parquet" or (path.suffix == "" and path.read_bytes()[:4] == b"PAR1"):
        table = pq.read_table(path)
        return json.dumps(table.to_pylist(), default=str) + str(pq.read_metadata(path).metadata)
    return path.read_bytes().decode("utf-8", errors="replace")


def test_an_erasure_leaves_no_erased_id_under_the_output_but_the_tombstone(uploads, tmp_path, face_files, capsys):
    source, _ = uploads
    erased = ["zq-erased-one", "zq-erased-two"]
    samples.write_tree(str(source), {f"{user}/face.jpg": face_files["baseline.jpg"] for user in erased})
    output, registry = tmp_path / "lake", tmp_path / "registry"
    _night(source, output, registry, "2026-03-01")
    samples.write_tree(str(source), {f"{erased[0]}/newer.png": face_files["rgba.png"],
                                     "keeper/me.jpg": face_files["progressive.jpg"]})
    for key in (f"{erased[0]}/newer.png", "keeper/me.jpg"):
        _later(source / key)
    _night(source, output, registry, "2026-03-02")  # an update of an erased user's row: change data of it
    assert main(["compact", "--output", str(output)]) == 0  # a checkpoint of the log, too
    holding = [p for p in output.rglob("*") if p.is_file() and any(u in _strings(p) for u in erased)]
    assert any("_change_data" in str(p) for p in holding) and any("users" in p.parts for p in holding)

    capsys.readouterr()
    assert main(["forget", "--output", str(output), "--source", str(source), "--user-id", erased[0],
                 "--user-id", erased[1], "--user-id", "zq-nobody"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unmatched_user_ids"] == ["zq-nobody"]
    assert report["change_data_files_removed"] >= 1 and report["change_data_whole_from_version"] is not None
    everything = [p for p in output.rglob("*") if p.is_file()]
    assert any("_delta_log" in str(p) for p in everything) and any(p.name.endswith(".checkpoint.parquet")
                                                                  for p in everything)
    still = [str(p.relative_to(output)) for p in everything if any(u in _strings(p) for u in erased)]
    assert still and all(re.match(r"_state/erased/", s) for s in still), still
    # The users table still answers the others, and the feed reads from the version `forget` names.
    assert "keeper" in DeltaTable(str(output / "users")).to_pandas()["user_id"].tolist()
    samples.write_tree(str(source), {"newcomer/me.jpg": face_files["progressive.jpg"]})
    summary = _night(source, output, registry, "2026-03-03")
    assert _changes(output, report["change_data_whole_from_version"]) == [("newcomer", "insert")]
    # What the erasure did, in the next night's summary, its trend row and `status`: the users
    # erased apart from the id that matched nobody.
    assert (summary["erased_users"], summary["erasure_ids_unmatched"]) == (2, 1)
    assert "2 users erased since the last run (1 more id asked matched nobody)." in headline(summary)
    assert summary["recent_runs"][-1]["erased"] == 2 and summary["recent_runs"][-2]["erased"] == 0
    assert main(["status", "--output", str(output)]) == 0
    assert "erasures     1: 2 users erased, 1 id that matched nobody; the last " in capsys.readouterr().out
