"""Agreement between risk estimators: pairwise rho and Bridge/Garden overlaps, by hand and in summary.json."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from bganalysis.analysis.agreement import estimator_agreement, estimator_scores, jaccard
from bganalysis.analysis.pipeline import AnalyzeConfig, run_analysis
from bganalysis.lab import lab_tokenizer
from tests.helpers import tiny_llama


def _positions(kappa, teacher_only, entropy):
    n = len(kappa)
    return pd.DataFrame({"doc_id": ["d"] * n, "position": range(n), "kappa": kappa, "teacher_only_kappa": teacher_only,
                         "teacher_entropy": entropy})


def test_jaccard_by_hand():
    a = pd.Series(["bridge", "bridge", "", "garden"])
    b = pd.Series(["bridge", "", "bridge", "garden"])
    assert jaccard(a, b, "bridge") == pytest.approx(1 / 3)
    assert jaccard(a, b, "garden") == 1.0
    assert math.isnan(jaccard(a, b, "other"))


def test_entropy_proxy_oriented_as_risk():
    positions = _positions([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.5, 0.2, 0.1])
    scores = estimator_scores(positions)
    assert scores["teacher_entropy"].tolist() == [-0.5, -0.2, -0.1]


def test_identical_and_reversed_estimators():
    kappa = np.arange(10.0)
    # teacher-only equals kappa; -entropy is the reverse ranking, so entropy = kappa.
    positions = _positions(kappa, kappa * 2, kappa)
    result = estimator_agreement(positions, "kappa", 0.3, 0.3, "document")

    same = result["pairs"]["kappa|teacher_only"]
    assert same["spearman"] == pytest.approx(1.0)
    assert same["bridge_overlap"] == 1.0
    assert same["garden_overlap"] == 1.0
    reversed_pair = result["pairs"]["kappa|teacher_entropy"]
    assert reversed_pair["spearman"] == pytest.approx(-1.0)
    assert reversed_pair["bridge_overlap"] == 0.0
    assert reversed_pair["garden_overlap"] == 0.0


def test_partial_overlap_by_hand():
    kappa = np.arange(10.0)
    other = kappa.copy()
    other[[9, 6]] = other[[6, 9]]  # swap one Bridge (9) with an unlabelled position (6)
    result = estimator_agreement(_positions(kappa, other, -kappa), "kappa", 0.3, 0.3, "document")
    pair = result["pairs"]["kappa|teacher_only"]
    assert pair["bridge_overlap"] == pytest.approx(2 / 4)  # {7, 8, 9} against {6, 7, 8}
    assert pair["garden_overlap"] == 1.0


def test_summary_has_every_pair_on_lab(tmp_path):
    student = tmp_path / "student"
    tiny_llama(39, seed=3).save_pretrained(student)
    lab_tokenizer().save_pretrained(student)
    run_analysis(AnalyzeConfig(teacher="lab", students=[str(student)], out=str(tmp_path / "run"), num_lab_docs=2,
                               kappa_k=2, kappa_rollouts=2, kappa_horizon=2, ro_samples=1, max_new_tokens=8,
                               bootstrap=20))
    summary = json.loads((tmp_path / "run" / "analysis" / "summary.json").read_text())
    agreement = summary["agreement"]

    names = ["kappa", "teacher_only", "exact", "teacher_pmax", "teacher_margin", "teacher_entropy"]
    assert agreement["estimators"] == names
    assert set(agreement["pairs"]) == {f"{a}|{b}" for a, b in itertools.combinations(names, 2)}
    for pair, values in agreement["pairs"].items():
        assert set(values) == {"spearman", "bridge_overlap", "garden_overlap"}, pair
        assert values["bridge_overlap"] is None or 0.0 <= values["bridge_overlap"] <= 1.0, pair
    assert set(agreement["vs_true_role"]) == set(names)
    assert agreement["vs_true_role"]["exact"]["bridge"]["f1"] is not None
