"""Exposure-bias tables: per-step TF, RO and EB, region summaries, bootstrap intervals.

Inputs are per-document sums and counts laid out as [documents, steps] arrays, so one
bootstrap replicate is a weighted sum over documents (documents drawn with replacement,
as multinomial counts) and all replicates run as one matrix product.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class StepArrays:
    """Per-document, per-step loss sums and counts for one student."""

    tf_sum: np.ndarray  # [D, T] teacher-forced loss at step t (nats)
    tf_count: np.ndarray  # [D, T] 1 where the teacher response has step t
    ro_sum: np.ndarray  # [D, T] summed loss of the student's own samples alive at step t
    ro_count: np.ndarray  # [D, T] number of samples alive at step t


def bootstrap_weights(num_documents: int, replicates: int, seed: int) -> np.ndarray:
    """Multinomial resampling counts of documents, [replicates, documents]."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_documents, np.full(num_documents, 1.0 / num_documents), size=replicates).astype(float)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def _interval(replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: steps no replicate reached
        return np.nanpercentile(replicates, tail, axis=0), np.nanpercentile(replicates, 100 - tail, axis=0)


def step_table(arrays: StepArrays, weights: np.ndarray) -> dict[str, np.ndarray]:
    """TF(t), RO(t), EB(t) = RO(t) - TF(t) with 95% bootstrap intervals, each [T]."""
    tf = _ratio(arrays.tf_sum.sum(0), arrays.tf_count.sum(0))
    ro = _ratio(arrays.ro_sum.sum(0), arrays.ro_count.sum(0))
    tf_rep = _ratio(weights @ arrays.tf_sum, weights @ arrays.tf_count)
    ro_rep = _ratio(weights @ arrays.ro_sum, weights @ arrays.ro_count)
    eb_low, eb_high = _interval(ro_rep - tf_rep)
    tf_low, tf_high = _interval(tf_rep)
    ro_low, ro_high = _interval(ro_rep)
    return {
        "tf": tf, "tf_low": tf_low, "tf_high": tf_high,
        "ro": ro, "ro_low": ro_low, "ro_high": ro_high,
        "eb": ro - tf, "eb_low": eb_low, "eb_high": eb_high,
        "tf_count": arrays.tf_count.sum(0), "ro_count": arrays.ro_count.sum(0),
    }


def region_summary(arrays: StepArrays, mask: np.ndarray, weights: np.ndarray, ro_mask: np.ndarray | None = None) -> dict[str, float]:
    """TF, RO and EB over the (document, step) cells in `mask`, with 95% intervals.

    `ro_mask` selects the RO cells (default: `mask`); the overall summary counts RO steps
    past the end of the teacher response, where no region is defined.
    """
    ro_mask = mask if ro_mask is None else ro_mask
    tf_sum, tf_count = (arrays.tf_sum * mask).sum(1), (arrays.tf_count * mask).sum(1)
    ro_sum, ro_count = (arrays.ro_sum * ro_mask).sum(1), (arrays.ro_count * ro_mask).sum(1)
    tf = float(_ratio(tf_sum.sum(), tf_count.sum()))
    ro = float(_ratio(ro_sum.sum(), ro_count.sum()))
    tf_rep = _ratio(weights @ tf_sum, weights @ tf_count)
    ro_rep = _ratio(weights @ ro_sum, weights @ ro_count)
    eb_low, eb_high = _interval((ro_rep - tf_rep)[:, None])
    tf_low, tf_high = _interval(tf_rep[:, None])
    ro_low, ro_high = _interval(ro_rep[:, None])
    return {
        "tf": tf, "tf_ci": [float(tf_low[0]), float(tf_high[0])],
        "ro": ro, "ro_ci": [float(ro_low[0]), float(ro_high[0])], "eb": ro - tf, "eb_ci": [float(eb_low[0]), float(eb_high[0])],
        "tf_tokens": int(tf_count.sum()), "ro_tokens": int(ro_count.sum()),
    }
