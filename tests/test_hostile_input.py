"""Bad input to every command is refused before anything is written: each command, each
argument, hostile values (empty, blank, path-like, very long, bytes that are not UTF-8,
unknown names, a file where a folder belongs and the reverse, an unknown URL scheme). The
exit status is the one docs/operating.md gives, the message names what was refused, and
the output's, the registry's and the working folder's files are byte for byte unchanged."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gender_pipeline import samples
from gender_pipeline.cli import EXIT_STORAGE, EXIT_USAGE, main

LONG = "x" * 300  # a path segment longer than any file system takes
NOT_UTF8 = os.fsdecode(b"caf\xe9")  # what Python makes of Latin-1 bytes on the command line


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """An output after one night, its registry and source, and a file and a folder to misuse."""
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("hostile")
    samples.write_tree(str(root / "uploads"), {"u1/a.jpg": samples.encode(samples.grace_hopper(), "JPEG"),
                                               "u2/b.png": samples.encode(samples.grace_hopper(), "PNG")})
    (root / "ids.txt").write_text("u1\n\n# a comment\nu1/../u2\n")
    (root / "a-file").write_text("not a folder")
    (root / "a-folder").mkdir()
    with prefect_test_harness(server_startup_timeout=120):
        assert main(["score", "--source", str(root / "uploads"), "--output", str(root / "lake"), "--registry",
                     str(root / "registry"), "--workers", "0"]) == 0
    return root


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cases():
    """(command line with {root} and {value} holes, the values to put in it, the words the
    refusal says, the exit status)."""
    location = ["", "   ", "ftpx://host/path", f"/tmp/{LONG}", NOT_UTF8 + "/x", "a\x01b"]
    user_id = ["", "   ", "u1/../u2", "u2/photo.jpg", "..", "u\x01", NOT_UTF8, LONG]
    model = ["", "x/y", "../m", NOT_UTF8, "a b"]
    out = "--output {root}/lake"
    src = "--source {root}/uploads"
    reg = "--registry {root}/registry"
    cases = []
    for value in location:
        cases += [(f"score --source {{value}} {out} {reg}", value, "--source"),
                  (f"score {src} --output {{value}} {reg}", value, "--output"),
                  (f"score {src} {out} --registry {{value}}", value, "--registry"),
                  (f"score {src} {out} --exclude-users {{value}}", value, "--exclude-users"),
                  (f"serve {src} --output {{value}}", value, "--output"),
                  ("status --output {value}", value, "--output"),
                  ("compact --output {value}", value, "--output"),
                  (f"forget --output {{value}} --user-id u1 {src}", value, "--output"),
                  (f"forget {out} --user-id u1 --source {{value}}", value, "--source"),
                  (f"forget {out} --users-from {{value}}", value, "--users-from"),
                  (f"rebuild-users --source {{value}} {out}", value, "--source"),
                  ("retrain --data {value} --registry {root}/registry", value, "--data"),
                  ("evaluate --data {value} --format manifest", value, "--data"),
                  ("promote m@1 --reason why --registry {value}", value, "--registry")]
    for value in user_id:
        cases.append((f"forget {out} --user-id {{value}} {src}", value, "user id"))
    for value in model:
        cases += [(f"score {src} {out} {reg} --model {{value}}", value, "--model"),
                  ("promote {value} --reason why --registry {root}/registry", value, "model"),
                  ("evaluate --model {value} --data {root}/uploads --format manifest", value, "--model")]
    for value in ("", "   ", "a\x00b", NOT_UTF8, "y" * 2001):
        cases.append(("promote m@1 --reason {value} --registry {root}/registry", value, "--reason"))
    cases += [
        (f"score {src} --output {{value}}", "{root}/a-file", "is a file, not a folder"),
        (f"score {src} {out} --exclude-users {{value}}", "{root}/a-folder", "is a folder, not a file"),
        ("status --output {value}", "{root}/a-file", "is a file, not a folder"),
        (f"forget {out} --users-from {{value}}", "{root}/a-folder", "is a folder, not a file"),
        ("retrain --data {root}/uploads --config {value}", "{root}/a-folder", "is a folder, not a file"),
        ("retrain --data {root}/uploads --config {value}", "{root}/nope.yaml", "config {root}/nope.yaml not found"),
        (f"score {src} --output {{value}}", "{root}/uploads/lake", "inside the source"),
        (f"score {src} {out} --date {{value}}", "29/11/2026", "YYYY-MM-DD"),
        (f"score {src} {out} --listing {{value}}", "ls", "'list' or 'inventory:URL'"),
        (f"score {src} {out} --batch-size {{value}}", "0", "at least 1"),
        (f"score {src} {out} --max-listing-drop {{value}}", "2", "in [0, 1]"),
        (f"score {src} {out} --endpoint-url {{value}}", "minio:9000", "http://"),
        (f"serve {src} {out} --cron {{value}}", "every night", "5 cron fields"),
        (f"serve {src} {out} --timezone {{value}}", "Mars/Base", "unknown time zone"),
        (f"rebuild-users {src} {out} --listing {{value}}", "inventory:", "'list' or 'inventory:URL'"),
        ("compact {out} --retention-hours {value}".replace("{out}", out), "-1", "at least 0"),
        ("evaluate --data {root}/uploads --format {value}", "parquet", "invalid choice"),
        ("retrain --data {root}/uploads --format {value}", "parquet", "invalid choice"),
        (f"forget {out} {src} --users-from {{value}}", "{root}/ids.txt", "ids.txt, line 4: user id 'u1/../u2'"),
        (f"score {src} {out} {reg} --exclude-users {{value}}", "{root}/ids.txt", "ids.txt, line 4"),
    ]
    for value in ("", "   ", "ftp://hooks.example/x", "hooks.example/x", "http://a b", NOT_UTF8):
        cases.append(("alerts --webhook-url {value}", value, "--webhook-url"))
    for value in ("", "soon", "5s", "-1h", "8d", "4 hours"):
        cases.append(("alerts --webhook-url http://127.0.0.1:9/hook --finish-within {value}", value,
                      "--finish-within"))
    for value in ("", "no-colon", "Bad Name: x", "X-Token:"):
        cases.append(("alerts --webhook-url http://127.0.0.1:9/hook --header {value}", value, "--header"))
    cases += [("alerts --finish-within {value}", "4h", "needs --webhook-url"),
              ("alerts --remove --webhook-url {value}", "http://127.0.0.1:9/hook", "--remove takes no other")]
    return cases


@pytest.mark.parametrize("line, value, words", _cases(),
                         ids=[f"{c[0].split()[0]}:{c[2]}:{c[1][:12]!r}" for c in _cases()])
def test_hostile_input_is_refused_before_anything_is_written(lake, line, value, words, monkeypatch, capsys):
    monkeypatch.chdir(lake / "a-folder")  # an empty location would mean this folder
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing may need Prefect to refuse
    value = value.replace("{root}", str(lake))
    argv = [value if part == "{value}" else part.replace("{root}", str(lake)) for part in line.split(" ")]
    before = {name: _tree(lake / name) for name in ("lake", "registry", "uploads", "a-folder")}
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err
    assert status == EXIT_USAGE, (argv, status, err[-800:])
    assert words.replace("{root}", str(lake)) in err, err[-800:]
    assert {name: _tree(lake / name) for name in before} == before


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("line, words", [
    ("score --source {root}/uploads --output {root}/lake --registry {root}/registry --model nope@9",
     "no model nope@9"),
    ("score --source {root}/uploads --output {root}/lake --registry {root}/registry --model dlib-age-v1@1",
     "answers age only"),
])
def test_a_model_that_cannot_score_is_refused_before_the_output_is_touched(lake, line, words, capsys):
    before = {name: _tree(lake / name) for name in ("lake", "uploads")}
    status = main(line.replace("{root}", str(lake)).split(" "))
    assert status == EXIT_USAGE and words in capsys.readouterr().err
    assert {name: _tree(lake / name) for name in before} == before


@pytest.mark.parametrize("line", ["status --output {root}/nothing-here", "compact --output {root}/uploads",
                                  "forget --output {root}/a-folder --user-id u1 --source {root}/uploads"])
def test_a_folder_that_holds_no_output_is_a_storage_error(lake, line, capsys):
    assert main(line.replace("{root}", str(lake)).split(" ")) == EXIT_STORAGE
    assert "holds no gender-pipeline output" in capsys.readouterr().err


def test_bytes_that_are_not_utf8_on_a_real_command_line(lake):
    """The same refusal when the bytes come from a real process's argv."""
    done = subprocess.run([sys.executable, "-m", "gender_pipeline.cli", "forget", "--output", str(lake / "lake"),
                           "--user-id", b"caf\xe9", "--source", str(lake / "uploads")],
                          capture_output=True, timeout=120)
    assert done.returncode == EXIT_USAGE and b"not valid UTF-8" in done.stderr
