"""Run directories for the explorer tests, built by the real pipeline at a tiny size.

`app_runs` (session scope) makes, under one RUNS_DIR:
- `good`: a lab demo run (students, training logs, analysis with windowed EB) plus an
  eval/results.parquet in the evaluation schema;
- `bare`: students and config only, no analysis;
- `broken`: `good` with tokens.parquet overwritten by bytes that are not Parquet;
- `long`: one 2,000-token document, written with the real Parquet writer from `good`'s rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bganalysis.demo import STUDENTS, DemoSize, run_demo
from bganalysis.io import atomic_write_bytes, atomic_write_parquet

TINY = DemoSize(train_steps=5, train_docs=16, batch_size=4, analysis_docs=3, ro_samples=1,
                kappa_k=3, kappa_rollouts=2, kappa_horizon=2, bootstrap=20)
WINDOWS = [1, 2]
LONG_TOKENS = 2000


def _analyse_with_windows(run: Path) -> None:
    from bganalysis.analysis.pipeline import AnalyzeConfig, run_analysis

    students = [str(run / "students" / name) for name in STUDENTS]
    run_analysis(AnalyzeConfig(teacher=str(run / "teacher"), students=students, out=str(run),
                               prompts=str(run / "prompts.jsonl"), ro_samples=1, kappa_k=3, kappa_rollouts=2,
                               kappa_horizon=2, bootstrap=20, windows=WINDOWS, max_new_tokens=24, force=True))


def results_frame(models: list[str]) -> pd.DataFrame:
    """Benchmark results in the evaluation schema: two suites, three benchmarks, every model."""
    rows = []
    for index, model in enumerate(models):
        for suite, benchmark, metric in (("code", "humaneval", "pass@1"), ("code", "mbpp", "pass@1"),
                                         ("reasoning", "arc_challenge", "acc")):
            rows.append({"model": model, "suite": suite, "benchmark": benchmark, "metric": metric,
                         "value": 0.2 + 0.05 * index + 0.01 * len(benchmark), "stderr": 0.02, "n": 164,
                         "suite_version": "1", "settings_hash": "abc123"})
    return pd.DataFrame(rows)


def _long_run(good: Path, folder: Path) -> None:
    """A run whose single document has LONG_TOKENS positions, tiled from `good`'s first document."""
    tokens = pd.read_parquet(good / "analysis" / "tokens.parquet")
    first = tokens[tokens.doc_id == tokens.doc_id.iloc[0]]
    frames = []
    for model, rows in first.groupby("model", sort=False):
        repeats = -(-LONG_TOKENS // len(rows))
        tiled = pd.concat([rows] * repeats, ignore_index=True).iloc[:LONG_TOKENS].copy()
        tiled["position"] = np.arange(LONG_TOKENS)
        tiled["doc_id"] = "long"
        frames.append(tiled)
    shutil.copytree(good / "analysis", folder / "analysis", ignore=shutil.ignore_patterns("shards", "next_tokens*", "continuations*"))
    atomic_write_parquet(folder / "analysis" / "tokens.parquet", pd.concat(frames, ignore_index=True))


@pytest.fixture(scope="session")
def app_runs(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    good = root / "good"
    run_demo(good, TINY)
    _analyse_with_windows(good)
    students = sorted(path.name for path in (good / "students").iterdir())
    atomic_write_parquet(good / "eval" / "results.parquet", results_frame(students))

    bare = root / "bare"
    shutil.copytree(good / "students", bare / "students")
    shutil.copy(good / "config.yaml", bare / "config.yaml")

    broken = root / "broken"
    shutil.copytree(good, broken, ignore=shutil.ignore_patterns("teacher", "shards"))
    atomic_write_bytes(broken / "analysis" / "tokens.parquet", b"this is not a parquet file\n")

    _long_run(good, root / "long")
    torch.set_num_threads(threads)
    return root
