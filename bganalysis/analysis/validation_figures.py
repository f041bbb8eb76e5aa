"""Figures of the lab validation: agreement of Monte-Carlo kappa with the exact kappa against the budget."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bganalysis.plots.style import pyplot, save


def plot_budget_grid(frame: pd.DataFrame, folder: Path, name: str = "rho_vs_budget") -> None:
    """Plot Spearman rho against exact kappa, and Bridge / Garden F1 against true roles, over R for each K.

    `frame` has one row per budget with columns kappa_k, kappa_rollouts, kappa_horizon,
    rho and, when present, bridge_f1 and garden_f1. Writes `name`.png and .svg.
    """
    plt = pyplot()
    panels = [("rho", "Spearman rho vs exact kappa")]
    panels += [(column, f"{column.split('_')[0].capitalize()} F1 vs true roles")
               for column in ("bridge_f1", "garden_f1") if column in frame]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5), squeeze=False)
    rollouts = sorted(frame["kappa_rollouts"].unique())
    for axis, (column, label) in zip(axes[0], panels):
        for k, group in frame.groupby("kappa_k"):
            group = group.sort_values("kappa_rollouts")
            axis.plot(group["kappa_rollouts"], group[column], marker="o", label=f"K = {k}")
        axis.set_xscale("log", base=2)
        axis.set_xticks(rollouts, [str(r) for r in rollouts])
        axis.set_xlabel("rollouts R per action")
        axis.set_ylabel(label)
    axes[0][0].legend()
    figure.suptitle(f"Lab: Monte-Carlo kappa against the truth (H = {int(frame['kappa_horizon'].iloc[0])})")
    figure.tight_layout()
    save(figure, folder, name)
    plt.close(figure)
