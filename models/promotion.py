"""The promotion gate: a challenger against production on the same held-out faces, per
attribute and per group, with paired tests.

A report here is `models.experiment.evaluate_predictor`'s with `keep_faces`: per face the
dataset index, gender right or not, the age error, whether the true age is known, and the
face's group in every group column (its true gender, and each extra column of the
dataset, ages in bands).

The gate (`decide_promotion`) blocks a challenger when, on the faces both answered,
- an attribute production answers is worse beyond noise overall (McNemar's exact test for
  gender, a paired test of the absolute errors for age, p < alpha), or is not answered; or
- any group of at least `min_group` faces is worse beyond noise within the group: the same
  paired test on that group's faces, its p adjusted by Holm's method over every group
  tested for that attribute (many groups make a chance drop likely in one of them), then
  compared with alpha;
and promotes it when none of these holds and at least one attribute gets better (or is new).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GATE_MIN_GROUP = 100  # groups of fewer faces in common are not tested: a drop there is noise
ALPHA = 0.05


def mcnemar_p(a_right: np.ndarray, b_right: np.ndarray) -> float:
    """Exact two-sided McNemar test on paired right/wrong outcomes."""
    a_right, b_right = np.asarray(a_right, dtype=bool), np.asarray(b_right, dtype=bool)
    b = int((a_right & ~b_right).sum())
    c = int((~a_right & b_right).sum())
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def paired_error_p(a_error: np.ndarray, b_error: np.ndarray) -> float:
    """Two-sided p of a paired t-test on absolute errors (normal approximation: n is the
    test split's hundreds of faces)."""
    d = np.asarray(a_error, dtype=np.float64) - np.asarray(b_error, dtype=np.float64)
    if len(d) < 2 or d.std(ddof=1) == 0:
        return 1.0 if len(d) < 2 or d.mean() == 0 else 0.0
    z = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return float(math.erfc(abs(z) / math.sqrt(2)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: each p multiplied by the number of hypotheses not yet
    rejected, kept monotone; compare the adjusted values with alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def faces_in_common(reports: list[dict]) -> np.ndarray:
    """The dataset indices of the faces every report (with `keep_faces`) evaluated, sorted."""
    common = set(reports[0]["faces"]["index"].tolist())
    for report in reports[1:]:
        common &= set(report["faces"]["index"].tolist())
    return np.array(sorted(common), dtype=np.int64)


def positions_on(report: dict, common: np.ndarray) -> np.ndarray:
    """Where each face of `common` stands in a report's per-face arrays."""
    position = {index: i for i, index in enumerate(report["faces"]["index"].tolist())}
    return np.array([position[i] for i in common.tolist()], dtype=np.int64)


def outcomes_on(report: dict, common: np.ndarray, key: str) -> np.ndarray:
    """A per-face outcome of a report (`correct`, `age_error`, `age_known`) on the faces `common`."""
    return np.asarray(report["faces"][key])[positions_on(report, common)]


def groups_on(report: dict, common: np.ndarray) -> dict[str, np.ndarray]:
    """Every face's group per group column, on the faces `common`."""
    at = positions_on(report, common)
    groups = report["faces"].get("groups") or {}
    return {column: np.asarray(values, dtype=object)[at] for column, values in groups.items()}


class Paired:
    """Both models' outcomes of one attribute on the faces both answered (and, for age,
    whose true age is known), with those faces' groups."""

    def __init__(self, candidate: dict, current: dict, key: str, mask_key: str | None = None):
        common = faces_in_common([candidate, current])
        keep = outcomes_on(candidate, common, mask_key).astype(bool) if mask_key else np.ones(len(common), bool)
        self.candidate = outcomes_on(candidate, common, key)[keep]
        self.current = outcomes_on(current, common, key)[keep]
        self.groups = {column: members[keep] for column, members in groups_on(candidate, common).items()}

    @classmethod
    def of(cls, candidate: dict, current: dict, key: str, mask_key: str | None = None) -> "Paired | None":
        """None when either report lacks the per-face outcomes."""
        if (candidate.get("faces") or {}).get(key) is None or (current.get("faces") or {}).get(key) is None:
            return None
        return cls(candidate, current, key, mask_key)


@dataclass(frozen=True)
class Attribute:
    """How the gate compares one attribute: the per-face outcome (and the mask of faces it
    counts on), the paired test, which way is better, and how figures and changes read."""

    key: str
    mask: str | None
    test: Callable[[np.ndarray, np.ndarray], float]
    test_name: str
    higher_is_better: bool
    figure: str
    shown: Callable[[float], str]
    change_shown: Callable[[float], str]

    def worse(self, change: float) -> bool:
        return change < 0 if self.higher_is_better else change > 0

    def better(self, change: float) -> bool:
        return change > 0 if self.higher_is_better else change < 0


ATTRIBUTES = {
    "gender": Attribute("correct", None, mcnemar_p, "McNemar", True, "accuracy", lambda x: f"{100 * x:.1f}%",
                        lambda x: f"{100 * x:+.1f} points"),
    "age": Attribute("age_error", "age_known", paired_error_p, "paired test", False, "MAE",
                     lambda x: f"{x:.2f} years", lambda x: f"{x:+.2f} years"),
}


def group_verdicts(attribute: str, pair: Paired, min_group: int = GATE_MIN_GROUP, alpha: float = ALPHA) -> list[dict]:
    """Every group of at least `min_group` faces, per column: both models' figure, the
    change, the paired test's p and Holm's adjusted p over all the groups tested; `worse`
    when the candidate is worse there beyond noise. Groups under `min_group` are listed
    with `tested: False`."""
    spec = ATTRIBUTES[attribute]
    rows = []
    for column, members in pair.groups.items():
        for group in sorted(set(members.tolist()), key=str):
            inside = members == group
            new, old = float(pair.candidate[inside].mean()), float(pair.current[inside].mean())
            tested = int(inside.sum()) >= min_group
            rows.append({"attribute": attribute, "column": column, "group": str(group), "faces": int(inside.sum()),
                         "candidate": new, "production": old, "change": new - old, "tested": tested,
                         "p": spec.test(pair.candidate[inside], pair.current[inside]) if tested else None})
    tested = [row for row in rows if row["tested"]]
    for row, adjusted in zip(tested, holm([row["p"] for row in tested])):
        row.update(p_holm=adjusted, worse=bool(spec.worse(row["change"]) and adjusted < alpha))
    return rows


def _group_line(row: dict) -> str:
    spec = ATTRIBUTES[row["attribute"]]
    return (f"{row['attribute']} {spec.figure} for {row['column']} {row['group']} ({row['faces']} faces): "
            f"{spec.shown(row['candidate'])} vs {spec.shown(row['production'])}, {spec.change_shown(row['change'])} "
            f"({spec.test_name} p={row['p']:.3g}, Holm-adjusted over {row['family']} groups {row['p_holm']:.3g})")


def decide_promotion(candidate: dict, current: dict, alpha: float = ALPHA, min_group: int = GATE_MIN_GROUP) -> dict:
    """Per attribute, on the same held-out images: an attribute production answers that
    the candidate answers worse beyond noise overall or in any group of at least
    `min_group` faces, or does not answer at all, blocks the promotion; at least one
    attribute must get better (or be new). The decision names every group that blocked
    it and by how much (`worse`, `groups`)."""
    verdicts, better, worse, groups = {}, [], [], []

    def judge(attribute: str, new: float, old: float, text: str) -> None:
        spec = ATTRIBUTES[attribute]
        pair = Paired.of(candidate, current, spec.key, spec.mask)
        change = new - old
        p = spec.test(pair.candidate, pair.current) if pair is not None else None
        verdicts[attribute] = {"candidate": new, "production": old, "change": change, "p": p}
        line = text + (f" (p={p:.3g})" if p is not None else "")
        if spec.worse(change) and (p is None or p < alpha):
            worse.append(line)
        elif spec.better(change):
            better.append(line)
        if pair is not None and pair.groups:
            rows = group_verdicts(attribute, pair, min_group, alpha)
            family = sum(row["tested"] for row in rows)
            for row in rows:
                row["family"] = family
                if row.get("worse"):
                    worse.append(_group_line(row))
            verdicts[attribute]["groups_tested"] = family
            groups.extend(rows)

    if "accuracy" in current or "accuracy" in candidate:
        if "accuracy" not in candidate:
            worse.append("gender (not answered)")
        elif "accuracy" in current:
            judge("gender", candidate["accuracy"], current["accuracy"],
                  f"gender accuracy {candidate['accuracy']:.4f} vs {current['accuracy']:.4f}")
    new_age, old_age = candidate.get("age", {}), current.get("age", {})
    if old_age.get("count") and not new_age.get("count"):
        worse.append("age (not answered)")
    elif new_age.get("count") and not old_age.get("count"):
        better.append(f"age is new (MAE {new_age['mae']:.2f} years)")
        verdicts["age"] = {"candidate": new_age["mae"], "production": None}
    elif new_age.get("count"):
        judge("age", new_age["mae"], old_age["mae"], f"age MAE {new_age['mae']:.2f} vs {old_age['mae']:.2f} years")
    promote = bool(better) and not worse
    images = candidate.get("images", "?")
    if promote:
        reason = f"{candidate['model']} promoted over {current['model']}: better: {'; '.join(better)}"
    elif worse:
        reason = f"{candidate['model']} not promoted over {current['model']}: worse: {'; '.join(worse)}"
    else:
        reason = f"{candidate['model']} not promoted over {current['model']}: no attribute got better"
    reason += f" (on the same {images} held-out images)"
    strip = (lambda report: {k: v for k, v in report.items() if k != "faces"})
    return {"promote": promote, "reason": reason, "attributes": verdicts, "better": better, "worse": worse,
            "groups": groups, "group_rule": {"min_faces": min_group, "alpha": alpha, "correction": "holm"},
            "candidate": strip(candidate), "production": strip(current),
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
