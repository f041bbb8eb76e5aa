"""Benchmarks page: the results table and the decomposition figure (deltas next to Bridge / Garden EB)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from bganalysis.app import data
from bganalysis.app.views.figures import show
from bganalysis.plots.benchmarks import RESULT_COLUMNS, plot_decomposition


def render(run: Path, names: list[str]) -> None:
    try:
        results = data.results(run)
    except data.Missing as error:
        data.show_missing(error)
        return
    missing = [column for column in RESULT_COLUMNS if column not in results]
    if missing:
        data.show_missing(data.Missing(f"{run}/eval/results.parquet lacks the columns {', '.join(missing)}.",
                                       data.eval_command(run)))
        return
    suites = sorted(results.suite.unique())
    chosen = st.multiselect("Suites", suites, default=suites, key="bench_suites")
    table = results[results.suite.isin(chosen)]
    st.dataframe(table, hide_index=True)

    models = list(dict.fromkeys(table.model))
    if len(models) < 2:
        st.info("The decomposition needs results of at least two models.")
        return
    reference = st.selectbox("Reference model (deltas are score minus its score)", models, key="bench_reference")
    try:
        summary = data.summary(run)
    except data.Missing as error:
        data.show_missing(error)
        summary = None
    key = ("decomposition", str(run), data.stamp(run / "eval" / "results.parquet"), tuple(chosen), reference)
    show(key, lambda plt: plot_decomposition(plt, table, summary, reference))
