"""Entry script of the explorer: `streamlit run bganalysis/app/main.py` (what `bganalysis app` runs).

The sidebar picks the page and the run; the query string (`?page=...&run=...&doc=...&pos=...`)
sets them on load, so every view has a URL. RUNS_DIR comes from the BGANALYSIS_RUNS_DIR
environment variable that `bganalysis app` sets.
"""

from __future__ import annotations

import streamlit as st

from bganalysis.app import data
from bganalysis.app.views import benchmarks, exposure, risk, runs, token_map

PAGES = {
    "Runs": runs.render,
    "Token map": token_map.render,
    "Exposure bias": exposure.render,
    "Risk": risk.render,
    "Benchmarks": benchmarks.render,
}


def _index(options: list[str], requested: str | None) -> int:
    return options.index(requested) if requested in options else 0


def main() -> None:
    st.set_page_config(page_title="bganalysis explorer", layout="wide")
    root = data.runs_root()
    params = st.query_params
    page = st.sidebar.radio("Page", list(PAGES), index=_index(list(PAGES), params.get("page")), key="page")
    st.title(page)

    names = data.list_runs(root)
    if not names:
        st.info(f"No runs in {root}. Make one with:\n\n`bganalysis demo --out {root}/demo`")
        return
    requested = params.get("run")
    if requested is not None and requested not in names:
        try:
            data.resolve_run(root, requested)
        except ValueError as error:
            st.error(f"Rejected: {error}.")
            return
    name = st.sidebar.selectbox("Run", names, index=_index(names, requested), key="run")
    st.query_params.update({"page": page, "run": name})
    st.sidebar.caption(f"RUNS_DIR: {root}")
    PAGES[page](data.resolve_run(root, name), names)


main()
