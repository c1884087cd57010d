"""The retrain report's pictures (PNG bytes): the confusion matrix, the learning curves,
a grid of faces captioned with the answer, the age plots, the reliability diagrams."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from gender_pipeline.lake.answers import age_band_index
from gender_pipeline.models.metrics import group_figures, reliability_bins

if TYPE_CHECKING:
    from gender_pipeline.models.experiment import RunResult


def _pyplot():
    """matplotlib's pyplot on the Agg backend (lazy: a third of a second, for the report only)."""
    import matplotlib  # lazy: see the docstring

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt


def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def plot_confusion(matrix: list[list[int]], title: str) -> bytes:
    plt = _pyplot()

    figure, axis = plt.subplots(figsize=(3.6, 3.2))
    axis.imshow(np.asarray(matrix), cmap="Blues")
    for i in range(2):
        for j in range(2):
            axis.text(j, i, str(matrix[i][j]), ha="center", va="center")
    axis.set_xticks([0, 1], ["Female", "Male"])
    axis.set_yticks([0, 1], ["Female", "Male"])
    axis.set_xlabel("Predicted")
    axis.set_ylabel("True")
    axis.set_title(title)
    return _figure_bytes(figure)


def plot_curves(results: list["RunResult"]) -> bytes:
    plt = _pyplot()

    with_age = any(r.age is not None for r in results)
    panels = (("loss", "loss"), ("acc", "gender accuracy")) + ((("mae", "age MAE (years)"),) if with_age else ())
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    for result in results:
        epochs = [h["epoch"] for h in result.history]
        for axis, (key, _) in zip(axes, panels):
            if key == "loss" and with_age:  # the validation side is the selection score
                line, = axis.plot(epochs, [h["train_loss"] for h in result.history], label=f"{result.name} train")
                continue
            line, = axis.plot(epochs, [h[f"train_{key}"] for h in result.history], label=f"{result.name} train")
            axis.plot(epochs, [h[f"val_{key}"] for h in result.history], "--", color=line.get_color(),
                      label=f"{result.name} val")
            if result.age is not None and key in ("acc", "mae"):
                axis.axvline(result.age.best_epoch, color=line.get_color(), linewidth=0.6, alpha=0.5)
    for axis, (_, title) in zip(axes, panels):
        axis.set_title(title)
        axis.set_xlabel("epoch")
    axes[1].legend(fontsize=7)
    return _figure_bytes(figure)


def plot_face_grid(chips: np.ndarray, labels: np.ndarray, p_male: np.ndarray, count: int = 12,
                   ages: np.ndarray | None = None, bands: list[str] | None = None,
                   band_confidence: np.ndarray | None = None, true_ages: np.ndarray | None = None) -> bytes:
    """Faces captioned like the study: "Pred: Female (70.5%) / True: Female"; a model
    that answers age adds it: "Pred: Female (97.1%), 25-34 (61%, 29 y) / True: Female, 27"."""
    plt = _pyplot()

    count = min(count, len(chips))
    columns = 4
    rows = max(1, (count + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.6, rows * 2.9))
    for index, axis in enumerate(np.asarray(axes).reshape(-1)):
        axis.axis("off")
        if index >= count:
            continue
        male = p_male[index] >= 0.5
        confidence = p_male[index] if male else 1 - p_male[index]
        axis.imshow(chips[index])
        predicted = f"Pred: {'Male' if male else 'Female'} ({100 * confidence:.1f}%)"
        true = f"True: {'Male' if labels[index] else 'Female'}"
        if ages is not None:
            predicted += f", {bands[index]} ({100 * band_confidence[index]:.0f}%, {ages[index]:.0f} y)"
            if true_ages is not None and true_ages[index] >= 0:
                true += f", {true_ages[index]:.0f}"
        axis.set_title(f"{predicted}\n{true}", fontsize=7 if ages is not None else 8)
    return _figure_bytes(figure)


def plot_age(true_ages: np.ndarray, years: np.ndarray, report: dict, title: str) -> bytes:
    """Predicted against true age (with the identity line), the error per true age band,
    and the band confusion matrix."""
    plt = _pyplot()

    known = np.asarray(true_ages) >= 0
    figure, (scatter, errors, matrix_axis) = plt.subplots(1, 3, figsize=(14, 4.2))
    scatter.scatter(np.asarray(true_ages)[known], np.asarray(years)[known], s=4, alpha=0.4)
    scatter.plot([0, 100], [0, 100], color="black", linewidth=0.8)
    scatter.set_xlabel("true age")
    scatter.set_ylabel("predicted age")
    scatter.set_title(f"{title}: MAE {report['mae']:.2f} years")
    by_band = report.get("groups_mae", {}).get("age", {}).get("groups", {})
    names = [b for b in report["bands"] if b in by_band]
    values = np.array([by_band[b]["mae"] for b in names])
    spread = np.nan_to_num(np.maximum(0, np.array([[by_band[b]["mae"] - by_band[b]["low"] for b in names],
                                                   [by_band[b]["high"] - by_band[b]["mae"] for b in names]])
                                      .reshape(2, -1)))
    errors.bar(names, values, yerr=spread, capsize=3, ecolor="black",
               color=["lightgray" if by_band[b]["too_small"] else "C0" for b in names])
    for i, b in enumerate(names):
        errors.text(i, values[i] + spread[1, i], f"{by_band[b]['count']}", ha="center", va="bottom", fontsize=7)
    errors.set_title("MAE by true age band, 95% intervals\n(faces above the bars; grey: too few to compare)",
                     fontsize=9)
    errors.set_ylabel("years")
    matrix = np.asarray(report["band_confusion"])
    matrix_axis.imshow(matrix, cmap="Blues")
    for i in range(len(matrix)):
        for j in range(len(matrix)):
            if matrix[i, j]:
                matrix_axis.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7)
    matrix_axis.set_xticks(range(len(report["bands"])), report["bands"], rotation=45, fontsize=7)
    matrix_axis.set_yticks(range(len(report["bands"])), report["bands"], fontsize=7)
    matrix_axis.set_xlabel("predicted band")
    matrix_axis.set_ylabel("true band")
    matrix_axis.set_title(f"age bands: {100 * report['band_accuracy']:.1f}% exact")
    return _figure_bytes(figure)


def plot_calibration(labels: np.ndarray, p_male: np.ndarray, true_ages: np.ndarray, years: np.ndarray,
                     band_confidence: np.ndarray, bins: int = 10) -> bytes:
    """Reliability diagrams: how often the answer is right against the confidence given,
    for gender and for the age band."""
    plt = _pyplot()

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    confidence = np.maximum(p_male, 1 - p_male)
    correct = (np.asarray(p_male) >= 0.5).astype(int) == np.asarray(labels)
    known = np.asarray(true_ages) >= 0
    band_correct = age_band_index(np.asarray(years)[known]) == age_band_index(np.asarray(true_ages)[known])
    for axis, conf, right, low, title in ((axes[0], confidence, correct, 0.5, "gender"),
                                          (axes[1], np.asarray(band_confidence)[known], band_correct, 0.0,
                                           "age band")):
        points = reliability_bins(conf, right, low, bins)  # (mean confidence, share right, faces)
        axis.plot([low, 1], [low, 1], color="black", linewidth=0.8)
        axis.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o")
        for x, y, n in points:
            axis.annotate(str(n), (x, y), fontsize=6, textcoords="offset points", xytext=(0, 4))
        axis.set_xlabel("confidence given")
        axis.set_ylabel("share right")
        axis.set_title(f"{title}: calibration (faces per point)")
    return _figure_bytes(figure)


def plot_groups(report: dict, title: str) -> bytes:
    """Every group's figure with its 95% interval, one panel per group column: gender
    accuracy (top row) and, for a model that answers age, age MAE (bottom row). Each
    panel's title gives the largest gap with its interval; groups too small to compare are
    grey and say so."""
    plt = _pyplot()

    labels = {"accuracy": ("gender accuracy, %", 100), "mae": ("age MAE, years", 1)}  # the axis, the scale
    rows = [(metric, *labels[metric], part) for metric, part in group_figures(report)]
    if not rows:
        figure, axis = plt.subplots(figsize=(6, 1.5))
        axis.axis("off")
        axis.text(0.5, 0.5, f"{title}: the data has no group columns", ha="center", va="center")
        return _figure_bytes(figure)
    columns = max(len(part) for _, _, _, part in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(4.6 * columns, 0.5 + 2.9 * len(rows)), squeeze=False)
    for r, (metric, label, scale, part) in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            if c >= len(part):
                axis.axis("off")
                continue
            column, column_report = list(part.items())[c]
            groups = list(column_report["groups"].items())
            for y, (group, v) in enumerate(groups):
                colour = "gray" if v["too_small"] else "C0"
                value = scale * v[metric]
                spread = np.nan_to_num(np.maximum(0, [[value - scale * v["low"]], [scale * v["high"] - value]]))
                axis.errorbar(value, y, xerr=spread, fmt="o", color=colour, capsize=3)
            axis.set_yticks(range(len(groups)), [f"{g} ({v['count']}{', too small' if v['too_small'] else ''})"
                                                 for g, v in groups], fontsize=8)
            axis.invert_yaxis()
            axis.set_xlabel(label, fontsize=8)
            axis.grid(axis="x", alpha=0.3)
            heading = column
            if column_report.get("max_gap_between"):
                unit = " points" if metric == "accuracy" else " y"
                low, high = scale * column_report["max_gap_low"], scale * column_report["max_gap_high"]
                heading += (f": largest gap {scale * column_report['max_gap']:.1f}{unit}\n(95% interval "
                            f"{low:.1f} to {high:.1f})")
            axis.set_title(heading, fontsize=9)
    figure.suptitle(f"{title}: per group, 95% intervals (faces in brackets)", fontsize=10)
    figure.tight_layout()
    return _figure_bytes(figure)
