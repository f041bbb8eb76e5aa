"""Risk figures: kappa against each teacher proxy, kappa per region, estimator agreement, EB per region and step."""

from __future__ import annotations

import math

import pandas as pd
from scipy.stats import spearmanr

from bganalysis.plots.style import REGION_COLOURS, REGION_NAMES, method_colour

PROXY_LABELS = {
    "teacher_entropy": "teacher entropy (nats)",
    "teacher_pmax": "teacher p_max (probability)",
    "teacher_margin": "teacher top-1 minus top-2 probability",
    "teacher_only_kappa": "teacher-only counterfactual kappa (nats)",
}


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rho, NaN when either side is constant or there are fewer than 3 points."""
    keep = a.notna() & b.notna()
    a, b = a[keep], b[keep]
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def positions_of(tokens: pd.DataFrame) -> pd.DataFrame:
    """One row per (document, position): kappa and the proxies do not depend on the student."""
    return tokens[tokens.model == tokens.model.iloc[0]]


def plot_kappa_vs_proxies(plt, positions: pd.DataFrame, kappa: tuple[str, str] = ("kappa", "Monte-Carlo kappa")):
    """Plot the `kappa` estimator (column, name) against each proxy and the other estimator, coloured by region."""
    column, name = kappa
    proxies = [proxy for proxy in PROXY_LABELS
               if proxy != column and proxy in positions and positions[proxy].notna().any()]
    columns = 2
    rows = -(-len(proxies) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(10, 3.6 * rows), sharey=True, squeeze=False)
    for axis in axes.flat[len(proxies):]:
        axis.set_visible(False)
    for axis, proxy in zip(axes.flat, proxies):
        for region, frame in positions.groupby("region"):
            axis.scatter(frame[proxy], frame[column], s=8, alpha=0.5, color=REGION_COLOURS.get(region, "#7f8c8d"),
                         label=REGION_NAMES.get(region, region))
        axis.set(xlabel=PROXY_LABELS[proxy], title=f"Spearman rho = {spearman(positions[proxy], positions[column]):.3f}")
    for axis in axes[:, 0]:
        axis.set_ylabel(f"{name} (nats)")
    axes[0][0].legend(fontsize=8, title="region")
    figure.tight_layout()
    return figure


def plot_kappa_by_region(plt, positions: pd.DataFrame, kappa: tuple[str, str] = ("kappa", "Monte-Carlo kappa")):
    """Plot the `kappa` estimator (column, name) per assigned region, and per true role on the lab, as boxes."""
    kappa_column, name = kappa
    import seaborn as sns

    groups = [("region", "assigned region (by kappa rank)")]
    if "true_role" in positions:
        groups.append(("true_role", "true role (lab)"))
    figure, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), sharey=True, squeeze=False)
    for axis, (column, label) in zip(axes[0], groups):
        frame = positions.assign(group=positions[column].map(lambda value: REGION_NAMES.get(value, value)))
        order = [name for name in ("Bridge", "unlabelled", "Garden") if name in set(frame.group)]
        order += sorted(set(frame.group) - set(order))
        palette = {REGION_NAMES.get(key, key): colour for key, colour in REGION_COLOURS.items()}
        sns.boxplot(data=frame, x="group", y=kappa_column, order=order, hue="group", palette=palette, ax=axis,
                    fliersize=2, legend=False)
        axis.set(xlabel=label, ylabel=f"{name} (nats)" if axis is axes[0][0] else "")
    figure.tight_layout()
    return figure


def agreement_table(summary: dict) -> pd.DataFrame:
    """Spearman rho of every estimator and proxy against Monte-Carlo kappa and, on the lab, exact kappa."""
    kappa = summary.get("kappa", {})
    rows = []
    entries = {"Monte-Carlo kappa": {"spearman_vs_exact": kappa.get("spearman_vs_exact"), "spearman_vs_kappa": 1.0},
               "teacher-only kappa": kappa.get("teacher_only", {}),
               **{f"proxy: {name}": entry for name, entry in kappa.get("proxies", {}).items()}}
    if summary.get("labels", {}).get("estimator", "monte_carlo") != "monte_carlo":
        del entries["Monte-Carlo kappa"]  # not run: spearman_vs_exact above is the labelling estimator's
    for name, entry in entries.items():
        rows.append({"estimator": name, "rho vs Monte-Carlo kappa": entry.get("spearman_vs_kappa"),
                     "rho vs exact kappa": entry.get("spearman_vs_exact")})
    table = pd.DataFrame(rows)
    return table.dropna(axis=1, how="all")


def plot_estimator_agreement(plt, summary: dict):
    table = agreement_table(summary).set_index("estimator").astype(float)
    figure, axis = plt.subplots(figsize=(7, 0.5 * len(table) + 1.5))
    table.plot.barh(ax=axis, color=["#0173b2", "#949494"][: table.shape[1]])
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set(xlabel="Spearman rho (rank agreement, -1 to 1)", ylabel="", title="Estimator agreement")
    axis.invert_yaxis()
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    return figure


def region_step_table(tokens: pd.DataFrame) -> pd.DataFrame:
    """Mean TF, RO and EB per (model, region, step) from the per-token losses; no intervals."""
    frame = tokens.assign(eb_loss=tokens.ro_loss - tokens.tf_loss)
    table = frame.groupby(["model", "region", "position"], sort=False).agg(
        tf=("tf_loss", "mean"), ro=("ro_loss", "mean"), eb=("eb_loss", "mean"), documents=("doc_id", "size"))
    return table.reset_index().rename(columns={"position": "step"})


def plot_eb_per_region_step(plt, tokens: pd.DataFrame, min_documents: int = 5):
    """EB per step for each model, one panel per region (Bridge, Garden)."""
    table = region_step_table(tokens)
    regions = [region for region in ("bridge", "garden") if region in set(table.region)]
    figure, axes = plt.subplots(1, max(len(regions), 1), figsize=(5.5 * max(len(regions), 1), 3.8), sharey=True, squeeze=False)
    for axis, region in zip(axes[0], regions):
        for model, frame in table[(table.region == region) & (table.documents >= min_documents)].groupby("model", sort=False):
            frame = frame.sort_values("step")
            axis.plot(frame.step, frame.eb, color=method_colour(model), label=model, marker=".", markersize=4)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set(xlabel="decoding step t (tokens)", title=f"{REGION_NAMES[region]} positions (>= {min_documents} documents)")
    axes[0][0].set_ylabel("EB(t) = RO - TF (nats/token)")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    return figure
