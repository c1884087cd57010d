"""The promotion gate protects every group: a challenger better overall but worse beyond
noise on one group of at least 100 test faces is not promoted, and the decision names the
group and the change."""

import json

import numpy as np
import pytest

from gender_pipeline.models.promotion import decide_promotion, holm, mcnemar_p

RACES = ["white"] * 500 + ["black"] * 250 + ["other"] * 160 + ["asian"] * 90  # asian: under the gate's 100


def _report(model: str, correct: np.ndarray, age_error: np.ndarray | None = None) -> dict:
    n = len(correct)
    report = {"model": model, "accuracy": float(np.mean(correct)), "images": n, "evaluated": n,
              "faces": {"index": np.arange(n), "correct": np.asarray(correct, bool),
                        "age_error": age_error, "age_known": None if age_error is None else np.ones(n, bool),
                        "groups": {"gender": np.array(["female", "male"] * (n // 2), dtype=object),
                                   "race": np.array(RACES, dtype=object)}}}
    if age_error is not None:
        report["age"] = {"count": n, "mae": float(np.mean(age_error))}
    return report


@pytest.fixture()
def production():
    rng = np.random.default_rng(3)
    return rng.random(len(RACES)) < 0.93  # right on about 93% of the faces


def _made_worse_on(correct: np.ndarray, race: str, faces: int, better_elsewhere: int = 40) -> np.ndarray:
    """Production's answers, improved on `better_elsewhere` faces of white and black people and
    made wrong on `faces` faces of `race` that production answers right."""
    candidate = correct.copy()
    races = np.array(RACES)
    wrong_elsewhere = np.flatnonzero(~correct & np.isin(races, ["white", "black"]))
    candidate[wrong_elsewhere[:better_elsewhere]] = True
    right_there = np.flatnonzero(correct & (races == race))
    candidate[right_there[:faces]] = False
    return candidate


def test_a_model_worse_on_one_group_is_not_promoted(production):
    candidate = _made_worse_on(production, "other", 16)
    assert candidate.mean() > production.mean()  # better overall: the old gate promoted it
    decision = decide_promotion(_report("new@2", candidate), _report("prod@1", production))
    assert not decision["promote"]
    other = next(row for row in decision["groups"] if row["column"] == "race" and row["group"] == "other")
    assert other["faces"] == 160 and other["tested"] and other["worse"]
    assert other["change"] == pytest.approx(-16 / 160)
    assert other["p"] == pytest.approx(mcnemar_p(candidate[750:910], production[750:910]))
    assert other["p_holm"] < 0.05 and other["family"] == 5  # female, male, white, black, other
    assert "gender accuracy for race other (160 faces)" in decision["reason"]
    assert "-10.0 points" in decision["reason"] and "Holm-adjusted over 5 groups" in decision["reason"]
    assert not any(row["worse"] for row in decision["groups"] if row["tested"] and row["group"] != "other")
    json.dumps(decision, default=float)  # promotion.json


def test_a_group_under_100_faces_is_named_but_not_tested(production):
    candidate = _made_worse_on(production, "asian", 16)
    decision = decide_promotion(_report("new@2", candidate), _report("prod@1", production))
    asian = next(row for row in decision["groups"] if row["group"] == "asian")
    assert asian["faces"] == 90 and not asian["tested"] and asian["p"] is None
    assert decision["promote"], decision["reason"]


def test_a_drop_within_noise_does_not_block(production):
    candidate = _made_worse_on(production, "other", 2)
    decision = decide_promotion(_report("new@2", candidate), _report("prod@1", production))
    assert decision["promote"], decision["reason"]


def test_holm_keeps_a_lone_small_p_from_blocking(production):
    """Six answers lost in one group: p = 0.031 on its own, 0.12 once corrected for the five
    groups tested (the ten answers won among white people are the one smaller p)."""
    candidate = _made_worse_on(production, "other", 6, better_elsewhere=10)
    decision = decide_promotion(_report("new@2", candidate), _report("prod@1", production))
    other = next(row for row in decision["groups"] if row["group"] == "other")
    assert other["p"] < 0.05 <= other["p_holm"] and not other["worse"]
    assert decision["promote"], decision["reason"]


def test_age_worse_on_one_group_blocks():
    rng = np.random.default_rng(5)
    correct = rng.random(len(RACES)) < 0.93
    errors = np.abs(rng.normal(0, 6, len(RACES)))
    candidate = errors * 0.7  # better everywhere...
    candidate[np.array(RACES) == "black"] += 3.0  # ...but three years worse for black people
    decision = decide_promotion(_report("new@2", correct, candidate), _report("prod@1", correct, errors))
    assert not decision["promote"]
    assert "age MAE for race black (250 faces)" in decision["reason"] and "years" in decision["reason"]


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []
    assert holm([0.5]) == [0.5]


def test_compare_models_prints_intervals_and_the_gates_verdict(production, capsys):
    """benchmarks/compare_models.py's tables, on two reports of the same faces."""
    from benchmarks.compare_models import gate_verdicts, gender_table
    from gender_pipeline.models.metrics import classification_report, group_report

    labels = np.arange(len(RACES)) % 2
    runs = []
    for name, correct in (("prod@1", production), ("new@2", _made_worse_on(production, "other", 16))):
        p_male = np.where(correct, labels, 1 - labels) * 0.8 + 0.1
        report = _report(name, correct)
        report.update(classification_report(labels, p_male), images_per_second=10.0,
                      groups=group_report(labels, p_male, {"race": RACES}))
        runs.append((name, report))
    gender_table(runs, len(RACES))
    gate_verdicts(runs)
    out = capsys.readouterr().out
    assert "| race | other | 91.9 (86.6–95.2), 160 | 81.9 (75.2–87.1), 160 |" in out
    assert "asian − other" in out or "white − other" in out or "black − other" in out  # the gap names its groups
    assert "- new@2: new@2 not promoted over prod@1: worse: gender accuracy for race other (160 faces)" in out
    assert "race other (160 faces): 0.8187 vs 0.9187, change -0.1000" in out and "— blocks" in out
