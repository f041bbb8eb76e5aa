"""`bganalysis report RUN`: benchmark deltas against a baseline next to exposure bias."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bganalysis.cli import main
from tests.eval_helpers import DATA, tiny_byte_model

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/benchmarks")


def _summary(run, students: dict) -> None:
    """analysis/summary.json in the shape `bganalysis analyze` writes (only the fields report reads)."""
    entries = {name: {key: value for region, value in eb.items()
                      for key, value in ((f"eb_{region}", value), (f"eb_{region}_ci", [value - 0.1, value + 0.1]))}
               for name, eb in students.items()}
    (run / "analysis").mkdir(parents=True)
    (run / "analysis" / "summary.json").write_text(json.dumps({"students": entries}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for seed, name in enumerate(("hard", "soft")):
        tiny_byte_model(run / "students" / name, seed=seed)
    assert main(["eval", "--suite", "code", "--model", str(run), "--data-dir", str(DATA), "--limit", "2",
                 "--max-new-tokens", "8"]) == 0
    _summary(run, {"hard": {"overall": 1.0, "bridge": 0.8, "garden": 1.2},
                   "soft": {"overall": 0.9, "bridge": 1.1, "garden": 0.7}})
    return run


def test_report_joins_deltas_and_exposure_bias(run, capsys):
    assert main(["report", str(run), "--baseline", "hard"]) == 0
    table = pd.read_parquet(run / "eval" / "decomposition.parquet").set_index("student")
    results = pd.read_parquet(run / "eval" / "results.parquet").set_index(["model", "benchmark", "metric"]).value
    expected = results["soft", "mbppplus", "pass@1_plus"] - results["hard", "mbppplus", "pass@1_plus"]
    assert table.loc["soft", "delta:mbppplus/pass@1_plus"] == pytest.approx(expected)
    assert (table.loc["hard", [c for c in table.columns if c.startswith("delta:")]] == 0).all()
    assert table.loc["soft", "eb_garden"] == 0.7 and table.loc["soft", "eb_bridge_high"] == pytest.approx(1.2)
    printed = capsys.readouterr().out
    assert "| soft |" in printed and "EB Bridge" in printed
    assert (run / "figures" / "eval_decomposition.png").stat().st_size > 1000


def test_unknown_baseline_is_one_line(run, capsys):
    assert main(["report", str(run), "--baseline", "nobody"]) == 2
    assert "--baseline 'nobody'" in capsys.readouterr().err


def test_missing_analysis_is_one_line(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    pd.DataFrame({"model": ["a"]}).to_parquet(tmp_path / "eval" / "results.parquet")
    assert main(["report", str(tmp_path)]) == 2
    assert "summary.json not found" in capsys.readouterr().err
