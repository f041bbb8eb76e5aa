"""Benchmark deltas against a baseline student, next to exposure bias (`bganalysis report RUN`).

Joins RUN/eval/results.parquet (from `bganalysis eval --model RUN`) with
RUN/analysis/summary.json (from `bganalysis analyze`): one row per student with each
benchmark metric minus the baseline student's, and EB overall / Bridge / Garden with
their 95% intervals. Writes RUN/eval/decomposition.parquet, RUN/eval/decomposition.md
and RUN/figures/eval_decomposition.{png,svg}. A delta is not called significant here:
the benchmark standard errors are in results.parquet for that judgement.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from bganalysis.errors import UserError
from bganalysis.io import atomic_write_parquet, atomic_write_text

EB_KEYS = ("eb_overall", "eb_bridge", "eb_garden")


def load_inputs(run: Path) -> tuple[pd.DataFrame, dict]:
    results, summary = run / "eval" / "results.parquet", run / "analysis" / "summary.json"
    if not results.is_file():
        raise UserError(f"{results} not found; run `bganalysis eval --model {run}` first")
    if not summary.is_file():
        raise UserError(f"{summary} not found; run `bganalysis analyze ... --out {run}` first")
    return pd.read_parquet(results), json.loads(summary.read_text())["students"]


def decomposition(results: pd.DataFrame, students: dict, baseline: str) -> pd.DataFrame:
    """One row per student measured by both: `delta:<benchmark>/<metric>` columns and EB columns."""
    common = [name for name in students if name in set(results.model)]
    if baseline not in common:
        raise UserError(f"--baseline {baseline!r} is not a student with both benchmark results and an analysis; "
                        f"choose one of {', '.join(common) or '(none: evaluate and analyse the same students)'}")
    values = results.pivot_table(index="model", columns=["benchmark", "metric"], values="value", aggfunc="last")
    rows = []
    for name in common:
        row = {"student": name}
        for (benchmark, metric), value in values.loc[name].items():
            row[f"delta:{benchmark}/{metric}"] = value - values.loc[baseline, (benchmark, metric)]
        for key in EB_KEYS:
            interval = students[name].get(f"{key}_ci") or [None, None]
            row[key], row[f"{key}_low"], row[f"{key}_high"] = students[name].get(key), interval[0], interval[1]
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, baseline: str) -> str:
    deltas = [column for column in table.columns if column.startswith("delta:")]
    header = ["student"] + [column.removeprefix("delta:") for column in deltas] + ["EB overall", "EB Bridge", "EB Garden"]
    lines = [f"Benchmark deltas against **{baseline}** (metric minus the baseline's); exposure bias in nats/token "
             "with 95% intervals.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [row.student] + [_signed(row[column]) for column in deltas]
        cells += [_interval(row[key], row[f"{key}_low"], row[f"{key}_high"]) for key in EB_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"


def _interval(value, low, high) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if low is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def plot(table: pd.DataFrame, baseline: str):
    """Left: benchmark deltas per student; right: EB overall, Bridge, Garden per student."""
    from bganalysis.plots.style import method_colour, pyplot

    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    deltas = [column for column in table.columns if column.startswith("delta:")]
    width = 0.8 / max(len(table), 1)
    for i, (_, row) in enumerate(table.iterrows()):
        positions = [j + i * width for j in range(len(deltas))]
        colour = method_colour(row.student)
        left.bar(positions, [row[column] for column in deltas], width, label=row.student, color=colour)
        eb = [row[key] if row[key] is not None else float("nan") for key in EB_KEYS]
        errors = [[max(value - (row[f"{key}_low"] if row[f"{key}_low"] is not None else value), 0) for value, key in zip(eb, EB_KEYS)],
                  [max((row[f"{key}_high"] if row[f"{key}_high"] is not None else value) - value, 0) for value, key in zip(eb, EB_KEYS)]]
        right.bar([j + i * width for j in range(3)], eb, width, yerr=errors, capsize=3, label=row.student, color=colour)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(deltas))])
    left.set_xticklabels([column.removeprefix("delta:") for column in deltas], rotation=30, ha="right", fontsize=8)
    left.axhline(0, color="black", linewidth=0.8)
    left.set_ylabel(f"metric minus {baseline}")
    left.set_title("Benchmark deltas")
    right.set_xticks([j + 0.4 - width / 2 for j in range(3)])
    right.set_xticklabels(["overall", "Bridge", "Garden"])
    right.set_ylabel("exposure bias (nats/token)")
    right.set_title("Exposure bias, 95% intervals")
    right.legend(fontsize=8)
    figure.tight_layout()
    return figure


def write_report(run: Path, baseline: str | None) -> tuple[pd.DataFrame, str]:
    """Compute, write and return (table, Markdown)."""
    from bganalysis.plots.style import save

    results, students = load_inputs(run)
    baseline = baseline or next((name for name in students if name in set(results.model)), "")
    table = decomposition(results, students, baseline)
    text = markdown(table, baseline)
    atomic_write_parquet(run / "eval" / "decomposition.parquet", table)
    atomic_write_text(run / "eval" / "decomposition.md", text + "\n")
    figure = plot(table, baseline)
    save(figure, run / "figures", "eval_decomposition")
    return table, text
