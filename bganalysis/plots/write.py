"""Write every figure of a run directory as PNG and SVG, then report.md that embeds them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from bganalysis.errors import UserError

log = logging.getLogger(__name__)


def read_analysis(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """tokens, steps and summary of `run`; UserError naming the missing file and the command that makes it."""
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}; pass a folder written by `bganalysis demo` or `bganalysis analyze --out`")
    analysis = run / "analysis"
    tables = {}
    for name in ("tokens.parquet", "steps.parquet", "summary.json"):
        path = analysis / name
        if not path.is_file():
            raise UserError(f"{path} not found; run `bganalysis analyze --teacher T --student S --out {run}` first")
        try:
            tables[name] = json.loads(path.read_text()) if name.endswith(".json") else pd.read_parquet(path)
        except Exception as error:  # pyarrow and json raise several types for a damaged file
            raise UserError(f"{path} cannot be read ({type(error).__name__}: {error}); rerun "
                            f"`bganalysis analyze ... --out {run}` to write it again") from None
    return tables["tokens.parquet"], tables["steps.parquet"], tables["summary.json"]


def read_results(run: Path) -> pd.DataFrame | None:
    """eval/results.parquet of `run`, or None when the run has no benchmark results."""
    path = run / "eval" / "results.parquet"
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as error:
        raise UserError(f"{path} cannot be read ({type(error).__name__}: {error}); rerun the evaluation to write it again") from None


def write_all_figures(run: Path, reference: str | None = None) -> list[str]:
    """Write every figure the run's tables support into run/figures; return their names."""
    from bganalysis.analysis import figures
    from bganalysis.plots import benchmarks, risk
    from bganalysis.plots.style import pyplot, save

    tokens, steps, summary = read_analysis(run)
    results = read_results(run)
    folder = run / "figures"
    heatmap_docs = summary.get("settings", {}).get("heatmap_docs", 4)
    figures.write_analysis_figures(folder, tokens, steps, summary, heatmap_docs)
    written = ["eb_per_step", "eb_regions", "kappa_map"] + (["kappa_vs_exact"] if "exact_kappa" in tokens else [])
    if figures.write_training_curves(folder, run / "students"):
        written.append("training_curves")

    plt = pyplot()
    positions = risk.positions_of(tokens)
    drawings = {
        "eb_region_steps": lambda: risk.plot_eb_per_region_step(plt, tokens),
        "kappa_vs_proxies": lambda: risk.plot_kappa_vs_proxies(plt, positions, figures.label_kappa(summary)),
        "kappa_by_region": lambda: risk.plot_kappa_by_region(plt, positions, figures.label_kappa(summary)),
        "estimator_agreement": lambda: risk.plot_estimator_agreement(plt, summary),
    }
    for window in summary.get("settings", {}).get("windows", []):
        drawings[f"eb_per_step_w{window}"] = lambda window=window: figures.plot_eb_per_step(plt, steps, window)
    if results is not None and len(results):
        reference = reference or str(results.model.iloc[0])
        if reference not in set(results.model):
            raise UserError(f"--reference {reference!r} has no benchmark results; choose one of: {', '.join(sorted(set(results.model)))}")
        drawings["benchmark_decomposition"] = lambda: benchmarks.plot_decomposition(plt, results, summary, reference)
    for name, draw in drawings.items():
        figure = draw()
        save(figure, folder, name)
        plt.close(figure)
        written.append(name)
    log.info("wrote %d figures to %s", len(written), folder)
    return written
