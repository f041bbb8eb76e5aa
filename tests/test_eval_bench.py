"""`bganalysis bench eval` on a tiny model: both paths run and the JSON line has every key."""

from __future__ import annotations

import json

import pytest

from bganalysis.bench.eval import BenchSize, run_bench
from tests.eval_helpers import DATA, tiny_byte_model

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/benchmarks")


def test_bench_eval_reports_rates_and_ratios(tmp_path):
    tiny_byte_model(tmp_path / "tiny")
    size = BenchSize(items=(("arc_challenge", 2), ("theoremqa", 1), ("humanevalplus", 1)), max_new_tokens=4)
    result = run_bench(str(tmp_path / "tiny"), str(DATA), str(tmp_path / "out"), size)
    assert set(result["benchmarks"]) == {"arc_challenge", "theoremqa", "humanevalplus"}
    for entry in result["benchmarks"].values():
        assert entry["items_per_second"] > 0 and entry["ours_seconds"] > 0 and entry["direct_seconds"] > 0
    assert result["ratio_lm_eval"] > 0 and result["ratio_evalplus"] > 0
    assert json.loads((tmp_path / "out" / "bench_eval.json").read_text()) == result
