"""The token map's live analysis: type a text, score it with the run's teacher and students."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from bganalysis.app import data
from bganalysis.app.live import analyse_text, live_sources, load_models


def _first_prompt(run: Path) -> str:
    path = run / "prompts.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                return json.loads(line).get("prompt", "")
    return ""


def render(run: Path) -> None:
    with st.expander("Live analysis of a typed text (loads the models once)", expanded=False):
        text = st.text_area("Text (prompt and response)", value=_first_prompt(run), key="live_text")
        if not st.button("Analyse this text", key="live_run"):
            if st.session_state.get("live_result") is not None:
                st.dataframe(st.session_state["live_result"], hide_index=True)
            return
        try:
            teacher_setting = data.summary(run).get("settings", {}).get("teacher")
        except data.Missing:
            teacher_setting = None
        teacher, students = live_sources(run, teacher_setting)
        if teacher is None:
            data.show_missing(data.Missing(f"No teacher model inside {run} (expected {run}/teacher).",
                                           f"copy or save the teacher to {run}/teacher"))
            return
        models = load_models(teacher, tuple(str(path) for path in students))
        result = analyse_text(models, text)
        st.session_state["live_result"] = result
        if result.empty:
            st.info("Type at least two tokens.")
        else:
            st.dataframe(result, hide_index=True)
