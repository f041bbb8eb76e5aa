"""Bridge/Garden labels from a risk ranking, and agreement between label sets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# The kappa estimators `analyze --estimators` can run, in the order that picks the one labels rank by:
# name -> (prefix of its kappa, kappa_abs and kappa_spread columns in the position table, display name).
KAPPA_ESTIMATORS = {"monte_carlo": ("", "Monte-Carlo kappa"), "teacher_only": ("teacher_only_", "teacher-only kappa")}


def estimator_column(estimator: str, ranking: str = "kappa") -> str:
    """Return the position-table column of `estimator`'s `ranking` (kappa, kappa_abs or kappa_spread)."""
    return KAPPA_ESTIMATORS[estimator][0] + ranking


def label_by_rank(values: np.ndarray, bridge_fraction: float, garden_fraction: float) -> tuple[np.ndarray, float, float]:
    """Label the top `bridge_fraction` of `values` Bridge and the bottom `garden_fraction` Garden.

    Returns (labels as an object array of "bridge" / "garden" / "", the smallest Bridge
    value, the largest Garden value). Ties keep position order (stable sort).
    """
    n = len(values)
    labels = np.full(n, "", dtype=object)
    if n == 0:
        return labels, math.nan, math.nan
    order = np.argsort(-np.asarray(values, dtype=float), kind="stable")
    num_bridge = math.floor(bridge_fraction * n + 0.5)  # half-up rounding, not Python's half-to-even
    num_garden = min(math.floor(garden_fraction * n + 0.5), n - num_bridge)
    labels[order[:num_bridge]] = "bridge"
    if num_garden:
        labels[order[n - num_garden:]] = "garden"
    bridge_min = float(values[order[num_bridge - 1]]) if num_bridge else math.nan
    garden_max = float(values[order[n - num_garden]]) if num_garden else math.nan
    return labels, bridge_min, garden_max


def label_frame(frame: pd.DataFrame, column: str, bridge_fraction: float, garden_fraction: float,
                scope: str = "document") -> tuple[pd.Series, dict]:
    """Label every row of `frame` by ranking `column` per document or per aligned position.

    Returns the labels (aligned with `frame.index`) and the thresholds used, keyed by
    document id or position.
    """
    group_key = {"document": "doc_id", "position": "position"}[scope]
    labels = pd.Series("", index=frame.index, dtype=object)
    thresholds = {}
    for key, group in frame.groupby(group_key, sort=False):
        group_labels, bridge_min, garden_max = label_by_rank(group[column].to_numpy(), bridge_fraction, garden_fraction)
        labels.loc[group.index] = group_labels
        thresholds[str(key)] = {"bridge_min": bridge_min, "garden_max": garden_max}
    return labels, thresholds


def set_agreement(predicted: pd.Series, reference: pd.Series, label: str) -> dict[str, float]:
    """Precision, recall and F1 of the positions labelled `label` against a reference."""
    predicted_set = predicted == label
    reference_set = reference == label
    hits = float((predicted_set & reference_set).sum())
    predicted_count, reference_count = float(predicted_set.sum()), float(reference_set.sum())
    precision = hits / predicted_count if predicted_count else math.nan
    recall = hits / reference_count if reference_count else math.nan
    total = predicted_count + reference_count
    f1 = 2 * hits / total if predicted_count and reference_count else math.nan
    return {"precision": precision, "recall": recall, "f1": f1}
