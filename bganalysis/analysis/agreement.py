"""Agreement between every pair of risk estimators, and of each estimator with the lab's true roles.

Each estimator gives a score per position, oriented so that a larger value means more
risk. Every score is labelled Bridge / Garden the same way as kappa (same fractions and
scope), and every pair of scores is compared three ways: Spearman rho of the scores,
and the Jaccard overlap |A ∩ B| / |A ∪ B| of their Bridge sets and of their Garden sets.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd
from scipy.stats import spearmanr

from bganalysis.analysis.labels import label_frame, set_agreement

# Proxies oriented so that a larger value means more risk: a confident teacher (high p_max,
# wide margin, low entropy) marks a position with one right token, as at lab Bridges. On real
# text the sign of the correlation with kappa can come out negative; summary.json stores it.
PROXY_RISK_SCORES = {"teacher_pmax": 1.0, "teacher_margin": 1.0, "teacher_entropy": -1.0}


def estimator_scores(positions: pd.DataFrame, ranking: str = "kappa") -> dict[str, pd.Series]:
    """Return the risk score of each estimator present in `positions`, larger = riskier.

    `ranking` (kappa, kappa_abs or kappa_spread) picks the column of the kappa estimators:
    Monte-Carlo `kappa`, `teacher_only` and, on the lab, `exact`.
    """
    columns = {"kappa": ranking, "teacher_only": f"teacher_only_{ranking}", "exact": f"exact_{ranking}"}
    scores = {name: positions[column] for name, column in columns.items() if _has_values(positions, column)}
    for proxy, sign in PROXY_RISK_SCORES.items():
        if _has_values(positions, proxy):
            scores[proxy] = sign * positions[proxy]
    return scores


def _has_values(positions: pd.DataFrame, column: str) -> bool:
    """Return whether `column` exists and is not all NaN (an estimator that `--estimators` left out)."""
    return column in positions and bool(positions[column].notna().any())


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rho, or NaN when fewer than 3 positions or either side is constant."""
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def jaccard(a: pd.Series, b: pd.Series, label: str) -> float:
    """Jaccard overlap of the positions labelled `label` in `a` and in `b`; NaN when both are empty."""
    in_a, in_b = a == label, b == label
    union = float((in_a | in_b).sum())
    return float((in_a & in_b).sum()) / union if union else math.nan


def estimator_agreement(positions: pd.DataFrame, ranking: str, bridge_fraction: float, garden_fraction: float,
                        scope: str) -> dict:
    """Return pairwise agreement of all estimators, and each one's Bridge/Garden F1 against true roles.

    The result has `pairs` keyed "a|b" (Spearman rho, Bridge and Garden Jaccard overlaps)
    and, on the lab, `vs_true_role` keyed by estimator (precision, recall and F1 of its
    Bridge and Garden sets).
    """
    scores = estimator_scores(positions, ranking)
    labels = {}
    for name, score in scores.items():
        frame = positions[["doc_id", "position"]].assign(score=score.to_numpy())
        labels[name], _ = label_frame(frame, "score", bridge_fraction, garden_fraction, scope)

    pairs = {}
    for first, second in itertools.combinations(scores, 2):
        pairs[f"{first}|{second}"] = {
            "spearman": spearman(scores[first], scores[second]),
            "bridge_overlap": jaccard(labels[first], labels[second], "bridge"),
            "garden_overlap": jaccard(labels[first], labels[second], "garden"),
        }
    result = {"estimators": list(scores), "overlap": "jaccard", "pairs": pairs}
    if "true_role" in positions:
        result["vs_true_role"] = {name: {label: set_agreement(labels[name], positions.true_role, label)
                                         for label in ("bridge", "garden")}
                                  for name in scores}
    return result
