"""Token map page: one document's tokens coloured by kappa, region, entropy or loss, and one token's details."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from bganalysis.app import data
from bganalysis.app.token_html import COLOUR_MODES, divergence_html, token_map_html
from bganalysis.plots.style import REGION_NAMES


# Catches clicks on the token links (a.tok, data-pos) anywhere in the page and sends the position
# to Python as a trigger value, so selecting a token reruns the script instead of reloading the page.
# One listener per page: later mounts only replace the function it calls.
CLICK_JS = """
export default function(component) {
  const state = window.__bganalysisTokenClicks || (window.__bganalysisTokenClicks = {});
  state.send = component.setTriggerValue;
  if (state.listening) return;
  state.listening = true;
  document.addEventListener("click", (event) => {
    const link = event.target.closest ? event.target.closest("a.tok") : null;
    if (!link || !state.send) return;
    event.preventDefault();
    state.send("selected", Number(link.dataset.pos));
  }, true);
}
"""
_token_clicks = st.components.v2.component("bganalysis_token_clicks", js=CLICK_JS)


def _index(options: list, requested) -> int:
    return options.index(requested) if requested in options else 0


def _query_int(name: str) -> int | None:
    try:
        return int(st.query_params.get(name))
    except (TypeError, ValueError):
        return None


def render(run: Path, names: list[str]) -> None:
    try:
        doc_ids = data.document_ids(run)
        rows = None
    except data.Missing as error:
        data.show_missing(error)
        doc_ids, rows = [], None
    if doc_ids:
        params = st.query_params
        top = st.columns([2, 2, 3])
        doc = top[0].selectbox("Document", doc_ids, index=_index(doc_ids, params.get("doc")), key="doc")
        rows = data.document(run, doc)
        models = list(dict.fromkeys(rows.model))
        student = top[1].selectbox("Student (loss colour, continuation)", models,
                                   index=_index(models, params.get("student")), key="student")
        modes = list(COLOUR_MODES)
        # A run analysed with --estimators teacher_only has no Monte-Carlo kappa: show the teacher-only one.
        only_teacher = rows.kappa.isna().all() and "teacher_only_kappa" in rows
        default = modes.index("teacher-only kappa") if only_teacher else 0
        requested = params.get("colour")
        index = modes.index(requested) if requested in modes else default
        mode = top[2].radio("Colour by", modes, index=index, key="colour", horizontal=True)
        positions = rows[rows.model == student].reset_index(drop=True)
        show_document(run, doc, student, mode, positions, models)
    from bganalysis.app.views import live

    live.render(run)


def show_document(run: Path, doc: str, student: str, mode: str, positions: pd.DataFrame, models: list[str]) -> None:
    clicked = _token_clicks(key="token_clicks", on_selected_change=lambda: None).selected
    if clicked is not None and 0 <= int(clicked) < len(positions):
        st.session_state["pos"] = int(clicked)
    if st.session_state.get("pos", 0) >= len(positions):
        st.session_state["pos"] = 0  # a shorter document was chosen
    requested = _query_int("pos")
    default = requested if requested is not None and 0 <= requested < len(positions) else 0
    position = st.number_input("Selected position (or click a token)", min_value=0, max_value=len(positions) - 1,
                               value=default, step=1, key="pos")
    query = {"page": "Token map", "run": st.session_state.get("run", "."), "doc": doc, "colour": mode, "student": student}
    st.query_params.update({**query, "pos": str(position)})

    started = time.perf_counter()
    st.markdown(token_map_html(positions, mode, query, position), unsafe_allow_html=True)
    elapsed = time.perf_counter() - started
    st.caption(f"{COLOUR_MODES[mode][2]}. {len(positions)} tokens, drawn in {elapsed * 1000:.0f} ms. "
               "Hover a token for its values; click it to select it.")

    show_details(run, doc, positions.iloc[position], models)
    show_continuation(run, doc, student, positions)


def show_details(run: Path, doc: str, row: pd.Series, models: list[str]) -> None:
    st.subheader(f"Position {row.position}: {row.token!r}")
    cells = st.columns([2, 1, 1, 1, 1])
    if pd.notna(row.kappa) or "teacher_only_kappa" not in row:
        cells[0].metric("kappa ± standard error (nats)", f"{row.kappa:.2f} ± {row.kappa_se:.2f}")
    else:  # analysed with --estimators teacher_only
        cells[0].metric("teacher-only kappa (nats)", f"{row.teacher_only_kappa:.2f}")
    cells[1].metric("region", REGION_NAMES.get(row.region, row.region))
    cells[2].metric("teacher entropy (nats)", f"{row.teacher_entropy:.3f}")
    if "exact_kappa" in row:
        cells[3].metric("exact kappa (lab, nats)", f"{row.exact_kappa:.3f}")
        cells[4].metric("true role (lab)", str(row.true_role))
    else:
        cells[3].metric("teacher p_max", f"{row.teacher_pmax:.3f}")

    left, right = st.columns(2)
    try:
        next_tokens = data.document(run, doc, "next_tokens")
    except data.Missing as error:
        with left:
            st.markdown("**Top next tokens**")
            data.show_missing(error)
        next_tokens = None
    if next_tokens is not None:
        here = next_tokens[next_tokens.position == row.position]
        order = ["teacher", *models]
        here = here.set_index("model").reindex([model for model in order if model in set(here.model)])
        table = {model: [f"{token!r} {prob:.3f}" for token, prob in zip(entry.tokens, entry.probs)]
                 for model, entry in here.iterrows()}
        left.markdown("**Top next tokens (token, probability) on the teacher prefix**")
        left.dataframe(pd.DataFrame(table, index=pd.RangeIndex(1, len(next(iter(table.values()))) + 1, name="rank")))
    with right:
        st.markdown("**Loss-to-go of each forced action** (nats over H states; kappa(a|s) = Q - Q̄)")
        if "action_q" not in row or row.action_q is None:
            data.show_missing(data.Missing("This analysis did not record Q per action.",
                                           f"rm -r {run}/analysis/shards && " + data.analyze_command(run)))
        else:
            st.dataframe(action_table(row, next_tokens), hide_index=True)


def action_table(row: pd.Series, next_tokens: pd.DataFrame | None) -> pd.DataFrame:
    """One row per evaluated action: Q (Monte-Carlo, exact on the lab) and kappa(a|s) where weights are known."""
    # NaN (stored as null) where the Monte-Carlo estimator did not run (`analyze --estimators teacher_only`).
    table = pd.DataFrame({"action": list(row.action_tokens), "Q (Monte-Carlo)": np.array(list(row.action_q), dtype=float)})
    if "exact_action_q" in row and row.exact_action_q is not None:
        table["Q (exact)"] = list(row.exact_action_q)
    if next_tokens is not None:
        teacher = next_tokens[(next_tokens.position == row.position) & (next_tokens.model == "teacher")]
        if len(teacher):
            lookup = dict(zip(teacher.token_ids.iloc[0], teacher.probs.iloc[0]))
            if all(action in lookup for action in row.action_ids):
                weights = np.array([lookup[action] for action in row.action_ids], dtype=float)
                weights /= weights.sum()
                table.insert(1, "teacher weight", weights)
                q = table["Q (Monte-Carlo)"].to_numpy()
                table["kappa(a|s)"] = q - (weights * q).sum()
    return table


def show_continuation(run: Path, doc: str, student: str, positions: pd.DataFrame) -> None:
    st.subheader(f"Teacher-forced text vs {student}'s own continuation")
    try:
        continuations = data.document(run, doc, "continuations")
    except data.Missing as error:
        data.show_missing(error)
        return
    own = continuations[continuations.model == student]
    if own.empty:
        st.info(f"No continuation of {student} was recorded for {doc}.")
        return
    own = own.iloc[0]
    teacher_tokens = positions.token.astype(str).tolist()
    spaced = not any(any(ch.isspace() for ch in token) for token in teacher_tokens)
    diverge_at = int(own.diverge_at)
    left, right = st.columns(2)
    left.markdown("**Teacher response (teacher-forced prefix)**")
    left.markdown(divergence_html(teacher_tokens, diverge_at, spaced), unsafe_allow_html=True)
    right.markdown(f"**{student}'s own continuation from the same prompt**")
    right.markdown(divergence_html(list(own.own_tokens), diverge_at, spaced), unsafe_allow_html=True)
    if diverge_at < 0:
        st.caption("The two texts are identical.")
    else:
        st.caption(f"They diverge at step {diverge_at} (highlighted); later tokens are greyed.")
