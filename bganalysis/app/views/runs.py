"""Runs page: config, students, training curves, EB summary, benchmarks, two students compared."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from bganalysis.analysis.figures import plot_training_curves, read_training_logs
from bganalysis.app import data
from bganalysis.app.views.figures import show

REGIONS = ("overall", "bridge", "garden")


def _interval(value, interval) -> str:
    if value is None:
        return "n/a"
    if not interval or interval[0] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def eb_table(summary: dict) -> pd.DataFrame:
    """One row per student: TF, RO and EB overall, EB on Bridges and Gardens, with 95% intervals."""
    rows = []
    for name, entry in summary["students"].items():
        row = {"student": name}
        for key in ("tf_overall", "ro_overall", "eb_overall", "eb_bridge", "eb_garden"):
            row[key.replace("_", " ") + " (nats/token)"] = _interval(entry.get(key), entry.get(key + "_ci"))
        rows.append(row)
    return pd.DataFrame(rows)


def overview(root_names: list[str], run: Path) -> pd.DataFrame:
    root = run if run.name and root_names == ["."] else run.parent
    rows = []
    for name in root_names:
        folder = (root / name).resolve()
        rows.append({"run": name, "students": len(list((folder / "students").glob("*"))) if (folder / "students").is_dir() else 0,
                     "analysis": (folder / "analysis" / "summary.json").is_file(),
                     "benchmarks": (folder / "eval" / "results.parquet").is_file()})
    return pd.DataFrame(rows)


def render(run: Path, names: list[str]) -> None:
    st.dataframe(overview(names, run), hide_index=True)
    st.header(f"Run: {run.name}")

    config = run / "config.yaml"
    with st.expander("config.yaml", expanded=False):
        st.code(config.read_text() if config.is_file() else "(no config.yaml in this run)", language="yaml")

    st.subheader("Students")
    students = data.students(run)
    if students.empty:
        data.show_missing(data.Missing(f"No students in {run}/students.", f"bganalysis train --out {run} --name NAME"))
    else:
        st.dataframe(students, hide_index=True)
    logs = read_training_logs(run / "students")
    if logs:
        key = ("curves", str(run), tuple(data.stamp(run / "students" / name / "train_log.jsonl") for name in logs))
        show(key, lambda plt: plot_training_curves(plt, logs))

    st.subheader("Exposure bias (95% bootstrap intervals over documents)")
    try:
        summary = data.summary(run)
    except data.Missing as error:
        data.show_missing(error)
        summary = None
    if summary is not None:
        st.dataframe(eb_table(summary), hide_index=True)

    st.subheader("Benchmarks")
    try:
        results = data.results(run)
        st.dataframe(results.pivot_table(index=["suite", "benchmark", "metric"], columns="model", values="value").reset_index(),
                     hide_index=True)
    except data.Missing as error:
        data.show_missing(error)
        results = None

    if summary is not None and len(summary["students"]) >= 2:
        compare(summary, results)


def compare(summary: dict, results: pd.DataFrame | None) -> None:
    """Two students side by side, with the difference B - A."""
    st.subheader("Compare two students")
    names = list(summary["students"])
    left, right = st.columns(2)
    first = left.selectbox("Student A", names, index=0, key="compare_a")
    second = right.selectbox("Student B", names, index=1, key="compare_b")
    rows = []
    if first == second:
        st.info("Pick two different students to compare.")
        return
    for key in ("tf_overall", "ro_overall", "eb_overall", "eb_bridge", "eb_garden", "tf_bridge", "tf_garden"):
        a, b = summary["students"][first].get(key), summary["students"][second].get(key)
        rows.append({"metric": key.replace("_", " ") + " (nats/token)", first: a, second: b,
                     "B - A": None if a is None or b is None else b - a})
    if results is not None:
        scores = results[results.model.isin([first, second])].pivot_table(
            index=["benchmark", "metric"], columns="model", values="value")
        for (benchmark, metric), values in scores.iterrows():
            a, b = values.get(first), values.get(second)
            rows.append({"metric": f"{benchmark} {metric} (score)", first: a, second: b,
                         "B - A": None if pd.isna(a) or pd.isna(b) else b - a})
    st.dataframe(pd.DataFrame(rows), hide_index=True)
