import json
from datetime import date

from gender_pipeline.cli import main
from gender_pipeline.lake.history import to_table, write_predictions
from gender_pipeline.lake.output import OutputState
from gender_pipeline.lake.photo_state import listing_table
from gender_pipeline.lake.status import output_status
from gender_pipeline.lake.storage import ObjectInfo, Store
from tests.test_storage_and_predictions import T0, row


def lake(tmp_path):
    store = Store(str(tmp_path / "lake"))
    write_predictions(store, to_table([row("ann/a.jpg", "h1"), row("bob/b.jpg", "h2")]), date(2026, 1, 1), "part-1")
    write_predictions(store, to_table([row("ann/c.jpg", "h3")]), date(2026, 1, 2), "part-2")
    write_predictions(store, to_table([row("cy/d.jpg", "h4", "rejected", "no_face")]), date(2026, 1, 2), "part-3")
    listing = [ObjectInfo(k, 1, T0) for k in ("ann/a.jpg", "bob/b.jpg", "ann/c.jpg", "cy/d.jpg")]
    OutputState(store).rebuild(listing_table(listing), seq=1)
    return store


def source_of(tmp_path, keys=("ann/a.jpg", "bob/b.jpg", "ann/c.jpg", "cy/d.jpg")):
    """The uploads behind `lake`, as files."""
    for key in keys:
        (tmp_path / "uploads" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "uploads" / key).write_bytes(b"x")
    return str(tmp_path / "uploads")


def test_forget_and_status_from_the_cli(tmp_path, capsys):
    lake(tmp_path)
    # No run recorded where the photos are: forget must be told.
    assert main(["forget", "--user-id", "bob", "--output", str(tmp_path / "lake")]) == 2
    assert "forget needs --source" in capsys.readouterr().err
    assert main(["forget", "--user-id", "bob", "--user-id", "ann", "--output", str(tmp_path / "lake"),
                 "--source", source_of(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_removed"] == 3 and report["history_files_deleted"] == 2
    assert report["history_files_rewritten"] == 0 and report["users_table_rows_removed"] == 2
    assert report["source_objects"] == ["ann/a.jpg", "ann/c.jpg", "bob/b.jpg"] and report["unmatched_user_ids"] == []
    assert not (tmp_path / "lake" / "predictions" / "dt=2026-01-01" / "part-1.parquet").exists()
    assert [p.name for p in (tmp_path / "lake").rglob("_tmp-*")] == []
    assert main(["status", "--output", str(tmp_path / "lake"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["rows"] == 1 and status["files"] == 1
    assert [p["dt"] for p in status["partitions"]] == ["2026-01-02"]
    assert status["partitions"][0]["reject_rate"] == 1.0
    assert status["reject_reasons"] == {"no_face": 1}
    assert status["models"] == []  # the rejected row names no model
    assert status["users"]["users"] == 0


def test_status_of_the_history_and_the_users(tmp_path):
    status = output_status(OutputState(lake(tmp_path)))
    assert status["rows"] == 4 and [p["rows"] for p in status["partitions"]] == [2, 2]
    assert status["users"]["users"] == 2 and status["users"]["genders"] == {"female": 0, "male": 2, "unknown": 0}
    assert status["users"]["models"] == [{"model": "m@1", "users": 2, "share": 1.0}]


def test_forget_needs_an_id(tmp_path, capsys):
    lake(tmp_path)
    empty = tmp_path / "none.txt"
    empty.write_text("\n# nobody\n")
    assert main(["forget", "--users-from", str(empty), "--output", str(tmp_path / "lake")]) == 2
    assert "needs --user-id" in capsys.readouterr().err
    assert main(["forget", "--users-from", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "lake")]) == 3


def test_forget_of_ids_that_match_nothing_says_so_and_vacuums_nothing(tmp_path, capsys):
    lake(tmp_path)
    logs = [tmp_path / "lake" / t / "_delta_log" for t in ("users", "_state/photos")]
    before = [sorted(p.name for p in log.iterdir()) for log in logs]
    files = sorted(p for p in (tmp_path / "lake").rglob("*.parquet") if "_state/erased" not in str(p))
    assert main(["forget", "--user-id", "zed", "--user-id", "nobody", "--output", str(tmp_path / "lake"),
                 "--source", source_of(tmp_path)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["unmatched_user_ids"] == ["nobody", "zed"] and report["files_vacuumed"] == 0
    assert "2 user ids matched nothing" in captured.err and "nobody, zed" in captured.err
    # Nothing deleted: no new table version, no file vacuumed or rewritten.
    assert [sorted(p.name for p in log.iterdir()) for log in logs] == before
    assert sorted(p for p in (tmp_path / "lake").rglob("*.parquet") if "_state/erased" not in str(p)) == files
    # One that matches (cy has a rejected photo) and one that does not.
    assert main(["forget", "--user-id", "zed", "--user-id", "cy", "--output", str(tmp_path / "lake"),
                 "--source", source_of(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unmatched_user_ids"] == ["zed"]
    assert "1 user id matched nothing" in captured.err
