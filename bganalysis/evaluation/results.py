"""The result cache, `results.parquet`, per-sample outputs and the Markdown table.

Layout under the output folder:

    cache/<model hash>/<benchmark>-<settings hash>.json   one finished benchmark (metrics, settings)
    samples/<model>/<benchmark>-<settings hash>.parquet   per-sample prompt, generation, extracted, correct
    results.parquet                                       one row per (model, benchmark, metric)
    results.md                                            the table printed at the end

A cache entry is written last and atomically, so it marks a finished benchmark: a run
that stops midway resumes at the first benchmark without one.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd

from bganalysis.io import atomic_write_json, atomic_write_parquet, atomic_write_text

COLUMNS = ["model", "suite", "benchmark", "metric", "value", "stderr", "n", "suite_version", "settings_hash"]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    def __init__(self, out: Path):
        self.out = Path(out)

    def _entry_path(self, model_hash: str, benchmark: str, shash: str) -> Path:
        return self.out / "cache" / model_hash / f"{benchmark}-{shash}.json"

    def samples_path(self, model: str, benchmark: str, shash: str) -> Path:
        return self.out / "samples" / model / f"{benchmark}-{shash}.parquet"

    def get(self, model_hash: str, benchmark: str, shash: str) -> dict | None:
        path = self._entry_path(model_hash, benchmark, shash)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, entry: dict, samples: pd.DataFrame) -> None:
        """Store one finished benchmark: samples first, the cache entry last."""
        atomic_write_parquet(self.samples_path(entry["model"], entry["benchmark"], entry["settings_hash"]), samples)
        atomic_write_json(self._entry_path(entry["model_hash"], entry["benchmark"], entry["settings_hash"]), entry)

    def write_tables(self, entries: list[dict]) -> pd.DataFrame:
        """Merge `entries` into results.parquet (replacing the same model, benchmark, settings); write results.md."""
        new = entry_rows(entries)
        path = self.out / "results.parquet"
        if path.is_file():
            old = pd.read_parquet(path)
            keys = set(zip(new.model, new.benchmark))
            old = old[[(m, b) not in keys for m, b in zip(old.model, old.benchmark)]]
            table = pd.concat([old, new], ignore_index=True) if len(old) else new
        else:
            table = new
        atomic_write_parquet(path, table)
        atomic_write_text(self.out / "results.md", markdown_table(new) + "\n")
        return new


def entry_rows(entries: list[dict]) -> pd.DataFrame:
    rows = [{"model": entry["model"], "suite": entry["suite"], "benchmark": entry["benchmark"], **metric,
             "suite_version": entry["suite_version"], "settings_hash": entry["settings_hash"]}
            for entry in entries for metric in entry["metrics"]]
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown_table(rows: pd.DataFrame) -> str:
    """Benchmarks and metrics down, models across: `value ± stderr (n)`."""
    models = list(dict.fromkeys(rows.model))
    lines = ["| benchmark | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for (benchmark, metric), group in rows.groupby(["benchmark", "metric"], sort=False):
        cells = []
        for model in models:
            match = group[group.model == model]
            cells.append(_cell(match.iloc[0]) if len(match) else "")
        lines.append(f"| {benchmark} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row) -> str:
    stderr = "" if row.stderr is None or math.isnan(row.stderr) else f" ± {row.stderr:.3f}"
    return f"{row.value:.3f}{stderr} (n={int(row.n)})"
