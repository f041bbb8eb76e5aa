"""One look for every figure: the seaborn theme, a fixed colour per supervision method, saving.

Colours are fixed per method name, not assigned in plotting order, so the hybrid student
is the same colour in every figure, every run and the explorer. A student whose name is
not a known method takes the colour of the longest known method its name starts with
(`hybrid_lam0.3` is drawn as hybrid); any other name gets a colour chosen by a hash of
the name from a spare palette, so it too is stable across figures.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

# Seaborn's colour-blind palette; Bridge red and Garden green are kept for regions only.
METHOD_COLOURS = {
    "teacher": "#222222",
    "hard": "#0173b2",
    "soft": "#de8f05",
    "hybrid": "#cc78bc",
    "hard_argmax": "#ca9161",
}
SPARE_COLOURS = ["#56b4e9", "#949494", "#fbafe4", "#ece133", "#029e73", "#d55e00"]
REGION_COLOURS = {"bridge": "#c0392b", "garden": "#27ae60", "": "#7f8c8d"}
REGION_NAMES = {"bridge": "Bridge", "garden": "Garden", "": "unlabelled"}
DPI = 130


def method_colour(name: str) -> str:
    """The colour of a student (or "teacher") by its supervision method name."""
    if name in METHOD_COLOURS:
        return METHOD_COLOURS[name]
    prefixes = [method for method in METHOD_COLOURS if name.startswith(method)]
    if prefixes:
        return METHOD_COLOURS[max(prefixes, key=len)]
    digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
    return SPARE_COLOURS[digest % len(SPARE_COLOURS)]


def pyplot():
    """matplotlib.pyplot on the Agg backend with the shared seaborn theme applied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt


def figure_bytes(figure, suffix: str = "png") -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix, dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def save(figure, folder: Path, name: str) -> None:
    """Write `folder/name.png` and `folder/name.svg` atomically."""
    from bganalysis.io import atomic_write_bytes

    for suffix in ("png", "svg"):
        atomic_write_bytes(folder / f"{name}.{suffix}", figure_bytes(figure, suffix))
