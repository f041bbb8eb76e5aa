"""Exposure bias page: TF, RO and EB per step with 95% bands, windowed variants, per region."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from bganalysis.analysis.figures import plot_eb_per_step
from bganalysis.app import data
from bganalysis.app.views.figures import show
from bganalysis.app.views.runs import eb_table
from bganalysis.plots.risk import plot_eb_per_region_step


def render(run: Path, names: list[str]) -> None:
    try:
        steps = data.analysis_table(run, "steps")
        summary = data.summary(run)
    except data.Missing as error:
        data.show_missing(error)
        return
    models = list(dict.fromkeys(steps.model))
    chosen = st.multiselect("Students", models, default=models, key="eb_students")
    if not chosen:
        st.info("Choose at least one student.")
        return
    windows = summary.get("settings", {}).get("windows", [])
    options = ["full rollout"] + [f"window W = {w}" for w in windows]
    choice = st.radio("Own prefix", options, key="eb_window", horizontal=True,
                      help="Windowed EB: the teacher writes up to t - W, the student the last W tokens.")
    window = windows[options.index(choice) - 1] if choice != "full rollout" else None
    if not windows:
        st.caption("No windowed variants in this run; add them with `--windows 1,3,5` to `bganalysis analyze`.")

    stamp = data.stamp(run / "analysis" / "steps.parquet")
    selected = steps[steps.model.isin(chosen)]
    show(("eb_steps", str(run), stamp, tuple(chosen), window), lambda plt: plot_eb_per_step(plt, selected, window))

    st.subheader("Summary by region (95% bootstrap intervals)")
    chosen_summary = {**summary, "students": {name: summary["students"][name] for name in chosen if name in summary["students"]}}
    st.dataframe(eb_table(chosen_summary), hide_index=True)

    st.subheader("EB per step on Bridge and Garden positions")
    try:
        tokens = data.analysis_table(run, "tokens")
    except data.Missing as error:
        data.show_missing(error)
        return
    selected_tokens = tokens[tokens.model.isin(chosen)]
    token_stamp = data.stamp(run / "analysis" / "tokens.parquet")
    show(("eb_region_steps", str(run), token_stamp, tuple(chosen)), lambda plt: plot_eb_per_region_step(plt, selected_tokens))
    st.caption("Mean over documents of the per-token RO minus TF loss at positions of each region; steps that "
               "fewer than 5 documents reach are left out.")
