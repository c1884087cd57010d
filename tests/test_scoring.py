from datetime import datetime, timezone

import numpy as np
import pytest

from gender_pipeline.engine.engine import RunStamp, ScoringEngine, ScoringOptions
from gender_pipeline.engine.prepared import prepare_photo
from gender_pipeline.faces.chip import ChipRecipe
from gender_pipeline.lake.keys import user_of
from gender_pipeline.lake.storage import Store
from gender_pipeline.models.registry import Registry

AT = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Registry(str(tmp_path_factory.mktemp("reg"))).load_predictor("gender-classifier", "cpu")


def memory_store(name, files):
    store = Store(f"memory://{name}/uploads")
    store.fs.pipe({f"/{name}/uploads/{k}": v for k, v in files.items()})
    return store


@pytest.mark.parametrize("key, user", [("u1/a.jpg", "u1"), ("u1/sub/a.jpg", "u1"), ("a.jpg", None),
                                       ("u1/../a.jpg", None), ("/u/a", None), ("u//a", None)])
def test_user_id_comes_from_the_first_segment(key, user):
    assert user_of(key) == user


def test_every_object_gets_exactly_one_answer(predictor, face_files, broken_files):
    files = {f"face{i}/{name}": data for i, (name, data) in enumerate(face_files.items())}
    files.update({f"bad{i}/{name}": data for i, (name, (data, _)) in enumerate(broken_files.items())})
    files["loose-file.jpg"] = face_files["baseline.jpg"]
    store = memory_store("every", files)
    rows, stats = ScoringEngine(predictor, ScoringOptions(batch_size=4, workers=0),
                                RunStamp("run", AT)).score(store, store.list_objects(), {})
    assert sorted(r.photo_key for r in rows) == sorted(files)
    by_key = {r.photo_key: r for r in rows}
    for i, (name, (_, reason)) in enumerate(broken_files.items()):
        assert by_key[f"bad{i}/{name}"].reject_reason == reason, name
    assert by_key["loose-file.jpg"].reject_reason == "bad_key"
    for i, name in enumerate(face_files):
        r = by_key[f"face{i}/{name}"]
        assert r.status == "scored" and r.face_count >= 1 and len(r.face_box) == 4, name
        assert abs(r.p_male + r.p_female - 1) < 1e-6 and r.confidence >= 0.5
    assert stats.scored == len(face_files) and stats.rejected == len(broken_files) + 1


@pytest.mark.parametrize("count", [1, 3, 4])  # batch size 3: one, exactly one batch, one more
def test_batch_boundaries(predictor, face_files, count):
    files = {f"user{i}/p.jpg": face_files["baseline.jpg"] for i in range(count)}
    store = memory_store(f"batch{count}", files)
    rows, _ = ScoringEngine(predictor, ScoringOptions(batch_size=3, workers=0),
                            RunStamp("run", AT)).score(store, store.list_objects(), {})
    assert len(rows) == count and all(r.status == "scored" for r in rows)
    assert len({round(r.p_male, 5) for r in rows}) == 1


def test_worker_processes_give_the_same_rows_as_inline(predictor, face_files, broken_files):
    files = {f"u{i}/{name}": data for i, (name, data) in enumerate(list(face_files.items())[:6])}
    files.update({f"b{i}/{name}": data for i, (name, (data, _)) in enumerate(list(broken_files.items())[:4])})
    store = memory_store("pool", files)
    inline, _ = ScoringEngine(predictor, ScoringOptions(workers=0),
                              RunStamp("r", AT)).score(store, store.list_objects(), {})
    pooled, _ = ScoringEngine(predictor, ScoringOptions(workers=2),
                              RunStamp("r", AT)).score(store, store.list_objects(), {})
    assert [(r.photo_key, r.status, r.reject_reason, r.face_box) for r in inline] == \
           [(r.photo_key, r.status, r.reject_reason, r.face_box) for r in pooled]
    assert np.allclose([r.p_male or 0 for r in inline], [r.p_male or 0 for r in pooled], atol=1e-5)


def test_same_content_is_not_scored_again(predictor, face_files):
    import hashlib

    data = face_files["baseline.jpg"]
    store = memory_store("same", {"u/a.jpg": data, "v/b.jpg": data})
    known = {"u/a.jpg": {hashlib.sha256(data).hexdigest()}}
    rows, stats = ScoringEngine(predictor, ScoringOptions(workers=0),
                                RunStamp("r", AT)).score(store, store.list_objects(), known)
    assert [r.photo_key for r in rows] == ["v/b.jpg"] and stats.skipped_same_hash == 1


def test_oversize_objects_are_rejected_from_the_listing_without_download(predictor, face_files, monkeypatch):
    store = memory_store("oversize", {"u/big.jpg": face_files["baseline.jpg"]})
    read = []
    original = store.read_many
    monkeypatch.setattr(store, "read_many", lambda keys: read.extend(keys) or original(keys))
    from gender_pipeline.faces.decoding import DecodeLimits

    rows, _ = ScoringEngine(predictor, ScoringOptions(workers=0, limits=DecodeLimits(max_bytes=1000)),
                            RunStamp("r", AT)).score(store, store.list_objects(), {})
    assert rows[0].reject_reason == "too_large" and read == []


def test_unreadable_object_becomes_read_error(predictor, face_files, monkeypatch):
    store = memory_store("unreadable", {"u/a.jpg": face_files["baseline.jpg"], "v/b.jpg": b"x"})
    original = store.read_many
    monkeypatch.setattr(store, "read_many", lambda keys: {**original(keys), "v/b.jpg": ConnectionError("reset")})
    rows, _ = ScoringEngine(predictor, ScoringOptions(workers=0),
                            RunStamp("r", AT)).score(store, store.list_objects(), {})
    assert [(r.photo_key, r.status, r.reject_reason) for r in rows] == [
        ("u/a.jpg", "scored", None), ("v/b.jpg", "rejected", "read_error")]


def test_abstain_threshold_override(predictor, face_files):
    store = memory_store("abstain", {"u/a.png": face_files["astronaut.png"]})
    rows, _ = ScoringEngine(predictor, ScoringOptions(workers=0, abstain_threshold=1.0),
                            RunStamp("r", AT)).score(store, store.list_objects(), {})
    assert rows[0].gender == "unknown" and rows[0].p_male is not None


def test_prepare_photo_is_a_plain_function(face_files):
    from gender_pipeline.faces.framing import Framing

    prepared = prepare_photo("u/p.jpg", face_files["baseline.jpg"], "sha", ChipRecipe(Framing(size=40)))
    assert prepared.chip.shape == (40, 40, 3) and prepared.user_id == "u"


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(workers=-1), dict(read_chunk=0)])
def test_bad_options(bad):
    with pytest.raises(ValueError):
        ScoringOptions(**bad)


def test_worker_pool_survives_a_photo_that_kills_its_decoder(predictor, face_files):
    from tests.crashing_decoder import crash_on_poison

    files = {f"u{i}/p.jpg": face_files["baseline.jpg"] for i in range(6)}
    files["evil/poison.jpg"] = face_files["baseline.jpg"]
    store = memory_store("crash", files)
    rows, stats = ScoringEngine(predictor, ScoringOptions(workers=2), RunStamp("r", AT),
                                worker_job=crash_on_poison).score(store, store.list_objects(), {})
    assert sorted(r.photo_key for r in rows) == sorted(files)
    by_key = {r.photo_key: r for r in rows}
    assert by_key["evil/poison.jpg"].reject_reason == "decoder_crash"
    assert all(by_key[f"u{i}/p.jpg"].status == "scored" for i in range(6))


def test_fast_path_equals_one_photo_at_a_time(predictor, face_files, broken_files):
    """Concurrent reads, worker processes and batches change nothing but speed."""

    files = {f"u{i}/{name}": data for i, (name, data) in enumerate(face_files.items())}
    files.update({f"b{i}/{name}": data for i, (name, (data, _)) in enumerate(broken_files.items())})
    store = memory_store("fastplain", files)
    fast, _ = ScoringEngine(predictor, ScoringOptions(workers=2, batch_size=5, read_chunk=7),
                            RunStamp("r", AT)).score(store, store.list_objects(), {})
    for row in fast:
        plain = prepare_photo(row.photo_key, files[row.photo_key], "sha", ChipRecipe(predictor.framing))
        assert plain.reject_reason == row.reject_reason, row.photo_key
        if plain.chip is not None:
            alone = float(predictor.predict(plain.chip[None]).p_male[0])
            assert abs(alone - row.p_male) < 1e-5, row.photo_key
            assert plain.box == row.face_box


def test_a_pool_that_cannot_start_fails_the_run_instead_of_rejecting_photos(predictor, face_files, monkeypatch):
    import gender_pipeline.engine.prepared as prepared
    from tests.crashing_decoder import broken_initializer

    monkeypatch.setattr(prepared, "init_worker", broken_initializer)
    store = memory_store("nopool", {f"u{i}/p.jpg": face_files["baseline.jpg"] for i in range(3)})
    with pytest.raises(RuntimeError, match="cannot start"):
        ScoringEngine(predictor, ScoringOptions(workers=2), RunStamp("r", AT)).score(store, store.list_objects(), {})


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["..", ".", "", "a", "ü", " ", "x.jpg", "/", "\\\\", "%2e%2e"]), min_size=1, max_size=6))
def test_user_ids_never_escape(parts):
    key = "/".join(parts)
    user = user_of(key)
    if user is not None:
        assert user not in ("", ".", "..") and "/" not in user
        assert ".." not in key.split("/") and not key.startswith("/")
