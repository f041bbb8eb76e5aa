"""Figures of an analysis: EB per step, EB per region, and per-token kappa maps."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from bganalysis.analysis.labels import KAPPA_ESTIMATORS, estimator_column
from bganalysis.plots.style import REGION_COLOURS, method_colour, pyplot, save

log = logging.getLogger(__name__)


def write_analysis_figures(folder: Path, tokens: pd.DataFrame, steps: pd.DataFrame, summary: dict, heatmap_docs: int) -> None:
    """Write eb_per_step, eb_regions, kappa_map (and kappa_vs_exact on the lab) as PNG and SVG."""
    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    for name, draw in (("eb_per_step", plot_eb_per_step), ("eb_regions", plot_eb_regions)):
        figure = draw(plt, steps if name == "eb_per_step" else summary)
        save(figure, folder, name)
        plt.close(figure)
    first_model = tokens.model.iloc[0]
    positions = tokens[tokens.model == first_model]
    column, _ = label_kappa(summary)
    figure = plot_kappa_map(plt, positions, heatmap_docs, column)
    save(figure, folder, "kappa_map")
    plt.close(figure)
    if "exact_kappa" in positions:
        figure = plot_kappa_vs_exact(plt, positions, summary, column)
        save(figure, folder, "kappa_vs_exact")
        plt.close(figure)
    else:
        for suffix in ("png", "svg"):  # a figure left by an earlier lab analysis in this folder
            (folder / f"kappa_vs_exact.{suffix}").unlink(missing_ok=True)


MIN_DOCUMENTS_PER_STEP = 5
KAPPA_NAMES = {estimator_column(estimator): name for estimator, (_, name) in KAPPA_ESTIMATORS.items()}  # column -> name


def label_kappa(summary: dict) -> tuple[str, str]:
    """Return (column, name) of the kappa estimator whose ranking labelled the regions."""
    estimator = summary.get("labels", {}).get("estimator", "monte_carlo")
    return estimator_column(estimator), KAPPA_ESTIMATORS[estimator][1]


def plot_eb_per_step(plt, steps: pd.DataFrame, window: int | None = None):
    """TF, RO and EB per step, over steps that at least MIN_DOCUMENTS_PER_STEP teacher responses reach.

    With `window`, RO and EB are the windowed variants (the student wrote only the last W tokens).
    """
    suffix = f"_w{window}" if window else ""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, frame in steps.groupby("model", sort=False):
        frame = frame[frame.tf_count >= min(MIN_DOCUMENTS_PER_STEP, frame.tf_count.max())]
        colour = method_colour(model)
        axes[0].plot(frame.step, frame[f"eb{suffix}"], color=colour, label=model)
        axes[0].fill_between(frame.step, frame[f"eb{suffix}_low"], frame[f"eb{suffix}_high"], color=colour, alpha=0.2)
        axes[1].plot(frame.step, frame.tf, color=colour, label=f"{model} TF")
        axes[1].plot(frame.step, frame[f"ro{suffix}"], color=colour, linestyle="--", label=f"{model} RO")
    axes[0].axhline(0, color="black", linewidth=0.8)
    name = f"EB_{window}(t)" if window else "EB(t)"
    axes[0].set(xlabel="decoding step t (tokens)", ylabel=f"{name} = RO - TF (nats/token, 95% CI)",
                title=f"Exposure bias per step{f', window W = {window}' if window else ''} (steps with >= {MIN_DOCUMENTS_PER_STEP} documents)")
    axes[1].set(xlabel="decoding step t (tokens)", ylabel="forward KL loss (nats/token)", title="Teacher-forced (solid) vs own prefixes (dashed)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def plot_eb_regions(plt, summary: dict):
    students = list(summary["students"])
    regions = ["overall", "bridge", "garden"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(students), 1)
    for index, name in enumerate(students):
        entry = summary["students"][name]
        for axis, metric in zip(axes, ("eb", "tf")):
            values = [entry[f"{metric}_{r}"] if entry[f"{metric}_{r}"] is not None else np.nan for r in regions]
            intervals = [entry[f"{metric}_{r}_ci"] for r in regions]
            low = [v - (c[0] if c[0] is not None else v) for v, c in zip(values, intervals)]
            high = [(c[1] if c[1] is not None else v) - v for v, c in zip(values, intervals)]
            x = np.arange(len(regions)) + index * width
            axis.bar(x, values, width, yerr=[low, high], capsize=3, label=name, color=method_colour(name))
    for axis, title in zip(axes, ("Exposure bias by region", "Teacher-forced loss by region")):
        axis.set_xticks(np.arange(len(regions)) + width * (len(students) - 1) / 2, regions)
        axis.set(title=title, ylabel="nats per token (95% bootstrap CI)")
        axis.axhline(0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_kappa_map(plt, positions: pd.DataFrame, max_docs: int, kappa_column: str = "kappa", per_line: int = 24):
    """Tokens laid out as text, each cell coloured by the kappa in `kappa_column`, with the region marked below."""
    doc_ids = list(dict.fromkeys(positions.doc_id))[:max_docs]
    lines = []
    for doc_id in doc_ids:
        doc = positions[positions.doc_id == doc_id].sort_values("position")
        lines.append((f"{doc_id}", None))
        for start in range(0, len(doc), per_line):
            lines.append((None, doc.iloc[start:start + per_line]))
    kappa = positions[kappa_column].to_numpy()
    low, high = np.nanpercentile(kappa, 2), np.nanpercentile(kappa, 98)
    import matplotlib

    colormap = matplotlib.colormaps["magma_r"]
    norm = matplotlib.colors.Normalize(vmin=low, vmax=high if high > low else low + 1)
    figure, axis = plt.subplots(figsize=(13, 0.42 * len(lines) + 1))
    for row, (title, chunk) in enumerate(lines):
        y = len(lines) - row
        if title is not None:
            axis.text(0, y, title, fontsize=9, fontweight="bold", va="center")
            continue
        for column, (_, token) in enumerate(chunk.iterrows()):
            colour = colormap(norm(token[kappa_column]))
            axis.add_patch(matplotlib.patches.Rectangle((column, y - 0.4), 0.95, 0.8, color=colour))
            text = display_token(str(token.token))
            axis.text(column + 0.47, y, text, ha="center", va="center", fontsize=6.5,
                      color="white" if norm(token[kappa_column]) > 0.6 else "black")
            axis.plot([column + 0.05, column + 0.9], [y - 0.45] * 2, color=REGION_COLOURS.get(token.region, "#7f8c8d"), linewidth=2)
    axis.set_xlim(0, per_line)
    axis.set_ylim(0, len(lines) + 1)
    axis.axis("off")
    name = KAPPA_NAMES.get(kappa_column, kappa_column)
    axis.set_title(f"{name} per token (darker = riskier); underline: red = Bridge, green = Garden, grey = unlabelled")
    figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colormap), ax=axis, fraction=0.02, label=f"{name} (nats)")
    return figure


def display_token(text: str, width: int = 7) -> str:
    """Make a token readable in a cell: visible spaces, tabs and newlines, cut with an ellipsis."""
    text = text.replace(" ", "·").replace("\t", "→").replace("\n", "↵")
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_kappa_vs_exact(plt, positions: pd.DataFrame, summary: dict, column: str = "kappa"):
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    for role, frame in positions.groupby("true_role"):
        axis.scatter(frame.exact_kappa, frame[column], s=10, alpha=0.6, label=f"true {role}",
                     color=REGION_COLOURS.get(role, "#7f8c8d"))
    rho = summary["kappa"].get("spearman_vs_exact")
    axis.set(xlabel="exact kappa (nats, dynamic programming)", ylabel=f"{KAPPA_NAMES.get(column, column)} (nats)",
             title=f"Lab: estimate vs exact (Spearman rho = {rho:.3f})" if rho is not None else "Lab: estimate vs exact")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def read_training_logs(students_dir: Path) -> dict[str, list[dict]]:
    """Every student's train_log.jsonl records, by student folder name; empty when none exist."""
    import json

    logs = {}
    for path in sorted(students_dir.glob("*/train_log.jsonl")):
        logs[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return logs


def plot_training_curves(plt, logs: dict[str, list[dict]]):
    """The soft and hard loss parts of each student per optimiser step (log scale)."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for name, records in logs.items():
        steps = [r["step"] for r in records]
        colour = method_colour(name)
        axes[0].plot(steps, [r["hard"] for r in records], color=colour, label=name)
        soft = [r["soft"] if r["soft"] is not None else np.nan for r in records]
        axes[1].plot(steps, soft, color=colour, label=name)
    axes[0].set(xlabel="optimiser step", ylabel="cross-entropy on teacher tokens (nats)", title="Hard loss part")
    axes[1].set(xlabel="optimiser step", ylabel="forward KL to the teacher (nats)", title="Soft loss part (not computed for hard-only)")
    for axis in axes:
        if any(np.nanmax(line.get_ydata(), initial=0) > 0 for line in axis.get_lines()):
            axis.set_yscale("log")  # not on an empty panel: a log axis without positive data raises
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def write_training_curves(folder: Path, students_dir: Path) -> bool:
    """Plot the soft and hard loss parts of every student's train_log.jsonl; False if none exist."""
    logs = read_training_logs(students_dir)
    if not logs:
        return False
    plt = pyplot()
    figure = plot_training_curves(plt, logs)
    save(figure, folder, "training_curves")
    plt.close(figure)
    return True
