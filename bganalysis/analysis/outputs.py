"""Turn per-document results into tokens.parquet, steps.parquet, summary.json and figures."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from bganalysis.analysis.agreement import PROXY_RISK_SCORES, estimator_agreement
from bganalysis.analysis.agreement import spearman as _spearman
from bganalysis.analysis.labels import label_frame, set_agreement
from bganalysis.analysis.statistics import bootstrap_weights, region_summary, step_table
from bganalysis.io import atomic_write_json, atomic_write_parquet
from bganalysis.provenance import provenance

log = logging.getLogger(__name__)



def write_outputs(config, setup, results) -> dict:
    """Aggregate, label, write every table and figure; return the summary."""
    from bganalysis.analysis import figures
    from bganalysis.analysis.pipeline import config_dict, step_arrays

    out = Path(config.out)
    positions = position_frame(setup, results)
    positions["region"], thresholds = label_frame(positions, config.label_column(), config.bridge_fraction,
                                                  config.garden_fraction, config.label_scope)
    if "teacher_only" in config.estimators:
        positions["teacher_only_region"], _ = label_frame(positions, "teacher_only_" + config.label_ranking,
                                                          config.bridge_fraction, config.garden_fraction,
                                                          config.label_scope)
    has_exact = "exact_kappa" in positions
    if has_exact:
        exact_column = "exact_" + config.label_ranking
        positions["exact_region"], _ = label_frame(positions, exact_column, config.bridge_fraction,
                                                   config.garden_fraction, config.label_scope)

    max_steps = max(max(len(r.doc.response_ids) for r in results), config.max_new_tokens)
    weights = bootstrap_weights(len(results), config.bootstrap, config.seed)
    region_masks = _region_masks(positions, results, max_steps)

    step_frames, students = [], {}
    for name in setup.students:
        arrays = step_arrays(results, name, max_steps)
        table = step_table(arrays, weights)
        frame = pd.DataFrame(table)
        frame.insert(0, "step", np.arange(max_steps))
        frame.insert(0, "model", name)
        students[name] = _student_summary(arrays, region_masks, weights)
        for window in config.windows:
            window_arrays = step_arrays(results, name, max_steps, window)
            windowed = step_table(window_arrays, weights)
            for column in ("ro", "eb", "eb_low", "eb_high"):
                metric, _, bound = column.partition("_")
                frame[f"{metric}_w{window}" + (f"_{bound}" if bound else "")] = windowed[column]
            window_summary = _student_summary(window_arrays, region_masks, weights)
            for region in ("overall", "bridge", "garden"):
                students[name][f"eb_w{window}_{region}"] = window_summary[f"eb_{region}"]
                students[name][f"eb_w{window}_{region}_ci"] = window_summary[f"eb_{region}_ci"]
        step_frames.append(frame[(frame.tf_count > 0) | (frame.ro_count > 0)])
    steps = pd.concat(step_frames, ignore_index=True)

    tokens = token_frame(positions, results, setup)
    summary = {
        "settings": config_dict(config),
        "provenance": provenance(),
        "documents": len(results),
        "positions": int(len(positions)),
        "kappa_student": setup.kappa_student,
        "labels": {"estimator": config.label_estimator, "ranking": config.label_ranking, "scope": config.label_scope,
                   "bridge_fraction": config.bridge_fraction, "garden_fraction": config.garden_fraction,
                   "thresholds": thresholds},
        "students": students,
        "kappa": _kappa_summary(positions, has_exact, config.label_column()),
        "agreement": estimator_agreement(positions, config.label_ranking, config.bridge_fraction,
                                         config.garden_fraction, config.label_scope),
    }
    if has_exact:
        summary["kappa_spearman_vs_exact"] = summary["kappa"]["spearman_vs_exact"]
        students[setup.kappa_student]["kappa_spearman_vs_exact"] = summary["kappa_spearman_vs_exact"]

    atomic_write_parquet(out / "analysis" / "tokens.parquet", tokens)
    atomic_write_parquet(out / "analysis" / "steps.parquet", steps)
    atomic_write_json(out / "analysis" / "summary.json", _clean(summary))
    write_detail_tables(out / "analysis", results, setup.tokenizer)
    figures.write_analysis_figures(out / "figures", tokens, steps, summary, config.heatmap_docs)
    log.info("wrote %s", out / "analysis")
    return summary


def position_frame(setup, results) -> pd.DataFrame:
    """Build one row per (document, response position): token, proxies, kappa, lab truth."""
    rows = []
    for result in results:
        for row in result.positions:
            rows.append({"doc_id": result.doc.doc_id, **row})
    frame = pd.DataFrame(rows)
    frame["token"] = [setup.tokenizer.decode([token_id]) for token_id in frame["token_id"]]
    if "action_ids" in frame:
        frame["action_tokens"] = [[setup.tokenizer.decode([i]) for i in ids] for ids in frame["action_ids"]]
    return frame


def write_detail_tables(folder: Path, results, tokenizer) -> None:
    """next_tokens.parquet and continuations.parquet for the explorer (analysis/details.py).

    Results from shards saved before these were kept give no table; a stale one is removed.
    """
    from bganalysis.analysis.details import continuation_frame, next_token_frame

    def decode(token_id):
        return tokenizer.decode([int(token_id)])

    for name, frame in (("next_tokens", next_token_frame(results, decode)),
                        ("continuations", continuation_frame(results, decode))):
        if frame is None:
            (folder / f"{name}.parquet").unlink(missing_ok=True)
        else:
            atomic_write_parquet(folder / f"{name}.parquet", frame)


def token_frame(positions: pd.DataFrame, results, setup) -> pd.DataFrame:
    """Build one row per (document, position, model) with that model's TF and RO losses."""
    frames = []
    for name in setup.students:
        tf, ro = [], []
        for result in results:
            tf.extend(result.tf[name].tolist())
            own = result.ro[name][:, : len(result.doc.response_ids)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # steps every sample ended before
                ro.extend(np.nanmean(own, axis=0).tolist())
            ro.extend([math.nan] * (len(result.doc.response_ids) - own.shape[1]))
        frame = positions.copy()
        frame.insert(0, "model", name)
        frame["kappa_student"] = setup.kappa_student
        frame["tf_loss"] = tf
        frame["ro_loss"] = ro
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _region_masks(positions: pd.DataFrame, results, max_steps: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(TF mask, RO mask) per region over [documents, steps]."""
    shape = (len(results), max_steps)
    masks = {"all": (np.ones(shape), np.ones(shape))}
    for region in ("bridge", "garden"):
        mask = np.zeros(shape)
        for d, result in enumerate(results):
            doc_rows = positions[positions.doc_id == result.doc.doc_id]
            steps = doc_rows.position[doc_rows.region == region].to_numpy()
            mask[d, steps] = 1
        masks[region] = (mask, mask)
    return masks


def _student_summary(arrays, region_masks, weights) -> dict:
    summary = {}
    for region, (tf_mask, ro_mask) in region_masks.items():
        values = region_summary(arrays, tf_mask, weights, ro_mask)
        key = "overall" if region == "all" else region
        summary[f"eb_{key}"] = values["eb"]
        summary[f"eb_{key}_ci"] = values["eb_ci"]
        summary[f"tf_{key}"] = values["tf"]
        summary[f"tf_{key}_ci"] = values["tf_ci"]
        summary[f"ro_{key}"] = values["ro"]
        summary[f"ro_{key}_ci"] = values["ro_ci"]
        summary[f"tokens_{key}"] = {"tf": values["tf_tokens"], "ro": values["ro_tokens"]}
    return summary


def _kappa_summary(positions: pd.DataFrame, has_exact: bool, label_column: str) -> dict:
    """Return the mean Monte-Carlo kappa and se, and each estimator's rho against it and the exact kappa.

    Values of an estimator that did not run are NaN (None in summary.json). The label
    F1 scores are those of `label_column`, the ranking the regions come from.
    """
    summary = {
        "mean": float(positions.kappa.mean()),
        "mean_se": float(positions.kappa_se.mean()),
        "proxies": {},
    }
    for proxy, sign in PROXY_RISK_SCORES.items():
        entry = {"orientation": "risk = " + ("-" if sign < 0 else "+") + proxy,
                 "spearman_vs_kappa": _spearman(sign * positions[proxy], positions.kappa)}
        if has_exact:
            entry["spearman_vs_exact"] = _spearman(sign * positions[proxy], positions.exact_kappa)
        summary["proxies"][proxy] = entry
    teacher_only = {"spearman_vs_kappa": _spearman(positions.teacher_only_kappa, positions.kappa)}
    if has_exact:
        teacher_only["spearman_vs_exact"] = _spearman(positions.teacher_only_kappa, positions.exact_kappa)
    if has_exact and "teacher_only_region" in positions:
        for label in ("bridge", "garden"):
            teacher_only[f"{label}_vs_true_role"] = set_agreement(positions.teacher_only_region, positions.true_role, label)
    summary["teacher_only"] = teacher_only
    if has_exact:
        summary["spearman_vs_exact"] = _spearman(positions[label_column], positions.exact_kappa)
        for label in ("bridge", "garden"):
            summary[f"{label}_vs_exact"] = set_agreement(positions.region, positions.exact_region, label)
            summary[f"{label}_vs_true_role"] = set_agreement(positions.region, positions.true_role, label)
    return summary


def _clean(value):
    """Replace NaN by None so summary.json is strict JSON."""
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
