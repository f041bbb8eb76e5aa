"""Risk page: kappa against each proxy with Spearman rho, kappa per region, estimator agreement."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from bganalysis.analysis.figures import label_kappa
from bganalysis.app import data
from bganalysis.app.views.figures import show
from bganalysis.plots import risk


def render(run: Path, names: list[str]) -> None:
    try:
        tokens = data.analysis_table(run, "tokens")
        summary = data.summary(run)
    except data.Missing as error:
        data.show_missing(error)
        return
    positions = risk.positions_of(tokens)
    stamp = (str(run), data.stamp(run / "analysis" / "tokens.parquet"))
    kappa = label_kappa(summary)  # the estimator the regions were labelled by
    st.subheader(f"{kappa[1]} against each proxy")
    show(("proxies", *stamp), lambda plt: risk.plot_kappa_vs_proxies(plt, positions, kappa))
    st.subheader(f"{kappa[1]} per region")
    show(("regions", *stamp), lambda plt: risk.plot_kappa_by_region(plt, positions, kappa))
    st.subheader("Estimator agreement (Spearman rho)")
    st.dataframe(risk.agreement_table(summary), hide_index=True)
    if kappa[0] == "kappa":
        about = f"Monte-Carlo kappa is student-aware, with student {summary.get('kappa_student')}"
    else:
        about = "The Monte-Carlo estimator did not run (analyze --estimators); teacher-only kappa needs no student"
    st.caption(f"{about}; {len(positions)} positions. Proxies are oriented so that larger means riskier.")
