"""Classification metrics, calibration, abstention and figures per group with their 95%
intervals, with numpy only.

Labels are 1 for male, 0 for female; scores are calibrated p_male.

Intervals (benchmarks/interval_coverage.py measures the choice): a share such as an
accuracy gets Wilson's score interval, which keeps close to 95% coverage for groups of
20 faces and accuracies near 1, where a percentile bootstrap covers less; the gap between
two groups' accuracies gets Newcombe's interval built from their two Wilson intervals. A
mean such as an MAE gets the normal interval of the mean (mean ± 1.96 standard errors),
and the gap between two groups' means Welch's (the standard errors added in quadrature).
"""

from __future__ import annotations

import math

import numpy as np

from gender_pipeline.lake.answers import AGE_BANDS, age_band_index

CLASSES = ("female", "male")
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
MIN_GROUP = 20  # a group of fewer faces is named as too small, and left out of the largest gap


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    i = 0
    while i < len(sorted_scores):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, low: float = 0.5,
                     bins: int = 15) -> list[tuple[float, float, int]]:
    """Equal-width confidence bins from `low` to 1 (the last one closed): for each bin
    with faces, (mean confidence, share right, faces)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct)
    edges = np.linspace(low, 1.0, bins + 1)
    out = []
    for k in range(bins):
        upper = confidence <= edges[k + 1] if k == bins - 1 else confidence < edges[k + 1]
        inside = (confidence >= edges[k]) & upper
        if inside.any():
            out.append((float(confidence[inside].mean()), float(correct[inside].mean()), int(inside.sum())))
    return out


def calibration_error(confidence: np.ndarray, correct: np.ndarray, low: float = 0.5, bins: int = 15) -> float:
    """Weighted gap between confidence and accuracy over equal-width confidence bins."""
    if len(confidence) == 0:
        return float("nan")
    return float(sum(count / len(confidence) * abs(right - mean)
                     for mean, right, count in reliability_bins(confidence, correct, low, bins)))


def expected_calibration_error(labels: np.ndarray, p_male: np.ndarray, bins: int = 15) -> float:
    """The calibration error of the gender answer (its confidence: max(p, 1 - p))."""
    labels, p_male = np.asarray(labels), np.asarray(p_male, dtype=np.float64)
    return calibration_error(np.maximum(p_male, 1 - p_male), (p_male >= 0.5).astype(int) == labels, 0.5, bins)


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int = 2) -> list[list[int]]:
    """Rows are the true class, columns the predicted class (CLASSES order by default)."""
    matrix = np.zeros((classes, classes), dtype=int)
    for t, p in zip(np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)):
        matrix[t, p] += 1
    return matrix.tolist()


def classification_report(labels: np.ndarray, p_male: np.ndarray, abstain_threshold: float = 0.5) -> dict:
    labels = np.asarray(labels, dtype=int)
    p_male = np.asarray(p_male, dtype=np.float64)
    predicted = (p_male >= 0.5).astype(int)
    report: dict = {"count": int(len(labels)),
                    "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan")}
    per_class = {}
    for index, name in enumerate(CLASSES):
        tp = int(((predicted == index) & (labels == index)).sum())
        fp = int(((predicted == index) & (labels != index)).sum())
        fn = int(((predicted != index) & (labels == index)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int((labels == index).sum())}
    report["per_class"] = per_class
    report["macro_f1"] = float(np.mean([c["f1"] for c in per_class.values()]))
    report["roc_auc"] = roc_auc(labels, p_male)
    report["ece"] = expected_calibration_error(labels, p_male)
    report["confusion_matrix"] = confusion(labels, predicted)
    confident = np.maximum(p_male, 1 - p_male) >= abstain_threshold
    report["abstain_threshold"] = abstain_threshold
    report["coverage"] = float(confident.mean()) if len(labels) else float("nan")
    report["accuracy_when_answering"] = (float((predicted[confident] == labels[confident]).mean())
                                         if confident.any() else float("nan"))
    return report


def banded(values: list, column: str = "") -> list[str]:
    """Numeric columns with many distinct values become bands: an `age` column the age
    bands the pipeline answers in (18-24, 25-34, …, 65+), others ten-wide bands ('20-29')."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return [str(v) for v in values]
    if column == "age":
        return [AGE_BANDS[i] for i in age_band_index(numbers)]
    if len(set(numbers)) <= 12:
        return [str(v) for v in values]
    return [f"{int(n // 10 * 10)}-{int(n // 10 * 10) + 9}" for n in numbers]


def wilson(successes: float, count: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a share `successes / count` (NaN for no count)."""
    if count <= 0:
        return float("nan"), float("nan")
    share, spread = float(successes) / count, z * z / count
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / count + spread / (4 * count)) / (1 + spread)
    return max(0.0, min(share, centre - half)), min(1.0, max(share, centre + half))  # rounding keeps the share inside


def share_difference(first: tuple[float, int], second: tuple[float, int], z: float = Z95) -> tuple[float, float]:
    """Newcombe's interval of the difference of two independent shares, each given as
    (successes, count): the first minus the second."""
    (k1, n1), (k2, n2) = first, second
    p1, p2 = float(k1) / n1, float(k2) / n2
    (low1, high1), (low2, high2) = wilson(k1, n1, z), wilson(k2, n2, z)
    difference = p1 - p2
    return (difference - math.sqrt((p1 - low1) ** 2 + (high2 - p2) ** 2),
            difference + math.sqrt((high1 - p1) ** 2 + (p2 - low2) ** 2))


def mean_interval(values: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """The normal interval of a mean: mean ± z standard errors (NaN under 2 values)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = z * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def mean_difference(first: np.ndarray, second: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """Welch's interval of the difference of two independent means: the first minus the second."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if len(first) < 2 or len(second) < 2:
        return float("nan"), float("nan")
    difference = first.mean() - second.mean()
    half = z * math.sqrt(first.var(ddof=1) / len(first) + second.var(ddof=1) / len(second))
    return float(difference - half), float(difference + half)


def per_group(values: np.ndarray, groups: dict[str, list], min_count: int = MIN_GROUP, metric: str = "accuracy",
              lower_is_better: bool = False, share: bool = True) -> dict:
    """The mean of `values` (per face: 1/0 for right or wrong with `share`, else an error in
    its unit) for every value of every group column with its 95% interval (`low`, `high`),
    and per column the largest gap between groups of at least `min_count` faces with its
    interval and the two groups it lies between (`max_gap_between`: the highest figure,
    then the lowest). Smaller groups keep their figure and interval, are marked
    `too_small`, and are named in the column's `too_small`: a gap over a handful of faces
    would be noise."""
    values = np.asarray(values, dtype=np.float64)
    out = {}
    for column, members in groups.items():
        members = np.asarray(banded(list(members), column))
        table, samples = {}, {}
        for value in sorted(set(members.tolist())):
            inside = (members == value) & ~np.isnan(values)
            if not inside.any():
                continue
            samples[value] = values[inside]
            count = int(inside.sum())
            low, high = wilson(samples[value].sum(), count) if share else mean_interval(samples[value])
            table[value] = {metric: float(samples[value].mean()), "count": count, "low": low, "high": high,
                            "too_small": count < min_count}
        measured = {k: v for k, v in table.items() if not v["too_small"]}
        out[column] = {"groups": table, "max_gap": 0.0, "max_gap_low": None, "max_gap_high": None,
                       "max_gap_between": None, "max_gap_over_groups_of_at_least": min_count,
                       "too_small": [k for k, v in table.items() if v["too_small"]]}
        if not measured:
            continue
        highest = max(measured, key=lambda k: (measured[k][metric], k))
        lowest = min(measured, key=lambda k: (measured[k][metric], k))
        out[column]["worst_group"] = highest if lower_is_better else lowest
        if highest == lowest:
            continue
        high_side, low_side = samples[highest], samples[lowest]
        low, high = (share_difference((high_side.sum(), len(high_side)), (low_side.sum(), len(low_side)))
                     if share else mean_difference(high_side, low_side))
        out[column].update(max_gap=float(high_side.mean() - low_side.mean()), max_gap_low=low, max_gap_high=high,
                           max_gap_between=[highest, lowest])
    return out


def group_figures(report: dict) -> list[tuple[str, dict]]:
    """The figures per group an evaluation report has, as (metric, `per_group` report):
    `accuracy` (gender), and `mae` (age, in years) for a model that answers age."""
    parts = [("accuracy", report.get("groups") or {}), ("mae", (report.get("age") or {}).get("groups_mae") or {})]
    return [(metric, part) for metric, part in parts if part]


def group_lines(report: dict, metric: str = "accuracy") -> list[str]:
    """Readable lines of a `per_group` report: every group's figure with its 95% interval
    and faces, the largest gap with its interval, the groups too small to compare. A
    share reads in percent and points, an MAE in its own unit."""
    percent = metric != "mae"
    scale, unit = (100, "%") if percent else (1, "")
    number = (lambda x: f"{scale * x:.1f}") if percent else (lambda x: f"{x:.2f}")
    gap_unit = " points" if percent else ""
    lines = []
    for column, part in report.items():
        cells = [f"{group} {number(v[metric])}{unit} ({number(v['low'])}-{number(v['high'])}, {v['count']} faces"
                 + (", too small" if v["too_small"] else "") + ")"
                 for group, v in part["groups"].items()]
        lines.append(f"{column}: " + "; ".join(cells))
        if part.get("max_gap_between"):
            highest, lowest = part["max_gap_between"]
            lines.append(f"  largest gap {number(part['max_gap'])}{gap_unit} (95% interval "
                         f"{number(part['max_gap_low'])} to {number(part['max_gap_high'])}), {highest} against "
                         f"{lowest}")
        if part["too_small"]:
            lines.append(f"  too small to compare (under {part['max_gap_over_groups_of_at_least']} faces): "
                         + ", ".join(part["too_small"]))
    return lines


def group_report(labels: np.ndarray, p_male: np.ndarray, groups: dict[str, list], min_count: int = MIN_GROUP) -> dict:
    """Gender accuracy for every value of every group column with its interval, and the
    largest gap per column between groups of at least `min_count` faces (per_group)."""
    correct = ((np.asarray(p_male) >= 0.5).astype(int) == np.asarray(labels, dtype=int)).astype(np.float64)
    return per_group(correct, groups, min_count)


def age_report(true_ages: np.ndarray, years: np.ndarray, confidence: np.ndarray, abstain_threshold: float,
               groups: dict[str, list] | None = None, min_count: int = MIN_GROUP, bins: int = 10) -> dict:
    """Age metrics over the faces whose true age is known (>= 0): mean absolute error in
    years (all, and adults), accuracy of the age band (exact, and within one band), the
    band confusion matrix, calibration of the band's confidence (ECE), coverage and band
    accuracy at the abstain threshold, and MAE and band accuracy per group."""
    true_ages, years = np.asarray(true_ages, dtype=np.float64), np.asarray(years, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    known = true_ages >= 0
    true_ages, years, confidence = true_ages[known], years[known], confidence[known]
    groups = {k: [v for v, keep in zip(values, known) if keep] for k, values in (groups or {}).items()}
    if not len(true_ages):
        return {"count": 0}
    error = np.abs(years - true_ages)
    true_band, band = age_band_index(true_ages), age_band_index(years)
    correct = (band == true_band).astype(np.float64)
    adults = true_ages >= 18
    answering = confidence >= abstain_threshold
    report = {
        "count": int(len(true_ages)), "mae": float(error.mean()),
        "mae_adults": float(error[adults].mean()) if adults.any() else float("nan"),
        "median_error": float(np.median(error)),
        "band_accuracy": float(correct.mean()),
        "band_accuracy_within_one": float((np.abs(band - true_band) <= 1).mean()),
        "band_confusion": confusion(true_band, band, len(AGE_BANDS)), "bands": list(AGE_BANDS),
        "band_ece": calibration_error(confidence, correct, 0.0, bins),
        "abstain_threshold": float(abstain_threshold), "coverage": float(answering.mean()),
        "band_accuracy_when_answering": float(correct[answering].mean()) if answering.any() else float("nan"),
        "mean_error": float((years - true_ages).mean()),  # > 0: the model guesses older
    }
    if groups:
        report["groups_mae"] = per_group(error, groups, min_count, "mae", lower_is_better=True, share=False)
        report["groups_band_accuracy"] = per_group(correct, groups, min_count, "band_accuracy")
    return report


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimizing the negative log likelihood of sigmoid(logit / T),
    by golden-section search on log T (deterministic, no optimizer state)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(logits) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, z) - labels * z))

    return float(math.exp(golden_section_minimum(nll, math.log(0.05), math.log(20.0), 80)))


def golden_section_minimum(f, low: float, high: float, iterations: int) -> float:
    """Where the unimodal `f` is smallest in [low, high]: golden-section search, one new
    evaluation per iteration (deterministic, no optimizer state)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = f(a), f(b)
    for _ in range(iterations):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = f(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = f(b)
    return (low + high) / 2


def threshold_for_coverage(p_male: np.ndarray, coverage: float) -> float:
    """The confidence threshold that keeps at least `coverage` of the answers."""
    if not 0 < coverage <= 1:
        raise ValueError(f"target coverage must be in (0, 1], got {coverage}")
    confidence = np.sort(np.maximum(np.asarray(p_male), 1 - np.asarray(p_male)))
    if len(confidence) == 0 or coverage == 1:
        return 0.5
    index = int(math.floor((1 - coverage) * len(confidence)))
    return float(max(0.5, confidence[index]))
