"""The benchmark decomposition: benchmark deltas against a reference student next to Bridge / Garden EB.

Reads the results table of `eval/results.parquet`: one row per (model, suite, benchmark,
metric) with columns value, stderr, n, suite_version and settings_hash.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bganalysis.plots.style import method_colour

RESULT_COLUMNS = ["model", "suite", "benchmark", "metric", "value", "stderr", "n", "suite_version", "settings_hash"]


def benchmark_deltas(results: pd.DataFrame, reference: str) -> pd.DataFrame:
    """value - reference value per (benchmark, metric) for every other model, with a combined stderr."""
    keys = ["suite", "benchmark", "metric"]
    base = results[results.model == reference].set_index(keys)[["value", "stderr"]]
    others = results[results.model != reference].join(base, on=keys, rsuffix="_reference", how="inner")
    others = others.assign(delta=others.value - others.value_reference,
                           delta_stderr=np.sqrt(others.stderr.fillna(0) ** 2 + others.stderr_reference.fillna(0) ** 2))
    return others[["model", *keys, "delta", "delta_stderr"]].reset_index(drop=True)


def plot_decomposition(plt, results: pd.DataFrame, summary: dict | None, reference: str):
    """Left: benchmark deltas against `reference` (+-1 stderr). Right: EB on Bridges and Gardens (95% CI)."""
    deltas = benchmark_deltas(results, reference)
    deltas["label"] = deltas.benchmark + " / " + deltas.metric
    labels = list(dict.fromkeys(deltas.label))
    models = list(dict.fromkeys(deltas.model))
    students = summary.get("students", {}) if summary else {}
    panels = 2 if students else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 0.45 * max(len(labels), 4) + 1.5), squeeze=False)
    axis = axes[0][0]
    height = 0.8 / max(len(models), 1)
    for index, model in enumerate(models):
        frame = deltas[deltas.model == model].set_index("label").reindex(labels)
        axis.barh(np.arange(len(labels)) + index * height, frame.delta, height, xerr=frame.delta_stderr,
                  color=method_colour(model), label=model, capsize=2)
    axis.set_yticks(np.arange(len(labels)) + height * (len(models) - 1) / 2, labels)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.invert_yaxis()
    axis.set(xlabel=f"score minus {reference} (metric units, +-1 stderr)", title=f"Benchmarks against {reference}")
    axis.legend(fontsize=8)
    if students:
        plot_region_eb(axes[0][1], students, [reference, *models])
    figure.tight_layout()
    return figure


def plot_region_eb(axis, students: dict, order: list[str]) -> None:
    """Bridge and Garden EB of each student, 95% bootstrap intervals, on one axis."""
    names = [name for name in order if name in students] + [name for name in students if name not in order]
    for row, region in enumerate(("bridge", "garden")):
        for index, name in enumerate(names):
            entry = students[name]
            value, interval = entry.get(f"eb_{region}"), entry.get(f"eb_{region}_ci") or [None, None]
            if value is None:
                continue
            low = value - (interval[0] if interval[0] is not None else value)
            high = (interval[1] if interval[1] is not None else value) - value
            y = row + (index - (len(names) - 1) / 2) * 0.8 / max(len(names), 1)
            axis.errorbar(value, y, xerr=[[low], [high]], fmt="o", color=method_colour(name), capsize=3,
                          label=name if row == 0 else None)
    axis.set_yticks([0, 1], ["Bridge", "Garden"])
    axis.invert_yaxis()
    axis.set(xlabel="EB = RO - TF (nats/token, 95% CI)", title="Exposure bias by region")
    axis.legend(fontsize=8)
