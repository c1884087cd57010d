from datetime import datetime, timezone

import pandas as pd
import pytest

from gender_pipeline.lake.history import PhotoResult, to_table
from gender_pipeline.night.checks import check_photo_metadata, check_predictions

AT = datetime(2026, 1, 1, tzinfo=timezone.utc)


def good_rows():
    scored = PhotoResult(user_id="u", photo_key="u/a.jpg", photo_sha256="h", status="scored", gender="female",
                         p_male=0.2, p_female=0.8, confidence=0.8, face_count=1, face_box=[0, 0, 9, 9],
                         model_name="m", model_version="1", scored_at=AT, run_id="r")
    rejected = PhotoResult.rejected("v", "v/b.jpg", "h2", "no_face")
    rejected.scored_at, rejected.run_id = AT, "r"
    return [scored, rejected]


def frame(rows):
    return to_table(rows).to_pandas()


def test_good_predictions_pass():
    assert check_predictions(frame(good_rows())).success
    with_age = frame(good_rows()).assign(age_years=[31.5, None], age_band=["25-34", None],
                                         age_confidence=[0.61, None])
    assert check_predictions(with_age).success
    unknown = with_age.assign(age_band=["unknown", None])  # under the age threshold: an answer too
    assert check_predictions(unknown).success


@pytest.mark.parametrize("breakage, rule", [
    (lambda f: f.assign(p_male=[1.5, None]), "between"),
    (lambda f: f.assign(p_female=[0.7, None]), "prob_sum_error"),
    (lambda f: f.assign(status=["maybe", "rejected"]), "in_set"),
    (lambda f: f.assign(gender=["woman", None]), "in_set"),
    (lambda f: f.assign(reject_reason=[None, "looked odd"]), "in_set"),
    (lambda f: pd.concat([f, f.iloc[:1]]), "unique"),
    (lambda f: f.assign(face_count=[0, 0]), "row_consistent"),
    (lambda f: f.assign(photo_key=[None, "v/b.jpg"]), "not_be_null"),
    # age, where the model answers it
    (lambda f: f.assign(age_years=[130.0, None], age_band=["65+", None], age_confidence=[0.5, None]), "between"),
    (lambda f: f.assign(age_years=[30.0, None], age_band=["thirties", None], age_confidence=[0.5, None]), "in_set"),
    (lambda f: f.assign(age_years=[30.0, None], age_band=["25-34", None], age_confidence=[1.5, None]), "between"),
    (lambda f: f.assign(age_years=[30.0, None], age_band=[None, None], age_confidence=[0.5, None]), "age_consistent"),
    (lambda f: f.assign(age_years=[30.0, 40.0], age_band=["25-34", "35-44"], age_confidence=[0.5, 0.4]),
     "age_consistent"),  # a rejected photo has no age
])
def test_broken_predictions_fail_with_a_readable_report(breakage, rule):
    report = check_predictions(breakage(frame(good_rows())))
    assert not report.success
    assert rule in report.text()


def test_photo_metadata_suite():
    ok = pd.DataFrame({"photo_key": ["u/a.jpg", "v/b.jpg"], "size_bytes": [10, 20]})
    assert check_photo_metadata(ok).success
    escaping = pd.DataFrame({"photo_key": ["u/../../etc/passwd", "v/b.jpg"], "size_bytes": [10, 20]})
    assert not check_photo_metadata(escaping).success
    duplicated = pd.DataFrame({"photo_key": ["u/a.jpg", "u/a.jpg"], "size_bytes": [10, 20]})
    assert not check_photo_metadata(duplicated).success
