"""Find runs under RUNS_DIR and read their tables, cached, with a plain message for what is missing.

Only folders below RUNS_DIR are read: a run name is resolved (links followed) and must lie
inside RUNS_DIR, so `..` or a link that leads elsewhere is rejected. Tables are cached with
`st.cache_data` keyed by path and modification time, so a rewritten file is read again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import streamlit as st

from bganalysis.app import RUNS_DIR_VARIABLE

RUN_MARKERS = ("analysis", "students", "eval", "config.yaml", "report.md")


class Missing(Exception):
    """A file a page needs is absent or unreadable: what is missing, and the command that makes it."""

    def __init__(self, what: str, command: str):
        super().__init__(what)
        self.what = what
        self.command = command


def show_missing(error: Missing) -> None:
    st.warning(f"{error.what} Make it with:\n\n`{error.command}`")


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_DIR_VARIABLE, "runs")).resolve()


def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).exists() for marker in RUN_MARKERS)


def inside(root: Path, path: Path) -> bool:
    resolved = path.resolve()
    return resolved == root or resolved.is_relative_to(root)


def list_runs(root: Path) -> list[str]:
    """Names of the runs in `root` ("." when root is itself a run); links leading outside are skipped."""
    if not root.is_dir():
        return []
    names = ["."] if is_run(root) else []
    for child in sorted(root.iterdir()):
        if not child.name.startswith(".") and inside(root, child) and is_run(child):
            names.append(child.name)
    return names


def resolve_run(root: Path, name: str) -> Path:
    """The folder of run `name`; ValueError when it is not a run inside `root`."""
    path = (root / name).resolve()
    if not inside(root, path):
        raise ValueError(f"run {name!r} is outside {root}; only runs inside RUNS_DIR can be opened")
    if not is_run(path):
        raise ValueError(f"run {name!r} not found in {root}")
    return path


def analyze_command(run: Path) -> str:
    students = sorted(path.name for path in (run / "students").glob("*") if path.is_dir()) if (run / "students").is_dir() else []
    student_flags = " ".join(f"--student {run}/students/{name}" for name in students) or "--student STUDENT_DIR"
    teacher = f"{run}/teacher" if (run / "teacher").is_dir() else "TEACHER"
    return f"bganalysis analyze --teacher {teacher} {student_flags} --out {run}"


def stamp(path: Path) -> float:
    return path.stat().st_mtime_ns if path.exists() else 0


@st.cache_data(show_spinner=False, max_entries=64)
def _read_parquet(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_parquet(path)


@st.cache_data(show_spinner=False, max_entries=64)
def _read_json(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


def _read(path: Path, reader, command: str):
    if not path.is_file():
        raise Missing(f"{path} not found.", command)
    try:
        return reader(str(path), stamp(path))
    except Exception as error:  # pyarrow and json raise many types for a damaged file
        raise Missing(f"{path} cannot be read ({type(error).__name__}); the file is damaged.", command) from None


def analysis_table(run: Path, name: str) -> pd.DataFrame:
    """analysis/<name>.parquet of `run` (tokens or steps)."""
    return _read(run / "analysis" / f"{name}.parquet", _read_parquet, analyze_command(run))


def summary(run: Path) -> dict:
    return _read(run / "analysis" / "summary.json", _read_json, analyze_command(run))


def results(run: Path) -> pd.DataFrame:
    """eval/results.parquet: one row per (model, suite, benchmark, metric)."""
    return _read(run / "eval" / "results.parquet", _read_parquet, eval_command(run))


def eval_command(run: Path) -> str:
    return f"bganalysis eval --suite reasoning --model {run}"  # a run folder means all its students; out: RUN/eval


@st.cache_data(show_spinner=False, max_entries=256)
def _document_rows(path: str, mtime: float, doc_id: str) -> pd.DataFrame:
    frame = pd.read_parquet(path, filters=[("doc_id", "==", doc_id)])
    if "position" in frame:  # a stable sort keeps the models in the analysis' order at each position
        frame = frame.sort_values("position", kind="stable").reset_index(drop=True)
    return frame


def document(run: Path, doc_id: str, name: str = "tokens") -> pd.DataFrame:
    """The rows of one document in analysis/<name>.parquet, all models, read with a row filter."""
    if name == "tokens":
        command = analyze_command(run)
    else:
        command = f"rm -r {run}/analysis/shards && " + analyze_command(run)  # older shards lack these details
    return _read(run / "analysis" / f"{name}.parquet", lambda p, m: _document_rows(p, m, doc_id), command)


@st.cache_data(show_spinner=False, max_entries=64)
def _document_ids(path: str, mtime: float) -> list[str]:
    return list(dict.fromkeys(pd.read_parquet(path, columns=["doc_id"]).doc_id))


def document_ids(run: Path) -> list[str]:
    return _read(run / "analysis" / "tokens.parquet", _document_ids, analyze_command(run))


def students(run: Path) -> pd.DataFrame:
    """One row per student folder: name and its training settings from train_config.yaml."""
    import yaml

    rows = []
    for folder in sorted((run / "students").glob("*")) if (run / "students").is_dir() else []:
        config_path = folder / "train_config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        config = config if isinstance(config, dict) else {}
        rows.append({"student": folder.name, **{key: config.get(key) for key in
                     ("method", "lam", "hard_target", "divergence", "weight_scheme", "steps", "batch_size", "seed")}})
    return pd.DataFrame(rows)
