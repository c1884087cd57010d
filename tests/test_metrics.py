import math

import numpy as np
import pytest

from gender_pipeline.models.metrics import (classification_report, expected_calibration_error, fit_temperature,
                                            group_report, roc_auc, threshold_for_coverage)


def test_hand_checked_example():
    # 6 faces: labels (1 = male) and calibrated p_male.
    labels = np.array([1, 1, 1, 0, 0, 0])
    p_male = np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.1])
    report = classification_report(labels, p_male, abstain_threshold=0.7)
    # predicted: 1 1 0 0 1 0 -> correct: T T F T F T
    assert report["accuracy"] == pytest.approx(4 / 6)
    male = report["per_class"]["male"]  # tp=2 fp=1 fn=1
    assert male["precision"] == pytest.approx(2 / 3) and male["recall"] == pytest.approx(2 / 3)
    female = report["per_class"]["female"]  # tp=2 fp=1 fn=1
    assert female["f1"] == pytest.approx(2 / 3)
    assert report["confusion_matrix"] == [[2, 1], [1, 2]]
    # ROC-AUC: pairs (male, female) ranked right: 0.9>all(3), 0.8>all(3), 0.4>0.3,0.1 (2) -> 8/9
    assert report["roc_auc"] == pytest.approx(8 / 9)
    # confidence: .9 .8 .6 .7 .6 .9 -> at >= 0.7: faces 0, 1, 3, 5 answered, all correct
    assert report["coverage"] == pytest.approx(4 / 6)
    assert report["accuracy_when_answering"] == 1.0


def test_roc_auc_ties_and_degenerate():
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_ece_of_a_perfectly_calibrated_bin():
    labels = np.array([1] * 8 + [0] * 2)
    p_male = np.full(10, 0.8)
    assert expected_calibration_error(labels, p_male) == pytest.approx(0.0)
    assert expected_calibration_error(np.ones(10, int), p_male) == pytest.approx(0.2)


def test_temperature_recovers_an_overconfident_scale():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3, rel=0.08)


def test_threshold_for_coverage():
    p_male = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.05, 0.15, 0.25, 0.45])
    threshold = threshold_for_coverage(p_male, 0.8)
    confidence = np.maximum(p_male, 1 - p_male)
    assert (confidence >= threshold).mean() >= 0.8
    with pytest.raises(ValueError):
        threshold_for_coverage(p_male, 0)


def test_group_gaps():
    out = group_report(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.1, 0.1]),
                       {"age": ["young", "young", "old", "old"]}, min_count=2)
    assert out["age"]["groups"]["young"]["accuracy"] == 1.0
    assert out["age"]["groups"]["old"]["accuracy"] == 0.5
    assert out["age"]["max_gap"] == 0.5


def test_numeric_columns_become_bands():
    ages = [str(a) for a in range(15, 45)]
    out = group_report(np.ones(30, int), np.full(30, 0.9), {"age": ages, "race": ["a", "b"] * 15,
                                                           "height": [str(150 + a) for a in range(30)]})
    assert sorted(out["age"]["groups"]) == ["0-17", "18-24", "25-34", "35-44"]  # the bands the pipeline answers in
    assert sorted(out["height"]["groups"]) == ["150-159", "160-169", "170-179"]
    assert sorted(out["race"]["groups"]) == ["a", "b"]


def test_age_report():
    from gender_pipeline.models.metrics import age_report

    true = np.array([20, 30, 40, 70, -1])  # -1: no age in the label
    years = np.array([22.0, 30.0, 50.0, 66.0, 5.0])
    confidence = np.array([0.9, 0.8, 0.3, 0.6, 0.9])
    report = age_report(true, years, confidence, 0.5, {"gender": ["f", "m", "m", "f", "f"]}, min_count=1)
    assert report["count"] == 4 and report["mae"] == pytest.approx((2 + 0 + 10 + 4) / 4)
    assert report["band_accuracy"] == pytest.approx(3 / 4)  # 40 -> 50 leaves its band
    assert report["coverage"] == pytest.approx(3 / 4) and report["band_accuracy_when_answering"] == 1.0
    assert report["groups_mae"]["gender"]["groups"]["f"]["mae"] == pytest.approx(3.0)
    assert report["groups_mae"]["gender"]["worst_group"] == "m" and report["groups_mae"]["gender"]["max_gap"] == 2.0
    assert sum(map(sum, report["band_confusion"])) == 4


def test_tiny_groups_do_not_make_the_gap():
    labels = np.ones(25, int)
    p_male = np.array([0.9] * 21 + [0.1] * 4)
    out = group_report(labels, p_male, {"race": ["a"] * 21 + ["b"] * 4})
    assert out["race"]["groups"]["b"]["accuracy"] == 0.0 and out["race"]["max_gap"] == 0.0


def test_wilson_interval():
    from gender_pipeline.models.metrics import wilson

    low, high = wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # the textbook value
    low, high = wilson(180, 190)
    assert low < 180 / 190 < high and (low, high) == pytest.approx((0.9058, 0.9712), abs=1e-4)
    assert wilson(20, 20)[1] == 1.0 and wilson(20, 20)[0] == pytest.approx(0.8389, abs=1e-4)
    assert all(np.isnan(wilson(0, 0)))


def test_difference_intervals():
    from gender_pipeline.models.metrics import mean_difference, mean_interval, share_difference

    low, high = share_difference((56, 70), (48, 80))  # Newcombe (1998), example (d): 0.2 [0.0524, 0.3339]
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    values = np.array([1.0, 2.0, 3.0, 4.0])
    low, high = mean_interval(values)
    assert (low + high) / 2 == pytest.approx(2.5) and high - low == pytest.approx(2 * 1.96 * values.std(ddof=1) / 2,
                                                                                  rel=1e-3)
    low, high = mean_difference(values + 10, values)
    assert low < 10 < high and all(np.isnan(mean_interval(values[:1])))


def test_every_group_has_an_interval_and_small_groups_are_named():
    labels = np.ones(125, int)
    p_male = np.array([0.9] * 95 + [0.1] * 5 + [0.9] * 20 + [0.1] * 5)
    out = group_report(labels, p_male, {"race": ["a"] * 100 + ["b"] * 20 + ["c"] * 5})["race"]
    assert out["too_small"] == ["c"] and out["groups"]["c"]["too_small"] and not out["groups"]["b"]["too_small"]
    a, b = out["groups"]["a"], out["groups"]["b"]
    assert a["low"] < a["accuracy"] == 0.95 < a["high"] and b["accuracy"] == 1.0 == b["high"] and b["low"] < 1
    assert out["max_gap_between"] == ["b", "a"] and out["max_gap"] == pytest.approx(0.05)
    assert out["max_gap_low"] < 0 < 0.05 < out["max_gap_high"]  # 5 points over 20 faces: within noise
    from gender_pipeline.models.metrics import group_lines

    text = "\n".join(group_lines({"race": out}))
    assert "a 95.0% (88.8-97.8, 100 faces)" in text and "c 0.0% (0.0-43.4, 5 faces, too small)" in text
    assert "largest gap 5.0 points (95% interval" in text and "b against a" in text
    assert "too small to compare (under 20 faces): c" in text


def test_age_groups_have_mean_intervals():
    from gender_pipeline.models.metrics import age_report

    rng = np.random.default_rng(0)
    true = rng.integers(20, 60, 200).astype(float)
    years = true + rng.normal(0, 5, 200)
    report = age_report(true, years, np.full(200, 0.9), 0.5, {"gender": ["f", "m"] * 100})
    part = report["groups_mae"]["gender"]
    for v in part["groups"].values():
        assert v["low"] < v["mae"] < v["high"] and v["high"] - v["low"] < 2
    assert part["max_gap_low"] < part["max_gap"] < part["max_gap_high"]
