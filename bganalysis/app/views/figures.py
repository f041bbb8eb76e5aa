"""Matplotlib figures drawn by the shared plot code, cached as PNG bytes per run and selection."""

from __future__ import annotations

import streamlit as st

from bganalysis.plots.style import figure_bytes, pyplot


@st.cache_data(show_spinner=False, max_entries=128)
def _png(key: tuple, _draw) -> bytes:
    plt = pyplot()
    figure = _draw(plt)
    png = figure_bytes(figure)
    plt.close(figure)
    return png


def show(key: tuple, draw) -> None:
    """Show `draw(plt)` as an image; the PNG is cached under `key` (run, file stamps, selection)."""
    st.image(_png(key, draw), width="stretch")
