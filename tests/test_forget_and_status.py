import json
from datetime import date

import pandas as pd

from gender_pipeline.cli import main
from core.predictions import dataset_status, forget_user, to_table, write_predictions
from core.storage import Store
from tests.test_storage_and_predictions import row


def lake(tmp_path):
    store = Store(str(tmp_path / "lake"))
    write_predictions(store, to_table([row("ann/a.jpg", "h1"), row("bob/b.jpg", "h2")]), date(2026, 1, 1), "part-1")
    write_predictions(store, to_table([row("ann/c.jpg", "h3")]), date(2026, 1, 2), "part-2")
    write_predictions(store, to_table([row("cy/d.jpg", "h4", "rejected", "no_face")]), date(2026, 1, 2), "part-3")
    return store


def test_forget_removes_a_user_everywhere_and_reports_it(tmp_path):
    store = lake(tmp_path)
    removed = forget_user(store, "ann")
    assert sorted((r["rows_removed"], r["rows_left"]) for r in removed) == [(1, 0), (1, 1)]
    frame = pd.read_parquet(str(tmp_path / "lake" / "predictions"))
    assert "ann" not in set(frame["user_id"]) and sorted(frame["user_id"]) == ["bob", "cy"]
    assert not (tmp_path / "lake" / "predictions" / "dt=2026-01-02" / "part-2.parquet").exists()
    leftovers = [p.name for p in (tmp_path / "lake").rglob("_*")]
    assert leftovers == []
    assert forget_user(store, "ann") == []  # idempotent


def test_forget_and_status_from_the_cli(tmp_path, capsys):
    lake(tmp_path)
    assert main(["forget", "--user-id", "bob", "--output", str(tmp_path / "lake")]) == 0
    assert json.loads(capsys.readouterr().out)["rows_removed"] == 1
    assert main(["status", "--output", str(tmp_path / "lake")]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["rows"] == 3 and status["files"] == 3
    assert [p["dt"] for p in status["partitions"]] == ["2026-01-01", "2026-01-02"]
    assert status["partitions"][1]["reject_rate"] == 0.5
    assert status["reject_reasons"] == {"no_face": 1}
    assert status["models"] == [{"model": "m@1", "rows": 2}]


def test_status_of_an_empty_output(tmp_path):
    assert dataset_status(Store(str(tmp_path)))["rows"] == 0
